"""The expected failures, one class each, under one base: the CLI prints them as one line and exits 2.

Anything else is a bug and keeps its traceback. This module imports nothing, so every layer can raise these.
"""
from __future__ import annotations



class CltunnelError(Exception):
    """A failure the user can fix (a config key, a data file, a checkpoint, a directory), said in one line."""


class CheckpointError(CltunnelError):
    """A checkpoint that cannot be used: damaged, not cltunnel's, or holding objects that would run code."""
