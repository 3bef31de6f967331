"""cltunnel's Avalanche plugins, one module each: the run loop's (progress bars, epoch checkpoints, training
curves, memory seeds, mid-task resume), the erosion protocol's test curve, and the mechanisms of the
tunnel-aware strategies (:mod:`cltunnel.training.tunnel_aware`: layer-wise EWC, frozen layers, replay at a
layer). Each is importable from here (``cltunnel.training.plugins:ProgressPlugin``); capture's proof lists
(:mod:`cltunnel.training.capture_rules`) name a class by the module that defines it.
"""
from __future__ import annotations

from cltunnel.training.plugins.epoch_checkpoints import EpochCheckpointPlugin
from cltunnel.training.plugins.freeze_layers import FreezeLayersPlugin
from cltunnel.training.plugins.history import HistoryPlugin
from cltunnel.training.plugins.layer_replay import LayerReplayPlugin
from cltunnel.training.plugins.layerwise_ewc import LayerwiseEWCPlugin
from cltunnel.training.plugins.memory_seed import MemorySeedPlugin
from cltunnel.training.plugins.mid_task_resume import MidTaskResumePlugin
from cltunnel.training.plugins.progress import ProgressPlugin
from cltunnel.training.plugins.test_curve import TestCurvePlugin

__all__ = ["EpochCheckpointPlugin", "FreezeLayersPlugin", "HistoryPlugin", "LayerReplayPlugin", "LayerwiseEWCPlugin",
           "MemorySeedPlugin", "MidTaskResumePlugin", "ProgressPlugin", "TestCurvePlugin"]
