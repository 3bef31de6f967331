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
