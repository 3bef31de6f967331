"""Strategy and plugin state as plain data (tensors, numbers, strings, lists, dicts), so that a checkpoint is
read with ``torch.load(weights_only=True)`` and never runs code.

Researchers share run directories, and unpickling a shared file (``torch.load`` outside weights-only mode)
executes whatever was pickled into it. So everything a strategy learned besides the weights (EWC's importances, LwF's previous
model, replay buffers, generators, the tunnel start found from probes) is written as tagged plain values:

* ``ParamData`` -> ``{"__paramdata__": name, "shape": [...], "data": tensor}``
* an ``nn.Module`` -> ``{"__module__": class name, "state": state_dict}``
* a ``torch.Generator`` -> ``{"__generator__": device, "state": byte tensor}``
* tuples, sets, ``torch.Size`` -> tagged lists
* any other object -> ``{"__object__": class name, "state": its encoded __dict__}``

Decoding never creates an object from a name read in the file: it restores *into* the objects a freshly
built strategy of the same configuration already holds (and into copies of the strategy's own model for a
stored module, as LwF keeps), and refuses any mismatch. A value that cannot be written as plain data is
refused when the checkpoint is saved, naming the attribute, rather than silently dropped.
"""
from __future__ import annotations

import copy
import types
from typing import Any

import torch
from avalanche.training.utils import ParamData
from torch import nn

from cltunnel.errors import CheckpointError


SCALARS = (bool, int, float, str, type(None))


CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type)


TAGS = ("__paramdata__", "__module__", "__generator__", "__tuple__", "__set__", "__size__", "__object__")


def encode(value: Any, where: str = "state") -> Any:
    """``value`` as nested dicts/lists of tensors and scalars; raises on what has no plain form."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode(v, where) for v in sorted(value, key=repr)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, (str, int))]
        if bad:
            raise CheckpointError(f"{where}: key {bad[0]!r} is neither a string nor an integer")
        return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, ParamData):
        return {"__paramdata__": value.name, "shape": list(value.shape), "data": encode(value.data)}
    if isinstance(value, nn.Module):
        return {"__module__": type(value).__name__, "state": encode(dict(value.state_dict()), where)}
    if isinstance(value, torch.Generator):
        return {"__generator__": str(value.device), "state": value.get_state()}
    if hasattr(value, "__dict__") and not isinstance(value, CODE):
        return {"__object__": type(value).__name__, "state": encode(dict(value.__dict__), where)}
    raise CheckpointError(f"{where}: a {type(value).__name__} has no plain-data form, so it cannot go into a "
                          "checkpoint that loads without running code")


def decode(saved: Any, current: Any, model: nn.Module | None, where: str = "state") -> Any:
    """The live value for ``saved``, restored into ``current`` (the fresh strategy's value) where it is an
    object; ``model`` is the template for a stored module that the fresh strategy does not hold yet."""
    if isinstance(saved, list):
        return [decode(v, None, model, f"{where}[{i}]") for i, v in enumerate(saved)]
    if not isinstance(saved, dict):
        return saved
    tag = next((t for t in TAGS if t in saved), None)
    if tag is None:
        return _decode_dict(saved, current, model, where)
    if tag == "__size__":
        return torch.Size(saved[tag])
    if tag == "__tuple__":
        return tuple(decode(v, None, model, where) for v in saved[tag])
    if tag == "__set__":
        return set(decode(v, None, model, where) for v in saved[tag])
    if tag == "__paramdata__":
        return ParamData(saved[tag], tuple(saved["shape"]), init_tensor=saved["data"], device=saved["data"].device)
    if tag == "__generator__":
        gen = torch.Generator(device=saved[tag])
        gen.set_state(saved["state"])
        return gen
    if tag == "__module__":
        return _decode_module(saved, current, model, where)
    return restore_object(current, saved, model, where)


def _decode_dict(saved: dict, current: Any, model: nn.Module | None, where: str) -> dict:
    out = current if isinstance(current, dict) else {}  # keeps a defaultdict a defaultdict
    fresh = {k: decode(v, out.get(k), model, f"{where}.{k}") for k, v in saved.items()}
    out.clear()
    out.update(fresh)
    return out


def _decode_module(saved: dict, current: Any, model: nn.Module | None, where: str) -> nn.Module:
    name = saved["__module__"]
    if isinstance(current, nn.Module) and type(current).__name__ == name:
        target = current
    elif model is not None and type(model).__name__ == name:
        target = copy.deepcopy(model)
    else:
        raise CheckpointError(f"{where}: the checkpoint holds a {name} this strategy does not build")
    target.load_state_dict(saved["state"])
    return target


def restore_object(target: Any, saved: dict, model: nn.Module | None, where: str = "state") -> Any:
    """Put an encoded object's attributes back into ``target``, an object of the same class."""
    name = saved.get("__object__")
    if target is None or type(target).__name__ != name:
        raise CheckpointError(f"{where}: the checkpoint holds a {name}, this strategy a {type(target).__name__}")
    for key, value in saved["state"].items():
        setattr(target, key, decode(value, getattr(target, key, None), model, f"{where}.{key}"))
    return target
