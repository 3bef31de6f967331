"""Block structure (Nguyen, Raghu & Kornblith, ICLR 2021), read beside the tunnel on the same model (analysis
``block_structure``).

On the model after task 1 and task 1's test rows, at two granularities (the body layers, and every
intermediate output inside them, :mod:`cltunnel.models.inner`):

- the layer x layer linear CKA (minibatch unbiased HSIC, ratio of sums: the paper's estimator; its §3),
- the share of variance of each layer's first principal component, the squared cosine similarity of the
  layers' first-PC scores, and the CKA with each layer's first PC removed (its §4.1, Figure 3),
- the block by a stated rule (:func:`cltunnel.measures.blocks.find_block`: the longest run of at least
  ``analyses.block_min_layers`` layers whose pairwise CKA are all at least ``analyses.block_threshold``),
- probe accuracy across the block and the accuracy of the model with the block's inner layers deleted, with
  its head and with a head retrained (its §4, Appendix E),
- the tunnel beside it: each rule's k, the block's first layer, numerical rank and first-PC share per layer in
  one figure and one table (neither paper has this comparison).

Across a scenario's seeds (:func:`block_seeds_table`): the summary as mean ± std, and the CKA between the
layers of two seeds' models (the paper's §5, Figure 4), inside and outside the block.

Files: ``block_structure.csv`` (per body layer), ``block_structure_summary.csv``/``.md``,
``block_<granularity>_<measure>.csv`` (granularity layers | inner; measure cka | cka_without_pc | pc_cos2),
``block_structure_layers.png``, ``block_structure_inner.png``, ``block_vs_tunnel.png``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cltunnel.experiments.analyses.cka import cross_cka_matrix
from cltunnel.experiments.analyses.loading import LoadedRun, cka_inputs, load_run
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.experiments.analyses.tunnel import profile_series, tunnel_profile
from cltunnel.measures.blocks import BlockStats, block_summary, find_block
from cltunnel.measures.probes import fit_probes, probe_accuracy
from cltunnel.measures.similarity import gram_matrix
from cltunnel.measures.tunnel import format_layer, rule_starts
from cltunnel.models.inner import hooked, inner_representations
from cltunnel.models.layered import LayeredModel
from cltunnel.models.surgery import delete_layers, shape_preserving_layers
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.store import BLOCK_STRUCTURE, BLOCK_SUMMARY
from cltunnel.training.accuracy import predict_accuracy

CKA_BATCH = 500  # rows per CKA minibatch (the one rule, cltunnel.measures.similarity.cka_batches)
SUMMARY_NAMES = {"cka_in_block": "CKA in block", "cka_in_block_without_first_pc": "CKA in block, first PC removed",
                 "first_pc_share_in_block": "first-PC share in block",
                 "first_pc_share_out_of_block": "first-PC share outside block"}  # block_summary's keys in words
MEASURES = {"cka": "linear CKA", "pc_cos2": "cos² of first-PC scores", "cka_without_pc": "CKA, first PC removed"}


@dataclass
class Granularity:
    """One granularity's measures: names of its representations, the body layer each sits in, the streamed
    statistics and the block found on its CKA map (0-based, inclusive; None: no block)."""

    names: list[str]
    layers: list[int]
    stats: BlockStats
    block: tuple[int, int] | None = None

    def matrix(self, measure: str) -> pd.DataFrame:
        values = {"cka": self.stats.cka, "pc_cos2": self.stats.pc_cos2,
                  "cka_without_pc": self.stats.cka_without_first_pc}[measure]()
        return pd.DataFrame(np.asarray(values), index=self.names, columns=self.names)


@torch.no_grad()
def measure_granularities(run: LoadedRun, model: LayeredModel, task: int = 0) -> dict[str, Granularity]:
    """One pass over the task's test rows in the CKA minibatches: every body layer's and every inner
    representation's Gram matrix, folded into the block statistics at once (no features kept)."""
    batches = cka_inputs(run, task, CKA_BATCH)
    first = next(batches)
    reps = inner_representations(model, first[:2])
    layers = Granularity([f"{k} {n}" for k, n in enumerate(model.layer_names, 1)],
                         list(range(1, len(model.body) + 1)), BlockStats())
    inner = Granularity([r.path for r in reps], [r.layer for r in reps], BlockStats())
    for x in [first, *batches]:
        grams: list[torch.Tensor | None] = [None] * len(reps)
        with hooked(reps, lambda i, out: grams.__setitem__(i, gram_matrix(out))):
            outs = model.layer_outputs(x)
        layers.stats.add_grams([gram_matrix(outs[k]) for k in sorted(outs)])
        inner.stats.add_grams(grams)
    o = run.options
    for g in (layers, inner):  # the inner block must span block_min_layers body layers, too
        g.block = find_block(g.stats.cka(), o.block_threshold, o.block_min_layers, g.layers)
    return {"layers": layers, "inner": inner}


