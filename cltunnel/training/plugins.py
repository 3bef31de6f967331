"""Avalanche plugins that belong to cltunnel's run loop: progress bars that name what is training,
epoch checkpoints, and a wall-clock timer.
"""
from __future__ import annotations

import time
from typing import Callable

from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm


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
    """Saves the model every ``every`` epochs within each task (how the tunnel develops during training).

    The epoch is read from Avalanche's clock, which a mid-task resume puts back, so a resumed run writes the
    same ``task<t>_epoch<e>.pt`` files as one never stopped (a count of its own would restart at 0)."""

    def __init__(self, save: "Callable[[int, int], object]", every: int) -> None:
        super().__init__()
        self.save, self.every = save, every

    def after_training_epoch(self, strategy, **kwargs):
        epoch = epochs_finished(strategy, self)
        if self.every and epoch % self.every == 0:
            self.save(strategy.experience.current_experience, epoch)


def epochs_finished(strategy, plugin: SupervisedPlugin) -> int:
    """Epochs of the current task finished, read in ``plugin``'s ``after_training_epoch``: Avalanche's clock
    counts the epoch in its own after_training_epoch, which runs after the plugins listed before it."""
    plugins = strategy.plugins
    clock_after = plugins.index(strategy.clock) > plugins.index(plugin) if strategy.clock in plugins else True
    return strategy.clock.train_exp_epochs + (1 if clock_after else 0)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
