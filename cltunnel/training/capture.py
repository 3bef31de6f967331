"""The captured training step: forward, loss, backward and the optimizer's update compiled as one unit per
iteration, and the self-check that decides whether it may be used.

How it sits with Avalanche's template (the choice, written down): Avalanche still owns the loop, the
experiences, the epochs and every callback *around* an iteration (before/after the training iteration,
epoch and experience: progress, history, schedules, checkpoints, mid-task resume, the clock). Only the
inside of an iteration — the span between ``before_forward`` and ``after_update`` — becomes one compiled
call: the model and the loss through ``torch.compile`` (its backward compiled by AOTAutograd; on CUDA in
"reduce-overhead" mode, i.e. replayed as CUDA graphs) and the optimizer's step through a compiled
``optimizer.step``.

**Who may be captured** is decided in :mod:`cltunnel.training.capture_rules`: by proof (a strategy and
plugins the project has run on both paths), or on the user's explicit ``capture: on``.

**The self-check.** On a schedule (:data:`CHECK_CALLS`: every new situation — a new head, batch shape,
learning rate, optimizer reset, frozen layer or train/eval switch — at its calls 1, 4, 16 and 64, then every
64th call) the step runs the *reference* (the strategy's own eager iteration, hooks and all; the plain eager
step when used alone) and then the compiled step from the same state: parameters, model buffers, the whole
optimizer state (every tensor and step count of any ``torch.optim`` optimizer) and the RNG. Each tensor's
compiled update is compared with that tensor's eager update (:func:`compare_steps`). A mismatch prints what
differed and the run goes on from the reference's result on Avalanche's eager step; so does a failure to
compile (or to record CUDA graphs) in the first calls of any new variant. An error the reference raises too
is a real error, and surfaces.

On CPU the eager step is the default (``training.capture: auto``) and stays bit-exact with earlier numbers;
``capture: on`` compiles on CPU too (the tests compare it with the eager step).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

CACHE_SIZE = 64  # compiled variants kept per function (heads x batch shapes of a task sequence)
CUDA_MODE = "reduce-overhead"  # CUDA graphs over the compiled step; verified per run by the self-check
GUARDED_CALLS = 3  # calls of a new variant that may still compile or record CUDA graphs: failures fall back
# The self-check compares, for each tensor the step changes, the compiled update c - b with the eager update
# e - b (b: the state before). It splits the difference into a *scale* error, |alpha - 1| with alpha the
# least-squares factor <c - b, e - b> / |e - b|^2, and a *direction* error, the residual |c - b - alpha (e - b)|
# / |e - b|, both for each tensor alone and for each kind of state taken together (parameters, optimizer state,
# model buffers). Faults a compiled step can have are scale errors (a stale or halved learning rate, a scaled
# or dropped gradient, a momentum not reset) or large direction errors (a miscompiled layer, BatchNorm
# statistics not updated). Rounding is a small direction error: compiled kernels sum in another order (CPU,
# VGG-11 with BatchNorm: 2e-6 to 5e-6 in most steps) and may route a gradient through another of several equal
# maxima of a max-pool window (zero-padded crops make such ties: up to 3e-2 on single first-layer tensors,
# far less together), which moves the update's direction but hardly its scale. The tolerances below catch a
# 1.5 % error in every gradient (scale, all tensors together) and a 15 % error in any single tensor (scale or
# direction), in fp32. bf16: both paths round to bf16 at different places; not yet measured on a GPU
# (benchmarks/gpu_acceptance.py prints the measured values), so its tolerances are wider and catch less.
SCALE_TOLERANCE = {"fp32": 2e-3, "bf16": 2e-2}  # |alpha - 1|, all tensors of a kind together
DIRECTION_TOLERANCE = {"fp32": 2e-2, "bf16": 5e-2}  # residual, all tensors of a kind together
TENSOR_TOLERANCE = {"fp32": 0.1, "bf16": 0.2}  # scale or residual of a single tensor
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}  # the loss is computed before any update: only rounding differs
ULPS = 8 * torch.finfo(torch.float32).eps
CHECK_CALLS = (1, 4, 16, 64)  # a situation's calls that are checked; then every CHECK_EVERY-th call
CHECK_EVERY = 64  # steady-state cost: one reference step and three state copies per 64 steps


def checked_call(call: int) -> bool:
    """Whether a situation's ``call``-th call (1-based) runs the self-check."""
    return call in CHECK_CALLS or call % CHECK_EVERY == 0


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