def layers_to_delete(block: tuple[int, int], deletable: set[int]) -> list[int]:
    """The body layers (1-based) of a block (0-based, inclusive) after its first, where their shapes allow:
    the first layer carries the representation into the block; the rest should add little if the block's
    representations are alike."""
    return [k for k in range(block[0] + 2, block[1] + 2) if k in deletable]


def deletion(run: LoadedRun, model: LayeredModel, block: tuple[int, int] | None, task: int = 0) -> dict[str, Any]:
    """Accuracy with the block's inner layers (its layers after the first) deleted where their shapes allow,
    with the model's head and with a linear head retrained on the pruned body's output (the probe protocol)."""
    if block is None:
        return {"deleted layers": "none (no block)"}
    t = run.data.scenario.tasks[task]
    example = next(iter(run.data.batches(t, "test", 2)))[0]
    drop = layers_to_delete(block, shape_preserving_layers(model, example))
    if not drop:
        return {"deleted layers": "none (no layer of the block keeps its input's shape)"}
    pruned = delete_layers(model, drop, example)
    last = len(pruned.body)
    probes = fit_probes(pruned, run.data, t, [last], run.probe_config(), run.progress)
    return {"deleted layers": " ".join(map(str, drop)),
            "test acc, block deleted, own head": 100 * predict_accuracy(pruned, run.data, t),
            "test acc, block deleted, head retrained": 100 * probe_accuracy(pruned, run.data, t, probes, [last])[last]}


def per_layer_frame(grains: dict[str, Granularity], profile: pd.DataFrame, starts: dict[str, int]) -> pd.DataFrame:
    """The block beside the tunnel in one table, per body layer: probe accuracy, numerical rank and its cap,
    first-PC share, inside the block or not, and the marks: where the block starts and each rule's k."""
    g = grains["layers"]
    share = np.asarray(g.stats.first_pc_share())
    inside = [g.block is not None and g.block[0] <= i <= g.block[1] for i in range(len(g.names))]
    frame = profile[["name", "probe_acc", "rank", "rank_cap"]].copy()
    frame["first_pc_share"] = share
    frame["in_block"] = inside
    marks: dict[int, list[str]] = {k: [] for k in frame.index}
    if g.block:
        marks[g.block[0] + 1].append("block starts")
    for rule, k in starts.items():
        marks[k].append(f"k ({rule})")
    frame["marks"] = ["; ".join(m) for m in marks.values()]
    return frame


def block_columns(g: Granularity, span: str, of: str, share_of: str, total: int) -> dict[str, Any]:
    """One granularity's block in the summary: its span, its share of ``total`` (column "block share of
    ``share_of``") and :func:`block_summary`, each column named with ``of`` (body layers, inner)."""
    columns: dict[str, Any] = {f"block ({of})": span if g.block else "none",
                               f"block share of {share_of}": (g.block[1] - g.block[0] + 1) / total if g.block else 0.0}
    found = block_summary(g.stats.cka(), g.stats.cka_without_first_pc(), g.stats.first_pc_share(), g.block)
    return columns | {f"{SUMMARY_NAMES[key]} ({of})": value for key, value in found.items()}


