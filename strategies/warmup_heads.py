"""Example user strategy: on each new task, train only its head for a few epochs before fine-tuning.

Fine-tuning under a freshly initialised head distorts the features it starts from (Kumar et al. 2022,
"LP-FT"); a linear-probe warm-up first lets the body start moving only once the head is sensible. In CL
terms the body, and so the old tasks, should be disturbed less. Name it in a scenario:

    strategy:
      class: strategies.warmup_heads:WarmupHeads
      args: {warmup_epochs: 2}
"""
from __future__ import annotations

from avalanche.training import Naive


class WarmupHeads(Naive):
    """Naive fine-tuning; from the second task on, the first ``warmup_epochs`` epochs train the head only."""

    def __init__(self, *, warmup_epochs: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.warmup_epochs = warmup_epochs

    def body_frozen(self) -> bool:
        return self.experience.current_experience > 0 and self.clock.train_exp_epochs < self.warmup_epochs

    def _before_training_epoch(self, **kwargs) -> None:
        super()._before_training_epoch(**kwargs)
        frozen = self.body_frozen()
        self.model.body.requires_grad_(not frozen)  # no gradient: SGD leaves those weights exactly as they are
        self.model.body.train(not frozen)  # BatchNorm statistics frozen too while warming up
