"""The run's one TensorBoard stream, ``<run>/tensorboard``: the training curves (:mod:`.plugins.history`),
Avalanche's metrics when ``evaluation.loggers`` names ``tensorboard`` (through the same writer), and the
analyses' per-layer profiles. One folder, and the training's scalars and Avalanche's through one writer, so
TensorBoard shows the run as one run with every scalar, not a second run in Avalanche's own folder.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from avalanche.logging import TensorboardLogger

from cltunnel.store import TENSORBOARD_DIR


def open_tensorboard(run_dir: Path, enabled: bool) -> Any:
    """A SummaryWriter for the run (None when switched off); events append across resumed processes."""
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard's protobufs: only when used

    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))


class RunTensorboardLogger(TensorboardLogger):
    """Avalanche's TensorBoard logger writing through the run's writer instead of a second one of its own
    (which would be a second event file, and in Avalanche's layout a second folder)."""

    def __init__(self, writer: Any, owns_writer: bool = False) -> None:
        self.shared_writer = writer
        super().__init__(tb_log_dir=writer.log_dir)
        if owns_writer:  # its own writer (the curves are off): closed, and flushed, when the logger goes, as Avalanche's
            weakref.finalize(self, writer.close)

    def _make_writer(self, tb_log_dir: Any, filename_suffix: str) -> Any:
        return self.shared_writer
