"""matplotlib on the file-only backend, and the finishing every figure shares (grid, legend, PNG): every
figure cltunnel writes goes through :func:`write_figure` (120 dpi).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cltunnel.reports.captions import declare_shown_by, declare_written
from cltunnel.store import HISTORY_FIGURE, HISTORY_FILE


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_axes(fig, axes, legend_size: int = 8):
    """Grid and legend on every axis; returns the figure (for an analysis to return, or to write)."""
    for ax in np.atleast_1d(axes).flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    return fig


def save_figure(fig, axes, path: Path, legend_size: int = 8) -> None:
    """Grid and legend on every axis, then write the PNG and free the figure."""
    write_figure(finish_axes(fig, axes, legend_size), path)


def write_figure(fig, path: Path, dpi: int = 120, tight: bool = True) -> None:
    """Lay out (``tight``), write the PNG (120 dpi, as every figure of a run; the toy-data protocols' sample
    grids keep their own) and free the figure. Every PNG cltunnel writes goes through here."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    """Training curves: loss and training accuracy per epoch over the whole task sequence, the test accuracy of
    each task where it was measured, task boundaries dashed."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = np.arange(1, len(history) + 1)
    left.plot(x, history["loss"], color="C0", label="training loss")
    left.set(xlabel="epoch (all tasks)", ylabel="loss", yscale="log")
    right.plot(x, 100 * history["train_acc"], color="k", lw=1, alpha=0.6, label="training accuracy")
    for column in [c for c in history.columns if c.startswith("test_acc_task")]:
        seen = history[column].notna().to_numpy()
        right.plot(x[seen], 100 * history[column][seen], marker="o", ms=3, label=column.replace("test_acc_", "test, "))
    right.set(xlabel="epoch (all tasks)", ylabel="accuracy (%)")
    for boundary in np.flatnonzero(np.diff(history["task"].to_numpy())) + 1.5:
        for ax in (left, right):
            ax.axvline(boundary, color="grey", ls="--", lw=0.8)
    save_figure(fig, (left, right), path, legend_size=7)


# The page's captions of the training curves (the first of a run's figures); the per-epoch log is shown by them.
declare_written({HISTORY_FIGURE: "Training curves: loss and training accuracy per epoch over the task sequence, and each "
                                  "task's test accuracy where measured (task boundaries dashed)."}, place=10)
declare_shown_by({HISTORY_FILE: HISTORY_FIGURE})
