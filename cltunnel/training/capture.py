"""The captured training step: forward, loss, backward and the SGD update compiled as one unit per
iteration, where nothing of the strategy's runs between those phases; and the self-check that decides
whether it may be used.

How it sits with Avalanche's template (the choice, written down): Avalanche still owns the loop, the
experiences, the epochs and every callback *around* an iteration (before/after the training iteration,
epoch and experience: progress, history, schedules, checkpoints, mid-task resume, the clock). Only the
inside of an iteration — the span between ``before_forward`` and ``after_update`` — becomes one compiled
call: the model and the loss through ``torch.compile`` (its backward compiled by AOTAutograd; on CUDA in
"reduce-overhead" mode, i.e. replayed as CUDA graphs) and the optimizer's step through a compiled
``optimizer.step``.

**Who may be captured.** Only a strategy of which nothing runs inside that span: no plugin hook there
(EWC's and LwF's penalties in ``before_backward``, AGEM's projection in ``after_backward``, replay that
changes the batch in ``before_forward``), no metric of its evaluator hooked there (Avalanche's
``EvaluationPlugin`` forwards every callback to its metrics), and no method of the strategy class (or of a
class between it and Avalanche's templates) among the template's step methods (``_before_backward``,
``forward``, ``criterion``, ``training_epoch``, ...). Anything else trains on the eager step, with one line
naming what needs it (:func:`capture_blockers`).

**The self-check.** Whenever the compiled step meets a new situation — its first call, a new head, a new
batch shape, a new learning rate, an optimizer state reset by a new task — it runs one eager step and one
compiled step from the same state and compares the loss and, after the update, every parameter, momentum
buffer and BatchNorm buffer (:data:`TOLERANCE`). A mismatch prints what differed and the run goes on eagerly
from the eager result; so does a failure to compile (or to record CUDA graphs) in the first calls of any
new variant. An error the eager step raises too is a real error, and surfaces.

On CPU the eager step is the default (``training.capture: auto``) and stays bit-exact with earlier numbers;
``capture: on`` compiles on CPU too (the tests compare it with the eager step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cltunnel.training.overrides import overrides

INNER_HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward", "before_update",
               "after_update")
STEP_METHODS = ("training_epoch", "_before_forward", "_after_forward", "_before_backward", "_after_backward",
                "_before_update", "_after_update", "forward", "criterion", "backward", "optimizer_step",
                "_make_empty_loss")  # the template's methods that run inside (or are) the captured span
CACHE_SIZE = 64  # compiled variants kept per function (heads x batch shapes of a task sequence)
CUDA_MODE = "reduce-overhead"  # CUDA graphs over the compiled step; verified per run by the self-check
GUARDED_CALLS = 3  # calls of a new variant that may still compile or record CUDA graphs: failures fall back
# Stated tolerance of the self-check, on the difference between the compiled and the eager step relative to
# what the step itself changed: for each kind of state (all parameters, all momentum buffers, all floating
# model buffers, taken together) and, looser, for each tensor alone; loss relative to the loss. A few float32
# ulps of each tensor are allowed on top, for tensors the step barely moves. fp32: compiled kernels sum in
# another order (measured on CPU, VGG-11 with BatchNorm: 2e-6 to 5e-6 for most steps) and may route a
# gradient through another of several equal maxima of a max-pool window (zero-padded crops make such ties:
# measured up to 3e-2 on single BatchNorm tensors of the first layers, far less in aggregate). The faults
# the check is there for are of the order of the change itself: a stale learning rate, BatchNorm statistics
# not updated, momentum carried over, a miscompiled layer. bf16: both paths round to bf16 at different
# places; not yet measured on a GPU (benchmarks/gpu_acceptance.py prints the measured values).
TOLERANCE = {"fp32": 2e-2, "bf16": 5e-2}  # per kind of state
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}  # the loss is computed before any update: only rounding differs
PER_TENSOR = 10  # a single tensor may differ by this many times the tolerance
ULPS = 8 * torch.finfo(torch.float32).eps


def capture_blockers(strategy: Any) -> list[str]:
    """What runs inside the step and so needs the eager one: plugin hooks in the span, the evaluator's
    metrics hooked there, and the template's step methods that the strategy class itself defines."""
    blockers = []
    for plugin in strategy.plugins:
        if isinstance(plugin, EvaluationPlugin):
            blockers += _hooked(plugin.metrics, PluginMetric)
        else:
            blockers += _hooked([plugin], SupervisedPlugin)
    return blockers + overrides(type(strategy), STEP_METHODS)


