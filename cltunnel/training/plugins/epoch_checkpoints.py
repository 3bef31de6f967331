"""Checkpoints every few epochs inside a task: how the tunnel develops during training."""
from __future__ import annotations

from typing import Callable

from avalanche.core import SupervisedPlugin


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
