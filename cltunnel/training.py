"""Training on device-resident tensors, driven by Avalanche's SupervisedTemplate.

Avalanche owns the loop (so its plugins, evaluators and strategies work unchanged); cltunnel owns the
data path. :class:`FastDataMixin` replaces the template's DataLoader with :class:`DeviceBatches`, which
indexes uint8 tensors already on the device, augments and normalises whole batches there, and yields
``[x, y, task]`` exactly like an Avalanche loader. It is mixed into any strategy class, a user's too.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from avalanche.core import SupervisedPlugin

from .config import ConfigError, TrainingConfig
from .data import DeviceAugment, ImageData, Normalise
from .scenarios import SplitScenario, Task


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' was asked for, but no CUDA GPU is available here (use 'auto' or 'cpu')")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device: '{name}' is not a torch device ({err})") from None


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
            yield [x, y, torch.full_like(y, self.task_label)]


def task_generator(device: torch.device, seed: int, task: int) -> torch.Generator:
    """One RNG per (seed, task): a resumed run shuffles and augments exactly as an uninterrupted one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 10_007 + task)
    return gen


class TemperatureCrossEntropy(nn.Module):
    """Cross-entropy of logits / T (the thesis's chapter 6 knob on tunnel strength); T=1 is plain CE."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float() / self.temperature, target)


class FastDataMixin:
    """Mixed in front of any Avalanche SGD strategy class to feed it from :class:`DeviceData`.

    Without ``self.cltunnel_data`` (a strategy used outside cltunnel) every method defers to Avalanche.
    """

    cltunnel_data: DeviceData | None = None
    cltunnel_seed: int = 0
    cltunnel_amp: bool = False

    def make_train_dataloader(self, **kwargs) -> None:
        if self.cltunnel_data is None:
            return super().make_train_dataloader(**kwargs)  # type: ignore[misc]
        task = self.cltunnel_data.scenario.tasks[self.experience.current_experience]
        gen = task_generator(self.cltunnel_data.device, self.cltunnel_seed, task.id)
        self.dataloader = self.cltunnel_data.batches(task, "train", self.train_mb_size, gen)

    def make_eval_dataloader(self, **kwargs) -> None:
        if self.cltunnel_data is None:
            return super().make_eval_dataloader(**kwargs)  # type: ignore[misc]
        task = self.cltunnel_data.scenario.tasks[self.experience.current_experience]
        self.dataloader = self.cltunnel_data.batches(task, "test", self.eval_mb_size)

    def forward(self):
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.cltunnel_amp else contextlib.nullcontext()
        with amp:
            if isinstance(self.dataloader, DeviceBatches):  # one task per batch: no per-batch unique()/sync
                out = self.model(self.mb_x, self.dataloader.task_label)
            else:
                out = super().forward()  # type: ignore[misc]
        return out.float()


def with_fast_data(strategy_cls: type) -> type:
    """``strategy_cls`` with the device data path in front of it (once)."""
    if issubclass(strategy_cls, FastDataMixin):
        return strategy_cls
    return type(strategy_cls.__name__, (FastDataMixin, strategy_cls), {"__module__": strategy_cls.__module__})


class ProgressPlugin(SupervisedPlugin):
    """A tqdm bar per task (iterations over all epochs, loss in the postfix). ``label`` names the bar where
    "task k" would not say which part of a run it is (the erosion phases all train one task)."""

    def __init__(self, enabled: bool = True, label: str | None = None) -> None:
        super().__init__()
        self.enabled, self.label, self.bar = enabled, label, None

    def before_training_exp(self, strategy, **kwargs):
        total = strategy.train_epochs * len(strategy.dataloader)
        desc = self.label or f"task {strategy.experience.current_experience}"
        self.bar = tqdm(total=total, desc=desc, unit="it",
                        disable=not self.enabled, leave=False, dynamic_ncols=True)

    def after_training_iteration(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{strategy.loss.item():.3f}", epoch=strategy.clock.train_exp_epochs + 1)

    def after_training_exp(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EpochCheckpointPlugin(SupervisedPlugin):
    """Saves the model every ``every`` epochs within each task (how the tunnel develops during training)."""

    def __init__(self, save: "Callable[[int, int], object]", every: int) -> None:
        super().__init__()
        self.save, self.every, self.epoch = save, every, 0

    def before_training_exp(self, strategy, **kwargs):
        self.epoch = 0

    def after_training_epoch(self, strategy, **kwargs):
        self.epoch += 1
        if self.every and self.epoch % self.every == 0:
            self.save(strategy.experience.current_experience, self.epoch)


@torch.no_grad()
def predict_accuracy(model: nn.Module, data: DeviceData, task: Task, rows: torch.Tensor | None = None,
                     batch_size: int = 1000, amp: bool = False, split: str = "test") -> float:
    """Accuracy of ``model`` on a task's test rows (or, with ``split="eval_train"``, its unaugmented training
    rows), through that task's head (NaN for no rows)."""
    batches = data.batches(task, split, batch_size, rows=rows)
    if len(batches.rows) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        for x, y, _ in batches:
            correct += (model(x, task.head).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(batches.rows)


def exact_rows_accuracy(model: nn.Module, data: DeviceData, task: Task, acc: float, batch_size: int = 1000,
                        amp: bool = False) -> float:
    """Accuracy through the task's head on its exact-pixel test rows, given ``acc`` on all its chosen test rows."""
    return task.exact_rows_accuracy(acc, lambda rows: predict_accuracy(model, data, task, rows, batch_size, amp))


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def amp_enabled(cfg: TrainingConfig, device: torch.device) -> bool:
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def channels_last_enabled(cfg: TrainingConfig, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
