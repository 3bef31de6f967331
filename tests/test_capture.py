"""The captured training step (training.capture) checks itself against the eager step (issue 23, item 2).

On real data the self-check runs in every new situation (first step, a new head, the step after each task's
optimizer reset, the step after an lr milestone) and holds to far below its tolerance on a VGG with
BatchNorm; a captured step that is wrong in the ways a compiled one could be (BatchNorm statistics not
updated, a learning rate frozen at its first value, momentum carried across a task switch) is caught there,
named, and the run trains eagerly; a step that fails to compile, at its first call or at a later head, costs
a notice, not the run; an error the eager step raises too still surfaces."""
from __future__ import annotations

import re

import pytest
import torch

from cltunnel.config import ConfigError, parse_config
from cltunnel.runs import run_seed
from cltunnel.store import load_metrics
from cltunnel.training import capture
from cltunnel.training.capture import CapturedStep
from cltunnel.training.capture_rules import capture_blockers
from test_training import mnist_tiny, tiny

pytestmark = pytest.mark.slow
PASSED = re.compile(r"capture: self-check passed at head (\d), lr \[([0-9.e-]+)\](, new task)?, call \d+: largest difference "
                    r"([0-9.e+-]+) of the step's change, ([0-9.e+-]+) of its bound")


def vgg_bn(out, capture_setting, epochs=3, per_class=60):
    """VGG-11 (width 1/8, BatchNorm after every conv) on CIFAR-10 5/5, momentum 0.9, lr 0.05 -> 0.005 after
    epoch 2: a task switch and an lr milestone inside each task."""
    return tiny(out, data={"train_per_class": per_class, "test_per_class": 20},
                training={"epochs": epochs, "capture": capture_setting, "momentum": 0.9, "lr_milestones": [2],
                          "batch_size": 100})


def mnist_two_tasks(out, capture_setting, strategy="naive"):
    return mnist_tiny(out, data={"train_per_class": 300, "test_per_class": 100},
                      scenario={"n_tasks": None, "tasks": [5, 5]},
                      training={"epochs": 2, "capture": capture_setting, "momentum": 0.9}, strategy=strategy)


