"""User classes for the capture tests (importable by name from a scenario: ``class: user_strategies:...``).
Each changes what a step does in a way that the numbers show, so a path that skipped it would be seen."""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_definitions import GenericPluginMetric
from avalanche.evaluation.metrics import Mean
from avalanche.training import Naive


class LoudBackward(Naive):
    """Zeroes its loss before backward: it must not learn (accuracy stays at chance)."""

    def _before_backward(self, **kwargs):
        self.loss = self.loss * 0
        super()._before_backward(**kwargs)


class NegatedForward(Naive):
    """Its own forward: the logits negated, so training drives the true class's logit down (below chance)."""

    def forward(self):
        return -super().forward()


class ForwardCalls(SupervisedPlugin):
    """A plugin that counts forward passes in ``before_forward`` (a hook inside the step)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def before_forward(self, strategy, **kwargs):
        self.calls += 1


class MeanLogitMetric(GenericPluginMetric):
    """A metric hooked inside the step (``after_forward``): the mean logit of each training minibatch."""

    def __init__(self):
        super().__init__(Mean(), reset_at="epoch", emit_at="epoch", mode="train")
        self.calls = 0

    def after_forward(self, strategy):
        self.calls += 1
        self._metric.update(float(strategy.mb_output.mean()), 1)

    def __str__(self):
        return "MeanLogit"


CALLS = {"metric": 0}


def mean_logit_metric():
    """The factory a scenario names (``evaluation.metrics: [user_strategies:mean_logit_metric]``)."""
    metric = MeanLogitMetric()
    CALLS["last"] = metric
    return metric


__all__ = ["LoudBackward", "NegatedForward", "ForwardCalls", "MeanLogitMetric", "mean_logit_metric", "torch"]


# ---- issue 30: ordinary user code that a detection rule misses (each changes the numbers if skipped) ----
class _ZeroLoss:
    """A callable object (a plain function could not go into a checkpoint that loads without running code)."""

    def __call__(self, strategy, **kwargs):
        strategy.loss = strategy.loss * 0


class _DuckZeroLoss:
    """Not a SupervisedPlugin at all: Avalanche calls any attribute named like a hook, and this one's
    ``before_backward`` is an instance attribute (set in __init__), so reading its class finds nothing."""

    def __init__(self):
        self.before_backward = _ZeroLoss()

    def __getattr__(self, name):  # every other callback: do nothing
        if name.startswith(("before_", "after_")):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class DuckTypedPlugin(Naive):
    """Naive with a duck-typed plugin that zeroes the loss: it must stay at chance on every path."""

    def __init__(self, **kwargs):
        kwargs["plugins"] = list(kwargs.get("plugins") or []) + [_DuckZeroLoss()]
        super().__init__(**kwargs)


class _ZeroLossPlugin(SupervisedPlugin):
    def before_backward(self, strategy, **kwargs):
        strategy.loss = strategy.loss * 0


class _AddAtTask2(SupervisedPlugin):
    """Adds a loss-zeroing plugin when the second task starts (hooked outside the step itself)."""

    def before_training_exp(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1 and not any(isinstance(p, _ZeroLossPlugin)
                                                                   for p in strategy.plugins):
            strategy.plugins.append(_ZeroLossPlugin())


class PluginAtTask2(Naive):
    """Task 2 must stay unlearned (its loss is zeroed from its first step)."""

    def __init__(self, **kwargs):
        kwargs["plugins"] = list(kwargs.get("plugins") or []) + [_AddAtTask2()]
        super().__init__(**kwargs)


class _PrependTask0Rows(SupervisedPlugin):
    """Keeps 32 rows of task 0 and, in task 1, puts them in front of every batch with their own task label
    (a rehearsal written the obvious way, in ``before_training_iteration``)."""

    def __init__(self):
        super().__init__()
        self.rows = None

    def before_training_iteration(self, strategy, **kwargs):
        x, y, t = strategy.mbatch
        if strategy.experience.current_experience == 0 and self.rows is None:
            self.rows = [x[:32].clone(), y[:32].clone(), t[:32].clone()]
        elif strategy.experience.current_experience > 0 and self.rows is not None:
            strategy.mbatch = [torch.cat([self.rows[0], x]), torch.cat([self.rows[1], y]),
                               torch.cat([self.rows[2], t])]


class PrependOldRows(Naive):
    def __init__(self, **kwargs):
        kwargs["plugins"] = list(kwargs.get("plugins") or []) + [_PrependTask0Rows()]
        super().__init__(**kwargs)


class FreshAdam(Naive):
    """A fresh Adam for every task (the self-check must save and restore Adam's moments and step count)."""

    def make_optimizer(self, **kwargs):
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
