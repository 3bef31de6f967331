"""Analyses run on a finished run directory: the tunnel (probes, rank), the extractor/tunnel swap table
(thesis Table 5.4.1), layer substitution curves (Figures 5.11.x) and per-layer CKA between M1 and M2.

Each writes CSV (+ markdown/LaTeX for tables) and a PNG into the run directory; :func:`aggregate_seeds`
combines the seeds of a scenario as mean ± std. Entry points: ``analyses:`` in a scenario's YAML (run after
training) and ``cltunnel analyze RUN_DIR``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cltunnel.config import ANALYSIS_NAMES, AnalysesConfig, ConfigError, DataConfig, parse_tunnel_start
from cltunnel.data.device import DeviceData, resolve_device
from cltunnel.data.images import ImageData, load_data, load_dataset, rendered_as
from cltunnel.data.scenarios import SplitScenario, Task, build_scenario
from cltunnel.measures.probes import ProbeConfig, layer_ranks, probe_protocol, rank_cap, train_probes
from cltunnel.measures.similarity import CKAMatrix, PairedCKA, cka_batches
from cltunnel.measures.tunnel import (check_tunnel_start, describe_rule, format_layer, kappa, profile_notices,
                                      rule_starts, tunnel_start)
from cltunnel.models.layered import LayeredModel
from cltunnel.models.surgery import compose, heads_trained_after_their_task, task_heads, with_heads
from cltunnel.reports.figures import pyplot, save_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.store import epoch_checkpoints, finished_tasks, load_metrics, load_run_config
from cltunnel.training.checkpoints import config_from_checkpoint, load_checkpoint, model_from_checkpoint
from cltunnel.training.evaluation import predict_accuracy
from cltunnel.training.history import open_tensorboard


# Thesis Table 5.4.1 (VGG-19, split CIFAR-10 5/5), first and second task accuracy (%).
THESIS_TABLE_5_4_1 = {
    "E1 + T1": (92.04, 56.8), "E1 + T2": (92.5, 58.04), "E2 + T2": (50.84, 93.94), "E2 + T1": (50.66, 93.72),
    "E2 + T1 (FT)": (56.1, None), "E2 (FT)": (74.4, None),
}


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


# ----------------------------------------------------------------------------------------- tunnel
def tunnel_profile(run: LoadedRun, model_index: int = 0, task: int = 0) -> pd.DataFrame:
    """Probe accuracy and numerical rank per body layer of model ``model_index`` on ``task``'s data."""
    if (model_index, task) == (0, 0) and run.profile is not None:
        return run.profile
    model = run.models[model_index]
    t = run.data.scenario.tasks[task]
    acc = train_probes(model, run.data, t, cfg=run.probe_config(), progress=run.progress)
    ranks, variances = layer_ranks(model, run.data, t, t.train_idx[: run.options.rank_samples],
                                   run.options.probe_protocol, run.options.rank_threshold)
    rows = len(t.train_idx[: run.options.rank_samples])
    caps = {k: rank_cap(rows, n) for k, n in layer_widths(model, run.data, t).items()}
    profile = pd.DataFrame({"layer": list(acc), "name": model.layer_names,
                            "probe_acc": [100 * a for a in acc.values()], "rank": [ranks[k] for k in acc],
                            "rank_cap": [caps[k] for k in acc],
                            "intra_class_var": [variances[k][0] for k in acc],
                            "inter_class_var": [variances[k][1] for k in acc]})
    profile = profile.set_index("layer")
    if (model_index, task) == (0, 0):
        run.profile = profile
    return profile


@torch.no_grad()
def layer_widths(model: LayeredModel, data: DeviceData, task: Task) -> dict[int, int]:
    """Features per body layer (flattened), from one small batch."""
    x = next(iter(data.batches(task, "test", 2)))[0]
    return {k: out[0].numel() for k, out in model.eval().layer_outputs(x).items()}


def resolve_tunnel_start(run: LoadedRun) -> tuple[int, pd.DataFrame | None]:
    """From ``analyses.tunnel_start`` (a layer number) or, by default, by ``analyses.tunnel_rule`` from the
    profile of the model after task 1."""
    given = parse_tunnel_start(run.options.tunnel_start, "analyses.tunnel_start")
    if given != "auto":
        return check_tunnel_start(given, run.n_layers, "analyses.tunnel_start"), None
    profile = tunnel_profile(run)
    acc, ranks = profile_series(profile)
    return run.rule_start(acc, ranks), profile


def profile_series(profile: pd.DataFrame) -> tuple[dict[int, float], dict[int, float]]:
    """A tunnel profile's probe accuracies (in [0, 1]) and ranks, layer -> value, as the rules read them."""
    return (profile["probe_acc"] / 100).to_dict(), profile["rank"].to_dict()


