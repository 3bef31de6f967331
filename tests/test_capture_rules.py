"""The captured step is safe by construction (issue 30).

``capture: auto`` captures only what the project has proven (``capture_rules``); anything else trains on
Avalanche's eager step and says why, once, in the log and on the page. ``capture: on`` is the user's explicit
request: what is found inside the step is re-read whenever the plugins change, rows of another task make the
step fall back, and the self-check's reference is the strategy's own eager iteration, hooks and all.

The user classes (tests/user_strategies.py) are ordinary code that a detection rule misses: a duck-typed plugin
with an instance-attribute hook, a plugin added when task 2 starts, a rehearsal that prepends task-0 rows in
``before_training_iteration``, a fresh Adam per task. Each must give the capture-off accuracy matrix.

Most runs make ``torch.compile`` the identity (the compiled path is then the same Python as the eager one, so
equal numbers are exact and a fault injected into it is the only difference); capture's real compilation is
run by tests/test_capture.py and benchmarks/capture_equality.py."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from cltunnel.config import ConfigError, load_config, parse_config
from cltunnel.runs import run_seed
from cltunnel.store import CAPTURE_NOTES, load_metrics
from cltunnel.training import capture, loop
from cltunnel.training.capture import CapturedStep, StepState, checked_call
from cltunnel.training.capture_rules import (INNER_HOOKS, PROVEN_LOGGERS, PROVEN_METRICS, PROVEN_PLUGINS,
                                             PROVEN_STRATEGIES, STEP_METHODS, capture_blockers, unproven)
from cltunnel.training.overrides import overrides
from cltunnel.training.strategies import check_strategy_args
from test_training import mnist_tiny

pytestmark = pytest.mark.slow
FAILED = re.compile(r"self-check failed at (.*?), call (\d+) \(([0-9.e+-]+|inf) times its bound\)")


def two_tasks(out, capture_setting, strategy, epochs=2, **training):
    return mnist_tiny(out, data={"train_per_class": 300, "test_per_class": 100},
                      scenario={"n_tasks": None, "tasks": [5, 5]},
                      training={"epochs": epochs, "capture": capture_setting, "momentum": 0.9, **training},
                      strategy=strategy)


@pytest.fixture
def identity_compile(monkeypatch):
    monkeypatch.setattr(capture.torch, "compile", lambda fn, **kw: fn)


def run(mnist, path, capture_setting, strategy, capsys, **training):
    run_dir = run_seed(parse_config(two_tasks(path, capture_setting, strategy, **training)), 0, mnist, False)
    return load_metrics(run_dir)["acc"], capsys.readouterr().out, run_dir


OFF: dict[str, list] = {}  # class name -> its capture-off accuracy matrix (one run serves both tests)


def capture_off(mnist, tmp_path, capsys, name):
    if name not in OFF:
        OFF[name] = run(mnist, tmp_path / "off", "off", {"class": f"user_strategies:{name}"}, capsys)[0]
    return OFF[name]


def as_auto_on_cuda(monkeypatch):
    """``capture: auto`` as it is on a GPU (proven mode), here on the CPU."""
    monkeypatch.setattr(loop, "capture_mode", lambda cfg, device: "proven")


USER_CASES = {  # class -> what the capture-off run shows (checked, so the class really changes the numbers)
    "DuckTypedPlugin": lambda acc: max(max(row) for row in acc) < 0.4,  # chance on both tasks (5 classes: 0.2)
    "PluginAtTask2": lambda acc: acc[0][0] > 0.8 and acc[1][1] < 0.4,  # task 2 never learned
    "PrependOldRows": lambda acc: acc[1][0] > 0.5,  # the rehearsal keeps task 0
    "FreshAdam": lambda acc: acc[1][1] > 0.8,
}


@pytest.mark.parametrize("name", sorted(USER_CASES))
def test_user_code_keeps_its_numbers_under_auto_it_trains_eagerly_and_says_why(mnist, tmp_path, capsys,
                                                                                  monkeypatch, identity_compile, name):
    off = capture_off(mnist, tmp_path, capsys, name)
    assert USER_CASES[name](off), off
    as_auto_on_cuda(monkeypatch)
    auto, printed, run_dir = run(mnist, tmp_path / "auto", "auto", {"class": f"user_strategies:{name}"}, capsys)
    assert auto == off
    notice = f"capture: eager training step, not proven for this run (strategy {name} is not one capture is proven"
    assert printed.count(notice) == 1, printed
    assert "training.capture: on" in printed
    assert notice in (run_dir / CAPTURE_NOTES).read_text()  # the page shows it (reports.page.NOTES)


@pytest.mark.parametrize("name", sorted(USER_CASES))
def test_user_code_keeps_its_numbers_when_capture_is_asked_for(mnist, tmp_path, capsys, identity_compile, name):
    """``capture: on``: the duck-typed hook and the plugin added at task 2 are found (instance attributes, the
    plugin list read again when it changes), the prepended rows of task 0 make the step fall back, and the
    fresh Adam is captured with a self-check that restores Adam's whole state: the capture-off matrix each time."""
    off = capture_off(mnist, tmp_path, capsys, name)
    on, printed, _ = run(mnist, tmp_path / "on", "on", {"class": f"user_strategies:{name}"}, capsys)
    assert on == off, printed
    expected = {"DuckTypedPlugin": "_DuckZeroLoss.before_backward (instance attribute)",
                "PluginAtTask2": "_ZeroLossPlugin.before_backward runs inside the step",
                "PrependOldRows": "the batch holds rows of another task than the loader's (1)",
                "FreshAdam": "capture: self-check passed at head 1"}[name]
    assert expected in printed, printed
    if name == "FreshAdam":
        assert "self-check failed" not in printed and "new task" in printed


