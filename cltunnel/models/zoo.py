"""One model interface: an ordered list of named body layers plus one head per task.

"Layer k" (1-based) is ``model.body[k-1]`` everywhere: training, checkpoints, surgery, probes and plots.
Its representation is the output of that block: after the activation, and after pooling where pooling
ends a VGG stage. The head is layer n = len(body) + 1, as in the thesis's counting (VGG-19: 16 conv +
2 FC body layers + the head).

Models come from one registry (``build_model("vgg19", ...)``), timm-style; an arbitrary torch model joins
through :func:`wrap_model` by naming its layers.
"""
from __future__ import annotations

import difflib
import functools
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from cltunnel.config import ConfigError, RunConfig
from cltunnel.data.scenarios import SplitScenario
from cltunnel.models import timm_models
from cltunnel.models.layered import LayeredModel
from cltunnel.registry import Registry


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


class Add(nn.Module):
    """The residual sum as a module (no parameters), so that a forward hook sees the representation after
    the addition and before the activation (Nguyen et al. 2021 compare every intermediate output)."""

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return x + shortcut


class BasicBlock(nn.Module):
    """ResNet basic block; ``skip=False`` gives the no-skip variant with the same layers. Its activations
    and the addition are modules without parameters (the state dict is that of the functional form), so
    :mod:`cltunnel.models.inner` can hook every intermediate output: conv1, bn1, relu1, conv2, bn2, add,
    relu2."""

    def __init__(self, c_in: int, c_out: int, stride: int, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(out, self.shortcut(x)) if self.skip else out)


RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 20: [3, 3, 3]}  # 20: He et al.'s CIFAR ResNet (3 stages)
RESNET_WIDTHS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512), 20: (16, 32, 64)}
CIFAR_RESNET_WIDTHS = (16, 32, 64)  # He et al.'s CIFAR family: depth 6n + 2, three stages of n blocks


def cifar_resnet_blocks(depth: int) -> list[int]:
    """Blocks per stage of He et al.'s CIFAR ResNet of ``depth`` = 6n + 2 layers (8, 14, 20, 26, 32, 38, 44,
    56, 110, 164, ...): n blocks in each of three stages (Nguyen et al. 2021 vary depth this way)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, ...), got {depth}")
    return [(depth - 2) // 6] * 3


def resnet_layers(depth: int, width: float, in_shape: tuple[int, int, int], skip: bool = True,
                  blocks: list[int] | None = None, stage_widths: tuple[int, ...] | None = None
                  ) -> tuple["OrderedDict[str, nn.Module]", int]:
    """CIFAR ResNet: 3x3 stem, residual blocks (one layer each, output after the block's conv2 and
    the addition), global average pool as the last body layer. ResNet-18/34: four stages from 64 channels;
    ResNet-20: three stages of three blocks from 16 channels (the thesis's chapter-6 "ResNet-20 style");
    ``blocks``/``stage_widths`` give any other plan (the CIFAR family, :func:`cifar_resnet_blocks`)."""
    widths = [max(1, round(c * width)) for c in (stage_widths or RESNET_WIDTHS[depth])]
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    layers["stem"] = nn.Sequential(nn.Conv2d(in_shape[0], widths[0], 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    c_in = widths[0]
    for stage, (count, c_out) in enumerate(zip(blocks or RESNET_BLOCKS[depth], widths), start=1):
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


MODELS: Registry[BodyBuilder] = Registry("model", ConfigError)


def register_model(name: str, builder: BodyBuilder | None = None) -> Any:
    """Add an architecture: ``register_model("my_net", f)`` or ``@register_model("my_net")`` on
    ``f(width, in_shape, **args) -> (OrderedDict of named body layers, feature width)``. Layer k is the k-th
    entry; ``model: {name: my_net, args: {...}}`` then trains it, checkpoints rebuild it (the registering
    module must be imported first, e.g. by the strategy or analysis module the scenario names)."""
    return MODELS.register(name, builder)


for _d in VGG_STAGES:
    MODELS[f"vgg{_d}"] = lambda width, in_shape, d=_d, conv_layers=None: vgg_layers(d, width, in_shape, conv_layers)


for _d in RESNET_BLOCKS:
    MODELS[f"resnet{_d}"] = lambda width, in_shape, d=_d: resnet_layers(d, width, in_shape)
    MODELS[f"resnet{_d}_noskip"] = lambda width, in_shape, d=_d: resnet_layers(d, width, in_shape, skip=False)


# He et al.'s CIFAR ResNet at any depth 6n + 2 and width multiplier (stages of 16w, 32w, 64w channels), with or
# without skips: `model: {name: cifar_resnet, width: 4, args: {depth: 38, skip: false}}`.
MODELS["cifar_resnet"] = lambda width, in_shape, depth=20, skip=True: resnet_layers(
    depth, width, in_shape, skip, cifar_resnet_blocks(depth), CIFAR_RESNET_WIDTHS)
MODELS["mlp"] = lambda width, in_shape, depth=12, hidden=1024: mlp_layers(depth, width, in_shape, hidden)


# Prefixed families, "<prefix>:<name>" (e.g. "timm:resnet18"): prefix -> the module that builds and checks them
# (``build_body(name, width, in_shape, **args)``, ``check(name, width, args, in_shape)``, ``describe()``).
FAMILIES: dict[str, Any] = {timm_models.PREFIX: timm_models}


def builder(name: str) -> BodyBuilder:
    """The body builder of a registered name or of a prefixed family's name ("timm:resnet18")."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in FAMILIES:
        return functools.partial(FAMILIES[prefix].build_body, rest)
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(sorted(MODELS))}, "
                         f"{', '.join(p + ':<name>' for p in FAMILIES)}")
    return MODELS[name]


