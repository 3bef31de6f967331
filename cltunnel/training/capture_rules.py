"""Who may train on the captured step: capture by proof, not by detection.

Python lets a strategy change a step in more ways than introspection finds (an instance attribute named
like a hook, a plugin added at task 2, a batch rewritten with rows of another task, a method patched at run
time). So ``training.capture: auto`` does not ask "is anything hooked inside the step?"; it asks "is every
part of this run one the project has shown to give the eager numbers?":

* the strategy's class is one of :data:`PROVEN_STRATEGIES` exactly (a subclass may override anything), run
  by the tests on both paths (``tests/test_capture.py``, ``tests/test_strategy_paths.py``);
* every plugin is of a class in :data:`PROVEN_PLUGINS` exactly; Avalanche's ``EvaluationPlugin`` only with
  metrics in :data:`PROVEN_METRICS` and loggers in :data:`PROVEN_LOGGERS` (a test checks that no listed class
  has a hook inside the step, so the list cannot name one that does);
* no instance attribute of the strategy or a plugin shadows a hook or a step method (Avalanche calls any
  attribute of that name), no module of the model has Python hooks, the criterion is cltunnel's.

Anything else trains on Avalanche's eager step, and the run says once why and how to opt in
(:func:`unproven`). ``capture: on`` is that opt-in: then only what *is* found inside the step blocks it
(:func:`capture_blockers`, instance attributes included), re-read whenever the plugin list or a plugin's
attributes change (:func:`plugin_signature`); rows of another task in the batch make the step fall back
(``fast_data``); and the self-check compares the compiled step with the strategy's own eager iteration,
hooks and all.
"""
from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.training.plugins import EvaluationPlugin

from cltunnel.config import EVAL_METRICS
from cltunnel.training.overrides import overrides

INNER_HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward", "before_update",
               "after_update")
STEP_METHODS = ("training_epoch", "_before_forward", "_after_forward", "_before_backward", "_after_backward",
                "_before_update", "_after_update", "forward", "criterion", "backward", "optimizer_step",
                "_make_empty_loss")  # the template's methods that run inside (or are) the captured span

# The classes capture is proven for, by qualified name ("module:Class"; exact class, not subclasses).
PROVEN_STRATEGIES = frozenset({
    "avalanche.training.supervised.strategy_wrappers:Naive",  # both paths: test_capture, test_strategy_paths
})
PROVEN_PLUGINS = frozenset({
    # cltunnel's own, all hooked around the iteration (progress, checkpoints, curves, seeds, mid-task resume)
    "cltunnel.training.plugins.progress:ProgressPlugin",
    "cltunnel.training.plugins.epoch_checkpoints:EpochCheckpointPlugin",
    "cltunnel.training.plugins.history:HistoryPlugin",
    "cltunnel.training.plugins.memory_seed:MemorySeedPlugin",
    "cltunnel.training.plugins.mid_task_resume:MidTaskResumePlugin",
    "cltunnel.training.plugins.test_curve:TestCurvePlugin",
    # Avalanche's that every template carries or cltunnel adds, hooked around the iteration
    "avalanche.training.plugins.clock:Clock",
    "avalanche.training.templates.base_sgd:PeriodicEval",
    "avalanche.training.plugins.lr_scheduling:LRSchedulerPlugin",
    "avalanche.training.plugins.evaluation:EvaluationPlugin",  # with its metrics and loggers checked below
})
PROVEN_METRICS = frozenset({  # what evaluation.metrics builds (training.avalanche_metrics.METRICS)
    f"avalanche.evaluation.metrics.{module}:{name}" for module, names in {
        "accuracy": ("EpochAccuracy", "ExperienceAccuracy", "StreamAccuracy"),
        "loss": ("EpochLoss", "ExperienceLoss", "StreamLoss"),
        "forgetting_bwt": ("ExperienceForgetting", "StreamForgetting", "ExperienceBWT", "StreamBWT"),
        "class_accuracy": ("ExperienceClassAccuracy", "StreamClassAccuracy"),
        "timing": ("EpochTime",),
        "confusion_matrix": ("StreamConfusionMatrix",),
    }.items() for name in names})
PROVEN_LOGGERS = frozenset({  # they write what the metrics emit; inside the step the proven metrics emit nothing
    "avalanche.logging.text_logging:TextLogger",
    "avalanche.logging.csv_logger:CSVLogger",
    "cltunnel.training.tensorboard:RunTensorboardLogger",  # Avalanche's, writing through the run's writer
    "avalanche.logging.interactive_logging:InteractiveLogger",
})
PROVEN_CRITERIA = frozenset({"cltunnel.training.fast_data:TemperatureCrossEntropy"})
OPT_IN = "set training.capture: on to capture it anyway (its self-check then compares each checked step with " \
         "the strategy's own eager iteration)"


def qualified(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}:{cls.__qualname__}"


def strategy_class(strategy: Any) -> type:
    """The class the scenario named: cltunnel's generated class puts its mixin in front of it and records it
    (``fast_data.with_fast_data``)."""
    return vars(type(strategy)).get("wrapped_strategy", type(strategy))


def shadowed(obj: Any, names: tuple[str, ...]) -> list[str]:
    """Instance attributes of ``obj`` that shadow a method Avalanche calls by name."""
    own = vars(obj) if hasattr(obj, "__dict__") else {}
    return [f"{type(obj).__name__}.{name} (instance attribute)" for name in names if name in own]


ALL_HOOKS = tuple(n for n in dir(SupervisedPlugin) if n.startswith(("before_", "after_")))


