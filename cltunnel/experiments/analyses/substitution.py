"""Layer substitution curves (thesis Figures 5.11.x): for every x, the first x body layers of one model under
the rest of the other, in both directions, on every task (analysis ``substitution``: ``substitution.csv``/
``.png``). :func:`~cltunnel.experiments.analyses.swap.swap_vs_k` reads Table 5.4.1 off these curves."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cltunnel.experiments.analyses.loading import LoadedRun
from cltunnel.experiments.analyses.registry import register_analysis
from cltunnel.reports.figures import pyplot, write_figure


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
    write_figure(fig, path)


@register_analysis("substitution")
def substitution_analysis(run: LoadedRun) -> pd.DataFrame:
    curves = substitution_curves(run)
    curves.to_csv(run.run_dir / "substitution.csv", index=False)
    plot_substitution(curves, run.run_dir / "substitution.png", run.run_dir.parent.name)
    return curves