def write_tunnel_profile(run: LoadedRun, profile: pd.DataFrame) -> tuple[int, dict[str, int], list[str]]:
    """The profile's CSV, figure and TensorBoard scalars; returns the k the scenario's rule picks, every rule's
    k and the notices on the profile (also printed)."""
    acc, ranks = profile_series(profile)
    starts, chosen = rule_starts(acc, ranks), run.rule_start(acc, ranks)
    notices = profile_notices(acc, starts, run.depth) + rank_cap_notices(profile)
    for notice in notices if not run.notices_shown else []:
        print(f"notice ({run.run_dir}): {notice}", flush=True)
    run.notices_shown = True
    profile.to_csv(run.run_dir / "tunnel_profile.csv")
    log_profile(run, "tunnel_profile", profile[["probe_acc", "rank"]])
    _plot_tunnel(profile, chosen, starts, run.rule_text(), run.depth, run.run_dir / "tunnel_profile.png")
    return chosen, starts, notices


def rank_cap_notices(profile: pd.DataFrame) -> list[str]:
    """Layers whose rank reached what the sampled rows allow (``analyses.rank_samples``)."""
    if "rank_cap" not in profile:
        return []
    capped = [int(k) for k, row in profile.iterrows() if row["rank"] >= row["rank_cap"]]
    if not capped:
        return []
    return [f"the numerical rank reached its cap at layer(s) {', '.join(map(str, capped))} (cap "
            f"{int(profile['rank_cap'].min())}: analyses.rank_samples rows minus one, or the features sampled): "
            "there the rank measures the sample; raise analyses.rank_samples"]


def log_profile(run: LoadedRun, tag: str, frame: pd.DataFrame) -> None:
    """Per-layer columns into the run's TensorBoard events (step = layer), when the run logs there."""
    writer = open_tensorboard(run.run_dir, run.tensorboard)
    if writer is None:
        return
    for column in frame.columns:
        for layer, value in frame[column].items():
            writer.add_scalar(f"{tag}/{column}", float(value), int(layer))
    writer.close()