TENSOR = object()  # in a StepState's optimizer layout: this entry is a tensor (held in ``tensors``)


@dataclass
class StepState:
    """Every tensor one training step changes, by name (parameters, model buffers, every tensor of the
    optimizer's state), and the layout of the optimizer's state: which parameters have state, which keys, and
    the plain values among them (a step count kept as a number). Enough to put any ``torch.optim`` optimizer
    back exactly as it was, including "no state yet" (Adam's first step creates its moments)."""

    tensors: dict[str, torch.Tensor]
    layout: dict[int, dict[str, Any]]  # parameter index in the optimizer -> {key: plain value or TENSOR}

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> "StepState":
        tensors = {name: t.detach().clone() for name, t in StepState.live(model, optimizer).items()}
        layout = {i: {k: TENSOR if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}
                  for i, state in _indexed_state(optimizer)}
        return cls(tensors, layout)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the values back into the same tensors (the compiled code guards on their identity); optimizer
        state the snapshot did not have is removed, state it had and the optimizer lost is made again."""
        params = _optimizer_params(optimizer)
        names = _param_names(model, optimizer)
        for i, p in enumerate(params):
            if i not in self.layout:
                optimizer.state.pop(p, None)
                continue
            state = optimizer.state[p]
            for key in [k for k in state if k not in self.layout[i]]:
                del state[key]
            for key, value in self.layout[i].items():
                if value is not TENSOR:
                    state[key] = copy.deepcopy(value)
                elif not isinstance(state.get(key), torch.Tensor):
                    state[key] = self.tensors[f"optimizer {key} {names[i]}"].clone()
        live = StepState.live(model, optimizer)
        with torch.no_grad():
            for name, value in self.tensors.items():
                live[name].copy_(value)

    @staticmethod
    def live(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """The tensors themselves, by name: parameters' data (the module's and any other parameter the
        optimizer steps), the module's buffers, optimizer state tensors. ``model`` is the whole compiled unit
        (model and criterion), so a criterion's parameters and buffers are state too."""
        live = {f"param {n}": p.data for n, p in model.named_parameters()}
        names = _param_names(model, optimizer)
        known = {p for p in model.parameters()}
        live.update({f"param {names[i]}": p.data for i, p in enumerate(_optimizer_params(optimizer)) if p not in known})
        for i, state in _indexed_state(optimizer):
            live.update({f"optimizer {k} {names[i]}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
        live.update({f"buffer {n}": b for n, b in model.named_buffers()})
        return live


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _indexed_state(optimizer: torch.optim.Optimizer) -> list[tuple[int, dict[str, Any]]]:
    return [(i, optimizer.state[p]) for i, p in enumerate(_optimizer_params(optimizer)) if p in optimizer.state]


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {p: n for n, p in model.named_parameters()}
    return [names.get(p, f"#{i}") for i, p in enumerate(_optimizer_params(optimizer))]


@dataclass
class Tolerance:
    """The self-check's bounds for one precision (see :data:`SCALE_TOLERANCE` and its neighbours)."""

    scale: float
    direction: float
    tensor: float
    loss: float

    @classmethod
    def for_precision(cls, precision: str) -> "Tolerance":
        return cls(SCALE_TOLERANCE[precision], DIRECTION_TOLERANCE[precision], TENSOR_TOLERANCE[precision],
                   LOSS_TOLERANCE[precision])


@dataclass
class Comparison:
    """The self-check's verdict: each measured error over its bound (``ratio``: the largest; < 1 passes),
    the largest plain relative difference, and a line for each bound exceeded."""

    ratio: float
    largest: float
    failures: list[str]


def _update_errors(d2: float, du: float, u2: float) -> tuple[float, float]:
    """Scale error |alpha - 1| and direction error |d - alpha u| / |u| of a compiled update d against the
    eager update u, from |d|^2, <d, u> and |u|^2 (float64 sums)."""
    alpha = du / u2
    residual2 = max(d2 - du * du / u2, 0.0)
    return abs(alpha - 1.0), residual2 ** 0.5 / u2 ** 0.5


COUNTERS = ("optimizer step ",)  # step counts kept as float tensors (Adam, AdamW): compared exactly


def _kind(name: str) -> str:
    """The group a tensor's update is summed into: parameters, buffers, and each optimizer state key apart
    (Adam's first and second moments move on scales orders of magnitude apart)."""
    words = name.split(" ")
    return " ".join(words[:2]) if words[0] == "optimizer" else words[0]


def _plain(layout: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    plain = {i: {k: v for k, v in keys.items() if v is not TENSOR} for i, keys in layout.items()}
    return {i: keys for i, keys in plain.items() if keys}


def compare_steps(before: StepState, eager: StepState, compiled: StepState, loss_eager: float,
                  loss_compiled: float, tolerance: Tolerance) -> Comparison:
    """Each tensor's compiled update against its own eager update, and each kind of state (param, optimizer,
    buffer) together; integer tensors (BatchNorm's batch count) must be equal. Tensors the step did not move
    (beyond a few float32 ulps) must stay within those ulps of the eager value."""
    loss_rel = abs(loss_compiled - loss_eager) / max(abs(loss_eager), 1e-12)
    ratios, largest, bad = [loss_rel / tolerance.loss], loss_rel, []
    if loss_rel > tolerance.loss:
        bad.append(f"loss {loss_compiled:.6g} vs eager {loss_eager:.6g}")
    kinds: dict[str, list[float]] = {}  # kind -> [|d|^2, <d,u>, |u|^2]
    # the compiled path primes zeroed momentum buffers for every parameter at a reset (prime_momentum), where
    # SGD makes one at a parameter's first gradient: a zero buffer is that first step's copy exactly
    extra = sorted(k for k in set(compiled.tensors) - set(eager.tensors)
                   if not (k.startswith("optimizer momentum_buffer ") and not compiled.tensors[k].any()))
    if extra or _plain(compiled.layout) != _plain(eager.layout):
        bad.append(f"the compiled step's optimizer state differs in layout or plain values ({extra[:3]})")
        ratios.append(float("inf"))
    for name, e in eager.tensors.items():
        c, b = compiled.tensors.get(name), before.tensors.get(name)
        if c is None or c.shape != e.shape:
            bad.append(f"{name}: missing or reshaped on the compiled path")
            ratios.append(float("inf"))
            continue
        if not e.is_floating_point() or name.startswith(COUNTERS):
            if not torch.equal(c, e):
                bad.append(f"{name}: {c.tolist()} vs eager {e.tolist()}")
                ratios.append(float("inf"))
            continue
        e64, c64 = e.double(), c.double()
        b64 = b.double() if b is not None and b.shape == e.shape else torch.zeros_like(e64)
        u, d = e64 - b64, c64 - b64
        u2, d2, du = float((u * u).sum()), float((d * d).sum()), float((d * u).sum())
        floor = ULPS * float(e64.norm())
        off = float((c64 - e64).norm())
        largest = max(largest, off / max(u2 ** 0.5, floor, 1e-30))
        if u2 ** 0.5 <= floor:  # the step did not move it: it must not move on the compiled path either
            if off > 2 * floor:
                bad.append(f"{name}: moved by {off:.2g} where the eager step left it")
                ratios.append(float("inf"))
            continue
        kind = kinds.setdefault(_kind(name), [0.0, 0.0, 0.0])
        kind[0], kind[1], kind[2] = kind[0] + d2, kind[1] + du, kind[2] + u2
        if off <= floor:
            continue
        scale, direction = _update_errors(d2, du, u2)
        ratios.append(max(scale, direction) / tolerance.tensor)
        if max(scale, direction) > tolerance.tensor:
            bad.append(f"{name}: its update is off by {scale:.2g} in scale, {direction:.2g} in direction")
    for kind, (d2, du, u2) in kinds.items():
        scale, direction = _update_errors(d2, du, u2)
        ratios += [scale / tolerance.scale, direction / tolerance.direction]
        if scale > tolerance.scale or direction > tolerance.direction:
            bad.insert(0, f"all {kind} tensors together: update off by {scale:.2g} in scale, {direction:.2g} in "
                          "direction")
    return Comparison(max(ratios), largest, bad)


class CapturedStep:
    """One training iteration as compiled calls: ``step(x, y, head, reference) -> (loss, output)``, checked
    against ``reference`` (the strategy's eager iteration on the same batch; the plain eager step by default)
    on the schedule of :func:`checked_call`. Raises :class:`CaptureRejected` (after leaving the model as the
    reference left it) when it must not be used; the caller trains eagerly."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool, log: Callable[[str], None] | None = None) -> None:
        mode = CUDA_MODE if device.type == "cuda" else None
        # one compiled variant per (head, batch shape): a task sequence needs more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE)
        # dropout and other random ops draw from the same generator as eager code (inductor's own philox draws
        # differ, so a checked step would compare different masks and an unchecked one train on other ones)
        torch._inductor.config.fallback_random = True
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.graphs = _graphs_compiled()  # dynamo's count of graphs: a recompile makes the next call checked
        self.resets = 0  # optimizer resets seen (each task's first step is checked, one head or many)
        self.had_state = False  # the optimizer held state after the last call (an empty one now: a reset)
        self.log = log or (lambda line: print(line, flush=True))
        self.eager_module = LossModule(model, criterion)
        self.loss_module = torch.compile(self.eager_module, mode=mode, dynamic=False)
        self.update: Callable[[], Any] = torch.compile(optimizer.step, dynamic=False)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp \
            else contextlib.nullcontext
        self.tolerance = Tolerance.for_precision("bf16" if amp else "fp32")
        self.calls = 0
        self.variants: dict[tuple, int] = {}  # situation -> calls made in it
        self.checks: list[float] = []  # each self-check's largest error over its bound (< 1 passed)
        self.differences: list[float] = []  # each self-check's largest relative difference
        self.momentum: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its momentum buffer, kept across tasks

    def prime_momentum(self) -> None:
        """Zeroed momentum buffers in an empty SGD state (a new task's reset empties it). SGD's first step
        makes its buffer a copy of the gradient; 0 * momentum + gradient is that copy exactly. The same
        buffer tensors are put back at every task, zeroed in place: the compiled update guards on their
        identity, so it compiles once for the run instead of once a task. Other optimizers make their state
        inside the compiled update."""
        if not isinstance(self.optimizer, torch.optim.SGD) or any(g.get("dampening", 0) for g in
                                                                    self.optimizer.param_groups):
            return  # with dampening, 0 * momentum + (1 - d) * gradient is not SGD's first-step copy
        for group in self.optimizer.param_groups:
            if group.get("momentum", 0):
                for p in group["params"]:
                    buffer = self.momentum.setdefault(p, torch.zeros_like(p))
                    self.optimizer.state[p]["momentum_buffer"] = buffer.zero_()

    def situation(self, x: torch.Tensor, head: int, reset: bool) -> tuple:
        """What a compiled variant, or a stale constant inside one, depends on: head, batch shape, the
        optimizer's hyperparameters (learning rates, momentum, betas, weight decay), which parameters train
        and which modules are in training mode (a strategy that freezes or unfreezes layers makes a new one),
        and each optimizer reset (a new task, one head or many)."""
        hyper = tuple((k, v) for g in self.optimizer.param_groups for k, v in sorted(g.items())
                      if k != "params" and isinstance(v, (bool, int, float, str, tuple, type(None))))
        trains = tuple(p.requires_grad for p in self.model.parameters())
        modes = tuple(m.training for m in self.model.modules())
        return head, tuple(x.shape), x.dtype, hyper, trains, modes, self.resets if reset else 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, head: int,
                 reference: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        reference = reference or (lambda: self.eager(x, y, head))
        reset = not self.optimizer.state and (self.calls == 0 or self.had_state)
        self.resets += reset
        key = self.situation(x, head, reset)
        call = self.variants.get(key, 0) + 1
        self.variants[key] = call
        self.calls += 1
        recompiled = _graphs_compiled() != self.graphs  # (self.graphs is brought up to date after every call)
        try:
            if checked_call(call) or recompiled:  # a variant the situation did not foresee is checked at once
                return self._checked(x, y, head, reset, reference)
            if reset:
                self.prime_momentum()
            if call <= GUARDED_CALLS:
                return self._guarded(x, y, head, reference)
            return self._unguarded(x, y, head, reference)
        finally:
            self.had_state = bool(self.optimizer.state)
            self.graphs = _graphs_compiled()

    def _compiled(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, out = self.loss_module(x, y, head)
        loss.backward()
        self.update()
        return loss.detach(), out.detach()

    def _unguarded(self, x: torch.Tensor, y: torch.Tensor, head: int,
                   reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A compiled call without a saved state. A recompile the situation did not foresee that fails does so
        while tracing, before the step changes anything: the reference then runs from the same state."""
        try:
            return self._compiled(x, y, head)
        except Exception as err:  # noqa: BLE001 - a compile failure, unless the reference fails too
            result = reference()
            raise CaptureRejected(compile_failure(err), result) from err

    def eager(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The template's step with nothing hooked into it (the reference when the step is used alone)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, out = self.eager_module(x, y, head)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), out.detach()

    def _guarded(self, x: torch.Tensor, y: torch.Tensor, head: int,
                 reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A compiled call that may still compile or record; if it fails, the reference from the same state."""
        before = StepState.of(self.eager_module, self.optimizer)
        rng = _rng_state()
        try:
            return self._compiled(x, y, head)
        except Exception as err:  # noqa: BLE001 - a compile/record failure, unless the reference fails too
            before.restore(self.eager_module, self.optimizer)
            _set_rng_state(rng)
            result = reference()  # a real error raises here, as it would without capture
            raise CaptureRejected(compile_failure(err), result) from err

    def _checked(self, x: torch.Tensor, y: torch.Tensor, head: int, reset: bool,
                 reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-check: the reference, then the compiled step from the same state (model, whole optimizer
        state, RNG), compared. After an optimizer reset the reference starts from the empty state, as the
        template's would, and the compiled step from the primed zero buffers: that priming is checked too."""
        before = StepState.of(self.eager_module, self.optimizer)
        rng = _rng_state()
        loss_e, out_e = reference()
        eager, rng_eager = StepState.of(self.eager_module, self.optimizer), _rng_state()
        before.restore(self.eager_module, self.optimizer)
        _set_rng_state(rng)
        if reset:
            self.prime_momentum()
        try:
            loss_c, out_c = self._compiled(x, y, head)
        except Exception as err:  # noqa: BLE001 - failed to compile: the reference's result stands
            eager.restore(self.eager_module, self.optimizer)
            _set_rng_state(rng_eager)
            raise CaptureRejected(compile_failure(err), (loss_e, out_e)) from err
        found = compare_steps(before, eager, StepState.of(self.eager_module, self.optimizer), float(loss_e),
                              float(loss_c), self.tolerance)
        self.checks.append(found.ratio)
        self.differences.append(found.largest)
        where = f"head {head}, lr {[g['lr'] for g in self.optimizer.param_groups]}" + (", new task" if reset else "")
        if found.failures:  # the run goes on exactly as the eager one would: its state, its RNG
            eager.restore(self.eager_module, self.optimizer)
            _set_rng_state(rng_eager)
            raise CaptureRejected(f"self-check failed at {where}, call {self.calls} ({found.ratio:.3g} times its "
                                  "bound): " + "; ".join(found.failures[:4])
                                  + (f"; and {len(found.failures) - 4} more" if len(found.failures) > 4 else ""),
                                  (loss_e, out_e))
        self.log(f"capture: self-check passed at {where}, call {self.calls}: largest difference "
                 f"{found.largest:.1e} of the step's change, {found.ratio:.2g} of its bound")
        return loss_c, out_c


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (it counts every recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
