"""The captured training step (training.capture): compiled forward+loss+backward+SGD equals the eager step
within a stated tolerance over several hundred steps on real data; strategies whose plugins need Python
inside the step keep the eager path and say so."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cltunnel.config import ConfigError, parse_config
from cltunnel.runs import run_seed
from cltunnel.store import load_metrics
from cltunnel.training import loop
from cltunnel.training.capture import capture_blockers
from test_training import mnist_tiny

pytestmark = pytest.mark.slow


def two_tasks(out, capture, strategy="naive", epochs=5, per_class=2000):
    # 2 tasks x 10,000 MNIST images, batch 128: 79 steps an epoch, 395 a task, 790 in all
    return mnist_tiny(out, data={"train_per_class": per_class, "test_per_class": 100},
                      scenario={"n_tasks": None, "tasks": [5, 5]}, training={"epochs": epochs, "capture": capture,
                                                                             "momentum": 0.9, "lr_milestones": [4]},
                      strategy=strategy)


def layer_distance(a_dir, b_dir, task: int) -> float:
    """The largest relative distance, over weight tensors, between two runs' models after ``task``."""
    a, b = (torch.load(d / f"task{task}.pt", weights_only=True)["layers"] for d in (a_dir, b_dir))
    return max(float((v - b[n][k]).norm() / v.norm()) for n in a for k, v in a[n].items() if v.is_floating_point())


def test_captured_step_equals_the_eager_step_over_hundreds_of_steps(mnist, tmp_path, capsys, monkeypatch):
    """Stated tolerance. Compiled kernels sum in another order, so the two paths differ by float32 rounding
    from the first step, and SGD with momentum amplifies any such difference: the yardstick is measured in
    the same test, as the eager step from initial weights moved by one float32 rounding (1e-7 relative).
    The first epoch (79 steps) must agree to 1e-4 in loss (a wrong update would not: measured 6 equal digits);
    after 395 and 790 steps the captured run may be no further from the eager one than 3x the rounded run is,
    in weights, per-epoch loss and accuracy. (Measured here: the rounded run ends 16 % / 47 % of the weights'
    norm away after 395 / 790 steps, the captured one 0.9 % / 28 %: this training is chaotic at lr 0.1.)"""
    eager_dir = run_seed(parse_config(two_tasks(tmp_path / "eager", "off")), 0, mnist, False)
    captured_dir = run_seed(parse_config(two_tasks(tmp_path / "captured", "on")), 0, mnist, False)
    assert "capture: eager" not in capsys.readouterr().out  # naive: nothing blocks the captured step
    build = loop.make_model

    def rounded(spec, seed):
        model = build(spec, seed)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen))
        return model

    monkeypatch.setattr(loop, "make_model", rounded)
    floor_dir = run_seed(parse_config(two_tasks(tmp_path / "rounded", "off")), 0, mnist, False)
    loss = {d: np.genfromtxt(d / "history.csv", delimiter=",", names=True)["loss"]
            for d in (eager_dir, captured_dir, floor_dir)}
    assert loss[captured_dir][0] == pytest.approx(loss[eager_dir][0], rel=1e-4)
    for task in (0, 1):
        assert layer_distance(eager_dir, captured_dir, task) <= 3 * layer_distance(eager_dir, floor_dir, task), task
    drift = {d: np.abs(loss[d] / loss[eager_dir] - 1).max() for d in (captured_dir, floor_dir)}
    assert drift[captured_dir] <= 3 * drift[floor_dir] + 1e-4
    acc = {d: np.asarray(load_metrics(d)["acc"]) for d in (eager_dir, captured_dir, floor_dir)}
    assert np.abs(acc[captured_dir] - acc[eager_dir]).max() <= max(0.01, 3 * np.abs(acc[floor_dir] - acc[eager_dir]).max())


def test_strategies_that_need_python_inside_the_step_stay_eager_and_say_why(mnist, tmp_path, capsys):
    run_dir = run_seed(parse_config(two_tasks(tmp_path / "ewc", "on", {"name": "ewc"}, epochs=1, per_class=200)), 0,
                       mnist, False)
    assert "capture: eager training step (EWCPlugin.before_backward needs per-iteration Python)" in capsys.readouterr().out
    assert len(load_metrics(run_dir)["acc"]) == 2


def test_blockers_name_plugin_hooks_and_overridden_step_methods():
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from avalanche.training.plugins import LwFPlugin

    class Custom(Naive):
        def criterion(self):
            return super().criterion()

    def strategy(cls, plugins):  # the class and plugins are all capture_blockers reads
        obj = object.__new__(cls)
        obj.plugins = plugins
        return obj

    assert capture_blockers(strategy(Naive, [SupervisedPlugin()])) == []
    assert "LwFPlugin.before_backward" in capture_blockers(strategy(Naive, [LwFPlugin()]))
    assert capture_blockers(strategy(Custom, [])) == ["Custom.criterion"]
    with pytest.raises(ConfigError, match="training.capture"):
        parse_config({"scenario": {"tasks": [5, 5]}, "training": {"capture": "yes"}})


def test_a_step_that_fails_to_compile_falls_back_to_the_eager_numbers(mnist, tmp_path, capsys, monkeypatch):
    """A compile failure (here: simulated on the first call) costs a notice, not the run: the run continues
    on the eager step from its first iteration and ends with exactly the eager numbers."""
    from cltunnel.training.capture import CapturedStep

    def broken(self, x, y, head):
        raise RuntimeError("no C++ compiler on this machine")

    eager = load_metrics(run_seed(parse_config(two_tasks(tmp_path / "eager", "off", epochs=2, per_class=300)), 0,
                                  mnist, False))["acc"]
    monkeypatch.setattr(CapturedStep, "__call__", broken)
    fallback = load_metrics(run_seed(parse_config(two_tasks(tmp_path / "broken", "on", epochs=2, per_class=300)), 0,
                                     mnist, False))["acc"]
    assert "capture: compiling the step failed (RuntimeError: no C++ compiler on this machine)" in capsys.readouterr().out
    assert fallback == eager
