"""One model interface: an ordered list of named body layers plus one head per task.

"Layer k" (1-based) is ``model.body[k-1]`` everywhere: training, checkpoints, surgery, probes and plots.
Its representation is the output of that block: after the activation, and after pooling where pooling
ends a VGG stage. The head is layer n = len(body) + 1, as in the thesis's counting (VGG-19: 16 conv +
2 FC body layers + the head).

Models come from one registry (``build_model("vgg19", ...)``), timm-style; an arbitrary torch model joins
through :func:`wrap_model` by naming its layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import torch
from torch import nn

from avalanche.models import MultiTaskModule


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

    def features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Output of body layer ``upto`` (1-based; None = whole body)."""
        for layer in list(self.body)[: upto if upto is not None else len(self.body)]:
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


# --------------------------------------------------------------------------------------------- layers
def _conv_layer(c_in: int, c_out: int, pool: int) -> nn.Sequential:
    parts: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                              nn.ReLU(inplace=True)]
    parts += [nn.MaxPool2d(2) for _ in range(pool)]
    return nn.Sequential(*parts)


def _fc_layer(d_in: int, d_out: int, flatten: bool = False) -> nn.Sequential:
    parts: list[nn.Module] = [nn.Flatten()] if flatten else []
    return nn.Sequential(*parts, nn.Linear(d_in, d_out), nn.ReLU(inplace=True))


VGG_STAGES: dict[int, list[int]] = {  # conv layers per stage, 5 stages of 64/128/256/512/512 channels
    11: [1, 1, 2, 2, 2],
    13: [2, 2, 2, 2, 2],
    16: [2, 2, 3, 3, 3],
    19: [2, 2, 4, 4, 4],
}
VGG_CHANNELS = [64, 128, 256, 512, 512]


def vgg_layers(depth: int, width: float, in_shape: tuple[int, int, int], conv_layers: int | None = None
               ) -> tuple["OrderedDict[str, nn.Module]", int]:
    """VGG body for 32x32 (or 28x28) inputs: conv layers, then 2 FC layers of 512*width units.

    ``conv_layers`` keeps only the first k conv layers of the full sequence (the shallow-network baseline,
    E3); the five max-pools stay, attached to the last conv layer before them, so the FC input is 1x1.
    """
    stages = VGG_STAGES[depth]
    total = sum(stages)
    keep = total if conv_layers is None else conv_layers
    if not 1 <= keep <= total:
        raise ValueError(f"vgg{depth}: conv_layers must be in 1..{total}, got {conv_layers}")
    plan: list[tuple[int, int]] = []  # (channels, pools after)
    for stage, count in enumerate(stages):
        for _ in range(count):
            if len(plan) < keep:
                plan.append((max(1, round(VGG_CHANNELS[stage] * width)), 0))
        plan[-1] = (plan[-1][0], plan[-1][1] + 1)
    channels, size = in_shape[0], in_shape[1]
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    for i, (c_out, pools) in enumerate(plan, start=1):
        layers[f"conv{i}"] = _conv_layer(channels, c_out, pools)
        channels, size = c_out, size // (2**pools)
    hidden = max(1, round(512 * width))
    layers["fc1"] = _fc_layer(channels * size * size, hidden, flatten=True)
    layers["fc2"] = _fc_layer(hidden, hidden)
    return layers, hidden


class BasicBlock(nn.Module):
    """ResNet basic block; ``skip=False`` gives the no-skip variant with the same layers."""

    def __init__(self, c_in: int, c_out: int, stride: int, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x) if self.skip else out)


RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def resnet_layers(depth: int, width: float, in_shape: tuple[int, int, int], skip: bool = True
                  ) -> tuple["OrderedDict[str, nn.Module]", int]:
    """CIFAR ResNet: 3x3 stem, residual blocks (one layer each, output after the block's conv2 and
    the addition), global average pool as the last body layer."""
    widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    layers["stem"] = nn.Sequential(nn.Conv2d(in_shape[0], widths[0], 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    c_in = widths[0]
    for stage, (count, c_out) in enumerate(zip(RESNET_BLOCKS[depth], widths), start=1):
        for b in range(count):
            stride = 2 if stage > 1 and b == 0 else 1
            layers[f"block{stage}_{b + 1}"] = BasicBlock(c_in, c_out, stride, skip)
            c_in = c_out
    layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return layers, c_in


def mlp_layers(depth: int, width: float, in_shape: tuple[int, int, int], hidden: int = 1024
               ) -> tuple["OrderedDict[str, nn.Module]", int]:
    """MLP-N: N-1 hidden Linear+ReLU layers (1024*width units) + the head = N layers."""
    units = max(1, round(hidden * width))
    d_in = in_shape[0] * in_shape[1] * in_shape[2]
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    for i in range(1, depth):
        layers[f"fc{i}"] = _fc_layer(d_in if i == 1 else units, units, flatten=(i == 1))
    return layers, units


BodyBuilder = Callable[..., "tuple[OrderedDict[str, nn.Module], int]"]
MODELS: dict[str, BodyBuilder] = {}
for _d in VGG_STAGES:
    MODELS[f"vgg{_d}"] = lambda width, in_shape, d=_d, conv_layers=None: vgg_layers(d, width, in_shape, conv_layers)
for _d in RESNET_BLOCKS:
    MODELS[f"resnet{_d}"] = lambda width, in_shape, d=_d: resnet_layers(d, width, in_shape)
    MODELS[f"resnet{_d}_noskip"] = lambda width, in_shape, d=_d: resnet_layers(d, width, in_shape, skip=False)
MODELS["mlp"] = lambda width, in_shape, depth=12, hidden=1024: mlp_layers(depth, width, in_shape, hidden)


def build_model(name: str, head_sizes: list[int], in_shape: tuple[int, int, int], width: float = 1.0,
                **kwargs) -> LayeredModel:
    """Build a registered architecture with one head per entry of ``head_sizes`` (task id = position)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(sorted(MODELS))}")
    layers, feat_dim = MODELS[name](width=width, in_shape=in_shape, **kwargs)
    heads = {str(t): nn.Linear(feat_dim, n) for t, n in enumerate(head_sizes)}
    return LayeredModel(layers, heads, arch=name)


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
