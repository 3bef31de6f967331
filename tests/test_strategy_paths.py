"""A strategy trains the same on every path (issue 23, item 1): cltunnel's device data path and captured step
change where batches come from and how fast a step runs, never what a strategy, plugin or metric does.

Each case runs twice on real MNIST, with ``training.capture`` off and on; a class that defines something
inside the step must give the eager numbers and name itself on the captured path."""
from __future__ import annotations

import pytest
import torch

from cltunnel.config import parse_config
from cltunnel.runs import run_seed
from cltunnel.store import load_metrics
from test_training import mnist_tiny

pytestmark = pytest.mark.slow


def two_tasks(out, capture, strategy, evaluation=None, **training):
    raw = mnist_tiny(out, data={"train_per_class": 300, "test_per_class": 100}, scenario={"n_tasks": None, "tasks": [5, 5]},
                     training={"epochs": 2, "capture": capture, **training}, strategy=strategy)
    if evaluation:
        raw["evaluation"] = evaluation
    return raw


def both_paths(mnist, tmp_path, capsys, strategy, evaluation=None):
    """The accuracy matrix with capture off and on, and what the captured run printed."""
    acc = {}
    for capture in ("off", "on"):
        run_dir = run_seed(parse_config(two_tasks(tmp_path / capture, capture, strategy, evaluation)), 0, mnist, False)
        acc[capture] = load_metrics(run_dir)["acc"]
        printed = capsys.readouterr().out
    return acc, printed


def test_a_user_hook_inside_the_step_runs_on_the_captured_path(mnist, tmp_path, capsys):
    """LoudBackward zeroes its loss in ``_before_backward``: it must stay at chance on both paths (before the
    fix it learned to 93 % with capture on: the override was skipped)."""
    acc, printed = both_paths(mnist, tmp_path, capsys, {"class": "user_strategies:LoudBackward"})
    assert acc["on"] == acc["off"]
    assert max(max(row) for row in acc["on"]) < 0.35  # 5 classes: chance is 20 %
    assert "capture: eager training step (LoudBackward._before_backward runs inside the step)" in printed


def test_a_user_forward_runs_on_the_device_path(mnist, tmp_path, capsys):
    """NegatedForward negates the logits in its own ``forward``: trained so, the model's own logits rank the
    true class last (accuracy far below chance), on both paths; the mixin's fast forward used to skip it."""
    acc, printed = both_paths(mnist, tmp_path, capsys, {"class": "user_strategies:NegatedForward"})
    assert acc["on"] == acc["off"]
    assert acc["on"][0][0] < 0.05
    assert "NegatedForward.forward runs inside the step" in printed


@pytest.mark.parametrize("name", ["DER", "ER_ACE"])
def test_avalanche_strategies_with_their_own_training_epoch_keep_it(mnist, tmp_path, capsys, name):
    """DER and ER-ACE override ``training_epoch`` (replay from their buffer); with the mixin first in the MRO
    they used to train as naive fine-tuning. Now: the same numbers on both paths, named, and not naive's."""
    acc, printed = both_paths(mnist, tmp_path, capsys, {"class": f"avalanche.training:{name}", "args": {"mem_size": 200}})
    assert acc["on"] == acc["off"]
    assert "capture: eager training step (" in printed and f"{name}.training_epoch" in printed
    naive = load_metrics(run_seed(parse_config(two_tasks(tmp_path / "naive", "off", {"name": "naive"})), 0, mnist,
                                  False))["acc"]
    assert acc["on"][1] != naive[1]  # the replay acted


def test_a_metric_hooked_inside_the_step_keeps_it(mnist, tmp_path, capsys):
    """A metric of the evaluator with an ``after_forward`` hook: the EvaluationPlugin forwards it, so the
    captured step (which has no after_forward) must not be used; the metric sees every minibatch."""
    import user_strategies

    evaluation = {"metrics": ["accuracy", "user_strategies:mean_logit_metric"], "loggers": []}
    acc, printed = both_paths(mnist, tmp_path, capsys, {"name": "naive"}, evaluation)
    assert acc["on"] == acc["off"]
    assert "MeanLogitMetric.after_forward runs inside the step" in printed
    assert user_strategies.CALLS["last"].calls == 2 * 2 * 12  # 2 tasks x 2 epochs x 12 minibatches of 128 (1,500 rows)


def test_a_plugin_hook_inside_the_step_is_named():
    from cltunnel.training.capture_rules import capture_blockers
    from avalanche.training import Naive
    from user_strategies import ForwardCalls

    strategy = object.__new__(Naive)
    strategy.plugins = [ForwardCalls()]
    assert capture_blockers(strategy) == ["ForwardCalls.before_forward"]


def test_rows_a_strategy_adds_from_other_tasks_go_through_their_own_heads():
    """DER puts buffer rows of earlier tasks in front of the batch (``_before_forward``); the device path's
    one-head forward would send them through the current task's head. Only the loader's own batch takes the
    fast path; a new tensor goes through Avalanche's forward, each row to its own head (as Avalanche does)."""
    from types import SimpleNamespace

    from avalanche.training import DER
    from cltunnel.models.zoo import build_model
    from cltunnel.training.fast_data import with_fast_data

    torch.manual_seed(0)
    model = build_model("mlp", [5, 5], (1, 28, 28), 0.25, depth=3).eval()
    strategy = object.__new__(with_fast_data(DER))

    import cltunnel.training.fast_data as fd
    loader = object.__new__(fd.DeviceBatches)
    loader.task_label, loader.last_x = 1, torch.randn(3, 1, 28, 28)
    strategy.__dict__.update(model=model, run_context=None, dataloader=loader, is_training=True,
                             device=torch.device("cpu"), experience=SimpleNamespace(task_labels=[1]))
    strategy.run_context = fd.RunContext(data=None)
    buffer = torch.randn(3, 1, 28, 28)
    strategy.mbatch = [torch.cat([buffer, loader.last_x]), None, torch.tensor([0, 0, 0, 1, 1, 1])]
    with torch.no_grad():
        out = strategy.forward()
        # rows go through a head in another batch composition: equal up to float summation order
        assert torch.allclose(out[:3], model(buffer, 0), atol=1e-6) and torch.allclose(out[3:], model(loader.last_x, 1),
                                                                                        atol=1e-6)
        strategy.mbatch = [loader.last_x, None, torch.tensor([1, 1, 1])]
        assert torch.allclose(strategy.forward(), model(loader.last_x, 1))