def _plot_tunnel(profile: pd.DataFrame, start: int, starts: dict[str, int], rule: str, depth: int, path: Path
                 ) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = profile.index.to_numpy()
    ax.plot(x, profile["probe_acc"], marker="o", color="C0", label="linear probe accuracy")
    ax.set_xlabel("layer")
    ax.set_ylabel("probe accuracy (%)", color="C0")
    ax.axvspan(start - 0.5, x.max() + 0.5, color="grey", alpha=0.15, label=f"tunnel from {format_layer(start, depth)}")
    for (name, k), style in zip(starts.items(), (":", "--", "-.")):
        ax.axvline(k, color="k", linestyle=style, linewidth=1, label=f"rule {name}: k={k}")
    ax.set_title(rule, fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, profile["rank"], marker="s", color="C3", label="numerical rank")
    ax2.set_ylabel("numerical rank", color="C3")
    ax.set_xticks(x)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="center right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_per_layer(frame: pd.DataFrame, lines: dict[str, str], start: int, path: Path, **axis: Any) -> None:
    """Columns of a per-layer frame against the layer, the tunnel (from ``start``) shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = frame.index.to_numpy()
    for (column, label), marker in zip(lines.items(), "os"):
        ax.plot(x, frame[column], marker=marker, label=label)
    ax.axvspan(start - 0.5, x.max() + 0.5, color="grey", alpha=0.15, label="tunnel")
    ax.set(xlabel="layer", xticks=x, **axis)
    save_figure(fig, [ax], path)


# ------------------------------------------------------------------------------- out-of-distribution
def ood_data(run: LoadedRun) -> tuple[DeviceData, Task]:
    """The OOD dataset in the run's input format, ``ood_*_per_class`` rows of its chosen classes, normalised
    like the training data (the backbone's input convention, not the OOD set's own statistics)."""
    o = run.options
    source = run.data.scenario.data
    d = run.data_config or DataConfig()  # with data.download: true, torchvision may fetch it (SVHN, CIFAR-100)
    ood = rendered_as(load_dataset(o.ood_data, d.root, download=d.download, cache_dir=d.cache_dir), source.shape)
    classes = o.ood_classes or list(range(min(10, ood.num_classes)))
    if not set(classes) <= set(range(ood.num_classes)):
        raise ConfigError(f"analyses.ood_classes: {classes} not all in 0..{ood.num_classes - 1} ({o.ood_data})")

    def rows(y: torch.Tensor, per_class: int) -> torch.Tensor:
        return torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in classes]).sort().values

    label_map = torch.full((ood.num_classes,), -1, dtype=torch.long)
    label_map[classes] = torch.arange(len(classes))
    test = rows(ood.y_test, o.ood_test_per_class)
    task = Task(0, classes, rows(ood.y_train, o.ood_train_per_class), test, test, label_map, head=0)
    data = DeviceData.create(SplitScenario(ood, [task], "class", classes), run.data.device, augment=False,
                             channels_last=run.data.channels_last)
    data.normalise = run.data.normalise
    return data, task


def ood_profile(run: LoadedRun) -> tuple[pd.DataFrame, float]:
    """Per layer: probe accuracy on the OOD data beside the in-distribution one; and rho (E8) =
    (best OOD accuracy - last layer's) / best: how much of the OOD information the tunnel discards."""
    data, task = ood_data(run)
    acc = train_probes(run.models[0], data, task, cfg=run.probe_config(), progress=run.progress)
    profile = tunnel_profile(run)
    frame = pd.DataFrame({"name": run.models[0].layer_names, "ood_probe_acc": [100 * a for a in acc.values()],
                          "id_probe_acc": profile["probe_acc"].to_numpy()}, index=pd.Index(list(acc), name="layer"))
    best = frame["ood_probe_acc"].max()
    return frame, float((best - frame["ood_probe_acc"].iloc[-1]) / best)


# ------------------------------------------------------------------------------------------ swaps
def swap_table(run: LoadedRun, k: int) -> pd.DataFrame:
    """Table 5.4.1: E_i + T_j with the extractor = layers 1..k; FT rows retrain a head with the probe protocol."""
    if len(run.models) != 2:
        raise ValueError(f"the swap table needs a 2-task run; {run.run_dir} has {len(run.models)} tasks")
    L = run.n_layers
    m2 = run.model(1)
    combos = {"E1 + T1": run.model(0), "E1 + T2": run.compose(0, 1, k), "E2 + T2": m2, "E2 + T1": run.compose(1, 0, k)}
    rows = {name: {"first task": 100 * run.accuracy(m, 0), "second task": 100 * run.accuracy(m, 1)}
            for name, m in combos.items()}
    task0 = run.data.scenario.tasks[0]
    pcfg = run.probe_config()
    ft = train_probes(combos["E2 + T1"], run.data, task0, layers=[L], cfg=pcfg, progress=run.progress)[L]
    probe = train_probes(m2, run.data, task0, layers=[k], cfg=pcfg, progress=run.progress)[k]
    rows["E2 + T1 (FT)"] = {"first task": 100 * ft, "second task": np.nan}
    rows["E2 (FT)"] = {"first task": 100 * probe, "second task": np.nan}
    if run.exact_rows:
        for name, m in combos.items():
            rows[name]["first task (exact rows)"] = 100 * run.accuracy(m, 0, exact=True)
            rows[name]["second task (exact rows)"] = 100 * run.accuracy(m, 1, exact=True)
    return pd.DataFrame(rows).T


# ------------------------------------------------------------------------------------ substitution
def substitution_curves(run: LoadedRun) -> pd.DataFrame:
    """For x in 0..L: M1[1:x]+M2[x+1:L] and M2[1:x]+M1[x+1:L], accuracy on every task with its own head."""
    last = len(run.models) - 1
    rows = []
    for x in range(run.n_layers + 1):
        for direction, model in (("M1[1:x]+M2[x+1:n]", run.compose(0, last, x)),
                                 ("M2[1:x]+M1[x+1:n]", run.compose(last, 0, x))):
            for t in range(len(run.data.scenario.tasks)):
                rows.append({"x": x, "direction": direction, "task": t + 1, "accuracy": 100 * run.accuracy(model, t)})
    return pd.DataFrame(rows)


def plot_substitution(curves: pd.DataFrame, path: Path, title: str = "") -> None:
    """One panel per task: accuracy against the number x of bottom layers taken from the first model."""
    plt = pyplot()
    tasks = sorted(curves["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for direction, group in curves[curves["task"] == t].groupby("direction", sort=False):
            stats = group.groupby("x")["accuracy"].agg(["mean", "std"]).fillna(0)
            ax.plot(stats.index, stats["mean"], marker="o", markersize=3, label=direction)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
        ax.set_title(f"{title} task {t}".strip())
        ax.set_xlabel("x (bottom layers from the first model)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SWAP_ROWS = {"E1 + T1": ("M1[1:x]+M2[x+1:n]", "n"), "E1 + T2": ("M1[1:x]+M2[x+1:n]", "k"),
             "E2 + T2": ("M1[1:x]+M2[x+1:n]", "0"), "E2 + T1": ("M2[1:x]+M1[x+1:n]", "k")}


def swap_vs_k(curves: pd.DataFrame) -> pd.DataFrame:
    """The four non-FT rows of Table 5.4.1 at every tunnel start k, read off one seed's substitution curves:
    E1 + T2 at k is M1[1:k]+M2[k+1:n] and E2 + T1 is M2[1:k]+M1[k+1:n]; E1 + T1 (= M1, x = n) and
    E2 + T2 (= M2, x = 0) do not depend on k. Columns ``<row> / task <t>``; the gaps the thesis reads as
    "the tunnel is task-agnostic" (E1 + T2 - E1 + T1 on task 1, E2 + T1 - E2 + T2 on task 2) beside them."""
    n = int(curves["x"].max())
    at = {(d, t): g.set_index("x")["accuracy"] for (d, t), g in curves.groupby(["direction", "task"])}
    ks = range(n + 1)
    frame = pd.DataFrame(index=pd.Index(ks, name="k"))
    for row, (direction, where) in SWAP_ROWS.items():
        for task in sorted(curves["task"].unique()):
            x = {"n": [n] * len(ks), "0": [0] * len(ks), "k": list(ks)}[where]
            frame[f"{row} / task {task}"] = at[(direction, task)].loc[x].to_numpy()
    frame["E1 + T2 - E1 + T1 (task 1)"] = frame["E1 + T2 / task 1"] - frame["E1 + T1 / task 1"]
    frame["E2 + T1 - E2 + T2 (task 2)"] = frame["E2 + T1 / task 2"] - frame["E2 + T2 / task 2"]
    return frame


def plot_swap_vs_k(mean: pd.DataFrame, std: pd.DataFrame, starts: list[int], path: Path, title: str,
                   rules: dict[str, list[int]] | None = None) -> None:
    """Each non-FT row of Table 5.4.1 on its own task against k, mean ± std over seeds; the tunnel starts
    the runs used are marked (grey), and each rule's k (median over seeds) along the top."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, task, rows in ((axes[0], 1, ("E1 + T1", "E1 + T2")), (axes[1], 2, ("E2 + T2", "E2 + T1"))):
        for row in rows:
            col = f"{row} / task {task}"
            ax.plot(mean.index, mean[col], marker="o", markersize=3, label=row)
            ax.fill_between(mean.index, mean[col] - std[col].fillna(0), mean[col] + std[col].fillna(0), alpha=0.2)
        for k in sorted(set(starts)):
            ax.axvline(k, color="grey", linestyle=":", linewidth=1)
        for (rule, ks), color in zip((rules or {}).items(), ("C2", "C3", "C4")):
            k = float(np.median(ks))
            ax.axvline(k, color=color, linestyle="--", linewidth=1, label=f"rule {rule}: k={k:g}")
        ax.set(title=f"{title}: task {task}", xlabel="k (extractor = layers 1..k)")
    axes[0].set_ylabel("accuracy (%)")
    save_figure(fig, axes, path)


# --------------------------------------------------------------------------------------------- CKA
def cka_inputs(run: LoadedRun, task: int, batch_size: int):
    """A task's test rows in the CKA minibatches (:func:`cltunnel.measures.similarity.cka_batches`)."""
    t = run.data.scenario.tasks[task]
    for chunk in cka_batches(len(t.test_idx), batch_size):
        rows = t.test_idx[chunk]
        yield next(iter(run.data.batches(t, "test", len(rows), rows=rows)))[0]


@torch.no_grad()
def layer_cka_between(run: LoadedRun, a: LayeredModel, b: LayeredModel, task: int, batch_size: int = 500
                      ) -> dict[int, float]:
    """CKA between the same layer of two models on a task's test rows (minibatch unbiased HSIC, streamed)."""
    acc = PairedCKA()
    for x in cka_inputs(run, task, batch_size):
        oa, ob = a.layer_outputs(x), b.layer_outputs(x)
        for k in range(1, run.n_layers + 1):
            acc.add(k, oa[k], ob[k])
    return acc.values()  # type: ignore[return-value]


@torch.no_grad()
def layer_cka_matrix(run: LoadedRun, model_index: int = 0, task: int = 0, batch_size: int = 500) -> pd.DataFrame:
    """CKA between every pair of body layers of one model on a task's test rows (the thesis's heatmaps)."""
    model = run.models[model_index]
    acc = CKAMatrix()
    for x in cka_inputs(run, task, batch_size):
        outs = model.layer_outputs(x)
        acc.add([outs[k] for k in sorted(outs)])
    names = [f"{k} {n}" for k, n in enumerate(model.layer_names, start=1)]
    return pd.DataFrame(acc.matrix().numpy(), index=names, columns=names)


@torch.no_grad()
def cross_cka_matrix(run: LoadedRun, a: LayeredModel, b: LayeredModel, task: int = 0, batch_size: int = 500
                     ) -> pd.DataFrame:
    """CKA between every layer of ``a`` (rows) and every layer of ``b`` (columns) on a task's test rows."""
    acc = CKAMatrix()
    for x in cka_inputs(run, task, batch_size):
        outs = [a.layer_outputs(x), b.layer_outputs(x)]
        acc.add([o[k] for o in outs for k in sorted(o)])
    n = len(a.body)
    full = acc.matrix().numpy()  # both models' layers together; the off-diagonal block is a vs b
    names = [f"{k} {name}" for k, name in enumerate(a.layer_names, start=1)]
    return pd.DataFrame(full[:n, n:], index=names, columns=names)


def plot_cka_matrix(matrix: pd.DataFrame, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
    ticks = range(len(matrix))
    ax.set_xticks(ticks, [str(k + 1) for k in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(k + 1) for k in ticks], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cka_m1_m2(run: LoadedRun) -> pd.DataFrame:
    m1, m2 = run.models[0], run.models[-1]
    cols = {f"task {t + 1} data": layer_cka_between(run, m1, m2, t) for t in range(len(run.data.scenario.tasks))}
    df = pd.DataFrame(cols)
    df.insert(0, "name", m1.layer_names)
    df.index.name = "layer"
    return df


# ------------------------------------------------------------------------------------- development
def tunnel_development(run: LoadedRun, task: int = 0) -> pd.DataFrame:
    """Rank per layer at every saved epoch of ``task`` (and at its end), and each layer's relative weight
    change since the previous checkpoint: how early the tunnel forms (thesis E4). Weight change is over the
    layer's parameters only: BatchNorm's running statistics are buffers, and their drift would dominate."""
    paths = epoch_checkpoints(run.run_dir, task)
    if not paths:
        raise FileNotFoundError(f"{run.run_dir}: no epoch checkpoints; set training.checkpoint_every and retrain")
    t = run.data.scenario.tasks[task]
    rows_idx = t.train_idx[: run.options.rank_samples]
    records, previous = [], None
    for path in tqdm(paths, desc="development", disable=not run.progress, leave=False):
        state = load_checkpoint(path)
        model = model_from_checkpoint(state).to(run.data.device).eval()
        ranks, _ = layer_ranks(model, run.data, t, rows_idx, run.options.probe_protocol, run.options.rank_threshold)
        weights = [layer_parameters(layer) for layer in model.body]
        for k, name in enumerate(model.layer_names, start=1):
            change = np.nan
            if previous is not None:
                now, before = weights[k - 1], previous[k - 1]
                change = float((now - before).norm() / before.norm().clamp_min(1e-12))
            records.append({"epoch": state["epoch"], "layer": k, "name": name,
                            "rank": ranks[k], "weight_change": change})
        previous = weights
    return pd.DataFrame(records)


def layer_parameters(layer: torch.nn.Module) -> torch.Tensor:
    """A layer's parameters as one vector (no buffers)."""
    return torch.cat([p.detach().flatten().float() for p in layer.parameters()])


def plot_development(dev: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    cmap = plt.get_cmap("viridis")
    epochs = sorted(dev["epoch"].unique())
    for i, e in enumerate(epochs):
        d = dev[dev["epoch"] == e]
        color = cmap(i / max(len(epochs) - 1, 1))
        axes[0].plot(d["layer"], d["rank"], color=color, label=f"epoch {e}")
        axes[1].plot(d["layer"], d["weight_change"], color=color)
    axes[0].set_ylabel("numerical rank")
    axes[1].set_ylabel("relative weight change\nsince the last save")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(dev["layer"].unique()))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ driver
def run_analyses(run_dir: str | Path, names: list[str] | None = None, device: str = "auto",
                 options: AnalysesConfig | None = None, progress: bool = True, data: ImageData | None = None,
                 tunnel_start: str | None = None) -> dict[str, Any]:
    """Run the named analyses (default: the scenario's ``analyses.run``, else all) on one run;
    ``tunnel_start`` overrides the configured extractor length."""
    run = load_run(run_dir, device, options, progress, data)
    if tunnel_start is not None:
        run.options = dataclasses.replace(run.options, tunnel_start=tunnel_start)
    wanted = names or run.options.run or list(ANALYSES)
    unknown = [n for n in wanted if n not in ANALYSES]
    if unknown:
        raise ConfigError(f"analyses: unknown {unknown}; valid: {', '.join(ANALYSES)}")
    results: dict[str, Any] = {}
    for name in wanted:
        results[name] = ANALYSES[name](run)
    return results


def _analysis_swap(run: LoadedRun) -> pd.DataFrame:
    k, profile = resolve_tunnel_start(run)
    notices = write_tunnel_profile(run, profile)[2] if profile is not None else []
    for notice in run.head_notices():
        print(f"notice: {notice}", flush=True)
        notices.append(notice)
    df = swap_table(run, k)
    df.attrs["tunnel_start"] = k
    df.to_csv(run.run_dir / "swap_table.csv")
    how = run.rule_text() if profile is not None else "fixed: analyses.tunnel_start"
    write_swap_meta(run, SwapMeta(k, how, notices))
    return df


def _analysis_tunnel(run: LoadedRun) -> pd.DataFrame:
    profile = tunnel_profile(run)
    chosen, starts, notices = write_tunnel_profile(run, profile)
    acc, _ = profile_series(profile)
    lines = [f"{run.rule_text()} (used): {format_layer(chosen, run.depth)}"]
    lines += [f"{describe_rule(rule)}: {format_layer(k, run.depth)}" for rule, k in starts.items()]
    lines += [f"rule 'last' at 0.98: {format_layer(tunnel_start(acc, 0.98, 'last'), run.depth)}",
              f"kappa (eta 0.99): {kappa(acc, run.depth):.3f}", *[f"notice: {n}" for n in notices]]
    (run.run_dir / "tunnel_start.txt").write_text("\n".join(lines) + "\n")
    # intra- and inter-class variance per layer (the thesis's Figure 5.3 style)
    _plot_per_layer(profile, {"intra_class_var": "intra-class variance", "inter_class_var": "inter-class variance"},
                    chosen, run.run_dir / "variance_profile.png", ylabel="variance", yscale="log")
    return profile


def _analysis_ood(run: LoadedRun) -> pd.DataFrame:
    frame, rho = ood_profile(run)
    frame.to_csv(run.run_dir / "ood_probes.csv")
    log_profile(run, "ood_probes", frame[["id_probe_acc", "ood_probe_acc"]])
    start = run.rule_start((frame["id_probe_acc"] / 100).to_dict())
    (run.run_dir / "ood_rho.txt").write_text(f"ood data: {run.options.ood_data}\nrho: {rho:.4f}\n")
    _plot_per_layer(frame, {"id_probe_acc": "in-distribution (task 1)",
                            "ood_probe_acc": f"OOD: {run.options.ood_data} (rho {rho:.2f})"},
                    start, run.run_dir / "ood_probes.png", ylabel="linear probe accuracy (%)")
    return frame


def _analysis_substitution(run: LoadedRun) -> pd.DataFrame:
    curves = substitution_curves(run)
    curves.to_csv(run.run_dir / "substitution.csv", index=False)
    plot_substitution(curves, run.run_dir / "substitution.png", run.run_dir.parent.name)
    return curves


def _analysis_cka(run: LoadedRun) -> pd.DataFrame:
    df = cka_m1_m2(run)
    df.to_csv(run.run_dir / "cka_m1_m2.csv")
    return df


def _analysis_cka_layers(run: LoadedRun) -> list[pd.DataFrame]:
    matrices = []
    for i, model in enumerate(run.models):
        matrix = layer_cka_matrix(run, model_index=i, task=0)
        matrix.to_csv(run.run_dir / f"cka_layers_model{i + 1}.csv")
        plot_cka_matrix(matrix, run.run_dir / f"cka_layers_model{i + 1}.png", f"M{i + 1}, task-1 test data")
        matrices.append(matrix)
    return matrices


def _analysis_development(run: LoadedRun) -> pd.DataFrame:
    dev = tunnel_development(run)
    dev.to_csv(run.run_dir / "development.csv", index=False)
    plot_development(dev, run.run_dir / "development.png")
    return dev


# The names live once, in config.ANALYSIS_NAMES (validated there without importing this module); each
# name's function is ``_analysis_<name>`` above.
ANALYSES: dict[str, Callable[[LoadedRun], Any]] = {name: globals()[f"_analysis_{name}"] for name in ANALYSIS_NAMES}


TABLE_5_2_1_RULES = {">0.95": ("last", 0.95), ">0.98": ("last", 0.98), "peak 0.95": ("peak", 0.95),
                     "rank 0.1": ("rank", 0.10)}


def tunnel_table(root: str | Path) -> str:
    """Table 5.2.1 across every run under ``root`` that has a tunnel profile: architecture, depth, dataset, the
    number of classes the profiled model was trained on (task 1's: fewer classes, longer tunnel) and the tunnel
    start by the thesis's rule at 95 % and 98 % and by the peak and rank rules, as the median over that
    set-up's seeds."""
    rows = []
    for path in sorted(Path(root).rglob("tunnel_profile.csv")):
        cfg = load_run_config(path.parent)
        classes = load_metrics(path.parent)["classes"][0]
        acc, ranks = profile_series(pd.read_csv(path, index_col=0))
        rows.append({"architecture": f"{cfg['model']['name']} (width {cfg['model']['width']:g})",
                     "depth": len(acc) + 1, "dataset": cfg["data"]["name"], "classes": len(classes),
                     **{c: tunnel_start(acc, share, rule, ranks) for c, (rule, share) in TABLE_5_2_1_RULES.items()}})
    if not rows:
        raise FileNotFoundError(f"{root}: no tunnel_profile.csv below it; run the 'tunnel' analysis first")
    runs = pd.DataFrame(rows)
    keys = ["architecture", "depth", "dataset", "classes"]
    table = runs.groupby(keys, sort=False).agg(**{c: (c, "median") for c in TABLE_5_2_1_RULES},
                                               runs=(">0.95", "size")).reset_index()
    for c in TABLE_5_2_1_RULES:
        table[c] = [format_layer(int(round(k)), n) for k, n in zip(table[c], table["depth"])]
    root = Path(root)
    table.to_csv(root / "table_5_2_1.csv", index=False)
    md = ("### Tunnel start across runs (thesis Table 5.2.1; median over runs)\n\n" + table.to_markdown(index=False)
          + "\n\n" + "\n".join(f"- {c}: {describe_rule(rule, share)}" for c, (rule, share) in TABLE_5_2_1_RULES.items())
          + "\n- k (share of depth); the thesis's table uses the 'last' rule\n")
    (root / "table_5_2_1.md").write_text(md)
    return md


# ------------------------------------------------------------------------------------ aggregation
def aggregate_seeds(scenario_dir: str | Path, out_dir: str | Path | None = None, provenance: list[str] = ()
                    ) -> list[str]:
    """Mean ± std over seed<k>/ of every analysis output present; returns the markdown written."""
    scenario_dir = Path(scenario_dir)
    out_dir = Path(out_dir) if out_dir else scenario_dir
    runs = sorted(p for p in scenario_dir.glob("seed*") if p.is_dir())
    written = []
    swaps = [pd.read_csv(r / "swap_table.csv", index_col=0) for r in runs if (r / "swap_table.csv").exists()]
    if swaps:
        mean, std = aggregate(swaps)
        metas = _swap_metas(runs)
        starts = [str(meta.k) for _, meta in metas]
        shown_mean, shown_std = mean.copy(), std.copy()
        if _is_table_5_4_1_setup(runs[0]):
            for i, col in enumerate(("first task", "second task")):
                shown_mean[f"thesis {col}"] = [THESIS_TABLE_5_4_1.get(n, (None, None))[i] for n in mean.index]
                shown_std[f"thesis {col}"] = np.nan  # a single published run: shown without ±
            reference = "thesis values: VGG-19 width 1, split CIFAR-10 (5,5), Table 5.4.1"
        else:
            reference = "no thesis reference values: Table 5.4.1 reports the full VGG-19 at width 1 on the (5,5) split only"
        shown_mean = shown_mean.astype(float)
        notes = [f"tunnel start (extractor = layers 1..k) per seed: {starts} ({'; '.join(_rule_texts(metas))})",
                 *_seed_notices(metas), *provenance, reference]
        written.append(write_table(shown_mean, shown_std, len(swaps), out_dir / f"{scenario_dir.name}_table_5_4_1",
                                          f"{scenario_dir.name}: extractor/tunnel swap (Table 5.4.1 layout, %)", notes))
    curves = [pd.read_csv(r / "substitution.csv") for r in runs if (r / "substitution.csv").exists()]
    if curves:
        allc = pd.concat(curves)
        allc.to_csv(out_dir / f"{scenario_dir.name}_substitution.csv", index=False)
        plot_substitution(allc, out_dir / f"{scenario_dir.name}_substitution.png", scenario_dir.name)
        written.append(_swap_vs_k_table(scenario_dir, out_dir, runs, curves))
        by_rule = swap_by_rule(scenario_dir, out_dir)
        if by_rule:
            written.append(by_rule)
    ckas = [pd.read_csv(r / "cka_m1_m2.csv", index_col=0) for r in runs if (r / "cka_m1_m2.csv").exists()]
    if ckas:
        names = ckas[0]["name"]
        mean, std = aggregate([c.drop(columns="name") for c in ckas])
        mean.index = [f"{i} {n}" for i, n in zip(mean.index, names)]
        std.index = mean.index
        written.append(write_table(mean, std, len(ckas), out_dir / f"{scenario_dir.name}_cka_m1_m2",
                                          f"{scenario_dir.name}: CKA between M1 and M2 per layer", list(provenance)))
    return written


SWAP_META = "swap_meta.txt"  # the k a run's swap analysis used, how it was chosen, and the profile's notices


@dataclass
class SwapMeta:
    k: int
    rule: str  # the rule and threshold in words (describe_rule), or "fixed: analyses.tunnel_start"
    notices: list[str]


def write_swap_meta(run: LoadedRun, meta: SwapMeta) -> None:
    (run.run_dir / SWAP_META).write_text(f"tunnel_start {meta.k} of {run.depth} layers ({meta.rule})\n"
                                         + "".join(f"notice: {n}\n" for n in meta.notices))


def read_swap_meta(run_dir: Path) -> SwapMeta | None:
    """The one reader of swap_meta.txt (runs written before the rules were named: rule 'last', no notices)."""
    path = Path(run_dir) / SWAP_META
    if not path.exists():
        return None
    first, *rest = path.read_text().splitlines()
    rule = first[first.index("(") + 1 : -1] if "(" in first else describe_rule("last")
    return SwapMeta(int(first.split()[1]), rule, [line[len("notice: "):] for line in rest if line.startswith("notice: ")])


def _swap_metas(runs: list[Path]) -> list[tuple[Path, SwapMeta]]:
    return [(r, meta) for r in runs if (meta := read_swap_meta(r)) is not None]


def _rule_texts(metas: list[tuple[Path, SwapMeta]]) -> list[str]:
    """How the runs' tunnel starts were chosen, each way once."""
    return list(dict.fromkeys(meta.rule for _, meta in metas))


def _seed_notices(metas: list[tuple[Path, SwapMeta]]) -> list[str]:
    """The degenerate-profile notices of the seeds, each once with the seeds it concerns."""
    seen: dict[str, list[str]] = {}
    for run, meta in metas:
        for notice in meta.notices:
            kind = notice.split(" (")[0].split(":")[0]  # the notice's wording without its numbers
            seen.setdefault(kind, []).append(f"{run.name}: {notice}")
    return [f"NOTICE {'; '.join(items)}" for items in seen.values()]


def swap_by_rule(scenario_dir: str | Path, out_dir: str | Path | None = None) -> str:
    """Table 5.4.1's non-FT rows at each rule's k (per seed, from its tunnel profile), read off the
    substitution curves, side by side with the thesis column: does the verdict depend on the rule?
    ``<scenario>_table_5_4_1_by_rule.*`` in ``out_dir`` (default: the scenario directory)."""
    scenario_dir = Path(scenario_dir)
    out_dir = Path(out_dir) if out_dir else scenario_dir
    runs = [r for r in sorted(scenario_dir.glob("seed*"))
            if (r / "substitution.csv").exists() and (r / "tunnel_profile.csv").exists()]
    if not runs:
        return ""
    frames, ks = [], {}
    for r in runs:
        table = swap_vs_k(pd.read_csv(r / "substitution.csv"))
        starts = rule_starts(*profile_series(pd.read_csv(r / "tunnel_profile.csv", index_col=0)))
        frame = pd.DataFrame(index=list(SWAP_ROWS))
        for rule, k in starts.items():
            ks.setdefault(rule, []).append(k)
            for col, task in (("first task", 1), ("second task", 2)):
                frame[f"{rule}: {col}"] = [table.loc[k, f"{row} / task {task}"] for row in SWAP_ROWS]
        frames.append(frame)
    mean, std = aggregate(frames)
    if _is_table_5_4_1_setup(runs[0]):
        for i, col in enumerate(("first task", "second task")):
            mean[f"thesis {col}"] = [THESIS_TABLE_5_4_1[n][i] for n in mean.index]
            std[f"thesis {col}"] = np.nan
    notes = [f"{describe_rule(rule)}: k per seed {k}" for rule, k in ks.items()]
    notes += ["all chosen test rows (read off the substitution curves); the FT rows need a head trained at each k "
              "and are in the Table 5.4.1 file at the k the runs used"]
    return write_table(mean.astype(float), std, len(frames), out_dir / f"{scenario_dir.name}_table_5_4_1_by_rule",
                       f"{scenario_dir.name}: Table 5.4.1's rows at each tunnel-start rule's k (%)", notes)


def _swap_vs_k_table(scenario_dir: Path, out_dir: Path, runs: list[Path], curves: list[pd.DataFrame]) -> str:
    mean, std = aggregate([swap_vs_k(c) for c in curves])
    metas = _swap_metas(runs)
    starts = [meta.k for _, meta in metas]
    profiles = [pd.read_csv(r / "tunnel_profile.csv", index_col=0) for r in runs if (r / "tunnel_profile.csv").exists()]
    by_rule: dict[str, list[int]] = {}
    for profile in profiles:
        for rule, k in rule_starts(*profile_series(profile)).items():
            by_rule.setdefault(rule, []).append(k)
    stem = out_dir / f"{scenario_dir.name}_swap_vs_k"
    plot_swap_vs_k(mean, std, starts, stem.with_suffix(".png"), scenario_dir.name, by_rule)
    notes = [f"tunnel start the runs used ({'; '.join(_rule_texts(metas))}; grey dotted lines in the figure): {starts}",
             *[f"{describe_rule(rule)}: k per seed {ks} (marked in the figure)" for rule, ks in by_rule.items()],
             "all chosen test rows (the substitution curves are not kept on the exact rows alone)",
             "the thesis's Table 5.4.1 reading: E1 + T2 ≈ E1 + T1 and E2 + T1 ≈ E2 + T2 (gaps near 0) at the tunnel start"]
    return write_table(mean, std, len(curves), stem, f"{scenario_dir.name}: Table 5.4.1's rows against k (%)", notes)


def _is_table_5_4_1_setup(run_dir: Path) -> bool:
    cfg = load_run_config(run_dir)
    model = cfg["model"]
    return ((cfg["data"]["name"], cfg["scenario"]["tasks"], model["name"], float(model.get("width", 1.0)),
             model.get("args") or {}) == ("cifar10", [5, 5], "vgg19", 1.0, {}))
