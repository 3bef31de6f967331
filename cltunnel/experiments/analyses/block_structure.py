"""Block structure (Nguyen, Raghu & Kornblith, ICLR 2021), read beside the tunnel on the same model (analysis
``block_structure``).

On the model after task 1 and task 1's test rows, at two granularities (the body layers, and every
intermediate output inside them, :mod:`cltunnel.models.inner`):

- the layer x layer linear CKA (minibatch unbiased HSIC, ratio of sums: the paper's estimator; its §3),
- the share of variance of each layer's first principal component, the squared cosine similarity of the
  layers' first-PC scores, and the CKA with each layer's first PC removed (its §4.1, Figure 3), the PCs over
  all the analysed rows (:class:`~cltunnel.measures.blocks.WholeSetPCs`), and the first-PC share of the last
  ``analyses.block_pooled_stages`` stages' representations pooled (Figure D.5),
- the block by a stated rule (:func:`cltunnel.measures.blocks.find_block`: the longest run of at least
  ``analyses.block_min_layers`` layers whose pairwise CKA are all at least ``analyses.block_threshold``), beside
  a continuous statistic that does not flip at a threshold (the upper-half CKA, with and without the first PC),
- probe accuracy across the block and the accuracy of the model with the block's inner layers deleted, with
  its head and with a head retrained (its §4, Appendix E); the deletion curve, block by block (Figure E.2);
  probes before and after each residual addition (Figure E.1); ReLU sparsity (Figure D.6),
- the tunnel beside it: each rule's k, the block's first layer, numerical rank and first-PC share per layer in
  one figure and one table (neither paper has this comparison).

Across a scenario's seeds (:func:`block_seeds_table`): the summary as mean ± std, and the CKA between the
layers of two seeds' models (the paper's §5, Figure 4), inside and outside the block.

Files: ``block_structure.csv`` (per body layer), ``block_structure_summary.csv``/``.md``,
``block_<granularity>_<measure>.csv`` (granularity layers | inner; measure cka | cka_without_pc | pc_cos2),
``block_<granularity>_first_pc_share.csv``, ``block_deletion_curve.csv/.png``, ``block_relu_sparsity.csv/.png``,
``block_residual_probes.csv/.png``, ``block_structure_layers.png``, ``block_structure_inner.png``,
``block_vs_tunnel.png``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cltunnel.experiments.analyses.cka import cross_cka_matrix
from cltunnel.experiments.analyses.loading import LoadedRun, cka_inputs, load_run
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.experiments.analyses.tunnel import profile_series, tunnel_profile
from cltunnel.measures.blocks import (BlockStats, ReluSparsity, WholeSetPCs, block_summary, find_block,
                                      fit_whole_set_pcs, upper_half_cka)
from cltunnel.measures.probes import fit_probes, probe_accuracy
from cltunnel.measures.similarity import gram_matrix
from cltunnel.measures.tunnel import format_layer, rule_starts
from cltunnel.models.inner import InnerOutputs, InnerRepresentation, hooked, inner_representations
from cltunnel.models.layered import LayeredModel
from cltunnel.models.surgery import delete_layers, shape_preserving_layers
from cltunnel.models.zoo import Add
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.store import BLOCK_STRUCTURE, BLOCK_SUMMARY
from cltunnel.training.accuracy import predict_accuracy

CKA_BATCH = 500  # rows per CKA minibatch (the one rule, cltunnel.measures.similarity.cka_batches)
SUMMARY_NAMES = {"cka_in_block": "CKA in block", "cka_in_block_without_first_pc": "CKA in block, first PC removed",
                 "first_pc_share_in_block": "first-PC share in block",
                 "first_pc_share_out_of_block": "first-PC share outside block",
                 "upper_half_cka": "upper-half CKA", "upper_half_cka_without_first_pc": "upper-half CKA, first PC removed",
                 "pooled_first_pc_share": "pooled first-PC share, last stages"}  # the summary's keys in words
MEASURES = {"cka": "linear CKA", "pc_cos2": "cos² of first-PC scores", "cka_without_pc": "CKA, first PC removed"}


@dataclass
class Granularity:
    """One granularity's measures: names of its representations, the body layer each sits in, the streamed
    statistics, the representations pooled for the pooled first-PC share (those in the last stages), the
    whole-set first PCs (one target per representation, then the pooled one) and the block found on its CKA
    map (0-based, inclusive; None: no block)."""

    names: list[str]
    layers: list[int]
    stats: BlockStats
    pooled: list[int] = field(default_factory=list)
    pcs: WholeSetPCs | None = None
    block: tuple[int, int] | None = None

    def matrix(self, measure: str) -> pd.DataFrame:
        values = {"cka": self.stats.cka, "pc_cos2": self.stats.pc_cos2,
                  "cka_without_pc": self.stats.cka_without_first_pc}[measure]()
        return pd.DataFrame(np.asarray(values), index=self.names, columns=self.names)

    def pooled_share(self) -> float:
        """The first-PC share of the pooled representations' concatenated features (Figure D.5); NaN if none."""
        return float(self.pcs.share()[-1]) if self.pooled else float("nan")


