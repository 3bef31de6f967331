"""One model interface: an ordered list of named body layers plus one head per task.

"Layer k" (1-based) is ``model.body[k-1]`` everywhere: training, checkpoints, surgery, probes and plots.
Its representation is the output of that block: after the activation, and after pooling where pooling
ends a VGG stage. The head is layer n = len(body) + 1, as in the thesis's counting (VGG-19: 16 conv +
2 FC body layers + the head). An arbitrary torch model joins through :func:`wrap_model` by naming its layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import torch
from avalanche.models import MultiTaskModule
from torch import nn


class LayeredModel(MultiTaskModule):
    """Body = ``nn.Sequential`` of named layers; heads = one ``nn.Linear`` per task id ("0", "1", ...).

    Task-incremental scenarios give each task its own head; class-incremental ones use the single head "0".
    Subclassing Avalanche's MultiTaskModule routes task labels through Avalanche strategies unchanged.
    """

    def __init__(self, layers: "OrderedDict[str, nn.Module]", heads: dict[str, nn.Module], arch: str = "") -> None:
        super().__init__()
        self.body = nn.Sequential(layers)
        self.heads = nn.ModuleDict(heads)
        self.arch = arch

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.body.named_children()]

    @property
    def depth(self) -> int:
        """n in the thesis's counting: body layers plus the head."""
        return len(self.body) + 1

    def split(self, k: int) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
        """The cut at layer k, the one place it is made: (extractor, tunnel) as named body layers, the
        extractor being layers 1..k and the tunnel k+1..n. Surgery, tunnel-aware strategies, replay and
        probes all cut here, so "layer k" cannot drift between them."""
        n = len(self.body)
        if not 0 <= k <= n:
            raise ValueError(f"cannot cut a body of {n} layers at layer {k} (0..{n})")
        named = list(self.body.named_children())
        return named[:k], named[k:]

    def features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Output of body layer ``upto`` (1-based; None = whole body): the extractor's output at that cut."""
        for _, layer in self.split(upto if upto is not None else len(self.body))[0]:
            x = layer(x)
        return x

    def layer_outputs(self, x: torch.Tensor, layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Representations of the requested body layers (1-based) from one forward pass."""
        wanted = set(range(1, len(self.body) + 1) if layers is None else layers)
        out: dict[int, torch.Tensor] = {}
        for k, layer in enumerate(self.body, start=1):
            if k > max(wanted, default=0):
                break
            x = layer(x)
            if k in wanted:
                out[k] = x
        return out

    def head_for(self, task_label: int) -> nn.Module:
        key = str(int(task_label))
        if key not in self.heads:
            if len(self.heads) == 1:  # class-incremental: one shared head answers every task
                return next(iter(self.heads.values()))
            raise KeyError(f"no head for task {key}; heads: {list(self.heads)}")
        return self.heads[key]

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.head_for(task_label)(self.body(x))

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every head's output from one body pass (Avalanche's LwF distils through all of them)."""
        feats = self.body(x)
        return {int(key): head(feats) for key, head in self.heads.items()}

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None = 0):
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, int) or len(self.heads) == 1:
            return self.forward_single_task(x, task_labels if isinstance(task_labels, int) else 0)
        unique = torch.unique(task_labels)
        if len(unique) == 1:
            return self.forward_single_task(x, int(unique.item()))
        return self._forward_mixed(x, task_labels, unique)

    def _forward_mixed(self, x: torch.Tensor, task_labels: torch.Tensor, unique: torch.Tensor) -> torch.Tensor:
        """Batches mixing tasks (replay): one body pass, each row through its own head, padded to the widest."""
        feats = self.body(x)
        width = max(h.out_features for h in self.heads.values())
        out = feats.new_zeros(len(x), width)
        for t in unique.tolist():
            rows = task_labels == t
            logits = self.head_for(t)(feats[rows])
            out[rows, : logits.shape[1]] = logits.to(out.dtype)
        return out

    # Avalanche calls adaptation() on dynamic modules; every head exists from the start, so there is none.
    def adaptation(self, experience=None) -> None:  # noqa: D401
        return None


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"wrap_model: '{path}' is not a submodule; some valid names: {names[:20]}") from err


def wrap_model(model: nn.Module, layer_names: list[str], head_name: str, head_sizes: list[int],
               example: torch.Tensor | None = None) -> LayeredModel:
    """Make any model whose forward is ``head(layer_n(...layer_1(x)))`` a LayeredModel (e.g. a timm model).

    ``layer_names`` are dotted submodule paths in forward order; the named head is replaced by one fresh
    head per task. With ``example``, the wrapped body is checked against the original forward (a model
    whose forward does more than chain these modules is refused rather than silently changed).
    """
    layers = OrderedDict((name.replace(".", "_"), _get_submodule(model, name)) for name in layer_names)
    head = _get_submodule(model, head_name)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"wrap_model: head '{head_name}' must be nn.Linear, got {type(head).__name__}")
    wrapped = LayeredModel(layers, {str(t): nn.Linear(head.in_features, n) for t, n in enumerate(head_sizes)},
                           arch=type(model).__name__)
    if example is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            expected = model(example)
            got = head(wrapped.body(example))
        model.train(was_training)
        if not torch.allclose(expected, got, atol=1e-5, rtol=1e-4):
            raise ValueError("wrap_model: chaining the named layers does not reproduce the model's forward; "
                             "list every module the forward applies, in order")
    return wrapped
