"""Strategy registry: Avalanche's strategies by name, or any importable class named in YAML.

Every class gets cltunnel's device data path mixed in (:func:`cltunnel.training.fast_data.with_fast_data`), so a
user's ``strategies/my_module.py:MyStrategy`` trains as fast as the built-ins and keeps checkpoints,
resume and analyses.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from typing import Any

import torch
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from cltunnel.config import ConfigError, EvaluationConfig, StrategyConfig, TrainingConfig
from cltunnel.registry import Registry, did_you_mean
from cltunnel.training.avalanche_metrics import build_evaluator
from cltunnel.training.fast_data import RunContext, with_fast_data


# name -> ("module:Class", default arguments). Defaults are starting points, not tuned values. EWC's lambda is
# small because SGD at the paper's lr 0.1 diverges above about 5 on CIFAR-10 VGGs (max Fisher entry ~2; see
# training.loop.check_finite), where Avalanche examples use 100+ with smaller learning rates.
STRATEGIES: Registry[tuple[str, dict[str, Any]]] = Registry("strategy", ConfigError, {
    "naive": ("avalanche.training:Naive", {}),
    "ewc": ("avalanche.training:EWC", {"ewc_lambda": 5.0}),
    "si": ("avalanche.training:SynapticIntelligence", {"si_lambda": 1.0}),
    "mas": ("avalanche.training:MAS", {"lambda_reg": 1.0}),
    "lwf": ("avalanche.training:LwF", {"alpha": 1.0, "temperature": 2.0}),
    "replay": ("cltunnel.training.tunnel_aware:Replay", {"mem_size": 500}),  # device path, augmented like training
    "avalanche_replay": ("avalanche.training:Replay", {"mem_size": 500}),  # Avalanche's loader: slow, unaugmented
    "agem": ("avalanche.training:AGEM", {"patterns_per_exp": 256}),
    "gem": ("avalanche.training:GEM", {"patterns_per_exp": 256}),
    # Tunnel-aware (cltunnel.training.tunnel_aware): tunnel_start 'auto' = from probes of the model after task 1.
    "ewc_extractor": ("cltunnel.training.tunnel_aware:LayerwiseEWC", {"ewc_lambda": 5.0, "penalise": "extractor"}),
    "freeze_tunnel": ("cltunnel.training.tunnel_aware:FreezeTunnel", {}),
    "feature_replay": ("cltunnel.training.tunnel_aware:FeatureReplay", {"mem_size": 500}),
})


def load_class(spec: str) -> type:
    """Import ``package.module:ClassName``; the working directory is importable (for ``strategies/``)."""
    if ":" not in spec:
        raise ConfigError(f"strategy.class: '{spec}' must look like 'package.module:ClassName'")
    module_name, cls_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"strategy.class: cannot import module '{module_name}' ({err})") from None
    if not hasattr(module, cls_name):
        public = [n for n in dir(module) if isinstance(getattr(module, n), type) and not n.startswith("_")]
        raise ConfigError(f"strategy.class: module '{module_name}' has no '{cls_name}'; classes there: {public}")
    return getattr(module, cls_name)


def resolve_strategy(cfg: StrategyConfig) -> tuple[type, dict[str, Any]]:
    if cfg.cls:
        cls, defaults = load_class(cfg.cls), {}
    elif cfg.name in STRATEGIES:
        spec, defaults = STRATEGIES[cfg.name]
        cls = load_class(spec)
    else:
        raise ConfigError(f"strategy.name: unknown strategy '{cfg.name}'{did_you_mean(cfg.name, STRATEGIES.list())}; "
                          f"valid: {', '.join(STRATEGIES)} "
                          "(or give 'class: package.module:ClassName')")
    if not (isinstance(cls, type) and issubclass(cls, SupervisedTemplate)):
        raise ConfigError(f"strategy: {cls!r} is not a subclass of avalanche's SupervisedTemplate")
    return with_fast_data(cls), {**defaults, **cfg.args}


# Keyword arguments cltunnel itself passes to every strategy (from `training:`), not for strategy.args.
BUILT_IN_ARGS = {"model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size", "device",
                 "plugins", "evaluator", "eval_every", "run_context"}


def accepted_args(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy: a strategy
    hands the keywords it does not name to its base, and Avalanche's base template refuses what nobody in
    the hierarchy names. None when the chain ends in ``**kwargs`` outside Avalanche (anything may be taken)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
        if klass.__module__.startswith("avalanche.training.templates"):
            return names  # Avalanche checks the rest against the whole hierarchy and refuses unknown keywords
    return None


def qp_solver_available() -> bool:
    """Whether qpsolvers can reach the quadprog solver, which Avalanche's GEM calls from its second task on."""
    try:
        import qpsolvers
    except ImportError:
        return False
    return "quadprog" in qpsolvers.available_solvers


