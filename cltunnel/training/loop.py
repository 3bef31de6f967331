"""The task-sequence training loop: tasks in order, an accuracy row and a checkpoint after each task.

``runs/<scenario>/seed<k>/`` holds ``config.yaml``, ``task<t>.pt``, ``metrics.json`` and the tables.
Re-running the same command resumes after the last finished task and yields the same numbers as an
uninterrupted run (per-task RNG streams, see :func:`cltunnel.data.device.task_generator`).
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch
from avalanche.training.plugins import AGEMPlugin, ReplayPlugin

from cltunnel.config import RunConfig
from cltunnel.data.device import DeviceData, resolve_device
from cltunnel.data.scenarios import SplitScenario, avalanche_benchmark
from cltunnel.errors import CltunnelError
from cltunnel.models.layered import LayeredModel
from cltunnel.data.images import ImageData
from cltunnel.data.scenarios import build_scenario
from cltunnel.models.zoo import make_model, model_spec
from cltunnel.reports.tables import render
from cltunnel.store import (CAPTURE_NOTES, append_notice, partial_checkpoint_path, save_metrics, save_run_config,
                            seed_dir)
from cltunnel.training.checkpoints import (latest_checkpoint, load_model_state, load_partial_task, load_strategy_state,
                                           save_epoch_checkpoint, save_partial_task, save_task_checkpoint)
from cltunnel.training.accuracy import Evaluation, evaluate_all, evaluate_seen
from cltunnel.training.avalanche_metrics import build_evaluator, close_loggers
from cltunnel.training.history import end_of_task, write_history
from cltunnel.training.plain_state import decode
from cltunnel.training.fast_data import (RunContext, TemperatureCrossEntropy, amp_enabled, capture_mode,
                                         capture_notice, channels_last_enabled)
from cltunnel.training.plugins import (EpochCheckpointPlugin, HistoryPlugin, MemorySeedPlugin,
                                       MidTaskResumePlugin, ProgressPlugin)
from cltunnel.training.plugins.memory_seed import seed_memory
from cltunnel.training.tensorboard import open_tensorboard
from cltunnel.training.strategies import build_strategy


def train_task_sequence(cfg: RunConfig, seed: int, data: ImageData, progress: bool = True,
                        stop_after: int | None = None) -> tuple[Path, bool]:
    """Train (or resume) one seed's tasks; returns its run directory and whether every task is done (then
    ``metrics.json`` and the tables are written). ``stop_after`` ends early (tests of resume)."""
    device = resolve_device(cfg.device)
    scenario = build_scenario(cfg, data)
    run_dir = seed_dir(cfg, seed)
    spec = model_spec(cfg, scenario)
    model = make_model(spec, seed)
    state = latest_checkpoint(run_dir, cfg)
    metrics = _empty_metrics(cfg, seed, scenario, device)
    strategy_state = None
    if state is not None:
        load_model_state(model, state)
        metrics, strategy_state = state["metrics"], state.get("strategy")
    start_task = len(metrics["acc"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg, seed)
    if start_task < len(scenario.tasks):
        _train_tasks(cfg, seed, scenario, model, spec, metrics, run_dir, device, start_task, progress, stop_after,
                     strategy_state)
    finished = len(metrics["acc"]) == len(scenario.tasks)
    if finished:
        save_metrics(run_dir, metrics)
        render(run_dir)
    return run_dir, finished


def _empty_metrics(cfg: RunConfig, seed: int, scenario: SplitScenario, device: torch.device) -> dict[str, Any]:
    lossy = scenario.data.has_lossy_test_rows
    return {"scenario": cfg.name, "seed": seed, "device": str(device), "test_rows": cfg.data.test_rows,
            "classes": [t.classes for t in scenario.tasks], "n_train": [len(t.train_idx) for t in scenario.tasks],
            "n_test": [len(t.test_idx) for t in scenario.tasks],
            "n_test_lossless": [len(t.test_lossless_idx) for t in scenario.tasks] if lossy else None,
            "acc": [], "acc_lossless": [] if lossy else None, "task_seconds": []}


def _train_tasks(cfg: RunConfig, seed: int, scenario: SplitScenario, model: LayeredModel, spec: dict[str, Any],
                 metrics: dict[str, Any], run_dir: Path, device: torch.device, start_task: int, progress: bool,
                 stop_after: int | None, strategy_state: dict[str, Any] | None = None) -> None:
    tcfg = cfg.training
    amp = amp_enabled(tcfg, device)
    ddata = DeviceData.create(scenario, device, tcfg.augment, channels_last_enabled(tcfg, device))
    model.to(device)
    if ddata.channels_last:
        model.to(memory_format=torch.channels_last)
    if tcfg.compile:
        model.body.compile()
    mean, std = scenario.data.channel_stats()
    benchmark = avalanche_benchmark(scenario, mean, std)
    history = metrics.setdefault("history", [])
    resume = MidTaskResumePlugin(tcfg.resume_every, tcfg.epochs, lambda t, done: save_partial_task(
        run_dir, t, done, model, strategy, cfg, extra={"history": history}))
    writer = open_tensorboard(run_dir, cfg.logging.tensorboard)
    curves = HistoryPlugin(history, lambda t: evaluate_seen(model, ddata, t, tcfg.eval_batch_size),
                           cfg.logging.eval_every, writer)
    plugins = [ProgressPlugin(progress), resume, curves, MemorySeedPlugin(seed)]  # the seeds before the memories
    if tcfg.checkpoint_every:
        plugins.append(EpochCheckpointPlugin(
            lambda task, epoch: save_epoch_checkpoint(run_dir, task, epoch, model, spec), tcfg.checkpoint_every))
    evaluator = build_evaluator(cfg.evaluation, run_dir, writer)
    context = RunContext(ddata, seed, amp, capture_mode(tcfg, device), lambda line: _notice(run_dir, line))
    notice = capture_notice(tcfg, device)
    if notice:
        context.notice(notice)
    strategy = build_strategy(cfg.strategy, model, tcfg, TemperatureCrossEntropy(tcfg.temperature), device, plugins,
                              context, evaluator)
    load_strategy_state(strategy, strategy_state)
    rebuild_memories(strategy, benchmark, seed, start_task)
    if start_task == 0 and "acc_init" not in metrics:  # the untrained model on every task: FWT's baseline
        init = evaluate_all(model, ddata, tcfg.eval_batch_size)
        metrics["acc_init"] = init.acc
        metrics["acc_init_lossless"] = init.acc_lossless if metrics["acc_lossless"] is not None else None
    for t in range(start_task, len(scenario.tasks)):
        timer = Timer()
        seed_task(seed, t)
        partial = load_partial_task(run_dir, t, cfg)
        if partial is not None:
            history[:] = decode(partial["extra"].get("history", history), None, None)
        resume.start_task(t, partial, model)
        strategy.train_epochs = tcfg.epochs - resume.epochs_done
        strategy.train(benchmark.train_stream[t], eval_streams=[], reset_optimizer_state=True)
        strategy.train_epochs = tcfg.epochs
        check_finite(model, t)
        if cfg.evaluation.metrics:  # Avalanche's metrics and loggers, on the same device data
            strategy.eval(benchmark.test_stream)
        ev = evaluate_all(model, ddata, tcfg.eval_batch_size)
        end_of_task(history, ev.acc, t, writer)
        metrics["acc"].append(ev.acc)
        if metrics["acc_lossless"] is not None:
            metrics["acc_lossless"].append(ev.acc_lossless)
        metrics["task_seconds"].append(timer.seconds)
        save_task_checkpoint(run_dir, t, model, strategy.optimizer, cfg, seed, metrics, spec, strategy)
        partial_checkpoint_path(run_dir, t).unlink(missing_ok=True)
        write_history(run_dir, history)
        _report(cfg, seed, t, len(scenario.tasks), ev, metrics["task_seconds"])
        if stop_after is not None and t >= stop_after:
            break
    close_loggers(evaluator)
    if writer is not None:
        writer.close()


class Timer:
    """Wall-clock seconds since it was made (a task's training and evaluation)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def _notice(run_dir: Path, line: str) -> None:
    """A training notice (the captured step's decisions): printed, and kept for the run's page."""
    print(line, flush=True)
    append_notice(run_dir / CAPTURE_NOTES, line)


def seed_task(seed: int, task: int) -> None:
    """Each (seed, task) its own RNG streams: torch's, and Python's, which Avalanche's AGEM uses to pick its
    memory (unseeded, two AGEM runs would differ and none could resume exactly)."""
    torch.manual_seed(seed * 10_007 + task)
    random.seed(seed * 10_007 + task)


def rebuild_memories(strategy: Any, benchmark: Any, seed: int, start_task: int) -> None:
    """AGEM's memory and Avalanche's replay buffers are dataset objects with loaders, which have no plain-data
    form; on resume they are filled again for tasks 0..start_task-1 exactly as the first time (same seeds, same
    order), so a resumed run ends with the numbers of one never stopped."""
    memories = [p for p in strategy.plugins if isinstance(p, (AGEMPlugin, ReplayPlugin))]
    if start_task == 0 or not memories:
        return
    seeds = [i for i, p in enumerate(strategy.plugins) if isinstance(p, MemorySeedPlugin)]
    if not seeds or seeds[0] > strategy.plugins.index(memories[0]):
        raise RuntimeError("MemorySeedPlugin must come before the memory plugins, or resume cannot be exact")
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    for task in range(start_task):
        experience = benchmark.train_stream[task]
        for plugin in memories:
            seed_memory(seed, task)
            if isinstance(plugin, AGEMPlugin):
                plugin.update_memory(experience.dataset)
            else:
                plugin.storage_policy.post_adapt(strategy, experience)
    torch.set_rng_state(torch_state)
    random.setstate(python_state)


class TrainingDiverged(CltunnelError, RuntimeError):
    """Parameters became NaN or infinite: the run's numbers would be chance, not a result."""


def check_finite(model: LayeredModel, task: int) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"task {task}: training diverged, {len(bad)} parameter tensors hold NaN/inf (first: {bad[0]}); lower "
            "training.lr or the strategy's regularisation strength (SGD on an EWC penalty diverges once "
            "lr * 2 * ewc_lambda * max Fisher > 2 (1 + momentum))")


def _report(cfg: RunConfig, seed: int, t: int, n_tasks: int, ev: Evaluation, seconds: list[float]) -> None:
    accs = " ".join(f"{100 * a:5.1f}" for a in ev.acc)
    exact = ""
    if any(a == a for a in ev.acc_lossless) and ev.acc_lossless != ev.acc:
        exact = " | exact rows: " + " ".join(f"{100 * a:5.1f}" for a in ev.acc_lossless)
    eta = (n_tasks - t - 1) * sum(seconds) / len(seconds)
    print(f"[{cfg.name} seed {seed}] task {t + 1}/{n_tasks} done in {seconds[-1]:.0f}s | acc per task (%): {accs}"
          f"{exact} | ETA {eta:.0f}s", flush=True)
