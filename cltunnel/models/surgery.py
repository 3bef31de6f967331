"""Layer surgery on LayeredModels: M_a[1:x] + M_b[x+1:n], extractor/tunnel swaps, retrained heads (E1, E2).

Works on the one layer abstraction, so any architecture (registry or wrapped) composes the same way. A
composed model owns deep copies of its layers: parameters and BatchNorm statistics travel with their
layer, and nothing is shared with the sources.

Heads: in the thesis each task is evaluated "with its own head", the head trained on that task. A head
need not stop changing after its task (LwF distils through every head, replay trains old heads on replayed
batches), so "its own head" must also belong with the top of the body it sits on: for a composition whose
top layers come from M_top, :func:`task_heads` takes head t from the later of M_t (the first model in which
head t was trained) and M_top. So E2+T2 and E1+T2 use M2's heads for both tasks, E1+T1 and E2+T1 use M1's
head 0 and M2's head 1 (M1's head 1 never trained); an analysis's endpoint equals the accuracy matrix
(E1+T1 on task 1 = a[0][0], E2+T2 = a[1][0], a[1][1]) for every strategy. For naive fine-tuning nothing
changes: a head gets no gradient after its task there.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from cltunnel.config import ConfigError
from cltunnel.models.layered import LayeredModel


def _check_compatible(a: LayeredModel, b: LayeredModel) -> None:
    if a.layer_names != b.layer_names:
        raise ValueError(f"cannot compose models with different layers: {a.layer_names} vs {b.layer_names}")


def compose(first: LayeredModel, rest: LayeredModel, x: int, heads: nn.ModuleDict | None = None) -> LayeredModel:
    """Body layers 1..x from ``first`` and x+1..L from ``rest`` (x in 0..L); heads from ``heads``, else
    from ``rest``. x = 0 is ``rest``'s body, x = L is ``first``'s."""
    _check_compatible(first, rest)
    extractor, tunnel = first.split(x)[0], rest.split(x)[1]
    layers = OrderedDict((name, copy.deepcopy(layer)) for name, layer in extractor + tunnel)
    model = LayeredModel(layers, {k: copy.deepcopy(h) for k, h in (heads or rest.heads).items()}, arch=first.arch)
    device = next(first.parameters()).device
    return model.to(device).eval()


def task_heads(models: list[LayeredModel], top: int) -> nn.ModuleDict:
    """The heads for a body whose top layers come from ``models[top]`` (models[t]: the model after task t):
    head t from ``models[max(t, top)]``; a class-incremental run's single head from ``models[top]``."""
    if len(models[top].heads) == 1:
        return copy.deepcopy(models[top].heads)
    return nn.ModuleDict({str(t): copy.deepcopy(models[max(t, top)].heads[str(t)]) for t in range(len(models))})


def heads_trained_after_their_task(models: list[LayeredModel]) -> list[int]:
    """Tasks t whose head changed in a model after M_t (the strategy kept training old heads)."""
    if len(models[0].heads) == 1:
        return []
    changed = []
    for t, model in enumerate(models):
        own = model.heads[str(t)].state_dict()
        if any(any(not torch.equal(v, later.heads[str(t)].state_dict()[n]) for n, v in own.items())
               for later in models[t + 1:]):
            changed.append(t)
    return changed


def with_heads(model: LayeredModel, heads: nn.ModuleDict) -> LayeredModel:
    return compose(model, model, len(model.body), heads)


def freeze_body(model: LayeredModel) -> LayeredModel:
    for p in model.body.parameters():
        p.requires_grad_(False)
    return model.eval()


def extractor_layers(model: LayeredModel, k: int) -> list[nn.Module]:
    """Body layers 1..k (:meth:`LayeredModel.split`)."""
    return [layer for _, layer in model.split(k)[0]]


def tunnel_layers(model: LayeredModel, k: int) -> list[nn.Module]:
    """Body layers k+1..n (:meth:`LayeredModel.split`)."""
    return [layer for _, layer in model.split(k)[1]]


def check_part(part: str) -> None:
    if part not in ("extractor", "tunnel", "all"):
        raise ConfigError(f"strategy.args.penalise: {part!r} must be extractor, tunnel or all")


def parameter_names(model: LayeredModel, part: str, k: int) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the extractor's, the tunnel's, or every parameter."""
    check_part(part)
    if part == "all":
        return {name for name, _ in model.named_parameters()}
    chosen = model.split(k)[0 if part == "extractor" else 1]
    return {f"body.{layer}.{name}" for layer, module in chosen for name, _ in module.named_parameters()}


@torch.no_grad()
def shape_preserving_layers(model: LayeredModel, example: torch.Tensor) -> set[int]:
    """Body layers (1-based) whose output has their input's shape: the ones a deletion can drop without
    breaking the layers after them (a ResNet's blocks inside a stage; not a downsampling block, not a pool)."""
    kept, x, was_training = set(), example, model.training
    for k, layer in enumerate(model.eval().body, start=1):
        out = layer(x)
        if out.shape == x.shape:
            kept.add(k)
        x = out
    model.train(was_training)
    return kept


def delete_layers(model: LayeredModel, layers: list[int], example: torch.Tensor) -> LayeredModel:
    """A copy of ``model`` without the body layers ``layers`` (1-based), heads kept: Nguyen et al.'s (2021,
    Appendix E) test of how much the layers inside a block structure still do. Refuses a layer whose output
    shape differs from its input's (:func:`shape_preserving_layers`), naming it."""
    bad = sorted(set(layers) - shape_preserving_layers(model, example))
    if bad:
        raise ValueError(f"cannot delete body layer(s) {bad}: their output shape differs from their input's")
    drop = set(layers)
    kept = OrderedDict((name, copy.deepcopy(layer)) for k, (name, layer) in enumerate(model.body.named_children(), 1)
                       if k not in drop)
    pruned = LayeredModel(kept, {k: copy.deepcopy(h) for k, h in model.heads.items()}, arch=model.arch)
    return pruned.to(example.device).eval()