def summary(run: LoadedRun, model: LayeredModel, grains: dict[str, Granularity], frame: pd.DataFrame,
            starts: dict[str, int]) -> dict[str, Any]:
    """One row: accuracies, the block (both granularities) as layers and share of depth, its CKA with and
    without the first PC, first-PC shares in and out of it, probes across it, deletion, each rule's k."""
    t = run.data.scenario.tasks[0]
    row: dict[str, Any] = {"train acc": 100 * predict_accuracy(model, run.data, t, split="eval_train"),
                           "test acc": 100 * predict_accuracy(model, run.data, t)}
    g, i = grains["layers"], grains["inner"]
    row.update(block_columns(g, f"{g.block[0] + 1}-{g.block[1] + 1}" if g.block else "", "body layers", "depth",
                             run.depth))  # a share of n, as k's share
    row.update(block_columns(i, f"{i.names[i.block[0]]} .. {i.names[i.block[1]]}" if i.block else "", "inner",
                             "inner representations", len(i.names)))
    if g.block:
        row["probe acc at block start"] = frame["probe_acc"].iloc[g.block[0]]
        row["probe acc at block end"] = frame["probe_acc"].iloc[g.block[1]]
    row["probe acc at last layer"] = frame["probe_acc"].iloc[-1]
    row.update(deletion(run, model, g.block))
    row.update({f"tunnel start, rule {rule}": k for rule, k in starts.items()})
    row["block first layer"] = g.block[0] + 1 if g.block else None
    row["depth n"] = run.depth
    return row


OUTPUTS = {
    "block_structure_inner.png": "Block structure (Nguyen et al. 2021, Fig. 3 layout) over every intermediate "
                                 "representation of the model after task 1: linear CKA, cos² of first-PC scores, CKA "
                                 "with each layer's first PC removed (the block, by the CKA rule, outlined), and the "
                                 "first-PC variance share per representation.",
    "block_structure_layers.png": "The same three maps over the body layers (the layers the tunnel is cut at).",
    "block_vs_tunnel.png": "The block beside the tunnel on the same model: probe accuracy, numerical rank (share of "
                           "its largest) and first-PC variance share per layer; the block shaded, each rule's k.",
    "*cross_seed_cka.png": "Linear CKA between the layers of two seeds' models (Nguyen et al. 2021, Fig. 4): the "
                           "diagonal says where two trainings learn the same representation.",
    "block_structure_summary.md": "Block structure of this run (Nguyen et al. 2021): accuracies, the block by the "
                                  "stated rule at both granularities, CKA in it with and without the first PC, "
                                  "first-PC shares, probes across it, the block's layers deleted, each rule's k.",
    BLOCK_STRUCTURE: "Per body layer: probe accuracy, numerical rank and its cap, first-PC variance share, whether the "
                     "layer is in the block.",
    "*_block_structure.md": "The block-structure summary over seeds, with the cross-seed CKA in and out of the block.",
}