def test_the_self_check_passes_tightly_on_a_batchnorm_vgg_across_tasks_and_milestones(cifar10, tmp_path, capsys):
    """Loss, every weight, momentum buffer and BatchNorm statistic after one compiled step equal the eager
    step's (tolerance 2e-2 of what the step changed; typically 2e-6 to 5e-6 here, up to 5e-3 where max-pool
    ties route a gradient to another input; see capture.TOLERANCE), at the first
    step of each task (fresh optimizer state: the primed momentum buffers are checked against SGD's own
    first step) and at the first step after the milestone, for both heads."""
    run_dir = run_seed(parse_config(vgg_bn(tmp_path / "captured", "on")), 0, cifar10, False)
    printed = capsys.readouterr().out
    checks = [(int(h), float(lr), bool(new), float(worst), float(ratio)) for h, lr, new, worst, ratio
              in PASSED.findall(printed)]
    assert "self-check failed" not in printed and "compiling the step failed" not in printed
    for head in (0, 1):
        assert (head, 0.05, True) in {c[:3] for c in checks}, (head, printed)  # the task's first step
        assert any(h == head and lr == pytest.approx(0.005) for h, lr, *_ in checks), (head, printed)  # milestone
    worst = sorted(c[3] for c in checks)
    ratios = sorted(c[4] for c in checks)
    print("largest differences", worst, "over bound", ratios)
    assert worst[len(worst) // 2] < 1e-4, worst  # most steps agree to float32 summation order
    assert ratios[-1] < 1, ratios
    assert len(load_metrics(run_dir)["acc"]) == 2


def frozen_lr(step: CapturedStep) -> None:
    """A compiled update that baked the learning rate in at its first call (a stale-constant bug)."""
    first = [g["lr"] for g in step.optimizer.param_groups]

    def update():
        now = [g["lr"] for g in step.optimizer.param_groups]
        for g, lr in zip(step.optimizer.param_groups, first):
            g["lr"] = lr
        step.optimizer.step()
        for g, lr in zip(step.optimizer.param_groups, now):
            g["lr"] = lr
    step.update = update


def batchnorm_frozen(step: CapturedStep) -> None:
    """A compiled forward that runs BatchNorm on its running statistics and never updates them."""
    module = step.loss_module

    def forward(x, y, head):
        step.model.eval()
        try:
            return module(x, y, head)
        finally:
            step.model.train()
    step.loss_module = forward


def momentum_kept(step: CapturedStep) -> None:
    """Momentum buffers carried over a task switch instead of starting afresh."""
    def prime():
        for group in step.optimizer.param_groups:
            for p in group["params"]:
                step.optimizer.state[p]["momentum_buffer"] = step.momentum.setdefault(p, torch.zeros_like(p))
    step.prime_momentum = prime


@pytest.mark.parametrize("fault, where", [(batchnorm_frozen, "at head 0, lr [0.05], new task"),  # the first step
                                          (frozen_lr, "at head 0, lr [0.005"),  # the first step after the milestone
                                          (momentum_kept, "at head 1, lr [0.05], new task")])  # the task switch
def test_a_wrong_captured_step_is_caught_named_and_replaced_by_the_eager_one(cifar10, tmp_path, capsys, monkeypatch,
                                                                              fault, where):
    """The faults are injected into the captured step with compilation itself turned off (torch.compile is the
    identity here), so what is tested is the check, in the situations where each fault shows."""
    monkeypatch.setattr(capture.torch, "compile", lambda fn, **kw: fn)
    build = CapturedStep.__init__

    def faulty(self, *args, **kwargs):
        build(self, *args, **kwargs)
        fault(self)
    monkeypatch.setattr(CapturedStep, "__init__", faulty)
    run_dir = run_seed(parse_config(vgg_bn(tmp_path / "faulty", "on", epochs=3, per_class=40)), 0, cifar10, False)
    printed = capsys.readouterr().out
    failed = [line for line in printed.splitlines() if "self-check failed" in line]
    assert len(failed) == 1 and where in failed[0] and failed[0].endswith("eager training step from here on"), printed
    assert len(load_metrics(run_dir)["acc"]) == 2


def test_a_step_that_fails_to_compile_falls_back_to_the_eager_numbers(mnist, tmp_path, capsys, monkeypatch):
    """A compile failure at the first call costs a notice, not the run: the run ends with exactly the eager
    numbers (the self-check's eager step is the one that stands)."""
    def broken(self, x, y, head):
        raise RuntimeError("no C++ compiler on this machine")

    eager = load_metrics(run_seed(parse_config(mnist_two_tasks(tmp_path / "eager", "off")), 0, mnist, False))["acc"]
    monkeypatch.setattr(CapturedStep, "_compiled", broken)
    fallback = load_metrics(run_seed(parse_config(mnist_two_tasks(tmp_path / "broken", "on")), 0, mnist, False))["acc"]
    assert "capture: compiling the step failed (RuntimeError: no C++ compiler on this machine); eager training " \
           "step from here on" in capsys.readouterr().out
    assert fallback == eager


def test_a_failure_at_a_later_variant_falls_back_and_a_real_error_surfaces(mnist, tmp_path, capsys, monkeypatch):
    """A new head compiles a new variant: if that fails (or its CUDA graphs cannot be recorded) in its first
    calls, the run goes on eagerly; an error that the eager step raises as well is not swallowed."""
    monkeypatch.setattr(capture.torch, "compile", lambda fn, **kw: fn)
    compiled = CapturedStep._compiled

    def head1_fails(self, x, y, head):
        if head == 1 and self.variants.get(self.situation(x, head, False)) == 2:  # a guarded call of head 1
            raise RuntimeError("CUDA graph capture out of memory")
        return compiled(self, x, y, head)
    monkeypatch.setattr(CapturedStep, "_compiled", head1_fails)
    run_dir = run_seed(parse_config(mnist_two_tasks(tmp_path / "later", "on")), 0, mnist, False)
    assert "capture: compiling the step failed (RuntimeError: CUDA graph capture out of memory)" in capsys.readouterr().out
    assert len(load_metrics(run_dir)["acc"]) == 2

    def everything_fails(self, *args, **kwargs):
        raise ValueError("target out of range")
    from cltunnel.training.fast_data import FastDataMixin
    monkeypatch.setattr(CapturedStep, "_compiled", everything_fails)
    monkeypatch.setattr(FastDataMixin, "_template_iteration", everything_fails)  # the reference fails too
    with pytest.raises(ValueError, match="target out of range"):
        run_seed(parse_config(mnist_two_tasks(tmp_path / "real", "on")), 0, mnist, False)


def test_a_new_optimizer_gets_a_new_captured_step(mnist, tmp_path, capsys, monkeypatch):
    """A strategy that builds a new optimizer per task: the captured step follows it instead of stepping the
    old one (the check at the new task's first step would fail otherwise)."""
    from avalanche.training import Naive

    class FreshOptimizer(Naive):
        def make_optimizer(self, **kwargs):
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    import user_strategies
    monkeypatch.setattr(user_strategies, "FreshOptimizer", FreshOptimizer, raising=False)
    monkeypatch.setattr(capture.torch, "compile", lambda fn, **kw: fn)
    run_seed(parse_config(mnist_two_tasks(tmp_path / "fresh", "on", {"class": "user_strategies:FreshOptimizer"})), 0,
             mnist, False)
    printed = capsys.readouterr().out
    assert "self-check failed" not in printed and printed.count("new task") >= 2, printed


def test_strategies_that_need_python_inside_the_step_stay_eager_and_say_why(mnist, tmp_path, capsys):
    run_dir = run_seed(parse_config(mnist_two_tasks(tmp_path / "ewc", "on", {"name": "ewc"})), 0, mnist, False)
    assert "capture: eager training step (EWCPlugin.before_backward runs inside the step)" in capsys.readouterr().out
    assert len(load_metrics(run_dir)["acc"]) == 2


def test_blockers_name_plugin_hooks_and_overridden_step_methods():
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from avalanche.training.plugins import LwFPlugin
    from cltunnel.training.fast_data import with_fast_data

    class Custom(Naive):
        def criterion(self):
            return super().criterion()

    def strategy(cls, plugins):  # the class and plugins are all capture_blockers reads
        obj = object.__new__(with_fast_data(cls))  # as cltunnel builds it: the mixin in front
        obj.plugins = plugins
        return obj

    assert capture_blockers(strategy(Naive, [SupervisedPlugin()])) == []
    assert "LwFPlugin.before_backward" in capture_blockers(strategy(Naive, [LwFPlugin()]))
    assert capture_blockers(strategy(Custom, [])) == ["Custom.criterion"]
    with pytest.raises(ConfigError, match="training.capture"):
        parse_config({"scenario": {"tasks": [5, 5]}, "training": {"capture": "yes"}})


def test_the_gpu_acceptance_script_passes_its_cpu_smoke_test(capsys, real_data_dir):
    """benchmarks/gpu_acceptance.py is the first call of a GPU session: its CPU form must pass here, so that a
    FAIL on the device is the device's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"
    spec = importlib.util.spec_from_file_location("gpu_acceptance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--quick", "--skip-speed"]) == 0, capsys.readouterr().out
    verdicts = capsys.readouterr().out.split("verdicts:")[-1]
    assert verdicts.count("PASS") == 11 and "FAIL" not in verdicts
