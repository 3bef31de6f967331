"""Generative vs discriminative representations under continual learning (thesis chapter 3, E6).

One MLP body (hidden 512, 256, b, 256, 512; b = 8 for MNIST/Fashion-MNIST, 128 for CIFAR-10) for three
models: D (cross-entropy, one 2-way head per task), AE (MSE reconstruction) and VAE (ELBO, the bottleneck
is the latent). All are :class:`LayeredModel` s, so "layer 5" (the penultimate, 512 units) is what the
probes, CKA and surgery of the rest of cltunnel see.

* Protocol 1 (Figure 3.3.2): after each task t a softmax-regression classifier is fitted for task t on the
  penultimate representations and frozen; every classifier's accuracy after every later task measures drift.
* Protocol 2 (Figure 3.3.3): CKA between task t's representations right after task t and after each later task.
* Protocol 3 (Tables 3.3.1, 3.3.2; Figure 3.3.4): train on task 1 only, then fit a classifier per task and one
  10-way classifier on the frozen representations; AE/VAE record reconstruction loss on every task's test
  images while training on task 1.

The classifiers use the probe protocol (Adam, lr 1e-3, batch 512, ``classifier_epochs``). Training is a plain
loop over device tensors (the objectives are not classification, so no Avalanche strategy drives it).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import dataclasses

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from cltunnel.config import ConfigError, RunConfig, register_section
from cltunnel.data.device import DeviceData, resolve_device, task_generator
from cltunnel.data.images import ImageData
from cltunnel.data.scenarios import SplitScenario, Task, build_scenario
from cltunnel.measures.probes import ProbeConfig, fit_probes, layer_features, probe_accuracy
from cltunnel.measures.similarity import cka_batches, minibatch_cka
from cltunnel.models.layered import LayeredModel
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import write_table
from cltunnel.experiments.registry import Protocol, register_protocol
from cltunnel.store import load_run_config, save_run_config, seed_dir, seed_dirs

PENULTIMATE = 5
FINISHED = "protocol3_*.json"  # in a seed directory: written when a model kind has been through protocol 3
REPRESENTATION_KINDS = ("D", "AE", "VAE")
OUTPUTS = {  # what the page says under each figure (the scenario's page)
    "*protocols.png": "Probe accuracy of D/AE/VAE representations under each protocol (thesis ch. 5 baselines).",
    "*recon_unseen.png": "Reconstructions of unseen classes by the generative models.",
}


# ------------------------------------------------------------------------------------ config section
@dataclasses.dataclass
class RepresentationsConfig:
    """``representations:``: discriminative vs generative (AE, VAE) representations (thesis chapter 3)."""

    models: list[str] = dataclasses.field(default_factory=lambda: list(REPRESENTATION_KINDS))
    bottleneck: int | None = None  # default: 8, or 128 for CIFAR-10
    epochs: int = 10  # per task
    lr: float = 1e-3  # Adam
    batch_size: int = 128
    classifier_epochs: int = 30

    def validate(self, cfg: RunConfig) -> None:
        bad = [m for m in self.models if m not in REPRESENTATION_KINDS]
        if bad:
            raise ConfigError(f"representations.models: unknown {bad}; valid: {', '.join(REPRESENTATION_KINDS)}")


# A free-form mapping before cltunnel 0.2: its fingerprint counts only the keys that differ from the defaults, as
# the mapping's did, so runs made then still resume.
register_section("representations", RepresentationsConfig, order=20, listed_when_unset=True, sparse_fingerprint=True)


# Thesis Tables 3.3.1 and 3.3.2 (mean, std), for the reference columns.
THESIS_3_3_1 = {"mnist": {"D": (76.8, 12.0), "AE": (96.8, 5.4), "VAE": (88.9, 6.7)},
                "fashion_mnist": {"D": (74.3, 11.5), "AE": (92.1, 7.2), "VAE": (94.2, 5.5)},
                "cifar10": {"D": (69.2, 6.4), "AE": (80.5, 2.0), "VAE": (78.9, 3.0)}}


THESIS_3_3_2 = {"mnist": {"D": (31.4, 3.1), "AE": (82.9, 2.4), "VAE": (58.6, 5.2)},
                "fashion_mnist": {"D": (36.0, 3.0), "AE": (74.6, 1.6), "VAE": (61.1, 0.9)},
                "cifar10": {"D": (23.3, 2.3), "AE": (44.4, 1.0), "VAE": (37.4, 0.2)}}


# ------------------------------------------------------------------------------------------- models
class GaussianLatent(nn.Module):
    """The VAE bottleneck: a (mu, log-variance) pair; samples while training, the mean otherwise. The KL of
    the last forward pass is kept for the loss."""

    def __init__(self, d_in: int, d_latent: int) -> None:
        super().__init__()
        self.stats = nn.Linear(d_in, 2 * d_latent)
        self.kl = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.stats(x).chunk(2, dim=1)
        self.kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu


def representation_model(kind: str, in_shape: tuple[int, int, int], n_tasks: int, bottleneck: int,
                         hidden: tuple[int, int] = (512, 256)) -> LayeredModel:
    """fc1 512 → fc2 256 → bottleneck → fc4 256 → fc5 512, then the heads: D one 2-way head per task,
    AE/VAE a single reconstruction head "0"."""
    d_in = int(np.prod(in_shape))
    a, b = hidden
    relu = nn.ReLU(inplace=True)
    layers: "OrderedDict[str, nn.Module]" = OrderedDict(
        fc1=nn.Sequential(nn.Flatten(), nn.Linear(d_in, a), relu), fc2=nn.Sequential(nn.Linear(a, b), relu),
        bottleneck=GaussianLatent(b, bottleneck) if kind == "VAE" else nn.Linear(b, bottleneck),
        fc4=nn.Sequential(nn.Linear(bottleneck, b), relu), fc5=nn.Sequential(nn.Linear(b, a), relu))
    heads = {str(t): nn.Linear(a, 2) for t in range(n_tasks)} if kind == "D" else {"0": nn.Linear(a, d_in)}
    return LayeredModel(layers, heads, arch=f"mlp_{kind.lower()}")


def loss_fn(kind: str, model: LayeredModel, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
    if kind == "D":
        return nn.functional.cross_entropy(model(x, task.head), y)
    recon = nn.functional.mse_loss(model(x, 0), x.flatten(1), reduction="none").sum(1).mean()
    return recon + model.body.bottleneck.kl if kind == "VAE" else recon


# ----------------------------------------------------------------------------------------- training
def train_task(kind: str, model: LayeredModel, data: DeviceData, task: Task, rc: RepresentationsConfig, seed: int,
               on_epoch: Any = None, progress: bool = False) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=rc.lr)
    gen = task_generator(data.device, seed, task.id)
    for epoch in tqdm(range(rc.epochs), desc=f"{kind} task {task.id}", disable=not progress, leave=False):
        model.train()
        for x, y, _ in data.batches(task, "train", rc.batch_size, gen):
            loss = loss_fn(kind, model, x, y, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)


@torch.no_grad()
def recon_loss(model: LayeredModel, data: DeviceData, task: Task) -> float:
    """Mean squared reconstruction error (summed over pixels) on a task's test images."""
    model.eval()
    total, n = 0.0, 0
    for x, _, _ in data.batches(task, "test", 1000):
        total += nn.functional.mse_loss(model(x, 0), x.flatten(1), reduction="sum").item()
        n += len(x)
    return total / max(n, 1)