def test_naive_under_auto_is_captured_checked_and_says_what_equal_means(mnist, tmp_path, capsys, monkeypatch,
                                                                          identity_compile):
    off, _, _ = run(mnist, tmp_path / "off", "off", "naive", capsys)
    as_auto_on_cuda(monkeypatch)
    auto, printed, run_dir = run(mnist, tmp_path / "auto", "auto", "naive", capsys)
    assert auto == off
    assert "capture: training on the captured step" in printed and "not bit for bit" in printed
    assert "not proven" not in printed
    calls = [int(c) for c in re.findall(r"self-check passed at head \d, lr \[[0-9.e-]+\](?:, new task)?, call (\d+)",
                                        printed)]
    # 2 tasks x 2 epochs x 12 batches (the last batch of each epoch is a new shape): calls 1, 4, 16 of the
    # full-batch situation of each task, and the first of each last-batch situation
    assert len(calls) >= 6, printed
    assert "capture: training on the captured step" in (run_dir / CAPTURE_NOTES).read_text()


# ---- faults injected into the compiled path only: each caught, with its margin -------------------------------
def _scaled_update(factor_of, step: CapturedStep):
    """The compiled update with each parameter's gradient multiplied by ``factor_of(step, name)`` first."""
    update = step.update
    names = {p: n for n, p in step.model.named_parameters()}

    def faulty():
        with torch.no_grad():
            for p in names:
                if p.grad is not None:
                    p.grad.mul_(factor_of(step, names[p]))
        return update()
    step.update = faulty


def one_inner_layer(step):
    """The second (inner) layer's weight gradient x1.15; every other tensor exact."""
    assert "body.fc2.0.weight" in dict(step.model.named_parameters())
    _scaled_update(lambda s, name: 1.15 if name == "body.fc2.0.weight" else 1.0, step)


def every_gradient(step):
    _scaled_update(lambda s, name: 1.015, step)


def zeroed_on_a_condition(step):
    """Gradients dropped on batches whose first label is even (about half of them)."""
    forward = step.loss_module

    def remember(x, y, head):
        step.last_even = int(y[0]) % 2 == 0
        return forward(x, y, head)
    step.loss_module = remember
    _scaled_update(lambda s, name: 0.0 if s.last_even else 1.0, step)


def lr_halved_from_call_5(step):
    update = step.update

    def faulty():
        if step.calls < 5:
            return update()
        groups = step.optimizer.param_groups
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] / 2
        try:
            return update()
        finally:
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
    step.update = faulty


@pytest.mark.parametrize("fault, strategy", [(one_inner_layer, "naive"), (every_gradient, "naive"),
                                             (zeroed_on_a_condition, "naive"), (lr_halved_from_call_5, "naive"),
                                             (every_gradient, {"class": "user_strategies:FreshAdam"})])
def test_a_fault_in_the_compiled_path_alone_is_caught(mnist, tmp_path, capsys, monkeypatch, identity_compile, fault,
                                                      strategy):
    """SGD with momentum, and Adam (whose step counts are compared exactly, apart from its moments)."""
    build = CapturedStep.__init__

    def faulty(self, *args, **kwargs):
        build(self, *args, **kwargs)
        fault(self)
    monkeypatch.setattr(CapturedStep, "__init__", faulty)
    on, printed, _ = run(mnist, tmp_path / "on", "on", strategy, capsys)
    found = FAILED.findall(printed)
    assert len(found) == 1 and "eager training step from here on" in printed, printed
    where, call, margin = found[0]
    print(f"{fault.__name__} ({strategy}): caught at {where}, call {call}, {margin} times the bound")
    assert float(margin) > 1
    if fault is lr_halved_from_call_5:
        assert int(call) >= 5  # at the first checked call once the fault has started
    assert len(on) == 2


