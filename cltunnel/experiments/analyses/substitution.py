"""Layer substitution curves (thesis Figures 5.11.x): for every x, the first x body layers of one model under
the rest of the other, in both directions, on every task (analysis ``substitution``: ``substitution.csv``/
``.png``). :func:`~cltunnel.experiments.analyses.swap.swap_vs_k` reads Table 5.4.1 off these curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cltunnel.experiments.analyses.loading import LoadedRun
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import format_mean_std
from cltunnel.store import SUBSTITUTION


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
    write_figure(substitution_figure(curves, title), path)


def substitution_figure(curves: pd.DataFrame, title: str = ""):
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
    return fig


def substitution_seeds(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> None:
    """Every seed's curves in one file and one figure, mean ± std bands (``<scenario>_substitution.*``)."""
    curves = [pd.read_csv(r / SUBSTITUTION) for r in runs if (r / SUBSTITUTION).exists()]
    if curves:
        allc = pd.concat(curves)
        allc.to_csv(out_dir / f"{scenario_dir.name}_{SUBSTITUTION}", index=False)
        plot_substitution(allc, out_dir / f"{scenario_dir.name}_substitution.png", scenario_dir.name)


def substitution_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """The curves as the page prints them: one row per x, one column per (direction, task); mean ± std
    (ddof 1) where the file pools seeds."""
    frame = frame.assign(curve=frame["direction"] + ", task " + frame["task"].astype(str))
    grouped = frame.groupby(["x", "curve"])["accuracy"]
    mean, std = grouped.mean().unstack(), grouped.std(ddof=1).unstack()
    shown = format_mean_std(mean, std, int(grouped.size().max()))
    return shown.rename_axis(index="x", columns=None)


@analysis("substitution", order=30, seeds=substitution_seeds, views={"*" + SUBSTITUTION: substitution_wide}, outputs={
    "*substitution.png": "Substitution curves M1[1:x] + M2[x+1:n] (thesis Fig. 5.5.1): from which layer on M2's "
                         "layers serve task 1 as well as M1's.",
    "*" + SUBSTITUTION: "The substitution curves as numbers: accuracy (%) on each task of M1[1:x]+M2[x+1:n] and "
                        "M2[1:x]+M1[x+1:n], by the number x of layers taken from the first model."})
def substitution_analysis(run: LoadedRun) -> dict[str, Any]:
    curves = substitution_curves(run)
    return {SUBSTITUTION: curves, "substitution.png": substitution_figure(curves, run.dir.parent.name)}