def protocols_1_2(kind: str, data: DeviceData, rc: RepresentationsConfig, seed: int, probe: ProbeConfig,
                  progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train through every task; classifier j's accuracy (%) and CKA of task j's representations after each task i."""
    tasks = data.scenario.tasks
    torch.manual_seed(seed)
    model = representation_model(kind, data.scenario.data.shape, len(tasks), rc.bottleneck).to(data.device)
    classifiers, reference, acc, cka = [], [], np.full((len(tasks),) * 2, np.nan), np.full((len(tasks),) * 2, np.nan)
    for i, task in enumerate(tasks):
        train_task(kind, model, data, task, rc, seed, progress=progress)
        classifiers.append(fit_probes(model, data, task, [PENULTIMATE], probe, progress=False))
        reference.append(penultimate(model, data, task))
        for j in range(i + 1):
            acc[i, j] = 100 * probe_accuracy(model, data, tasks[j], classifiers[j], [PENULTIMATE])[PENULTIMATE]
            cka[i, j] = linear_cka(reference[j], penultimate(model, data, tasks[j]))
    index = [f"after task {i}" for i in range(len(tasks))]
    cols = [f"task {j}" for j in range(len(tasks))]
    return pd.DataFrame(acc, index=index, columns=cols), pd.DataFrame(cka, index=index, columns=cols)


def penultimate(model: LayeredModel, data: DeviceData, task: Task) -> torch.Tensor:
    return layer_features(model, data, task, "test", [PENULTIMATE])[0][PENULTIMATE]


def linear_cka(a: torch.Tensor, b: torch.Tensor, batch: int = 500) -> float:
    """Minibatch linear CKA by the one minibatch rule of every CKA path (similarity.cka_batches)."""
    return minibatch_cka([(a[part], b[part]) for part in cka_batches(len(a), batch)])


def protocol_3(kind: str, data: DeviceData, all_classes: DeviceData, rc: RepresentationsConfig, seed: int, probe: ProbeConfig,
               progress: bool) -> dict[str, Any]:
    """Train on task 1 only; per-task and 10-way classifier accuracy (%) on the frozen representations, and
    (AE/VAE) reconstruction loss on every task's test images after each epoch."""
    tasks = data.scenario.tasks
    torch.manual_seed(seed)
    model = representation_model(kind, data.scenario.data.shape, len(tasks), rc.bottleneck).to(data.device)
    curve: list[list[float]] = []
    record = None
    if kind != "D":
        def record(epoch: int) -> None:
            curve.append([recon_loss(model, data, t) for t in tasks])

        record(0)
    train_task(kind, model, data, tasks[0], rc, seed, record, progress)
    per_task, per_task_exact = zip(*[classifier_accuracy(model, data, t, probe) for t in tasks])
    ten_way, ten_way_exact = classifier_accuracy(model, all_classes, all_classes.scenario.tasks[0], probe)
    out = {"per_task": list(per_task), "avg_per_task": float(np.mean(per_task)), "ten_way": ten_way,
           "recon_curve": curve}
    if data.scenario.data.has_lossy_test_rows:  # CIFAR-10 here: the exact-pixel rows, to compare with the thesis
        out.update(per_task_exact=list(per_task_exact), avg_per_task_exact=float(np.mean(per_task_exact)),
                   ten_way_exact=ten_way_exact, n_exact_rows=len(all_classes.scenario.tasks[0].test_lossless_idx))
    return out


def classifier_accuracy(model: LayeredModel, data: DeviceData, task: Task, probe: ProbeConfig
                        ) -> tuple[float, float]:
    """A softmax-regression classifier on the frozen penultimate representations: its test accuracy (%) on the
    task's test rows and on their exact-pixel subset (NaN where there is none)."""
    classifier = fit_probes(model, data, task, [PENULTIMATE], probe, progress=False)
    acc = probe_accuracy(model, data, task, classifier, [PENULTIMATE])[PENULTIMATE]
    exact = task.exact_rows_accuracy(
        acc, lambda rows: probe_accuracy(model, data, task, classifier, [PENULTIMATE], rows)[PENULTIMATE])
    return 100 * acc, 100 * exact


def run_representations(cfg: RunConfig, seed: int, data: ImageData, progress: bool = True) -> Path:
    """Every model kind through the three protocols for one seed; results beside the run's config."""
    rc = dataclasses.replace(cfg.representations)
    rc.bottleneck = rc.bottleneck or (128 if data.name.startswith("cifar") else 8)
    device = resolve_device(cfg.device)
    run_dir = seed_dir(cfg, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg, seed)
    scenario = build_scenario(cfg, data)
    whole = SplitScenario(data, [_all_classes_task(scenario)], "class", scenario.class_order)
    ddata, dwhole = (DeviceData.create(s, device, augment=False, channels_last=False) for s in (scenario, whole))
    probe = ProbeConfig(epochs=rc.classifier_epochs, seed=seed)
    results: dict[str, Any] = {}
    for kind in rc.models:
        done = run_dir / f"protocol3_{kind}.json"
        if done.exists():  # resume: a finished model kind is not trained again
            continue
        acc, cka = protocols_1_2(kind, ddata, rc, seed, probe, progress)
        acc.to_csv(run_dir / f"protocol1_{kind}.csv")
        cka.to_csv(run_dir / f"protocol2_{kind}.csv")
        results[kind] = protocol_3(kind, ddata, dwhole, rc, seed, probe, progress)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(results[kind]))
        tmp.replace(done)
        print(f"[{cfg.name} seed {seed}] {kind}: protocol 3 avg per-task {results[kind]['avg_per_task']:.1f}%, "
              f"10-way {results[kind]['ten_way']:.1f}%", flush=True)
    return run_dir