def unproven(strategy: Any) -> list[str]:
    """Why capture is not proven for this run ([] when it is): each part not on the lists above."""
    reasons = []
    cls = strategy_class(strategy)
    if qualified(cls) not in PROVEN_STRATEGIES:
        reasons.append(f"strategy {cls.__name__} is not one capture is proven for (proven: Naive)")
    reasons += shadowed(strategy, STEP_METHODS + ALL_HOOKS)
    for plugin in strategy.plugins:
        if qualified(plugin) not in PROVEN_PLUGINS:
            reasons.append(f"plugin {type(plugin).__name__} is not on the proven list")
        reasons += shadowed(plugin, ALL_HOOKS)
        if isinstance(plugin, EvaluationPlugin):
            reasons += [f"metric {type(m).__name__} is not on the proven list" for m in plugin.metrics
                        if qualified(m) not in PROVEN_METRICS]
            reasons += [f"logger {type(lg).__name__} is not on the proven list" for lg in plugin.loggers
                        if qualified(lg) not in PROVEN_LOGGERS]
            reasons += [r for m in plugin.metrics for r in shadowed(m, ALL_HOOKS)]
    criterion = getattr(strategy, "_criterion", None)
    if criterion is not None and qualified(criterion) not in PROVEN_CRITERIA:
        reasons.append(f"criterion {type(criterion).__name__} is not cltunnel's")
    if _model_hooked(strategy):
        reasons.append("a module of the model has Python forward/backward hooks")
    return reasons


def _model_hooked(strategy: Any) -> bool:
    """Whether a module of the strategy's model, or torch's global module hooks, holds a Python hook."""
    model = getattr(strategy, "model", None)
    return model is not None and (any(_hook_count(m) for m in model.modules()) or _global_module_hooks())


def capture_blockers(strategy: Any) -> list[str]:
    """What is found inside the step (used with ``capture: on``): plugin hooks in the span however Avalanche
    would reach them (class, instance attribute, ``__getattr__``), the evaluator's own and its metrics' hooks
    there, Python hooks on the model's modules (or torch's global module hooks), and the template's step
    methods that the strategy class defines or an instance attribute shadows."""
    blockers = []
    for plugin in strategy.plugins:
        if isinstance(plugin, EvaluationPlugin):  # it answers every callback itself, forwarding it to its metrics
            blockers += _evaluator_hooks(plugin) + _hooked(plugin.metrics, PluginMetric)
        else:
            blockers += _hooked([plugin], SupervisedPlugin)
    blockers += shadowed(strategy, STEP_METHODS + INNER_HOOKS)
    if _model_hooked(strategy):
        blockers.append("a Python hook on a module of the model")
    return blockers + overrides(type(strategy), STEP_METHODS)


def _hooked(objects: list[Any], base: type) -> list[str]:
    """``Class.hook`` for each inner hook an object answers with something other than ``base``'s (for a
    plugin, Avalanche's do-nothing default; for the evaluator, its forwarding to metrics and loggers): on its
    class, as an instance attribute, or through ``__getattr__`` (Avalanche calls whatever ``getattr`` gives)."""
    found = []
    for obj in objects:
        for hook in INNER_HOOKS:
            if hook in getattr(obj, "__dict__", {}):
                found.append(f"{type(obj).__name__}.{hook} (instance attribute)")
                continue
            answer = getattr(obj, hook, None)
            if answer is not None and getattr(answer, "__func__", answer) is not getattr(base, hook, None):
                found.append(f"{type(obj).__name__}.{hook}")
    return found


def _evaluator_hooks(evaluator: Any) -> list[str]:
    """Inner hooks an evaluator has beyond Avalanche's forwarding to its metrics: defined by a subclass, or
    set on the instance."""
    found = [f"{type(evaluator).__name__}.{hook} (instance attribute)" for hook in INNER_HOOKS
             if hook in vars(evaluator)]
    for klass in type(evaluator).__mro__:
        if klass is EvaluationPlugin:
            break
        found += [f"{klass.__name__}.{hook}" for hook in INNER_HOOKS if hook in vars(klass)]
    return found


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def plugin_signature(strategy: Any) -> tuple:
    """What a capture decision was made on and must be made again when it changes: the plugins (identity and
    order), the attribute names each plugin, metric and the strategy instance hold, and the Python hooks on
    the model's modules (a hook added after the first compilation would run on the eager path only)."""
    parts: list[Any] = [tuple(vars(strategy).keys() & set(STEP_METHODS + ALL_HOOKS))]
    for plugin in strategy.plugins:
        parts.append((id(plugin), tuple(getattr(plugin, "__dict__", {}).keys())))
        if isinstance(plugin, EvaluationPlugin):
            parts += [(id(m), tuple(getattr(m, "__dict__", {}).keys())) for m in plugin.metrics]
    model = getattr(strategy, "model", None)
    if model is not None:
        parts.append(tuple(_hook_count(m) for m in model.modules()) + (_global_module_hooks(),))
    return tuple(parts)


def _hook_count(module: Any) -> int:
    return (len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
            + len(getattr(module, "_backward_pre_hooks", {})))


PROVEN_STRATEGY_NAMES = ("naive",)  # the registered names of PROVEN_STRATEGIES (training.strategies)


def proven_config(strategy: Any, metrics: list[str]) -> bool:
    """Whether a run of this strategy config and these evaluation metrics is one ``auto`` captures (for
    estimates made before any strategy exists, e.g. a campaign's); the run itself decides by :func:`unproven`."""
    return strategy.cls is None and strategy.name in PROVEN_STRATEGY_NAMES and set(metrics) <= set(EVAL_METRICS)