Visit = Callable[[str, int, slice, torch.Tensor], None]  # (granularity, representation, rows, its output)


def _pass(run: LoadedRun, model: LayeredModel, reps: list[InnerRepresentation], visit: Visit,
          batch_done: Callable[[slice], None] | None = None, task: int = 0) -> None:
    """One forward pass over the task's test rows in the CKA minibatches: ``visit`` sees every inner
    representation as its module runs and every body layer's output, then ``batch_done(rows)``."""
    start = 0
    for x in cka_inputs(run, task, CKA_BATCH):
        rows = slice(start, start + len(x))
        start += len(x)
        with hooked(reps, lambda i, out: visit("inner", i, rows, out)):
            outs = model.layer_outputs(x)
        for k in sorted(outs):
            visit("layers", k - 1, rows, outs[k])
        if batch_done is not None:
            batch_done(rows)


def last_stages(model: LayeredModel, example: torch.Tensor, count: int) -> set[int]:
    """The body layers (1-based) of the model's last ``count`` stages: a stage is a run of consecutive body layers
    whose outputs are feature maps of one shape (a CIFAR ResNet: stem and stage 1, stage 2, stage 3; the pool's
    vector is none). All of them where the model has fewer."""
    with torch.no_grad():
        outs = model.eval().layer_outputs(example)
    runs: list[list[int]] = []
    for k in sorted(outs):
        if outs[k].dim() != 4:
            continue
        if runs and runs[-1][-1] == k - 1 and outs[runs[-1][-1]].shape == outs[k].shape:
            runs[-1].append(k)
        else:
            runs.append([k])
    return {k for stage in runs[-count:] for k in stage}


