"""Split scenarios: which classes, rows and labels make each task, as an Avalanche benchmark too.

The benchmark comes from Avalanche's ``nc_benchmark`` (so Avalanche strategies and plugins see ordinary
experiences); cltunnel keeps, beside it, each task's row indices into the device-resident tensors so that
training never goes through per-sample ``__getitem__``. A test checks both views hold the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from avalanche.benchmarks import nc_benchmark
from torch.utils.data import Dataset

from cltunnel.config import ConfigError, RunConfig
from cltunnel.data.images import ImageData


@dataclass
class Task:
    """One experience: its classes (original ids, in class order) and its rows, with labels as trained."""

    id: int
    classes: list[int]
    train_idx: torch.Tensor  # rows of ImageData.x_train
    test_idx: torch.Tensor  # rows of ImageData.x_test (the chosen test rows)
    test_lossless_idx: torch.Tensor  # the subset of test_idx with exact pixels
    label_map: torch.Tensor  # original class id -> trained label (-1 outside the task)
    head: int  # which head answers this task (task id; 0 for every task in class-incremental mode)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def test_rows_all_exact(self) -> bool:
        """Every chosen test row has exact pixels (MNIST, ``test_rows: lossless``): exact-row accuracy is the
        accuracy itself, no second pass needed."""
        return len(self.test_lossless_idx) == len(self.test_idx)

    def exact_rows_accuracy(self, acc: float, accuracy_on: Callable[[torch.Tensor], float]) -> float:
        """Accuracy on the exact-pixel test rows, given ``acc`` on all the chosen test rows and a way to measure
        on given rows: one rule for every evaluator (the model's own head, a probe), NaN where there are none."""
        if self.test_rows_all_exact:
            return acc
        if not len(self.test_lossless_idx):
            return float("nan")
        return accuracy_on(self.test_lossless_idx)


@dataclass
class SplitScenario:
    data: ImageData
    tasks: list[Task]
    mode: str
    class_order: list[int]
    benchmark: object = None  # the Avalanche benchmark, built on demand (see avalanche_benchmark)

    @property
    def head_sizes(self) -> list[int]:
        if self.mode == "class":
            return [len(self.class_order)]
        return [t.n_classes for t in self.tasks]


def task_sizes(cfg: RunConfig, num_classes: int) -> list[int]:
    """Classes per task from the config, refusing splits that do not add up to the dataset."""
    sc = cfg.scenario
    if sc.tasks is not None:
        sizes = list(sc.tasks)
        if any(s < 1 for s in sizes):
            raise ConfigError(f"scenario.tasks: every task needs at least one class, got {sizes}")
        if sum(sizes) != num_classes:
            raise ConfigError(
                f"scenario.tasks: {' + '.join(map(str, sizes))} = {sum(sizes)} classes, but dataset "
                f"'{cfg.data.name}' has {num_classes}")
        return sizes
    n = sc.n_tasks or 0
    if n < 1 or num_classes % n:
        raise ConfigError(f"scenario.n_tasks: {num_classes} classes of '{cfg.data.name}' do not split into {n} equal tasks")
    return [num_classes // n] * n


def resolve_class_order(cfg: RunConfig, num_classes: int) -> list[int]:
    order = cfg.scenario.class_order
    if order is None:
        return list(range(num_classes))
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(f"scenario.class_order: must be a permutation of 0..{num_classes - 1}, got {order}")
    return list(order)


def _first_per_class(labels: torch.Tensor, rows: torch.Tensor, cap: int | None) -> torch.Tensor:
    """Keep the first ``cap`` rows of each class (in dataset order): a deterministic, seed-free subset."""
    if cap is None:
        return rows
    keep = torch.zeros(len(rows), dtype=torch.bool)
    row_labels = labels[rows]
    for c in torch.unique(row_labels).tolist():
        keep[torch.nonzero(row_labels == c).flatten()[:cap]] = True
    return rows[keep]


def build_scenario(cfg: RunConfig, data: ImageData) -> SplitScenario:
    sizes = task_sizes(cfg, data.num_classes)
    order = resolve_class_order(cfg, data.num_classes)
    test_rows = torch.arange(len(data.y_test))
    if cfg.data.test_rows == "lossless":
        test_rows = test_rows[data.test_lossless]
    train_pool = _first_per_class(data.y_train, torch.arange(len(data.y_train)), cfg.data.train_per_class)
    test_pool = _first_per_class(data.y_test, test_rows, cfg.data.test_per_class)
    tasks, start = [], 0
    for t, size in enumerate(sizes):
        classes = order[start : start + size]
        label_map = torch.full((data.num_classes,), -1, dtype=torch.long)
        first_label = start if cfg.scenario.mode == "class" else 0
        label_map[torch.tensor(classes)] = torch.arange(first_label, first_label + size)
        cls = torch.tensor(classes)
        train_idx = train_pool[torch.isin(data.y_train[train_pool], cls)]
        test_idx = test_pool[torch.isin(data.y_test[test_pool], cls)]
        tasks.append(Task(t, classes, train_idx, test_idx, test_idx[data.test_lossless[test_idx]], label_map,
                          head=t if cfg.scenario.mode == "task" else 0))
        start += size
    return SplitScenario(data, tasks, cfg.scenario.mode, order)


class NormalisedImages(Dataset):
    """Per-sample view (standardised float) of chosen rows, for Avalanche code that builds its own loaders."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.x, self.rows = x, rows
        self.targets = y[rows].tolist()
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        x = self.x[self.rows[i]].float().div_(255.0).sub_(self.mean).div_(self.std)
        return x, self.targets[i]


def avalanche_benchmark(scenario: SplitScenario, mean: torch.Tensor, std: torch.Tensor):
    """The same split as an Avalanche ``nc_benchmark`` (task labels and per-task ids in task mode)."""
    data = scenario.data
    train_rows = torch.cat([t.train_idx for t in scenario.tasks]).sort().values
    test_rows = torch.cat([t.test_idx for t in scenario.tasks]).sort().values
    task_mode = scenario.mode == "task"
    scenario.benchmark = nc_benchmark(
        NormalisedImages(data.x_train, data.y_train, train_rows, mean, std),
        NormalisedImages(data.x_test, data.y_test, test_rows, mean, std),
        n_experiences=len(scenario.tasks),
        task_labels=task_mode,
        shuffle=False,
        fixed_class_order=scenario.class_order,
        per_exp_classes={t.id: t.n_classes for t in scenario.tasks},
        class_ids_from_zero_in_each_exp=task_mode,
        class_ids_from_zero_from_first_exp=not task_mode,
    )
    return scenario.benchmark