def check_strategy_dependencies(cls: type, label: str) -> None:
    """A strategy whose package is missing is refused before training, naming what to install (GEM solves a
    quadratic program at every step of its second task; without a solver it trains task 1, then crashes)."""
    from avalanche.training import GEM

    if issubclass(cls, GEM) and not qp_solver_available():
        raise ConfigError(f"strategy {label} needs the quadprog QP solver, which is not installed "
                          "(pip install quadprog)")


def check_strategy_args(cfg: StrategyConfig) -> None:
    """The strategy class imports, is a SupervisedTemplate, its dependencies are installed, and it takes
    every key of ``strategy.args``: checked from the class alone, before any data is loaded."""
    cls, args = resolve_strategy(cfg)
    check_strategy_dependencies(cls, cfg.name or cfg.cls or cls.__name__)
    accepted = accepted_args(cls)
    taken = sorted(set(args) & BUILT_IN_ARGS)
    if taken:
        raise ConfigError(f"strategy.args: {taken} are set by cltunnel from the scenario (training: section)")
    unknown = [k for k in args if accepted is not None and k not in accepted]
    if unknown:
        valid = sorted(accepted - BUILT_IN_ARGS) if accepted else []
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        raise ConfigError(f"strategy.args: {cls.__name__} takes no argument '{unknown[0]}'"
                          + (f" (did you mean '{close[0]}'?)" if close else "") + f"; it takes: {', '.join(valid)}")


def build_strategy(cfg: StrategyConfig, model: nn.Module, training: TrainingConfig, criterion: nn.Module,
                   device: torch.device, plugins: list, context: RunContext | None = None,
                   evaluator: EvaluationPlugin | None = None) -> Any:
    """Instantiate the strategy with SGD at the scenario's settings and ``evaluator`` (default: a silent
    Avalanche evaluator; see training.avalanche_metrics); with a ``context``, it trains from cltunnel's device data."""
    cls, args = resolve_strategy(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                                weight_decay=training.weight_decay,
                                foreach=True if context is not None and context.capture != "off" else None)
    if training.lr_schedule == "cosine":  # Nguyen et al.'s schedule: lr * (1 + cos(pi * epoch / epochs)) / 2, per epoch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=training.epochs)
        plugins = plugins + [LRSchedulerPlugin(sched, reset_scheduler=True, reset_lr=True)]
    elif training.lr_milestones:
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, training.lr_milestones, training.lr_gamma)
        plugins = plugins + [LRSchedulerPlugin(sched, reset_scheduler=True, reset_lr=True)]
    if evaluator is None:
        evaluator = build_evaluator(EvaluationConfig(), None)  # silent: cltunnel records its own metrics
    try:
        strategy = cls(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=training.batch_size,
                       train_epochs=training.epochs, eval_mb_size=training.eval_batch_size, device=device,
                       plugins=plugins, evaluator=evaluator, eval_every=-1, run_context=context, **args)
    except TypeError as err:
        raise ConfigError(f"strategy.args: {cls.__name__} rejected its arguments {args}: {err}") from None
    _check_plugin_dependencies(strategy, cfg.name or cfg.cls or cls.__name__)
    return strategy


def _check_plugin_dependencies(strategy: Any, label: str) -> None:
    """A user class that adds Avalanche's GEM plugin itself: refused before its first task, like ``gem``."""
    from avalanche.training.plugins import GEMPlugin

    if any(isinstance(p, GEMPlugin) for p in strategy.plugins) and not qp_solver_available():
        raise ConfigError(f"strategy {label} uses Avalanche's GEMPlugin, which needs the quadprog QP solver "
                          "(pip install quadprog)")