@torch.no_grad()
def measure_granularities(run: LoadedRun, model: LayeredModel, task: int = 0
                          ) -> tuple[dict[str, Granularity], ReluSparsity, list[InnerRepresentation]]:
    """The task's test rows at both granularities, never holding features: a pass in the CKA minibatches folds
    every Gram into the CKA (and each ReLU's zeros into its sparsity); then whole-set first PCs by subspace
    iteration (:class:`~cltunnel.measures.blocks.WholeSetPCs`, two passes per iteration, at most
    ``analyses.block_pc_iterations``); then a last pass folds each Gram with its first PC removed."""
    t = run.data.scenario.tasks[task]
    example = next(iter(run.data.batches(t, "test", 2)))[0]
    reps = inner_representations(model, example)
    staged = last_stages(model, example, run.options.block_pooled_stages)
    layer_of = list(range(1, len(model.body) + 1))
    grains = {"layers": Granularity([f"{k} {n}" for k, n in enumerate(model.layer_names, 1)], layer_of, BlockStats(),
                                    [i for i, k in enumerate(layer_of) if k in staged]),
              "inner": Granularity([r.path for r in reps], [r.layer for r in reps], BlockStats(),
                                   [i for i, r in enumerate(reps) if r.layer in staged])}
    for g in grains.values():
        targets = [[i] for i in range(len(g.names))] + ([g.pooled] if g.pooled else [])
        g.pcs = WholeSetPCs(targets, len(t.test_idx))
    relus, is_relu = ReluSparsity(), [isinstance(r.module, nn.ReLU) for r in reps]
    grams = {name: [None] * len(g.names) for name, g in grains.items()}

    def moments(name: str, i: int, rows: slice, out: torch.Tensor) -> None:
        grams[name][i] = gram_matrix(out)
        grains[name].pcs.visit(i, rows, out)
        if name == "inner" and is_relu[i]:
            relus.add(i, out)

    _pass(run, model, reps, moments, lambda _rows: [g.stats.add_grams(grams[n]) for n, g in grains.items()], task)
    _whole_set_pcs(run, model, reps, grains, task)

    def without_pc(name: str, i: int, _rows: slice, out: torch.Tensor) -> None:
        grams[name][i] = gram_matrix(out)

    _pass(run, model, reps, without_pc,
          lambda rows: [g.stats.add_grams_without_first_pc(grams[n], rows) for n, g in grains.items()], task)
    o = run.options
    for g in grains.values():  # the inner block must span block_min_layers body layers, too
        g.block = find_block(g.stats.cka(), o.block_threshold, o.block_min_layers, g.layers)
    return grains, relus, reps


def _whole_set_pcs(run: LoadedRun, model: LayeredModel, reps: list[InnerRepresentation],
                   grains: dict[str, Granularity], task: int) -> None:
    """Both granularities' first PCs from the same passes (``analyses.block_pc_iterations``, ``block_pc_tolerance``),
    then given to their statistics."""
    fit_whole_set_pcs([g.pcs for g in grains.values()],
                      lambda: _pass(run, model, reps, lambda name, i, rows, out: grains[name].pcs.visit(i, rows, out),
                                    task=task),
                      run.options.block_pc_iterations, run.options.block_pc_tolerance)
    for g in grains.values():
        g.stats.set_first_pcs(g.pcs, list(range(len(g.names))))


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


def deletable_runs(deletable: set[int]) -> list[list[int]]:
    """Runs of consecutive body layers that keep their input's shape: a CIFAR ResNet's blocks of one stage after
    its downsampling block (stage 1: all of them)."""
    runs: list[list[int]] = []
    for k in sorted(deletable):
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def deletion_curve(run: LoadedRun, model: LayeredModel, block: tuple[int, int] | None, task: int = 0
                   ) -> pd.DataFrame:
    """Figure E.2: test accuracy (the model's own head, nothing retrained) with blocks deleted, per body layer that
    keeps its input's shape: that block alone, and that block with every block after it in its stage (the paper's
    curve, "deleting blocks backwards one-by-one within each ResNet stage"). A flat stretch is blocks the model
    does without."""
    t = run.data.scenario.tasks[task]
    example = next(iter(run.data.batches(t, "test", 2)))[0]
    rows = []
    for stage in deletable_runs(shape_preserving_layers(model, example)):
        for pos, k in enumerate(stage):
            alone = 100 * predict_accuracy(delete_layers(model, [k], example), run.data, t)
            rest = stage[pos:]
            onwards = alone if len(rest) == 1 else 100 * predict_accuracy(delete_layers(model, rest, example), run.data, t)
            rows.append({"layer": k, "name": model.layer_names[k - 1], "stage run": f"{stage[0]}-{stage[-1]}",
                         "test acc, block deleted": alone, "test acc, block to end of stage deleted": onwards,
                         "in_block": block is not None and block[0] <= k - 1 <= block[1]})
    return pd.DataFrame(rows)


