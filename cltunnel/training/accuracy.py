"""Accuracy of a model on a task's test rows (all chosen rows, and the exact-pixel rows alone), on the
device data path.

Always in float32, whatever precision training used (``training.amp``): the accuracy matrix, the curves and
every analysis evaluate the same way, so identities such as E1+T1 on task 1 = a[0][0] hold on CUDA as on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cltunnel.data.device import DeviceData
from cltunnel.data.scenarios import Task
from cltunnel.models.layered import LayeredModel


@dataclass
class Evaluation:
    acc: list[float]
    acc_lossless: list[float]


def evaluate_all(model: LayeredModel, data: DeviceData, batch_size: int) -> Evaluation:
    """Accuracy on every task's chosen test rows, and on its exact-pixel rows alone."""
    tasks = data.scenario.tasks
    acc = [predict_accuracy(model, data, t, None, batch_size) for t in tasks]
    return Evaluation(acc, [exact_rows_accuracy(model, data, t, a, batch_size) for t, a in zip(tasks, acc)])


def evaluate_seen(model: LayeredModel, data: DeviceData, task: int, batch_size: int) -> list[float]:
    """Accuracy on the chosen test rows of tasks 0..task (the training curves' test columns)."""
    return [predict_accuracy(model, data, t, None, batch_size) for t in data.scenario.tasks[: task + 1]]


@torch.no_grad()
def predict_accuracy(model: nn.Module, data: DeviceData, task: Task, rows: torch.Tensor | None = None,
                     batch_size: int = 1000, split: str = "test") -> float:
    """Accuracy of ``model`` on a task's test rows (or, with ``split="eval_train"``, its unaugmented training
    rows), through that task's head (NaN for no rows)."""
    batches = data.batches(task, split, batch_size, rows=rows)
    if len(batches.rows) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    for x, y, _ in batches:
        correct += (model(x, task.head).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(batches.rows)


def exact_rows_accuracy(model: nn.Module, data: DeviceData, task: Task, acc: float, batch_size: int = 1000) -> float:
    """Accuracy through the task's head on its exact-pixel test rows, given ``acc`` on all its chosen test rows."""
    return task.exact_rows_accuracy(acc, lambda rows: predict_accuracy(model, data, task, rows, batch_size))