def build_model(name: str, head_sizes: list[int], in_shape: tuple[int, int, int], width: float = 1.0,
                **kwargs) -> LayeredModel:
    """Build a registered architecture with one head per entry of ``head_sizes`` (task id = position)."""
    layers, feat_dim = builder(name)(width=width, in_shape=in_shape, **kwargs)
    heads = {str(t): nn.Linear(feat_dim, n) for t, n in enumerate(head_sizes)}
    return LayeredModel(layers, heads, arch=name)


def model_spec(cfg: RunConfig, scenario: SplitScenario) -> dict[str, Any]:
    """Everything needed to rebuild the architecture from a checkpoint alone."""
    return {"name": cfg.model.name, "width": cfg.model.width, "args": dict(cfg.model.args),
            "head_sizes": scenario.head_sizes, "in_shape": list(scenario.data.shape)}


def make_model(spec: dict[str, Any], seed: int) -> LayeredModel:
    torch.manual_seed(seed)
    return build_model(spec["name"], spec["head_sizes"], tuple(spec["in_shape"]), spec["width"], **spec["args"])


def check_model(name: str, width: float, args: dict[str, Any], head_sizes: list[int],
                in_shape: tuple[int, int, int]) -> int:
    """Build the architecture on the meta device (no memory, no data) to prove the name and arguments work;
    returns its number of body layers, so a tunnel start can be checked against it before any work."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in FAMILIES:  # the family builds on meta and words its own errors
        return FAMILIES[prefix].check(rest, width, args, in_shape)
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS) + [f"{p}:{rest}" for p in FAMILIES if sep], n=1)
        raise ConfigError(f"model.name: unknown model '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                          + f"; valid: {', '.join(sorted(MODELS))}, {', '.join(p + ':<name>' for p in FAMILIES)}")
    try:
        with torch.device("meta"):
            model = build_model(name, head_sizes, in_shape, width, **args)
    except TypeError as err:
        raise ConfigError(f"model.args: {name} rejected {args}: {str(err).replace('<lambda>()', name)}") from None
    except (ValueError, IndexError, KeyError, RuntimeError) as err:
        raise ConfigError(f"model.args: {name} cannot be built with width {width} and {args}: {err}") from None
    return len(model.body)
