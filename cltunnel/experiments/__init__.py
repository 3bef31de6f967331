"""Experiments: one module per protocol (task sequence, feature erosion, representations, synthetic data,
shallow networks), each registering itself in :mod:`~cltunnel.experiments.registry`, plus the analyses of
finished task-sequence runs (:mod:`~cltunnel.experiments.analyses`: one module per analysis, each registering
itself with ``@analysis``).

Importing this package imports every module in it, so a new protocol module registers itself (its config section
and its protocol) by existing; whatever parses a scenario imports this package first.
"""
from __future__ import annotations

import importlib
import pkgutil

from cltunnel.experiments.registry import PROTOCOLS, Protocol, protocol_for, protocol_for_saved, register_protocol

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PROTOCOLS", "Protocol", "protocol_for", "protocol_for_saved", "register_protocol"]
