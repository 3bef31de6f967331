"""The captured training step: forward, loss, backward and the SGD update compiled as one unit per
iteration, where a strategy's plugins leave nothing to do between those phases.

How it sits with Avalanche's template (the choice, written down): Avalanche still owns the loop, the
experiences, the epochs and every callback a plugin can use *around* an iteration (before/after the
training iteration, epoch and experience: progress, history, schedules, checkpoints, mid-task resume, the
clock). Only the inside of an iteration — the span between ``before_forward`` and ``after_update`` — becomes
one compiled call: the model and the loss through ``torch.compile`` (its backward compiled by AOTAutograd;
on CUDA in "reduce-overhead" mode, i.e. replayed as CUDA graphs) and the optimizer's step through a
compiled ``optimizer.step`` (one fused kernel set instead of a Python loop over parameters).

A strategy whose plugins hook into that span (EWC's and LwF's penalties in ``before_backward``, AGEM's
projection in ``after_backward``, replay that changes the batch in ``before_forward``, SI's and MAS's
bookkeeping) keeps today's eager step, and the run says so in one line naming the hook. So does a strategy
class that overrides the template's forward/criterion/backward/optimizer step.

On CPU the eager step is the default (``training.capture: auto``) and stays bit-exact with earlier numbers;
``capture: on`` compiles on CPU too (tests compare it with the eager step).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

INNER_HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward", "before_update",
               "after_update")
TEMPLATE_STEP = ("criterion", "backward", "optimizer_step", "_make_empty_loss", "training_epoch")
STEP_OWNERS = ("avalanche.training.templates", "avalanche.core", "cltunnel.training.fast_data")  # the plain step
CACHE_SIZE = 64  # compiled variants kept per function (heads x batch shapes of a task sequence)
CUDA_MODE = "reduce-overhead"  # CUDA graphs over the compiled step; not yet measured on a GPU (tables/SPEED.md)


def capture_blockers(strategy: Any) -> list[str]:
    """What needs per-iteration Python inside the step: plugin hooks in the compiled span, and template
    methods the strategy class overrides (cltunnel's own FastDataMixin methods excepted)."""
    blockers = []
    for plugin in strategy.plugins:
        for hook in INNER_HOOKS:
            own = getattr(type(plugin), hook, None)
            if own is not None and own is not getattr(SupervisedPlugin, hook, None):
                blockers.append(f"{type(plugin).__name__}.{hook}")
    for name in TEMPLATE_STEP:
        owner = next((c for c in type(strategy).__mro__ if name in vars(c)), None)
        if owner is not None and not owner.__module__.startswith(STEP_OWNERS):
            blockers.append(f"{owner.__name__}.{name}")
    return blockers


class LossModule(nn.Module):
    """The model and the training loss as one module, so that one compiled graph holds both."""

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x, head).float()
        return self.criterion(out, y), out


class CapturedStep:
    """One training iteration as compiled calls: ``step(x, y, head) -> (loss, output)``."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool) -> None:
        mode = CUDA_MODE if device.type == "cuda" else None
        # one compiled variant per (head, batch shape): a task sequence needs more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE)
        self.loss_module = torch.compile(LossModule(model, criterion), mode=mode, dynamic=False)
        self.optimizer = optimizer
        self.update: Callable[[], Any] = torch.compile(optimizer.step, dynamic=False)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        self.calls = 0
        self.momentum: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its momentum buffer, kept across tasks

    def prime_momentum(self) -> None:
        """Zeroed momentum buffers in an empty optimizer state (a new task's reset empties it). SGD's first
        step makes its buffer a copy of the gradient; 0 * momentum + gradient is that copy exactly. The same
        buffer tensors are put back at every task, zeroed in place: the compiled update guards on their
        identity, so it compiles once for the run instead of once a task."""
        for group in self.optimizer.param_groups:
            if group.get("momentum", 0):
                for p in group["params"]:
                    buffer = self.momentum.setdefault(p, torch.zeros_like(p))
                    self.optimizer.state[p]["momentum_buffer"] = buffer.zero_()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.optimizer.state:
            self.prime_momentum()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, out = self.loss_module(x, y, head)
        loss.backward()
        self.update()
        self.calls += 1
        return loss.detach(), out.detach()
