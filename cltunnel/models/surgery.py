"""Layer surgery on LayeredModels: M_a[1:x] + M_b[x+1:n], extractor/tunnel swaps, retrained heads (E1, E2).

Works on the one layer abstraction, so any architecture (registry or wrapped) composes the same way. A
composed model owns deep copies of its layers: parameters and BatchNorm statistics travel with their
layer, and nothing is shared with the sources.

Heads: in the thesis each task is evaluated "with its own head", the head trained on that task. With
checkpoints M_1..M_T, :func:`own_heads` takes head t from M_t (the checkpoint right after task t).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

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


def own_heads(models: list[LayeredModel]) -> nn.ModuleDict:
    """Head t from the model after task t (for class-incremental runs: the last model's single head)."""
    if len(models[-1].heads) == 1:
        return copy.deepcopy(models[-1].heads)
    return nn.ModuleDict({str(t): copy.deepcopy(m.heads[str(t)]) for t, m in enumerate(models)})


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
