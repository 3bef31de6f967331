"""matplotlib on the file-only backend, and the finishing every figure shares (grid, legend, PNG).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, axes, path: Path, legend_size: int = 8) -> None:
    """Grid and legend on every axis, then write the PNG and free the figure."""
    plt = pyplot()
    for ax in np.atleast_1d(axes).flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