def sparsity_frame(relus: ReluSparsity, reps: list[InnerRepresentation], block: tuple[int, int] | None
                   ) -> pd.DataFrame:
    """Figure D.6, per ReLU: share of zero outputs, of dead units and of always-active units, and whether its
    body layer is in the block (body layers)."""
    frame = pd.DataFrame([{"representation": reps[i].path, "layer": reps[i].layer, **relus.shares(i),
                           "in_block": block is not None and block[0] <= reps[i].layer - 1 <= block[1]}
                          for i in sorted(relus.zeros)])
    return frame.set_index("representation")


def residual_probes(run: LoadedRun, model: LayeredModel, reps: list[InnerRepresentation],
                    block: tuple[int, int] | None, task: int = 0) -> pd.DataFrame | None:
    """Figure E.1: linear probe accuracy (the run's probe protocol) on each residual block's branch output just
    before the addition (the representation its module runs before the ``Add``: a CIFAR ResNet's bn2) and on the
    sum after it (before the block's last ReLU). None where the model has no residual addition."""
    adds = [i for i, r in enumerate(reps) if isinstance(r.module, Add) and i > 0]
    if not adds:
        return None
    view = InnerOutputs(model, [reps[j] for i in adds for j in (i - 1, i)])
    wanted = list(range(1, 2 * len(adds) + 1))
    t = run.data.scenario.tasks[task]
    probes = fit_probes(view, run.data, t, wanted, run.probe_config(), run.progress)  # type: ignore[arg-type]
    acc = probe_accuracy(view, run.data, t, probes, wanted)  # type: ignore[arg-type]
    return pd.DataFrame([{"block": reps[i].path.rsplit(".", 1)[0], "layer": reps[i].layer,
                          "before add": reps[i - 1].path, "probe acc before add": 100 * acc[2 * n + 1],
                          "probe acc after add": 100 * acc[2 * n + 2],
                          "in_block": block is not None and block[0] <= reps[i].layer - 1 <= block[1]}
                         for n, i in enumerate(adds)])


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
    found |= upper_half_cka(g.stats.cka(), g.stats.cka_without_first_pc())
    found["pooled_first_pc_share"] = g.pooled_share()
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
                                 "first-PC variance share per representation with the pooled share of the last stages "
                                 "(Fig. D.5) dashed; principal components over all analysed test rows.",
    "block_structure_layers.png": "The same three maps over the body layers (the layers the tunnel is cut at).",
    "block_vs_tunnel.png": "The block beside the tunnel on the same model: probe accuracy, numerical rank (share of "
                           "its largest) and first-PC variance share per layer; the block shaded, each rule's k.",
    "block_deletion_curve.png": "Deleting residual blocks (Nguyen et al. 2021, Fig. E.2): test accuracy with the "
                                "model's own head, per block that keeps its input's shape, with that block deleted "
                                "and with it and the rest of its stage deleted (the paper's curve); the full model's "
                                "accuracy grey, the block shaded. A plateau is blocks the model does without.",
    "block_deletion_curve.csv": "Per deletable block: test accuracy with it deleted, and with it and the blocks "
                                "after it in its stage deleted (Fig. E.2).",
    "block_relu_sparsity.png": "ReLU sparsity (Nguyen et al. 2021, Fig. D.6): per ReLU, the share of its outputs "
                               "that are zero on the test rows, and of its units that are never zero (linear on "
                               "this data) or always zero (dead); the block shaded. Alike in and out of the block: "
                               "the block's layers still act nonlinearly.",
    "block_relu_sparsity.csv": "Per ReLU: share of zero outputs, of dead units and of always-active units, and "
                               "whether its body layer is in the block (Fig. D.6).",
    "block_residual_probes.png": "Linear probes around the residual addition (Nguyen et al. 2021, Fig. E.1): probe "
                                 "accuracy on each block's branch just before the addition and on the sum after it; "
                                 "the block shaded. A large gap inside the block: the skip carries the "
                                 "representation there.",
    "block_residual_probes.csv": "Per residual block: probe accuracy before and after its addition (Fig. E.1).",
    "*cross_seed_cka.png": "Linear CKA between the layers of two seeds' models (Nguyen et al. 2021, Fig. 4): the "
                           "diagonal says where two trainings learn the same representation.",
    "block_structure_summary.md": "Block structure of this run (Nguyen et al. 2021): accuracies, the block by the "
                                  "stated rule at both granularities beside the continuous upper-half CKA (with and "
                                  "without the first PC), first-PC shares (per layer and pooled over the last "
                                  "stages), probes across the block, its layers deleted, ReLU sparsity in and out of "
                                  "it, each rule's k.",
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
    grains, relus, reps = measure_granularities(run, model)
    profile = tunnel_profile(run)
    starts = rule_starts(*profile_series(profile))
    frame = per_layer_frame(grains, profile, starts)
    block = grains["layers"].block
    sparsity = sparsity_frame(relus, reps, block)
    curve = deletion_curve(run, model, block)
    row = summary(run, model, grains, frame, starts) | sparsity_summary(sparsity)
    files: dict[str, Any] = {BLOCK_STRUCTURE: frame}
    for name, g in grains.items():
        for measure in MEASURES:
            files[f"block_{name}_{measure}.csv"] = g.matrix(measure)
        files[f"block_{name}_first_pc_share.csv"] = pd.DataFrame(
            {"layer": g.layers, "first_pc_share": np.asarray(g.stats.first_pc_share()),
             "pooled": [i in g.pooled for i in range(len(g.names))]},
            index=pd.Index(g.names, name="representation"))
        files[f"block_structure_{name}.png"] = maps_figure(g, f"{run.dir.name}: {name}")
    files[BLOCK_SUMMARY] = pd.DataFrame([row])
    files["block_relu_sparsity.csv"] = sparsity
    files["block_relu_sparsity.png"] = sparsity_figure(sparsity)
    if len(curve):
        files["block_deletion_curve.csv"] = curve
        files["block_deletion_curve.png"] = deletion_figure(curve, row["test acc"])
    probes = residual_probes(run, model, reps, block) if run.options.block_residual_probes else None
    if probes is not None:
        files["block_residual_probes.csv"] = probes
        files["block_residual_probes.png"] = residual_probes_figure(probes)
    files["block_structure_summary.md"] = summary_markdown(run, row, grains)
    files["block_vs_tunnel.png"] = block_vs_tunnel_figure(frame, row, run.depth)
    return files


