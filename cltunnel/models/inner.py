"""The second granularity of representations: every intermediate output inside the body layers (after each
conv, BatchNorm, activation, pooling and residual addition), as Nguyen, Raghu & Kornblith (ICLR 2021) compare
them, read through forward hooks. "Layer k" stays the output of ``model.body[k-1]`` everywhere else; an
inner representation is labelled with the body layer it sits in, so a figure can mark the body layers'
boundaries on it.

Left out: the shortcut branch of a residual block (its 1x1 conv and BatchNorm are not on the path from one
block's output to the next) and modules that only reshape or pass their input on (Flatten, Identity,
Dropout): their output is the previous representation again. Only what modules compute is seen (a functional
``x + y`` or ``torch.relu`` in a forward is not); a module run twice in one pass is refused, since its one
hook would hold two representations.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from cltunnel.models.layered import LayeredModel

PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class InnerRepresentation:
    """One hooked module: its body layer (1-based, as everywhere), its path inside the body and the module."""

    layer: int
    path: str
    module: nn.Module


@torch.no_grad()
def inner_representations(model: LayeredModel, example: torch.Tensor) -> list[InnerRepresentation]:
    """The leaf modules of every body layer in the order a forward pass of ``example`` runs them (modules it
    does not run are dropped), shortcut branches and pass-through modules left out. A body layer that is
    itself a leaf module stands for itself."""
    candidates: list[InnerRepresentation] = []
    for k, (name, layer) in enumerate(model.body.named_children(), start=1):
        for path, module in layer.named_modules():
            if list(module.children()) or "shortcut" in path.split(".") or isinstance(module, PASS_THROUGH):
                continue
            candidates.append(InnerRepresentation(k, f"{name}.{path}" if path else name, module))
    calls: list[int] = []
    with hooked(candidates, lambda i, _out: calls.append(i)):
        model.body(example)
    twice = sorted({candidates[i].path for i in calls if calls.count(i) > 1})
    if twice:  # one hook slot would hold several representations (e.g. torchvision's reused ReLU)
        raise ValueError(f"inner representations: module(s) {twice} run more than once per forward pass; give "
                         "each use its own module to read intermediate outputs")
    return [candidates[i] for i in calls]


@contextmanager
def hooked(representations: list[InnerRepresentation], visit: Callable[[int, torch.Tensor], None]
           ) -> Iterator[None]:
    """While open, every forward pass calls ``visit(index, output)`` for each representation as its module
    runs: at that moment, before an in-place activation after it can overwrite the tensor, so ``visit`` must
    use the output at once (e.g. reduce it to a Gram matrix), not keep it."""
    handles = [rep.module.register_forward_hook(lambda _m, _i, out, i=i: visit(i, out))
               for i, rep in enumerate(representations)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class InnerOutputs:
    """A model read at chosen inner representations instead of its body layers: ``layer_outputs(x)`` gives
    representation i (1-based, in the order given) for a forward pass of ``x``, as
    :meth:`LayeredModel.layer_outputs` gives body layer k. So the probe helpers
    (:mod:`cltunnel.measures.probes`), which only ask a model for ``eval`` and ``layer_outputs``, train and test
    probes on them (Nguyen et al. 2021, Figure E.1: before and after each residual addition). Each output is
    copied as its module runs, before an in-place activation after it could overwrite it."""

    def __init__(self, model: LayeredModel, representations: list[InnerRepresentation]) -> None:
        self.model = model
        self.representations = representations

    def eval(self) -> "InnerOutputs":
        self.model.eval()
        return self

    def layer_outputs(self, x: torch.Tensor, layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        wanted = sorted(set(range(1, len(self.representations) + 1) if layers is None else layers))
        out: dict[int, torch.Tensor] = {}
        reps = [self.representations[k - 1] for k in wanted]
        with hooked(reps, lambda i, output: out.__setitem__(wanted[i], output.clone())):
            self.model.body(x)
        return out
