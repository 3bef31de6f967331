"""Training curves: one row per epoch (loss, training accuracy, test accuracy of the tasks seen so far) in
``history.csv``, and the same scalars in the run's TensorBoard stream (:mod:`cltunnel.training.tensorboard`).

The rows are recorded by :class:`~cltunnel.training.plugins.history.HistoryPlugin` and live in the run's
metrics (task checkpoints carry them, a mid-task state carries the rows of its task so far), so a resumed
run's history is whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cltunnel.reports.figures import plot_history
from cltunnel.store import HISTORY_FIGURE, HISTORY_FILE, atomic_write_text
from cltunnel.training.plugins.history import HistoryPlugin, test_columns

__all__ = ["HistoryPlugin", "end_of_task", "write_history"]  # HistoryPlugin: its former home, still importable


def end_of_task(rows: list[dict[str, Any]], acc: list[float], task: int, writer: Any) -> None:
    """The task's evaluation (every task, at its end) goes into its last row and into TensorBoard as a row of
    the accuracy matrix (step = tasks trained)."""
    if rows:
        rows[-1].update(test_columns(acc[: task + 1]))
    if writer is not None:
        for j, a in enumerate(acc):
            writer.add_scalar(f"accuracy_matrix/task{j}", a, task + 1)
        writer.flush()


def write_history(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """history.csv and its figure (history.png)."""
    if rows:
        frame = pd.DataFrame(rows)
        atomic_write_text(run_dir / HISTORY_FILE, frame.to_csv(index=False, float_format="%.6g"))
        plot_history(frame, run_dir / HISTORY_FIGURE)
