"""Mid-task resume: a state saved every few epochs inside a task, and put back where it was saved."""
from __future__ import annotations

from typing import Any, Callable

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import LRSchedulerPlugin

from cltunnel.models.layered import LayeredModel
from cltunnel.training.checkpoints import load_model_state, load_strategy_state


class MidTaskResumePlugin(SupervisedPlugin):
    """Every ``every`` epochs inside a task, ``save`` (:func:`~cltunnel.training.checkpoints.save_partial_task`);
    when a task resumes from such a state, puts it back (optimizer, strategy and clock, batch order, RNG) just
    before its first remaining epoch, after Avalanche has reset the optimizer for the new experience.

    Both happen at the start of an epoch: by then every plugin has finished the epoch before (the learning
    rate schedule has stepped), so a state is saved and put back at the same point of the loop."""

    def __init__(self, every: int, epochs: int, save: Callable[[int, int], Any]) -> None:
        super().__init__()
        self.every, self.epochs, self.save = every, epochs, save
        self.task, self.epochs_done, self.pending = 0, 0, None

    def start_task(self, task: int, state: dict[str, Any] | None, model: LayeredModel) -> None:
        self.task, self.pending, self.epochs_done = task, state, 0
        if state is not None:
            load_model_state(model, state)
            self.epochs_done = state["epochs_done"]
            print(f"resuming task {task + 1} after epoch {self.epochs_done} of {self.epochs}", flush=True)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if self.pending is not None:
            self._restore(strategy)
        elif self.every and self.epochs_done and self.epochs_done % self.every == 0:
            self.save(self.task, self.epochs_done)

    def _restore(self, strategy: Any) -> None:
        state, self.pending = self.pending, None
        strategy.optimizer.load_state_dict(state["optimizer"])
        load_strategy_state(strategy, state["strategy"])
        if state["data_generator"] is not None:
            strategy.dataloader.generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        for plugin in strategy.plugins:
            if isinstance(plugin, LRSchedulerPlugin):  # the schedule continues at the epoch reached (the lr
                plugin.scheduler.last_epoch = state["epochs_done"]  # itself came back with the optimizer)
                plugin.scheduler._last_lr = [group["lr"] for group in strategy.optimizer.param_groups]

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.epochs_done += 1
