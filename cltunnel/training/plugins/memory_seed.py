"""Seeds for what a memory draws at the end of a task, so a resumed run can draw it again exactly."""
from __future__ import annotations

import random
from typing import Any

import torch
from avalanche.core import SupervisedPlugin


def seed_memory(seed: int, task: int) -> None:
    """The RNG streams a memory draws from when it takes its samples of ``task`` (AGEM's from Python's random,
    Avalanche's replay buffers from torch's): fixed per (seed, task) so the draw can be made again on resume."""
    torch.manual_seed(seed * 10_007 + task + 5_003)
    random.seed(seed * 10_007 + task + 5_003)


class MemorySeedPlugin(SupervisedPlugin):
    """Seeds :func:`seed_memory` at the end of each task, ahead of the plugins that fill their memory there
    (Avalanche calls plugins in list order, and a strategy appends its own after the ones it is given)."""
    transient = True

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        seed_memory(self.seed, strategy.experience.current_experience)
