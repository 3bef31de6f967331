"""Strategy registry: Avalanche's strategies by name, or any importable class named in YAML.

Every class gets cltunnel's device data path mixed in (:func:`cltunnel.training.with_fast_data`), so a
user's ``strategies/my_module.py:MyStrategy`` trains as fast as the built-ins and keeps checkpoints,
resume and analyses.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .config import ConfigError, StrategyConfig, TrainingConfig
from .training import with_fast_data

# name -> ("module:Class", default arguments). Defaults are starting points, not tuned values. EWC's lambda is
# small because SGD at the paper's lr 0.1 diverges above about 5 on CIFAR-10 VGGs (max Fisher entry ~2; see
# runs.check_finite), where Avalanche examples use 100+ with smaller learning rates.
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "naive": ("avalanche.training:Naive", {}),
    "ewc": ("avalanche.training:EWC", {"ewc_lambda": 5.0}),
    "si": ("avalanche.training:SynapticIntelligence", {"si_lambda": 1.0}),
    "mas": ("avalanche.training:MAS", {"lambda_reg": 1.0}),
    "lwf": ("avalanche.training:LwF", {"alpha": 1.0, "temperature": 2.0}),
    "replay": ("cltunnel.tunnel_aware:Replay", {"mem_size": 500}),  # device path, augmented like training
    "avalanche_replay": ("avalanche.training:Replay", {"mem_size": 500}),  # Avalanche's loader: slow, unaugmented
    "agem": ("avalanche.training:AGEM", {"patterns_per_exp": 256}),
    "gem": ("avalanche.training:GEM", {"patterns_per_exp": 256}),
    # Tunnel-aware (cltunnel.tunnel_aware): tunnel_start 'auto' = from probes of the model after task 1.
    "ewc_extractor": ("cltunnel.tunnel_aware:LayerwiseEWC", {"ewc_lambda": 5.0, "penalise": "extractor"}),
    "freeze_tunnel": ("cltunnel.tunnel_aware:FreezeTunnel", {}),
    "feature_replay": ("cltunnel.tunnel_aware:FeatureReplay", {"mem_size": 500}),
}


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
    from avalanche.training.templates import SupervisedTemplate

    if cfg.cls:
        cls, defaults = load_class(cfg.cls), {}
    elif cfg.name in STRATEGIES:
        spec, defaults = STRATEGIES[cfg.name]
        cls = load_class(spec)
    else:
        raise ConfigError(f"strategy.name: unknown strategy '{cfg.name}'; valid: {', '.join(STRATEGIES)} "
                          "(or give 'class: package.module:ClassName')")
    if not (isinstance(cls, type) and issubclass(cls, SupervisedTemplate)):
        raise ConfigError(f"strategy: {cls!r} is not a subclass of avalanche's SupervisedTemplate")
    return with_fast_data(cls), {**defaults, **cfg.args}


def build_strategy(cfg: StrategyConfig, model: nn.Module, training: TrainingConfig, criterion: nn.Module,
                   device: torch.device, plugins: list) -> Any:
    """Instantiate the strategy with SGD at the scenario's settings and a silent Avalanche evaluator."""
    from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

    cls, args = resolve_strategy(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                                weight_decay=training.weight_decay)
    if training.lr_milestones:
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, training.lr_milestones, training.lr_gamma)
        plugins = plugins + [LRSchedulerPlugin(sched, reset_scheduler=True, reset_lr=True)]
    try:
        with warnings.catch_warnings():  # cltunnel records its own metrics; Avalanche's logger-less warning is noise
            warnings.filterwarnings("ignore", message="No loggers specified")
            return cls(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=training.batch_size,
                   train_epochs=training.epochs, eval_mb_size=training.eval_batch_size, device=device,
                       plugins=plugins, evaluator=EvaluationPlugin(loggers=[]), eval_every=-1, **args)
    except TypeError as err:
        raise ConfigError(f"strategy.args: {cls.__name__} rejected its arguments {args}: {err}") from None
