"""Avalanche's evaluation, named in the scenario (``evaluation: {metrics: [...], loggers: [...]}``).

cltunnel's accuracy matrix comes from its own device-path evaluation (``training.accuracy``); this module
builds the ``EvaluationPlugin`` a user of Avalanche expects beside it: its metrics, computed on the same
device data (the strategy's eval loader is cltunnel's), written by its loggers into the run directory. With
no metrics named the evaluator is silent and the strategy is never asked to evaluate, which costs nothing.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from avalanche.evaluation import metrics as av
from avalanche.logging import CSVLogger, InteractiveLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from cltunnel.config import EVAL_METRICS, ConfigError, EvaluationConfig
from cltunnel.training.tensorboard import RunTensorboardLogger, open_tensorboard

# Each name at the granularities a CL user reads: per epoch while training, per experience and per stream
# when the test stream is evaluated after every task.
METRICS: dict[str, Callable[[], Any]] = {
    "accuracy": lambda: av.accuracy_metrics(epoch=True, experience=True, stream=True),
    "loss": lambda: av.loss_metrics(epoch=True, experience=True, stream=True),
    "forgetting": lambda: av.forgetting_metrics(experience=True, stream=True),
    "bwt": lambda: av.bwt_metrics(experience=True, stream=True),
    "class_accuracy": lambda: av.class_accuracy_metrics(experience=True, stream=True),
    "timing": lambda: av.timing_metrics(epoch=True),
    "confusion_matrix": lambda: av.confusion_matrix_metrics(stream=True, save_image=False),
}
AVALANCHE_DIR = "avalanche"  # the loggers' files, inside the run directory
assert set(METRICS) == set(EVAL_METRICS)  # the config names what this module builds


def _logger(name: str, run_dir: Path, writer: Any) -> Any:
    if name == "tensorboard":  # the run's one stream: its writer, or one of its own when curves are off
        return RunTensorboardLogger(writer, owns_writer=False) if writer else \
            RunTensorboardLogger(open_tensorboard(run_dir, True), owns_writer=True)
    folder = run_dir / AVALANCHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if name == "text":
        return TextLogger(open(folder / "log.txt", "a"))
    if name == "csv":
        return CSVLogger(log_folder=str(folder / "csv"))
    return InteractiveLogger()


def metric_factory(name: str) -> Callable[[], Any]:
    """A named metric, or a user's ``package.module:factory`` (called with no arguments)."""
    if name in METRICS:
        return METRICS[name]
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"evaluation.metrics: cannot import '{name}' ({err})") from None


def check_evaluation(cfg: EvaluationConfig) -> None:
    """Every metric resolves (a user's factory imports), before any data is loaded."""
    for name in cfg.metrics:
        metric_factory(name)


def build_evaluator(cfg: EvaluationConfig, run_dir: Path | None, writer: Any = None) -> EvaluationPlugin:
    """The strategy's evaluator: silent without metrics; else the named metrics and loggers (a ``tensorboard``
    logger writes through ``writer``, the run's TensorBoard writer, when there is one)."""
    if not cfg.metrics:
        with warnings.catch_warnings():  # silent on purpose: Avalanche's "no loggers" warning is noise here
            warnings.filterwarnings("ignore", message="No loggers specified")
            return EvaluationPlugin(loggers=[])
    metrics = [metric_factory(name)() for name in cfg.metrics]
    loggers = [_logger(name, run_dir or Path("."), writer) for name in cfg.loggers]
    return EvaluationPlugin(*metrics, loggers=loggers)


def close_loggers(evaluator: EvaluationPlugin) -> None:
    """Flush and close the loggers' files (Avalanche leaves them open until the process ends)."""
    for logger in evaluator.loggers:
        if hasattr(logger, "close"):
            logger.close()
        if getattr(logger, "writer", None) is not None:
            logger.writer.close()
        file = getattr(logger, "file", None)
        if file is not None and file not in (sys.stdout, sys.stderr):
            file.close()
