"""Training curves: one row per epoch (loss, training accuracy, test accuracy of the tasks seen so far) in
``history.csv``, and the same scalars in TensorBoard event files under ``<run>/tensorboard``.

The rows live in the run's metrics (task checkpoints carry them, a mid-task state carries the rows of its
task so far), so a resumed run's history is whole. Loss and accuracy are summed on the device and read once
per epoch: recording them adds no host sync to a training step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from avalanche.core import SupervisedPlugin

from cltunnel.reports.figures import plot_history
from cltunnel.store import atomic_write_text

HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"


def open_tensorboard(run_dir: Path, enabled: bool) -> Any:
    """A SummaryWriter for the run (None when switched off); events append across resumed processes."""
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard's protobufs: only when used

    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))


class HistoryPlugin(SupervisedPlugin):
    """Appends a row per epoch to ``rows`` (the run's ``metrics["history"]``); every ``eval_every`` epochs
    (0: never) ``evaluate(task)`` gives the test accuracy of tasks 0..task. Writes scalars to ``writer``."""
    transient = True  # its rows are saved with the metrics, not as plugin state

    def __init__(self, rows: list[dict[str, Any]], evaluate: Callable[[int], list[float]], eval_every: int = 0,
                 writer: Any = None) -> None:
        super().__init__()
        self.rows, self.evaluate, self.eval_every, self.writer = rows, evaluate, eval_every, writer
        self.loss = self.correct = None
        self.seen = 0

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        device = strategy.device
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        n = len(strategy.mb_y)
        self.loss += strategy.loss.detach().float().sum() * n  # Avalanche's loss may be shape [1]
        output = strategy.mb_output
        if output is not None and output.shape[0] == n:
            self.correct += (output.detach().argmax(1) == strategy.mb_y).sum()
        self.seen += n

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        task = strategy.experience.current_experience
        epoch = 1 + sum(row["task"] == task for row in self.rows)
        row: dict[str, Any] = {"task": task, "epoch": epoch, "loss": self.loss.item() / max(self.seen, 1),
                               "train_acc": self.correct.item() / max(self.seen, 1)}
        if self.eval_every and epoch % self.eval_every == 0:
            row.update(test_columns(self.evaluate(task)))
        self.rows.append(row)
        self.write_scalars(row)

    def write_scalars(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = len(self.rows)  # epochs trained so far, over all tasks
        self.writer.add_scalar("train/loss", row["loss"], step)
        self.writer.add_scalar("train/accuracy", row["train_acc"], step)
        for key, value in row.items():
            if key.startswith("test_acc_"):
                self.writer.add_scalar(f"test/{key.removeprefix('test_acc_')}", value, step)
        self.writer.flush()


def test_columns(acc: list[float]) -> dict[str, float]:
    """Tasks numbered from 0, as in the accuracy-matrix tables ("after task 0", "task 0"); epochs from 1."""
    return {f"test_acc_task{j}": a for j, a in enumerate(acc)}


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
        plot_history(frame, run_dir / "history.png")
