"""A tqdm bar per task that names what is training."""
from __future__ import annotations

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
