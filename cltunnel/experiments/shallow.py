"""Baselines of the tunnel-effect work that read a sweep: shallower networks forget less (E3, Figure 5.4.1).

(Feature erosion, E5, trains its own phases: :mod:`cltunnel.experiments.erosion`.)
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from cltunnel.experiments.analyses import read_swap_meta
from cltunnel.experiments.registry import SWEEP_REPORTS, SweepReport
from cltunnel.models.zoo import VGG_STAGES
from cltunnel.reports.captions import declare_written
from cltunnel.reports.figures import pyplot, save_figure
from cltunnel.reports.tables import write_table
from cltunnel.config import parse_tunnel_start
from cltunnel.store import load_manifest, load_metrics, load_run_config, seed_dirs


DEPTH_AXIS = "model.args.conv_layers"


def _conv_layers(run_dir: Path) -> int:
    """Conv layers of a run's model (the full VGG's count when ``conv_layers`` is not set)."""
    cfg = load_run_config(run_dir)
    given = (cfg["model"].get("args") or {}).get("conv_layers")
    return int(given) if given else sum(VGG_STAGES[int(cfg["model"]["name"][3:])])


def depth_frames(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """By conv-layer count: task 1 after task 1, task 2 after task 2, forgetting of task 1 (%, mean/std)."""
    manifest = load_manifest(sweep_dir)
    rows: dict[int, list[list[float]]] = {}
    for config in manifest["configs"]:
        for run in seed_dirs(sweep_dir / config):
            acc = 100 * np.asarray(load_metrics(run)["acc"])
            rows.setdefault(_conv_layers(run), []).append([acc[0, 0], acc[1, 1], acc[0, 0] - acc[1, 0]])
    cols = ["task 1 after task 1", "task 2 after task 2", "forgetting of task 1"]
    depths = sorted(rows)
    mean = pd.DataFrame([np.mean(rows[d], 0) for d in depths], index=depths, columns=cols)
    std = pd.DataFrame([np.std(rows[d], 0, ddof=1) if len(rows[d]) > 1 else np.zeros(3) for d in depths],
                       index=depths, columns=cols)
    mean.index.name = std.index.name = "conv layers"
    return mean, std, min(len(v) for v in rows.values())


def extractor_length(sweep_dir: Path) -> int | None:
    """The full-depth model's extractor (in conv layers), read from the full-depth runs themselves: their own
    resolved ``analyses.tunnel_start`` when it is a number (so a ``base:`` given as a file counts too), else
    the k their swap analysis used (the most common over seeds). Runs of shallower networks run the swap
    too, and their k is not the full network's."""
    manifest = load_manifest(sweep_dir)
    runs = [run for config in manifest["configs"] for run in seed_dirs(sweep_dir / config)]
    if not runs:
        return None
    full = max(_conv_layers(run) for run in runs)
    full_runs = [run for run in runs if _conv_layers(run) == full]
    for run in full_runs:
        given = parse_tunnel_start((load_run_config(run).get("analyses") or {}).get("tunnel_start", "auto"),
                                   "analyses.tunnel_start")
        if given != "auto":
            return given
    ks = [meta.k for meta in (read_swap_meta(run) for run in full_runs) if meta is not None]
    return Counter(ks).most_common(1)[0][0] if ks else None


def depth_report(sweep_dir: str | Path) -> str:
    """``shallow_forgetting.{csv,md,tex,png}``: the thesis's Figure 5.4.1 as a table and a figure."""
    sweep_dir = Path(sweep_dir)
    mean, std, n = depth_frames(sweep_dir)
    k = extractor_length(sweep_dir)
    notes = [f"seeds per depth: {n} or more", f"extractor of the full model: {k} layers" if k else
             "extractor of the full model: unknown (run the tunnel or swap analysis on the full-depth runs)"]
    md = write_table(mean, std, n, sweep_dir / "shallow_forgetting",
                            "Shallower networks: accuracy and forgetting by conv layers (%)", notes)
    plot_depth(mean, std, k, sweep_dir / "shallow_forgetting.png")
    return md


def plot_depth(mean: pd.DataFrame, std: pd.DataFrame, extractor: int | None, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    full = mean.index.max()
    for col, colour in zip(mean.columns, ("C0", "C1", "C3")):
        ax.errorbar(mean.index, mean[col], yerr=std[col], marker="o", ms=4, capsize=3, color=colour, label=col)
        ax.axhline(mean.loc[full, col], color=colour, ls=":", lw=1)  # the full network, for reference
    if extractor:
        ax.axvline(extractor, color="grey", ls="--", lw=1, label=f"extractor of the full model ({extractor})")
    ax.set(xlabel="conv layers", ylabel="%", title="shallower networks: accuracy and forgetting")
    save_figure(fig, ax, path)


SWEEP_REPORTS.register("depth", SweepReport(lambda sweep_dir, manifest: DEPTH_AXIS in manifest["axes"],
                                            lambda sweep_dir, manifest: depth_report(sweep_dir), order=10))
declare_written({"shallow_forgetting.png": "Forgetting against network depth (thesis Fig. 5.4.1, shallower "
                                                  "networks)."}, place=40)