def test_the_check_schedule():
    checked = [c for c in range(1, 300) if checked_call(c)]
    assert checked == [1, 4, 16, 64, 128, 192, 256]


# ---- the self-check's own state ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: torch.optim.Adam(p, lr=1e-2),
                                  lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)])
def test_a_step_state_puts_any_optimizer_back_exactly(make):
    """Snapshot, step, restore: every parameter and every optimizer state entry (moments, step counts, or no
    state at all before the first step) is as it was, in the same tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = make(model.parameters())

    def step():
        opt.zero_grad()
        logits = model(torch.randn(16, 4)) / temperature
        torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (16,))).backward()
        opt.step()
    temperature = torch.nn.Parameter(torch.ones(()))  # stepped by the optimizer, held by no module
    opt.add_param_group({"params": [temperature]})
    assert "param #6" in StepState.live(model, opt)  # after the model's six tensors
    for fresh in (True, False):  # before the first step (empty state), then with state
        before = StepState.of(model, opt)
        ids = {k: v.data_ptr() for k, v in StepState.live(model, opt).items()}
        step()
        before.restore(model, opt)
        assert (not opt.state) if fresh else True
        after = StepState.of(model, opt)
        assert after.tensors.keys() == before.tensors.keys() and after.layout.keys() == before.layout.keys()
        assert all(torch.equal(after.tensors[k], v) for k, v in before.tensors.items())
        assert all(v.data_ptr() == ids[k] for k, v in StepState.live(model, opt).items() if k in ids)
        step()


# ---- the proven lists are what they claim ----------------------------------------------------------------------
def _load(qualified_name):
    import importlib
    module, name = qualified_name.split(":")
    return getattr(importlib.import_module(module), name)


def test_no_class_on_the_proven_lists_has_a_hook_inside_the_step():
    """A listed class must leave every hook inside the step at Avalanche's do-nothing default (the evaluator
    forwards them to its metrics and loggers, which are listed and checked themselves)."""
    from avalanche.core import BasePlugin, BaseSGDPlugin, SupervisedPlugin
    from avalanche.evaluation.metric_definitions import GenericPluginMetric, PluginMetric
    from avalanche.logging import BaseLogger
    from avalanche.training.plugins import EvaluationPlugin

    defaults = (BasePlugin, BaseSGDPlugin, SupervisedPlugin, PluginMetric, GenericPluginMetric, BaseLogger, object)
    for name in sorted(PROVEN_PLUGINS | PROVEN_METRICS | PROVEN_LOGGERS | PROVEN_STRATEGIES):
        cls = _load(name)
        if cls is EvaluationPlugin:
            continue
        if name in PROVEN_STRATEGIES:  # a strategy: none of the template's step methods of its own
            assert overrides(cls, STEP_METHODS) == [], name
            continue
        for hook in INNER_HOOKS:
            owner = next((k for k in cls.__mro__ if hook in vars(k)), None)
            assert owner is None or owner in defaults or owner.__module__.startswith(
                "avalanche.training.templates"), f"{name} defines {hook} ({owner})"


def test_unproven_names_each_part_not_on_the_lists():
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from cltunnel.training.fast_data import TemperatureCrossEntropy, with_fast_data

    class MyNaive(Naive):
        pass

    def strategy(cls, plugins):
        obj = object.__new__(with_fast_data(cls))
        obj.plugins, obj._criterion = plugins, TemperatureCrossEntropy()
        return obj

    from avalanche.training.plugins.clock import Clock
    assert unproven(strategy(Naive, [Clock()])) == []
    assert unproven(strategy(MyNaive, [Clock()])) == ["strategy MyNaive is not one capture is proven for (proven: Naive)"]
    assert unproven(strategy(Naive, [SupervisedPlugin()])) == ["plugin SupervisedPlugin is not on the proven list"]
    clock = Clock()
    clock.before_backward = lambda strategy, **kw: None
    assert unproven(strategy(Naive, [clock])) == ["Clock.before_backward (instance attribute)"]
    assert capture_blockers(strategy(Naive, [clock])) == ["Clock.before_backward (instance attribute)"]


def test_capture_on_finds_hooks_however_avalanche_reaches_them():
    """A plugin forwarding every attribute to an inner one (``__getattr__``), an evaluator subclass with a hook
    of its own, and a Python hook on a module of the model: each keeps the eager step under ``capture: on``."""
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from cltunnel.training.fast_data import TemperatureCrossEntropy, with_fast_data

    class ZeroLoss(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            strategy.loss = strategy.loss * 0

    class Proxy:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class MyEvaluator(EvaluationPlugin):
        def after_forward(self, strategy, **kwargs):
            return super().__getattribute__("after_forward")(strategy, **kwargs)

    model = torch.nn.Linear(2, 2)
    strategy = object.__new__(with_fast_data(Naive))
    strategy.__dict__.update(plugins=[Proxy(SupervisedPlugin())], _criterion=TemperatureCrossEntropy(), model=model)
    assert capture_blockers(strategy) == []  # forwarding to a do-nothing plugin is fine
    strategy.plugins = [Proxy(ZeroLoss())]
    assert capture_blockers(strategy) == ["Proxy.before_backward"]
    strategy.plugins = [MyEvaluator(loggers=[])]
    assert capture_blockers(strategy) == ["MyEvaluator.after_forward"]
    strategy.plugins = []
    handle = model.register_forward_hook(lambda *args: None)
    assert capture_blockers(strategy) == ["a Python hook on a module of the model"]
    handle.remove()


def test_dropout_draws_the_same_masks_on_both_paths():
    """Inductor's own random numbers differ from eager's; the captured step makes compiled code draw from the
    same generator, so a model with dropout passes the self-check (real compilation, a tiny model)."""
    from cltunnel.training.fast_data import TemperatureCrossEntropy

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.drop = torch.nn.Linear(8, 16), torch.nn.Dropout(0.5)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x, head):
            return self.head(self.drop(torch.relu(self.body(x))))

    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lines = []
    step = CapturedStep(model, TemperatureCrossEntropy(), opt, torch.device("cpu"), False, log=lines.append)
    for _ in range(5):  # calls 1 (a new task), 2 (its first call without the reset) and 5 (its fourth) are checked
        step(torch.randn(32, 8), torch.randint(0, 3, (32,)), 0)
    assert len(lines) == 3 and all("self-check passed" in line for line in lines), lines


def test_the_template_iteration_is_avalanche_s_own():
    """``FastDataMixin._template_iteration`` repeats the body of Avalanche's SGD iteration: held to its source."""
    from avalanche.training.templates.update_type.sgd_update import SGDUpdate
    from cltunnel.training.fast_data import FastDataMixin

    def statements(fn, start, end):
        lines = [ln.strip() for ln in inspect.getsource(fn).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        return lines[lines.index(start) + 1: lines.index(end)] if end else lines[lines.index(start) + 1:]

    avalanche = statements(SGDUpdate.training_epoch, "self._before_training_iteration(**kwargs)",
                           "self._after_training_iteration(**kwargs)")
    source = inspect.getsource(FastDataMixin._template_iteration)
    body = source[source.index('"""', source.index('"""') + 3) + 3:]  # after the docstring
    ours = [ln.strip() for ln in body.splitlines() if ln.strip()]
    assert ours == avalanche


# ---- preflight -----------------------------------------------------------------------------------------------
def test_gem_without_a_qp_solver_is_refused_before_training(monkeypatch):
    from cltunnel.training import strategies

    monkeypatch.setattr(strategies, "qp_solver_available", lambda: False)
    with pytest.raises(ConfigError, match="strategy gem needs the quadprog QP solver.*pip install quadprog"):
        strategies.check_strategy_args(parse_config({"scenario": {"tasks": [5, 5]}, "strategy": "gem"}).strategy)
    monkeypatch.setattr(strategies, "qp_solver_available", lambda: True)
    strategies.check_strategy_args(parse_config({"scenario": {"tasks": [5, 5]}, "strategy": "gem"}).strategy)
    strategies.check_strategy_args(parse_config({"scenario": {"tasks": [5, 5]}, "strategy": "agem"}).strategy)


@pytest.mark.parametrize("written", ["strategy: naive", "strategy: {name: ewc, args: {ewc_lambda: 2}}",
                                     "strategy: {class: 'user_strategies:LoudBackward'}", ""])
def test_set_strategy_class_or_name_works_whatever_form_strategy_had(tmp_path, written):
    path = tmp_path / "s.yaml"
    path.write_text("scenario: {tasks: [5, 5]}\n" + written + "\n")
    cfg = load_config(path, {"strategy.class": "user_strategies:NegatedForward"})
    assert (cfg.strategy.cls, cfg.strategy.name) == ("user_strategies:NegatedForward", None)
    if "ewc_lambda" in written:  # the old strategy's arguments stay, and the new class refuses them in one line
        with pytest.raises(ConfigError, match="NegatedForward takes no argument 'ewc_lambda'"):
            check_strategy_args(cfg.strategy)
    else:
        check_strategy_args(cfg.strategy)
    cfg = load_config(path, {"strategy.name": "lwf"})
    assert (cfg.strategy.cls, cfg.strategy.name) == (None, "lwf")
    with pytest.raises(ConfigError, match="strategy.class"):
        load_config(path, {"strategy.class.x": "1"})
