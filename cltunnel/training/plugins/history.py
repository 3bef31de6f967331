"""The training curves' rows: loss, training accuracy and (every few epochs) the test accuracy of the tasks
seen so far, one row per epoch, also written to the run's TensorBoard stream.

Loss and accuracy are summed on the device and read once per epoch: recording them adds no host sync to a
training step. The rows are the run's ``metrics["history"]``; :mod:`cltunnel.training.history` writes them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from avalanche.core import SupervisedPlugin


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
