"""A finished run loaded for its analyses (:class:`LoadedRun`: its models, one per task, and its data on the
analysis device, with the head rule every analysis composes by), and what the analyses read of it alike:
feature widths, the CKA minibatches, per-layer TensorBoard scalars.

:class:`LoadedRun` is public API (``cltunnel.LoadedRun``): what a user's analysis receives, and all the
built-in analyses read of a run: ``run.dir``, ``run.models`` (the model after each task) and ``run.model(i)``
(with each task's head), ``run.tasks`` and ``run.data`` (the task data on the device), ``run.batches``,
``run.features``, ``run.accuracy``, the cut at layer k (``run.cut``, ``run.compose``), ``run.probe`` and
``run.cka``, and the scenario's analysis options (``run.options``) and tunnel rule (``run.rule_start``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from cltunnel.config import AnalysesConfig, DataConfig
from cltunnel.data.device import DeviceData, resolve_device
from cltunnel.data.images import ImageData, load_data
from cltunnel.data.scenarios import Task, build_scenario
from cltunnel.measures.probes import ProbeConfig, probe_protocol
from cltunnel.measures.probes import layer_features, train_probes
from cltunnel.measures.similarity import PairedCKA, cka_batches
from cltunnel.measures.tunnel import describe_rule, tunnel_start
from cltunnel.models.layered import LayeredModel
from cltunnel.models.surgery import (compose, extractor_layers, heads_trained_after_their_task, task_heads,
                                     tunnel_layers, with_heads)
from cltunnel.store import finished_tasks
from cltunnel.training.accuracy import predict_accuracy
from cltunnel.training.checkpoints import config_from_checkpoint, load_checkpoint, model_from_checkpoint
from cltunnel.training.tensorboard import open_tensorboard


@dataclass
class LoadedRun:
    """A finished run's models (one per task, as trained) and its data on the analysis device. Analyses take
    a model or a composition through :meth:`model` / :meth:`compose`, which attach each task's head by the
    rule of :func:`cltunnel.models.surgery.task_heads`."""

    run_dir: Path
    models: list[LayeredModel]
    data: DeviceData
    options: AnalysesConfig
    progress: bool = True
    profile: pd.DataFrame | None = None  # tunnel profile of the model after task 1, computed once
    tensorboard: bool = False  # also write per-layer profiles to the run's TensorBoard events
    notices_shown: bool = False  # the profile's notices are printed once per run
    data_config: DataConfig | None = None  # where the run's data came from (the OOD set is read the same way)

    @property
    def n_layers(self) -> int:
        return len(self.models[0].body)

    @property
    def dir(self) -> Path:
        """The run directory (where ``task<t>.pt``, ``config.yaml`` and every analysis's files are)."""
        return self.run_dir

    @property
    def tasks(self) -> list[Task]:
        """The scenario's tasks (classes, training and test rows, head), in training order."""
        return self.data.scenario.tasks

    def task(self, task: int | Task) -> Task:
        return self.tasks[task] if isinstance(task, int) else task

    def rank_rows(self, task: int | Task = 0) -> torch.Tensor:
        """The training rows a task's numerical ranks are taken on: its first ``analyses.rank_samples``, fewer
        where the task has fewer (then the rank caps at their count - 1 whatever the option says)."""
        return self.task(task).train_idx[: self.options.rank_samples]

    def batches(self, task: int | Task = 0, split: str = "test", batch_size: int = 500, rows: torch.Tensor | None = None):
        """(images, labels, rows) batches of a task's rows on the device, unaugmented and in order
        (``split``: ``test`` or ``eval_train``), normalised as the network saw them."""
        return self.data.batches(self.task(task), split, batch_size, rows=rows)

    @torch.no_grad()
    def features(self, model: LayeredModel, task: int | Task = 0, split: str = "test",
                 layers: list[int] | None = None, rows: torch.Tensor | None = None
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Flattened representations of body layers (1-based; default all) on a task's rows, and the labels."""
        layers = layers or list(range(1, len(model.body) + 1))
        return layer_features(model.eval(), self.data, self.task(task), split, layers, rows)

    def cut(self, k: int, index: int = 0) -> tuple[torch.nn.Sequential, torch.nn.Sequential]:
        """The cut at layer k of the model after task ``index``: the extractor (body layers 1..k) and the
        tunnel (k+1..n), each an ``nn.Sequential`` sharing the model's modules."""
        model = self.models[index]
        return (torch.nn.Sequential(*extractor_layers(model, k)), torch.nn.Sequential(*tunnel_layers(model, k)))

    def probe(self, model: LayeredModel, task: int | Task = 0, layers: list[int] | None = None) -> dict[int, float]:
        """Linear-probe test accuracy (in [0, 1]) per body layer of ``model`` on a task, by the scenario's probe
        protocol (``analyses.probe_protocol``, ``analyses.probe``)."""
        return train_probes(model, self.data, self.task(task), layers=layers, cfg=self.probe_config(),
                            progress=self.progress)

    @torch.no_grad()
    def cka(self, a: LayeredModel, b: LayeredModel, task: int | Task = 0, batch_size: int = 500) -> dict[int, float]:
        """Linear CKA between the same body layer of two models on a task's test rows (minibatch unbiased HSIC,
        streamed over :func:`cka_inputs`)."""
        acc = PairedCKA()
        index = task if isinstance(task, int) else task.id
        for x in cka_inputs(self, index, batch_size):
            oa, ob = a.layer_outputs(x), b.layer_outputs(x)
            for k in range(1, self.n_layers + 1):
                acc.add(k, oa[k], ob[k])
        return acc.values()  # type: ignore[return-value]

    def log_profile(self, tag: str, frame: pd.DataFrame) -> None:
        """Per-layer columns of ``frame`` into the run's TensorBoard events (step = layer)."""
        log_profile(self, tag, frame)

    def model(self, index: int) -> LayeredModel:
        """The model after task ``index`` with each task's head (head t from the later of M_t and it)."""
        return with_heads(self.models[index], task_heads(self.models, index))

    def compose(self, first: int, rest: int, x: int) -> LayeredModel:
        """models[first][1:x] + models[rest][x+1:n], with the heads that belong with its top layers."""
        top = rest if x < self.n_layers else first
        return compose(self.models[first], self.models[rest], x, task_heads(self.models, top))

    def head_notices(self) -> list[str]:
        """Where the head rule changes a number compared with 'head t from M_t': tasks whose head the strategy
        kept training after their task."""
        changed = heads_trained_after_their_task(self.models)
        if not changed:
            return []
        tasks = ", ".join(str(t) for t in changed)
        return [f"the strategy kept training old heads (head of task {tasks} changed after its task): each task's "
                "head is taken from the later of the model after that task and the model that supplies the top "
                "layers, so E2+T2 and E1+T2 use M2's heads and equal the accuracy matrix's row 2"]

    @property
    def depth(self) -> int:
        return self.models[0].depth

    def accuracy(self, model: LayeredModel, task: int, exact: bool = False) -> float:
        t = self.data.scenario.tasks[task]
        return predict_accuracy(model, self.data, t, t.test_lossless_idx if exact else None)

    @property
    def exact_rows(self) -> bool:
        return self.data.scenario.data.has_lossy_test_rows

    def probe_config(self) -> ProbeConfig:
        return probe_protocol(self.options.probe_protocol, self.options.probe)

    def rule_start(self, probe_acc: dict[int, float], ranks: dict[int, float] | None = None) -> int:
        """k by the scenario's rule (``analyses.tunnel_rule`` at ``tunnel_threshold``); profiles without ranks
        (OOD probes) fall back to the 'last' rule for the rank rule."""
        rule = self.options.tunnel_rule if ranks or self.options.tunnel_rule != "rank" else "last"
        threshold = self.options.tunnel_threshold if rule == self.options.tunnel_rule else None
        return tunnel_start(probe_acc, threshold, rule, ranks)

    def rule_text(self) -> str:
        return describe_rule(self.options.tunnel_rule, self.options.tunnel_threshold)


def load_run(run_dir: str | Path, device: str = "auto", options: AnalysesConfig | None = None,
             progress: bool = True, data: ImageData | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    done = finished_tasks(run_dir)
    if not done:
        raise FileNotFoundError(f"{run_dir}: no task checkpoints (task<t>.pt); train the scenario first")
    states = [load_checkpoint(run_dir / f"task{t}.pt") for t in done]
    cfg = config_from_checkpoint(states[-1])
    dev = resolve_device(device)
    scenario = build_scenario(cfg, data if data is not None else load_data(cfg))
    models = [model_from_checkpoint(s).to(dev).eval() for s in states]
    return LoadedRun(run_dir, models, DeviceData.create(scenario, dev, augment=False, channels_last=False),
                     options or cfg.analyses, progress, tensorboard=cfg.logging.tensorboard, data_config=cfg.data)


@torch.no_grad()
def layer_widths(model: LayeredModel, data: DeviceData, task: Task) -> dict[int, int]:
    """Features per body layer (flattened), from one small batch."""
    x = next(iter(data.batches(task, "test", 2)))[0]
    return {k: out[0].numel() for k, out in model.eval().layer_outputs(x).items()}


def cka_inputs(run: LoadedRun, task: int, batch_size: int):
    """A task's test rows in the CKA minibatches (:func:`cltunnel.measures.similarity.cka_batches`)."""
    t = run.data.scenario.tasks[task]
    for chunk in cka_batches(len(t.test_idx), batch_size):
        rows = t.test_idx[chunk]
        yield next(iter(run.data.batches(t, "test", len(rows), rows=rows)))[0]


def log_profile(run: LoadedRun, tag: str, frame: pd.DataFrame) -> None:
    """Per-layer columns into the run's TensorBoard events (step = layer), when the run logs there."""
    writer = open_tensorboard(run.run_dir, run.tensorboard)
    if writer is None:
        return
    for column in frame.columns:
        for layer, value in frame[column].items():
            writer.add_scalar(f"{tag}/{column}", float(value), int(layer))
    writer.close()
