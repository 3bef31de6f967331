"""The device data path: a scenario's uint8 images on the training device, batches indexed, augmented and
normalised there, and a torch.Generator per (seed, task) so that a resumed run draws the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from cltunnel.config import ConfigError
from cltunnel.data.images import DeviceAugment, ImageData, Normalise
from cltunnel.data.scenarios import SplitScenario, Task


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' was asked for, but no CUDA GPU is available here (use 'auto' or 'cpu')")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device: '{name}' is not a torch device ({err})") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: '{name}' was asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@dataclass
class DeviceData:
    """The scenario's tensors on the training device, plus how to turn them into network inputs."""

    scenario: SplitScenario
    device: torch.device
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    normalise: Normalise
    augment: DeviceAugment | None
    channels_last: bool
    label_maps: list[torch.Tensor]
    # Applied to training batches after augmentation, (uint8 images, their row ids) -> images: a marker that
    # must sit at a fixed place whatever the crop (feature erosion's squares).
    overlay: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def create(cls, scenario: SplitScenario, device: torch.device, augment: bool, channels_last: bool
               ) -> "DeviceData":
        data: ImageData = scenario.data
        mean, std = data.channel_stats()
        return cls(scenario, device, data.x_train.to(device), data.y_train.to(device), data.x_test.to(device),
                   data.y_test.to(device), Normalise(mean, std).to(device),
                   DeviceAugment() if augment else None, channels_last,
                   [t.label_map.to(device) for t in scenario.tasks])

    def batches(self, task: Task, split: str, batch_size: int, generator: torch.Generator | None = None,
                rows: torch.Tensor | None = None) -> "DeviceBatches":
        """``train``: training rows, shuffled and augmented (needs ``generator``); ``eval_train``: training
        rows in order, unaugmented (features for probes); ``test``: the chosen test rows in order."""
        if split not in ("train", "eval_train", "test"):
            raise ValueError(f"split must be train, eval_train or test, got {split!r}")
        on_train = split != "test"
        if rows is None:
            rows = task.train_idx if on_train else task.test_idx
        x, y = (self.x_train, self.y_train) if on_train else (self.x_test, self.y_test)
        shuffle = split == "train"
        return DeviceBatches(self, x, y, rows.to(self.device), self.label_maps[task.id], task.head, batch_size,
                             generator if shuffle else None, self.augment if shuffle else None,
                             self.overlay if on_train else None)


class DeviceBatches:
    """An Avalanche-compatible loader over device tensors: ``[x, y, t]`` batches, no per-sample Python."""

    def __init__(self, data: DeviceData, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
                 label_map: torch.Tensor, task_label: int, batch_size: int, generator: torch.Generator | None,
                 augment: DeviceAugment | None, overlay: Callable | None = None) -> None:
        self.data, self.x, self.y, self.rows = data, x, y, rows
        self.label_map, self.task_label, self.batch_size = label_map, task_label, batch_size
        self.generator, self.augment, self.overlay = generator, augment, overlay
        self.last_x: torch.Tensor | None = None  # the batch last yielded: all of it is this loader's task
    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        rows = self.rows
        if self.generator is not None:
            rows = rows[torch.randperm(len(rows), generator=self.generator, device=rows.device)]
        for start in range(0, len(rows), self.batch_size):
            idx = rows[start : start + self.batch_size]
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            if self.overlay is not None:
                x = self.overlay(x, idx)
            x = self.data.normalise(x)
            if self.data.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.label_map[self.y[idx]]
            self.last_x = x
            yield [x, y, torch.full_like(y, self.task_label)]


def task_generator(device: torch.device, seed: int, task: int) -> torch.Generator:
    """One RNG per (seed, task): a resumed run shuffles and augments exactly as an uninterrupted one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 10_007 + task)
    return gen