def _all_classes_task(scenario: SplitScenario) -> Task:
    train = torch.cat([t.train_idx for t in scenario.tasks]).sort().values
    test = torch.cat([t.test_idx for t in scenario.tasks]).sort().values
    lossless = torch.cat([t.test_lossless_idx for t in scenario.tasks]).sort().values
    n = scenario.data.num_classes
    return Task(0, list(range(n)), train, test, lossless, torch.arange(n), head=0)


# -------------------------------------------------------------------------------------- aggregation
def aggregate_representations(scenario_dir: str | Path) -> str:
    """Tables 3.3.1 and 3.3.2 (mean ± std over seeds, thesis values beside) and Figures 3.3.2-3.3.4."""
    scenario_dir = Path(scenario_dir)
    runs = seed_dirs(scenario_dir, FINISHED)
    if not runs:
        return ""
    dataset = load_run_config(runs[0])["data"]["name"]
    kinds = [k for k in REPRESENTATION_KINDS if all((r / f"protocol3_{k}.json").exists() for r in runs)]
    p3 = {k: [json.loads((r / f"protocol3_{k}.json").read_text()) for r in runs] for k in kinds}
    md = []
    for key, thesis, stem, title in (
            ("avg_per_task", THESIS_3_3_1, "table_3_3_1", "per-task classifiers after training on task 1 only, "
             "average over tasks (Table 3.3.1, %)"),
            ("ten_way", THESIS_3_3_2, "table_3_3_2", "one 10-way classifier after training on task 1 only "
             "(Table 3.3.2, %)")):
        columns = {"cltunnel": key}
        notes = [f"{dataset}, seeds: {[r.name for r in runs]}", "thesis: the published mean ± std"]
        if all(f"{key}_exact" in p for k in kinds for p in p3[k]):
            columns["cltunnel, exact rows"] = f"{key}_exact"
            notes.append(f"exact rows: the {p3[kinds[0]][0]['n_exact_rows']} test images with exact pixels; "
                         "the other column uses every chosen test row (JPEG-decoded ones included, see the README)")
        values = {c: {k: [p[f] for p in p3[k]] for k in kinds} for c, f in columns.items()}
        mean = pd.DataFrame({**{c: [np.mean(v[k]) for k in kinds] for c, v in values.items()},
                             "thesis": [thesis.get(dataset, {}).get(k, (np.nan,))[0] for k in kinds]}, index=kinds)
        std = pd.DataFrame({**{c: [np.std(v[k], ddof=1) if len(runs) > 1 else 0.0 for k in kinds]
                               for c, v in values.items()},
                            "thesis": [thesis.get(dataset, {}).get(k, (np.nan, np.nan))[1] for k in kinds]},
                           index=kinds)
        md.append(write_table(mean, std, len(runs), scenario_dir / f"{scenario_dir.name}_{stem}",
                                     f"{scenario_dir.name}: {title}", notes))
    plot_protocols(scenario_dir, runs, kinds)
    plot_recon(scenario_dir, p3)
    return "\n".join(md)