def sparsity_summary(sparsity: pd.DataFrame) -> dict[str, float]:
    """Mean share of zero ReLU outputs in and out of the block (Fig. D.6's comparison); NaN over nothing."""
    inside = sparsity["in_block"].to_numpy(dtype=bool)
    zero = sparsity["zero_share"].to_numpy()
    return {"ReLU zero share in block": float(zero[inside].mean()) if inside.any() else float("nan"),
            "ReLU zero share outside block": float(zero[~inside].mean()) if (~inside).any() else float("nan")}


def summary_markdown(run: LoadedRun, row: dict[str, Any], grains: dict[str, Granularity]) -> str:
    """The summary as a two-column table, with how the block and the principal components were found."""
    o = run.options
    pcs = grains["layers"].pcs
    notes = [f"block rule: the longest run of at least {o.block_min_layers} layers whose pairwise CKA "
             f"are all >= {o.block_threshold} (task-1 test rows, {len(run.data.scenario.tasks[0].test_idx)}); "
             "upper-half CKA: the mean off-diagonal CKA over the later half of the representations, a continuous "
             "reading beside the rule",
             f"first principal components over all {pcs.rows} analysed test rows (subspace iteration, "
             f"{max(g.pcs.iterations for g in grains.values())} iterations, largest residual "
             f"{max(float(g.pcs.residual.max()) for g in grains.values()):.1e}, tolerance {o.block_pc_tolerance}); "
             f"pooled share: the first PC of the concatenated representations of the last {o.block_pooled_stages} "
             "stages (Fig. D.5)"]
    shown = pd.Series({k: shown_value(v) for k, v in row.items()}, name="value").to_frame()
    return ("### Block structure (Nguyen et al. 2021) beside the tunnel\n\n" + shown.to_markdown() + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


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
    for pos in _boundaries(g.layers) if len(set(g.layers)) < len(g.layers) else []:
        ax.axvline(pos, color="grey", lw=0.3, alpha=0.5)
    if g.pooled:
        ax.hlines(g.pooled_share(), min(g.pooled) - 0.5, max(g.pooled) + 0.5, color="C3", ls="--",
                  label=f"pooled, last stages: {g.pooled_share():.3f}")
    if g.block or g.pooled:
        ax.legend(fontsize=7)
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


def _finish_per_item(ax, x: np.ndarray, inside: np.ndarray, names: Any, rotation: int, fontsize: int) -> None:
    """The common finish of the per-block and per-ReLU figures (positions ``x``, one tick per item named
    ``names``): the block's span shaded (``inside``: in the block), grid and legend."""
    if inside.any():
        ax.axvspan(x[inside].min() - 0.5, x[inside].max() + 0.5, color="C2", alpha=0.12, label="block (CKA rule)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=rotation, fontsize=fontsize)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def deletion_figure(curve: pd.DataFrame, full_acc: float):
    """Figure E.2: accuracy with each block deleted and with it to the end of its stage, over block position;
    stage runs separated, the full model's accuracy a grey line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(curve))
    for column, marker in (("test acc, block to end of stage deleted", "o"), ("test acc, block deleted", "s")):
        for _, part in curve.groupby("stage run", sort=False):
            ax.plot(x[part.index], part[column], marker=marker, color="C0" if marker == "o" else "C1",
                    label=column.replace("test acc, ", "") if part.index[0] == 0 else None)
    ax.axhline(full_acc, color="grey", lw=1, label="full model")
    for pos in np.flatnonzero(curve["stage run"].to_numpy()[1:] != curve["stage run"].to_numpy()[:-1]) + 0.5:
        ax.axvline(pos, color="g", lw=0.8)
    ax.set(xlabel="deleted block", ylabel="test accuracy (%)", title="deleting residual blocks (Fig. E.2)")
    _finish_per_item(ax, x, curve["in_block"].to_numpy(dtype=bool), curve["name"], 60, 7)
    return fig


def sparsity_figure(sparsity: pd.DataFrame):
    """Figure D.6: per ReLU, the shares of zero outputs, of never-zero units and of dead units; the block shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(sparsity))
    for column, label in (("zero_share", "zero outputs"), ("always_active_unit_share", "units never zero"),
                          ("dead_unit_share", "units always zero")):
        ax.plot(x, sparsity[column], marker=".", label=label)
    ax.set(xlabel="ReLU", ylabel="share", ylim=(0, 1), title="ReLU sparsity on the test rows (Fig. D.6)")
    _finish_per_item(ax, x, sparsity["in_block"].to_numpy(dtype=bool), sparsity.index, 75, 6)
    return fig


def residual_probes_figure(probes: pd.DataFrame):
    """Figure E.1: probe accuracy before (orange) and after (blue) each residual addition; the block shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(probes))
    ax.plot(x, probes["probe acc after add"], marker="o", color="C0", label="after the addition")
    ax.plot(x, probes["probe acc before add"], marker="s", color="C1", label="before (the residual branch)")
    ax.set(xlabel="residual block", ylabel="probe accuracy (%)",
           title="linear probes around the residual addition (Fig. E.1)")
    _finish_per_item(ax, x, probes["in_block"].to_numpy(dtype=bool), probes["block"], 60, 7)
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