def block_seeds(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> str | None:
    return block_seeds_table(scenario_dir, out_dir, runs, provenance)


# CSVs a figure shows in full (a layer x layer matrix is not a table to read): named under the page's tables.
SHOWN_BY = {"block_layers_*.csv": "block_structure_layers.png", "block_inner_*.csv": "block_structure_inner.png",
            "*cross_seed_cka.csv": "the cross-seed CKA figure"}


@analysis("block_structure", order=80, seeds=block_seeds, outputs=OUTPUTS, shown_by=SHOWN_BY)
def block_structure_analysis(run: LoadedRun) -> dict[str, Any]:
    model = run.model(0)
    grains = measure_granularities(run, model)
    profile = tunnel_profile(run)
    starts = rule_starts(*profile_series(profile))
    frame = per_layer_frame(grains, profile, starts)
    row = summary(run, model, grains, frame, starts)
    files: dict[str, Any] = {BLOCK_STRUCTURE: frame}
    for name, g in grains.items():
        for measure in MEASURES:
            files[f"block_{name}_{measure}.csv"] = g.matrix(measure)
        files[f"block_{name}_first_pc_share.csv"] = pd.DataFrame(
            {"layer": g.layers, "first_pc_share": np.asarray(g.stats.first_pc_share())},
            index=pd.Index(g.names, name="representation"))
        files[f"block_structure_{name}.png"] = maps_figure(g, f"{run.dir.name}: {name}")
    files[BLOCK_SUMMARY] = pd.DataFrame([row])
    notes = [f"block rule: the longest run of at least {run.options.block_min_layers} layers whose pairwise CKA "
             f"are all >= {run.options.block_threshold} (task-1 test rows, {len(run.data.scenario.tasks[0].test_idx)})",
             "first principal components taken per CKA minibatch (>= 500 rows where there are 500), shares as "
             "ratios of sums over minibatches"]
    shown = pd.Series({k: shown_value(v) for k, v in row.items()}, name="value").to_frame()
    files["block_structure_summary.md"] = ("### Block structure (Nguyen et al. 2021) beside the tunnel\n\n"
                                           + shown.to_markdown() + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    files["block_vs_tunnel.png"] = block_vs_tunnel_figure(frame, row, run.depth)
    return files


def shown_value(value: Any) -> str:
    """Numbers to three significant digits (accuracies to one decimal), NaN and None as a dash."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def _boundaries(layers: list[int]) -> list[float]:
    """Positions between representations where the body layer changes (drawn as thin lines)."""
    return [i - 0.5 for i in range(1, len(layers)) if layers[i] != layers[i - 1]]


def maps_figure(g: Granularity, title: str):
    """The paper's Figure 3 panels: CKA, cos² of first-PC scores, CKA with the first PC removed, and the
    first-PC variance share per representation; the block outlined (shaded on the share), body-layer
    boundaries marked on the inner maps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    _plot_share(axes[3], g)
    axes = axes[:3]
    lines = _boundaries(g.layers) if len(set(g.layers)) < len(g.layers) else []
    for ax, (measure, label) in zip(axes, MEASURES.items()):
        im = ax.imshow(g.matrix(measure).to_numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
        for pos in lines:
            ax.axhline(pos, color="w", lw=0.3, alpha=0.5)
            ax.axvline(pos, color="w", lw=0.3, alpha=0.5)
        if g.block:
            a, b = g.block
            ax.add_patch(plt.Rectangle((a - 0.5, a - 0.5), b - a + 1, b - a + 1, fill=False, ec="cyan", lw=1.2))
        ax.set(title=label, xlabel="representation" if lines else "layer", ylabel="representation" if lines else "layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title + (f" — block {g.names[g.block[0]]} .. {g.names[g.block[1]]}" if g.block else " — no block"),
                 fontsize=9)
    return fig


def _plot_share(ax, g: Granularity) -> None:
    share = np.asarray(g.stats.first_pc_share())
    ax.plot(range(len(share)), share, marker="." if len(share) > 30 else "o", color="C2")
    if g.block:
        ax.axvspan(g.block[0] - 0.5, g.block[1] + 0.5, color="cyan", alpha=0.15, label="block")
        ax.legend(fontsize=7)
    for pos in _boundaries(g.layers) if len(set(g.layers)) < len(g.layers) else []:
        ax.axvline(pos, color="grey", lw=0.3, alpha=0.5)
    ax.set(title="first-PC variance share", xlabel="representation" if len(set(g.layers)) < len(g.layers)
           else "layer", ylim=(0, 1))
    ax.grid(alpha=0.3)


def block_vs_tunnel_figure(frame: pd.DataFrame, row: dict[str, Any], depth: int):
    """Probe accuracy, numerical rank (share of its largest) and first-PC share per body layer; the block
    shaded, each tunnel rule's k a vertical line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = frame.index.to_numpy()
    ax.plot(x, frame["probe_acc"] / 100, marker="o", label="probe accuracy")
    ax.plot(x, frame["rank"] / frame["rank"].max(), marker="s", label="numerical rank / its largest")
    ax.plot(x, frame["first_pc_share"], marker="^", label="first-PC variance share")
    inside = x[frame["in_block"].to_numpy(dtype=bool)]
    if len(inside):
        ax.axvspan(inside.min() - 0.5, inside.max() + 0.5, color="C2", alpha=0.12, label="block (CKA rule)")
    for (key, k), style in zip([(k, v) for k, v in row.items() if k.startswith("tunnel start")], (":", "--", "-.")):
        ax.axvline(k, color="k", ls=style, lw=1, label=f"{key.replace('tunnel start, ', '')}: k={format_layer(k, depth)}")
    ax.set(xlabel="layer", xticks=x, ylim=(0, 1.05), title="block structure beside the tunnel (model after task 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig


NUMERIC_SUMMARY = ("train acc", "test acc", "block share of depth", "probe acc at last layer",
                   "test acc, block deleted, own head", "test acc, block deleted, head retrained")


def block_seeds_table(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> str | None:
    """Mean ± std over the seeds' block summaries and, with two seeds or more, the CKA between the layers of
    the first two seeds' models (``<scenario>_cross_seed_cka.*``); None where no seed has a block summary."""
    done = [r for r in runs if (r / BLOCK_SUMMARY).exists()]
    if not done:
        return None
    rows = pd.concat([pd.read_csv(r / BLOCK_SUMMARY) for r in done], ignore_index=True)
    numeric = rows.select_dtypes("number")
    mean, std = aggregate([numeric.iloc[[i]].reset_index(drop=True) for i in range(len(numeric))])
    if len(done) > 1:
        mean, std = _with_cross_seed(scenario_dir, out_dir, done, mean, std)
    notes = [f"blocks per seed (body layers): {', '.join(map(str, rows['block (body layers)']))}", *provenance]
    mean, std = mean.T.set_axis(["value"], axis=1), std.T.set_axis(["value"], axis=1)
    return write_table(mean, std, len(done), out_dir / f"{scenario_dir.name}_block_structure",
                       f"{scenario_dir.name}: block structure over seeds", notes)


def _with_cross_seed(scenario_dir: Path, out_dir: Path, done: list[Path], mean: pd.DataFrame, std: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    matrix, inside = cross_seed_cka(done[0], done[1])
    matrix.to_csv(out_dir / f"{scenario_dir.name}_cross_seed_cka.csv")
    plot_cross_seed(matrix, inside, out_dir / f"{scenario_dir.name}_cross_seed_cka.png",
                    f"{scenario_dir.name}: {done[0].name} vs {done[1].name}")
    diag = np.diag(matrix.to_numpy())
    mean["cross-seed CKA in block"] = float(diag[inside].mean()) if inside.any() else np.nan
    mean["cross-seed CKA outside block"] = float(diag[~inside].mean()) if (~inside).any() else np.nan
    std["cross-seed CKA in block"] = std["cross-seed CKA outside block"] = np.nan
    return mean, std


def cross_seed_cka(a_dir: Path, b_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """CKA between every body layer of seed a's model after task 1 (rows) and seed b's (columns) on seed a's
    task-1 test rows, and which layers are in seed a's block."""
    a, b = load_run(a_dir, progress=False), load_run(b_dir, progress=False)
    matrix = cross_cka_matrix(a, a.model(0), b.model(0))
    inside = pd.read_csv(a_dir / BLOCK_STRUCTURE, index_col=0)["in_block"].to_numpy(dtype=bool)
    return matrix, inside


def plot_cross_seed(matrix: pd.DataFrame, inside: np.ndarray, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
    if inside.any():
        a, b = np.flatnonzero(inside)[[0, -1]]
        ax.add_patch(plt.Rectangle((a - 0.5, a - 0.5), b - a + 1, b - a + 1, fill=False, ec="cyan", lw=1.2))
    ax.set(xlabel="layer, second seed", ylabel="layer, first seed", title=title)
    fig.colorbar(im, ax=ax, label="linear CKA")
    write_figure(fig, path)
