"""A run: one scenario, one seed, tasks in sequence, a checkpoint and an accuracy row after each task.

``runs/<scenario>/seed<k>/`` holds ``config.yaml``, ``task<t>.pt``, ``metrics.json`` and the tables.
Re-running the same command resumes after the last finished task and yields the same numbers as an
uninterrupted run (per-task RNG streams, see :func:`cltunnel.training.task_generator`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import tables
from .checkpoints import (latest_checkpoint, load_model_state, load_strategy_state, save_epoch_checkpoint,
                          save_task_checkpoint)
from .config import ErosionConfig, RunConfig
from .data import ImageData, load_dataset
from .errors import CltunnelError
from .models import LayeredModel, build_model
from .scenarios import SplitScenario, avalanche_benchmark, build_scenario
from .strategies import build_strategy
from .training import (DeviceData, EpochCheckpointPlugin, ProgressPlugin, TemperatureCrossEntropy, Timer, amp_enabled,
                       channels_last_enabled, exact_rows_accuracy, predict_accuracy, resolve_device)

log = logging.getLogger("cltunnel")


def load_data(cfg: RunConfig) -> ImageData:
    d = cfg.data
    return load_dataset(d.name, d.root, d.source, d.download, d.cache_dir)


def model_spec(cfg: RunConfig, scenario: SplitScenario) -> dict[str, Any]:
    """Everything needed to rebuild the architecture from a checkpoint alone."""
    return {"name": cfg.model.name, "width": cfg.model.width, "args": dict(cfg.model.args),
            "head_sizes": scenario.head_sizes, "in_shape": list(scenario.data.shape)}


def make_model(spec: dict[str, Any], seed: int) -> LayeredModel:
    torch.manual_seed(seed)
    return build_model(spec["name"], spec["head_sizes"], tuple(spec["in_shape"]), spec["width"], **spec["args"])


@dataclass
class Evaluation:
    acc: list[float]
    acc_lossless: list[float]


def evaluate_all(model: LayeredModel, data: DeviceData, batch_size: int, amp: bool) -> Evaluation:
    """Accuracy on every task's chosen test rows, and on its exact-pixel rows alone."""
    tasks = data.scenario.tasks
    acc = [predict_accuracy(model, data, t, None, batch_size, amp) for t in tasks]
    return Evaluation(acc, [exact_rows_accuracy(model, data, t, a, batch_size, amp) for t, a in zip(tasks, acc)])


def _empty_metrics(cfg: RunConfig, seed: int, scenario: SplitScenario, device: torch.device) -> dict[str, Any]:
    lossy = scenario.data.has_lossy_test_rows
    return {"scenario": cfg.name, "seed": seed, "device": str(device), "test_rows": cfg.data.test_rows,
            "classes": [t.classes for t in scenario.tasks], "n_train": [len(t.train_idx) for t in scenario.tasks],
            "n_test": [len(t.test_idx) for t in scenario.tasks],
            "n_test_lossless": [len(t.test_lossless_idx) for t in scenario.tasks] if lossy else None,
            "acc": [], "acc_lossless": [] if lossy else None, "task_seconds": []}


def saved_protocol(scenario_dir: str | Path) -> tuple[Callable[..., Path], Callable[[Path], str]] | None:
    """``other_protocol`` of the scenario whose seeds were written to ``scenario_dir`` (for ``cltunnel table``)."""
    configs = sorted(Path(scenario_dir).glob(f"seed*/{tables.CONFIG_FILE}"))
    if not configs:
        return None
    raw = tables.load_run_config(configs[0].parent) or {}
    return other_protocol(RunConfig(**{k: raw.get(k) for k in ("representations", "synthetic")},
                                    erosion=ErosionConfig() if raw.get("erosion") else None))


def other_protocol(cfg: RunConfig) -> tuple[Callable[..., Path], Callable[[Path], str]] | None:
    """(run one seed, aggregate the seeds) for scenarios that are not a task sequence, else None."""
    if cfg.erosion is not None:
        from .erosion import aggregate_erosion, run_erosion

        return run_erosion, aggregate_erosion
    if cfg.representations is not None:
        from .representations import aggregate_representations, run_representations

        return run_representations, aggregate_representations
    if cfg.synthetic is not None:
        from .synthetic import aggregate_synthetic, run_synthetic

        return run_synthetic, aggregate_synthetic
    return None


def run_seed(cfg: RunConfig, seed: int, data: ImageData | None = None, progress: bool = True,
             stop_after: int | None = None) -> Path:
    """Train (or resume) one seed; return its run directory. ``stop_after`` ends early (tests of resume)."""
    data = data if data is not None else load_data(cfg)
    protocol = other_protocol(cfg)
    if protocol is not None:
        return protocol[0](cfg, seed, data, progress)
    device = resolve_device(cfg.device)
    scenario = build_scenario(cfg, data)
    run_dir = tables.seed_dir(cfg, seed)
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
    tables.save_run_config(run_dir, cfg, seed)
    if start_task < len(scenario.tasks):
        _train_tasks(cfg, seed, scenario, model, spec, metrics, run_dir, device, start_task, progress, stop_after,
                     strategy_state)
    if len(metrics["acc"]) == len(scenario.tasks):
        (run_dir / tables.METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        tables.render(run_dir)
        if cfg.analyses.run:
            from .experiments import run_analyses

            run_analyses(run_dir, cfg.analyses.run, cfg.device, cfg.analyses, progress, data)
    return run_dir


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
    plugins = [ProgressPlugin(progress)]
    if tcfg.checkpoint_every:
        plugins.append(EpochCheckpointPlugin(
            lambda task, epoch: save_epoch_checkpoint(run_dir, task, epoch, model, spec), tcfg.checkpoint_every))
    strategy = build_strategy(cfg.strategy, model, tcfg, TemperatureCrossEntropy(tcfg.temperature), device, plugins)
    strategy.cltunnel_data, strategy.cltunnel_seed, strategy.cltunnel_amp = ddata, seed, amp
    load_strategy_state(strategy, strategy_state)
    for t in range(start_task, len(scenario.tasks)):
        timer = Timer()
        torch.manual_seed(seed * 10_007 + t)
        strategy.train(benchmark.train_stream[t], eval_streams=[], reset_optimizer_state=True)
        check_finite(model, t)
        ev = evaluate_all(model, ddata, tcfg.eval_batch_size, amp)
        metrics["acc"].append(ev.acc)
        if metrics["acc_lossless"] is not None:
            metrics["acc_lossless"].append(ev.acc_lossless)
        metrics["task_seconds"].append(timer.seconds)
        save_task_checkpoint(run_dir, t, model, strategy.optimizer, cfg, seed, metrics, spec, strategy)
        _report(cfg, seed, t, len(scenario.tasks), ev, metrics["task_seconds"])
        if stop_after is not None and t >= stop_after:
            break


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


def run_scenario(cfg: RunConfig, progress: bool = True) -> Path:
    """Every seed of a scenario, then the mean ± std tables; returns the scenario directory."""
    data = load_data(cfg)
    for seed in cfg.seeds:
        run_seed(cfg, seed, data, progress)
    scenario_dir = Path(cfg.output_dir) / cfg.name
    protocol = other_protocol(cfg)
    if protocol is not None:
        protocol[1](scenario_dir)
        return scenario_dir
    if len(tables.seed_dirs(scenario_dir)) > 1:  # every finished seed so far, also from earlier invocations
        tables.render(scenario_dir)
    if cfg.analyses.run:
        from .experiments import aggregate_seeds

        aggregate_seeds(scenario_dir)
    return scenario_dir