def _hooked(objects: list[Any], base: type) -> list[str]:
    """``Class.hook`` for each inner hook an object's class defines beyond ``base``'s do-nothing default."""
    found = []
    for obj in objects:
        for hook in INNER_HOOKS:
            own = getattr(type(obj), hook, None)
            if own is not None and own is not getattr(base, hook, None):
                found.append(f"{type(obj).__name__}.{hook}")
    return found


class LossModule(nn.Module):
    """The model and the training loss as one module, so that one compiled graph holds both."""

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x, head).float()
        return self.criterion(out, y), out


class CaptureRejected(RuntimeError):
    """The compiled step cannot be used in this run (its self-check failed, or it did not compile). Carries
    the eager step's result for the batch at hand: the model is left as the eager step left it."""

    def __init__(self, reason: str, result: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__(reason)
        self.reason, self.result = reason, result


@dataclass
class StepState:
    """Every tensor one training step changes: parameters, momentum buffers, model buffers (BatchNorm)."""

    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> "StepState":
        return cls({name: t.detach().clone() for name, t in StepState.live(model, optimizer).items()})

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the values back into the same tensors (the compiled code guards on their identity)."""
        live = StepState.live(model, optimizer)
        with torch.no_grad():
            for name, value in self.tensors.items():
                live[name].copy_(value)

    @staticmethod
    def live(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """The tensors themselves, by name (parameters' data, momentum buffers, model buffers)."""
        live = {f"param {n}": p.data for n, p in model.named_parameters()}
        names = {p: n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            if state.get("momentum_buffer") is not None:
                live[f"momentum {names.get(p, '?')}"] = state["momentum_buffer"]
        live.update({f"buffer {n}": b for n, b in model.named_buffers()})
        return live


def compare_steps(before: StepState, eager: StepState, compiled: StepState, loss_eager: float,
                  loss_compiled: float, tolerance: float, loss_tolerance: float = 1e-4) -> tuple[float, list[str]]:
    """The largest relative difference between the two steps, and a line for each kind of state or tensor
    beyond tolerance (see :data:`TOLERANCE`); integer buffers (BatchNorm's batch count) must be equal."""
    worst = abs(loss_compiled - loss_eager) / max(abs(loss_eager), 1e-12)
    bad = [f"loss {loss_compiled:.6g} vs eager {loss_eager:.6g}"] if worst > loss_tolerance else []
    kinds: dict[str, list[float]] = {}  # kind -> [squared difference, squared change, squared floor]
    for name, e in eager.tensors.items():
        c, b = compiled.tensors[name], before.tensors.get(name)
        if not e.is_floating_point():
            if not torch.equal(c, e):
                bad.append(f"{name}: {c.tolist()} vs eager {e.tolist()}")
                worst = float("inf")
            continue
        diff = float((c.float() - e.float()).norm())
        moved = float((e.float() - b.float()).norm()) if b is not None else float(e.float().norm())
        floor = ULPS * float(e.float().norm())
        total = kinds.setdefault(name.split(" ")[0], [0.0, 0.0, 0.0])
        total[0], total[1], total[2] = total[0] + diff ** 2, total[1] + moved ** 2, total[2] + floor ** 2
        if diff > PER_TENSOR * tolerance * moved + floor:
            bad.append(f"{name}: differs by {diff / max(moved, 1e-30):.2g} of the step's change")
    for kind, (diff2, moved2, floor2) in kinds.items():
        rel = diff2 ** 0.5 / max(moved2 ** 0.5, 1e-30)
        if diff2 ** 0.5 > tolerance * moved2 ** 0.5 + floor2 ** 0.5:
            bad.insert(0, f"all {kind}s together: differ by {rel:.2g} of the step's change")
        worst = max(worst, rel if diff2 ** 0.5 > floor2 ** 0.5 else 0.0)
    return worst, bad


class CapturedStep:
    """One training iteration as compiled calls: ``step(x, y, head) -> (loss, output)``, checked against the
    eager step whenever it meets a new situation (see the module docstring). Raises :class:`CaptureRejected`
    (after leaving the model as the eager step would) when it must not be used; the caller trains eagerly."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool, log: Callable[[str], None] | None = None) -> None:
        mode = CUDA_MODE if device.type == "cuda" else None
        # one compiled variant per (head, batch shape): a task sequence needs more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE)
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.resets = 0  # optimizer resets seen (each task's first step is checked, one head or many)
        self.log = log or (lambda line: print(line, flush=True))
        self.eager_module = LossModule(model, criterion)
        self.loss_module = torch.compile(self.eager_module, mode=mode, dynamic=False)
        self.update: Callable[[], Any] = torch.compile(optimizer.step, dynamic=False)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp \
            else contextlib.nullcontext
        self.tolerance = TOLERANCE["bf16" if amp else "fp32"]
        self.loss_tolerance = LOSS_TOLERANCE["bf16" if amp else "fp32"]
        self.calls = 0
        self.variants: dict[tuple, int] = {}  # situation -> compiled calls made in it
        self.checks: list[float] = []  # worst relative difference of each self-check (for the GPU acceptance)
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

    def situation(self, x: torch.Tensor, head: int, reset: bool) -> tuple:
        """What a compiled variant, or a stale constant inside one, depends on: head, batch shape, learning
        rates, which parameters train and which modules are in training mode (a strategy that freezes or
        unfreezes layers makes a new one), and each optimizer reset (a new task, one head or many)."""
        lrs = tuple(g["lr"] for g in self.optimizer.param_groups)
        trains = tuple(p.requires_grad for p in self.model.parameters())
        modes = tuple(m.training for m in self.model.modules())
        return head, tuple(x.shape), x.dtype, lrs, trains, modes, self.resets if reset else 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        momentum = any(g.get("momentum", 0) for g in self.optimizer.param_groups)
        reset = momentum and not self.optimizer.state  # a new task's optimizer reset (or the run's first step)
        self.resets += reset
        key = self.situation(x, head, reset)
        seen = self.variants.get(key, 0)
        self.variants[key] = seen + 1
        self.calls += 1
        if seen == 0:
            return self._checked(x, y, head, reset)
        if seen == GUARDED_CALLS:  # on CUDA the first calls warm up and record the graph: check a replay too
            return self._checked(x, y, head, False)
        if reset:
            self.prime_momentum()
        if seen < GUARDED_CALLS:
            return self._guarded(x, y, head)
        return self._compiled(x, y, head)

    def _compiled(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, out = self.loss_module(x, y, head)
        loss.backward()
        self.update()
        return loss.detach(), out.detach()

    def eager(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The template's step with nothing hooked into it (that is when capture is used)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, out = self.eager_module(x, y, head)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), out.detach()

    def _guarded(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A compiled call that may still compile or record; if it fails, the eager step from the same state."""
        before = StepState.of(self.model, self.optimizer)
        rng = _rng_state()
        try:
            return self._compiled(x, y, head)
        except Exception as err:  # noqa: BLE001 - a compile/record failure, unless the eager step fails too
            before.restore(self.model, self.optimizer)
            _set_rng_state(rng)
            result = self.eager(x, y, head)  # a real error raises here, as it would without capture
            raise CaptureRejected(compile_failure(err), result) from err

    def _checked(self, x: torch.Tensor, y: torch.Tensor, head: int, reset: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-check: one eager step, then one compiled step from the same state, compared. After an
        optimizer reset the eager step starts from the empty state, as the template's would, and the compiled
        one from the primed zero buffers: that priming is checked too."""
        before = StepState.of(self.model, self.optimizer)
        rng = _rng_state()
        loss_e, out_e = self.eager(x, y, head)
        eager = StepState.of(self.model, self.optimizer)
        before.restore(self.model, self.optimizer)
        _set_rng_state(rng)
        if reset:
            self.optimizer.state.clear()
            self.prime_momentum()
        try:
            loss_c, out_c = self._compiled(x, y, head)
        except Exception as err:  # noqa: BLE001 - failed to compile: the eager result stands
            eager.restore(self.model, self.optimizer)
            raise CaptureRejected(compile_failure(err), (loss_e, out_e)) from err
        worst, bad = compare_steps(before, eager, StepState.of(self.model, self.optimizer), float(loss_e),
                                   float(loss_c), self.tolerance, self.loss_tolerance)
        self.checks.append(worst)
        where = f"head {head}, lr {[g['lr'] for g in self.optimizer.param_groups]}" + (", new task" if reset else "")
        if bad:
            eager.restore(self.model, self.optimizer)
            raise CaptureRejected(f"self-check failed at {where} (tolerance {self.tolerance:g}, one tensor "
                                  f"{PER_TENSOR * self.tolerance:g}): " + "; ".join(bad[:4])
                                  + (f"; and {len(bad) - 4} more" if len(bad) > 4 else ""), (loss_e, out_e))
        self.log(f"capture: self-check passed at {where}: compiled vs eager step differ by at most {worst:.1e} "
                 f"(tolerance {self.tolerance:g})")
        return loss_c, out_c


def compile_failure(err: Exception) -> str:
    """The notice for a step that failed to compile or record: the error's type and first line."""
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"compiling the step failed ({type(err).__name__}: {first})"


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