def plot_protocols(scenario_dir: Path, runs: list[Path], kinds: list[str]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(kinds), figsize=(4 * len(kinds), 6.5), squeeze=False)
    for col, kind in enumerate(kinds):
        for row, (proto, label) in enumerate((("protocol1", "classifier accuracy (%)"), ("protocol2", "CKA to right after"))):
            frames = [pd.read_csv(r / f"{proto}_{kind}.csv", index_col=0) for r in runs]
            mean = sum(f.to_numpy() for f in frames) / len(frames)
            ax = axes[row, col]
            for j in range(mean.shape[1]):
                ax.plot(range(j, mean.shape[0]), mean[j:, j], marker="o", ms=3, label=f"task {j}")
            ax.set(xlabel="after task", ylabel=label, title=f"{kind}")
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=7)
    write_figure(fig, scenario_dir / f"{scenario_dir.name}_protocols.png")


def plot_recon(scenario_dir: Path, p3: dict[str, list[dict[str, Any]]]) -> None:
    kinds = [k for k in p3 if p3[k][0]["recon_curve"]]
    if not kinds:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        curve = np.mean([np.asarray(p["recon_curve"]) for p in p3[kind]], axis=0)
        for t in range(curve.shape[1]):
            ax.plot(curve[:, t], label=f"task {t}" + (" (trained)" if t == 0 else ""))
        ax.set(xlabel="epoch on task 0", ylabel="test reconstruction loss", title=kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    write_figure(fig, scenario_dir / f"{scenario_dir.name}_recon_unseen.png")


def summary(scenario_dir: Path, cfg: RunConfig) -> str:
    """What ``cltunnel run`` prints: Tables 3.3.1 and 3.3.2 over the scenario's seeds."""
    return "\n".join(p.read_text() for p in sorted(scenario_dir.glob(f"{scenario_dir.name}_table_3_3_*.md")))


register_protocol(Protocol("representations", "representations", run_representations, aggregate_representations,
                           FINISHED, summary, trains_model_section=False, outputs=OUTPUTS, place=80))
