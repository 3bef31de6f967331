"""Nguyen, Raghu & Kornblith (ICLR 2021) across a sweep: the inner-representation CKA heatmaps of every
configuration laid out as the paper's Figures 1 and 2 (one row per value of the sweep's first axis, one
column per value of its second: depth x width, or data size x width), and one summary row per configuration
(accuracies, the block, its CKA with and without the first PC, first-PC shares and cross-seed CKA in and out
of it). Written by a task-sequence sweep whose runs ran the ``block_structure`` analysis
(``block_structure.{csv,md}``, ``block_structure_grid.png``, ``block_structure_grid_without_pc.png``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cltunnel.experiments.analyses.block_structure import shown_value
from cltunnel.experiments.registry import SWEEP_REPORTS, SweepReport
from cltunnel.reports.captions import declare_written
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import markdown_table
from cltunnel.store import BLOCK_STRUCTURE, BLOCK_SUMMARY, seed_dirs

SUMMARY = BLOCK_SUMMARY
# The table's columns: the block and its statistics at the body layers' granularity (the layers the tunnel is
# cut at), then the inner block's share, so a row never mixes two blocks.
SHOWN = {"train acc": "train acc (%)", "test acc": "test acc (%)", "block (body layers)": "block (layers)",
         "block share of depth": "block share", "CKA in block (body layers)": "CKA in block",
         "CKA in block, first PC removed (body layers)": "CKA in block, PC removed",
         "first-PC share in block (body layers)": "PC share in block",
         "first-PC share outside block (body layers)": "PC share outside",
         "upper-half CKA (body layers)": "upper-half CKA",
         "upper-half CKA, first PC removed (body layers)": "upper-half CKA, PC removed",
         "pooled first-PC share, last stages (body layers)": "pooled PC share",
         "block share of inner representations": "inner block share",
         "cross-seed CKA in block": "cross-seed CKA in block", "cross-seed CKA outside block": "cross-seed CKA outside"}


def has_blocks(sweep_dir: Path, manifest: dict[str, Any]) -> bool:
    return any((run / SUMMARY).exists() for c in manifest["configs"] for run in seed_dirs(sweep_dir / c))


def config_row(config_dir: Path) -> dict[str, Any] | None:
    """Mean over the configuration's seeds of the numeric summary (NaN-skipping: a block's statistics over the
    seeds that have one), every seed's block, and the cross-seed CKA from the configuration's seed table (when it
    has two seeds or more)."""
    runs = [r for r in seed_dirs(config_dir) if (r / SUMMARY).exists()]
    if not runs:
        return None
    rows = pd.concat([pd.read_csv(r / SUMMARY) for r in runs], ignore_index=True)
    row: dict[str, Any] = rows.select_dtypes("number").mean().to_dict()
    row["block (body layers)"] = " / ".join(map(str, rows["block (body layers)"]))  # every seed's
    row["seeds"] = len(runs)
    table = config_dir / f"{config_dir.name}_block_structure.csv"
    if table.exists():
        means = pd.read_csv(table, header=[0, 1], index_col=0)["mean"].iloc[:, 0]
        row.update({k: means[k] for k in ("cross-seed CKA in block", "cross-seed CKA outside block") if k in means})
    return row


def block_sweep_report(sweep_dir: Path, manifest: dict[str, Any]) -> str:
    """The summary table and the heatmap grids of a block-structure sweep; returns its markdown."""
    rows = {c: config_row(sweep_dir / c) for c in manifest["configs"]}
    rows = {c: r for c, r in rows.items() if r is not None}
    if not rows:
        return ""
    labels = pd.DataFrame({c: manifest["configs"][c]["labels"] for c in rows}).T
    frame = pd.DataFrame(rows).T
    shown = pd.concat([labels, frame[[c for c in SHOWN if c in frame] + ["seeds"]].rename(columns=SHOWN)], axis=1)
    shown.index.name = "configuration"
    shown.to_csv(sweep_dir / BLOCK_STRUCTURE)  # the sweep's table, under the per-run table's name
    md = (f"### {manifest['name']}: block structure per configuration (Nguyen et al. 2021, Figures 1-2)\n\n"
          + markdown_table(shown.map(shown_value)) + "\n\n- the block by the rule of the runs' analyses.block_threshold "
          "and block_min_layers over the body layers, each seed's span (seed 0 / seed 1 ...); block share: mean over "
          "seeds; CKA and first-PC share in the block: mean over the seeds that have one; inner block share: the "
          "same rule over every intermediate representation; upper-half CKA: mean off-diagonal CKA over the later half "
          "of the body layers (continuous, beside the rule); pooled PC share: the first PC of the last stages' "
          "body layers concatenated (Fig. D.5)\n- cross-seed CKA (diagonal of the map between the "
          "first two seeds' layers, in and out of the first seed's block): configurations with two seeds or more\n")
    (sweep_dir / "block_structure.md").write_text(md)
    axes = [a for a in manifest["axes"] if a != "seed"]
    for measure, suffix in (("cka", ""), ("cka_without_pc", "_without_pc")):
        plot_grid(sweep_dir, manifest, list(rows), axes, measure, sweep_dir / f"block_structure_grid{suffix}.png")
    return md


def _grid_positions(manifest: dict[str, Any], configs: list[str], axes: list[str]
                    ) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows: values of the first axis; columns: of the second (a single row or column where there is none),
    in sweep order."""
    def label(config: str, position: int) -> str:
        return str(manifest["configs"][config]["labels"][axes[position]]) if position < len(axes) else ""

    rows = list(dict.fromkeys(label(c, 0) for c in configs))
    columns = list(dict.fromkeys(label(c, 1) for c in configs))
    return rows, columns, {c: (rows.index(label(c, 0)), columns.index(label(c, 1))) for c in configs}


def plot_grid(sweep_dir: Path, manifest: dict[str, Any], configs: list[str], axes: list[str], measure: str,
              path: Path) -> None:
    """Each configuration's first-seed inner CKA map in its (row, column) cell."""
    first, second, where = _grid_positions(manifest, configs, axes)
    plt = pyplot()
    fig, cells = plt.subplots(len(first), len(second), figsize=(2.6 * len(second) + 0.8, 2.5 * len(first)),
                              squeeze=False)
    for ax in cells.flat:
        ax.axis("off")
    for config in configs:
        run = next(r for r in seed_dirs(sweep_dir / config) if (r / SUMMARY).exists())
        matrix = pd.read_csv(run / f"block_inner_{measure}.csv", index_col=0).to_numpy()
        ax = cells[where[config]]
        ax.axis("on")
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(config, fontsize=7)
    fig.colorbar(im, ax=cells.ravel().tolist(), fraction=0.02, label="linear CKA" +
                 (" (first PC removed)" if measure != "cka" else ""))
    fig.suptitle(f"{manifest['name']}: rows {axes[0] if axes else ''}, columns {axes[1] if len(axes) > 1 else ''}",
                 fontsize=9)
    write_figure(fig, path, tight=False)




SWEEP_REPORTS.register("block_structure", SweepReport(has_blocks, block_sweep_report, order=30))
declare_written({
    "block_structure_grid.png": "Every configuration's CKA map over its intermediate representations, laid out as "
                                "Nguyen et al. 2021's Figures 1-2 (first seed).",
    "block_structure_grid_without_pc.png": "The same maps with each representation's first PC removed.",
}, place=50)
declare_written({"block_structure.md": "Every configuration of the sweep: accuracies, the block, its CKA with and "
                                       "without the first PC, first-PC shares and cross-seed CKA."}, place=75)
