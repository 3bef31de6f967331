"""Any timm model by name as a LayeredModel: ``model: {name: "timm:<name>", args: {...}}``.

``args`` go to ``timm.create_model`` (``img_size``, ``patch_size``, ``in_chans``, ``drop_path_rate``, ``depth``,
``embed_dim``, ``channels``, ...) with ``pretrained: false`` unless given, and ``num_classes=0``: timm's
classifier is dropped and each task gets its own head on the pre-logits features, as for the zoo's models.
The body layers are found from the model's own structure (timm's stage containers, the ones ``feature_info``
names, and the blocks inside them), by one rule per family (:data:`FAMILY_RULES`):

- ``ResNet``: ``stem`` (conv1, bn1, act1, maxpool), one layer per residual block (``layer{s}_{b}``, timm's
  indices), ``pool`` (global pooling). ``cifar_stem: true`` replaces the stem by a 3x3 stride-1 conv without
  max-pool (the zoo's ResNets' stem).
- ``VisionTransformer`` (ViT, DeiT): ``embed`` (patch embedding, class/register tokens, position embedding,
  pre-norm), one layer per transformer block (``blocks_{i}``), ``pool`` (final norm, token pooling, fc_norm).
- ``ConvNeXt``: ``stem``, one layer per block (``stages_{s}_{b}``; a stage's downsampling opens its first
  block's layer), ``pool`` (norm_pre and timm's norm-pool head without its classifier).
- ``EfficientNet`` (EfficientNet, MobileNetV2, MNASNet, ...): ``stem`` (conv_stem, bn1), one layer per block
  (``blocks_{s}_{b}``), ``head_conv`` (conv_head, bn2), ``pool``.
- ``MobileNetV3``: ``stem``, one layer per block, ``pool`` (global pooling), ``head_conv`` (conv_head,
  norm_head, act2, flatten).

A layer's representation is its output: (B, C, H, W) maps for convolutional layers, (B, N, D) token
sequences for a ViT's blocks, (B, D) after pooling. Every measure reads a representation through
``flatten(1)`` (:func:`cltunnel.measures.probes.layer_features`, the CKA and rank code): a token sequence
becomes N·D features exactly as a conv map becomes C·H·W, nothing pooled away. Dropout that timm applies
functionally before its classifier (``drop_rate``) becomes an ``nn.Dropout`` in ``pool`` so the chain is
timm's ``forward_head(forward_features(x), pre_logits=True)``.

timm is imported only when a timm model is built or checked (it takes seconds to import).
"""
from __future__ import annotations

import difflib
import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from cltunnel.config import ConfigError

PREFIX = "timm"

# Family (timm's model class) -> the rule splitting it into body layers (README, "Models").
FAMILY_RULES: dict[str, str] = {
    "ResNet": "stem | one layer per residual block | pool (cifar_stem: 3x3 stride-1 stem, no max-pool)",
    "VisionTransformer": "embed (patches + cls/pos) | one layer per transformer block | pool (norm + token pool)",
    "ConvNeXt": "stem | one layer per block (stage downsampling in its first block) | pool (norm + pool head)",
    "EfficientNet": "stem | one layer per block | head_conv | pool",
    "MobileNetV3": "stem | one layer per block | pool | head_conv",
}
EXAMPLES = "resnet18, resnet50, vit_tiny_patch16_224, deit_tiny_patch16_224, convnext_atto, efficientnet_b0, " \
           "mobilenetv2_100, mobilenetv3_small_100"
OUR_ARGS = ("cifar_stem",)  # read here, not passed to timm


def _timm():
    """The timm package, or one ConfigError line saying how to get it (a device image may lack it)."""
    try:
        import timm
    except ImportError as err:
        raise ConfigError(f"model.name: timm models need the timm package ({err}); pip install timm (on the device: "
                          "its wheel in the staged wheels, campaign/README.md)") from None
    return timm


def describe() -> str:
    """One line for ``cltunnel list``."""
    return (f"timm models as 'timm:<name>' (args go to timm.create_model), families split: "
            f"{', '.join(FAMILY_RULES)} (e.g. {EXAMPLES})")


# ------------------------------------------------------------------------------------------------ parts
class ViTEmbed(nn.Module):
    """A ViT's input side as one layer: patch embedding, class/register tokens, position embedding (timm's own
    ``_pos_embed``), patch dropout and pre-norm. Holds the model's modules and parameters, not copies."""

    ATTRS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre",
             "no_embed_class", "num_prefix_tokens", "dynamic_img_size")

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for name in self.ATTRS:
            setattr(self, name, getattr(vit, name))
        self._pos_embed_fn = type(vit)._pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed_fn(self, x)
        return self.norm_pre(self.patch_drop(x))


class ViTPool(nn.Module):
    """A ViT's output side as one layer: final norm, token pooling (timm's own ``pool``: class token, mean,
    or attention pooling), fc_norm and head dropout; the classifier is the task's head."""

    ATTRS = ("norm", "attn_pool", "pool_include_prefix", "num_prefix_tokens", "global_pool", "fc_norm",
             "head_drop")

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for name in self.ATTRS:
            setattr(self, name, getattr(vit, name))
        self._pool_fn = type(vit).pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_drop(self.fc_norm(self._pool_fn(self, self.norm(x))))


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))


def _pool_with_dropout(model: nn.Module, *named: tuple[str, nn.Module]) -> nn.Sequential:
    """``named`` then timm's functional pre-classifier dropout (``drop_rate``) as a module."""
    rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    return _seq(*named, *([("drop", nn.Dropout(rate))] if rate > 0 else []))


def _blocks(prefix: str, stages: nn.Module) -> list[tuple[str, nn.Module]]:
    """One layer per block of each stage (a Sequential of Sequentials: EfficientNet/MobileNetV3's ``blocks``)."""
    return [(f"{prefix}_{s}_{b}", block) for s, stage in enumerate(stages) for b, block in enumerate(stage)]


def _split_resnet(m: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = [info["module"] for info in m.feature_info if info["module"].startswith("layer")]
    layers = [("stem", _seq(("conv1", m.conv1), ("bn1", m.bn1), ("act1", m.act1), ("maxpool", m.maxpool)))]
    layers += [(f"{stage}_{b}", block) for stage in stages for b, block in enumerate(getattr(m, stage))]
    return layers + [("pool", _pool_with_dropout(m, ("global_pool", m.global_pool)))]


def _split_vit(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("embed", ViTEmbed(m)), *((f"blocks_{i}", b) for i, b in enumerate(m.blocks)), ("pool", ViTPool(m))]


def _split_convnext(m: nn.Module) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [("stem", m.stem)]
    for s, stage in enumerate(m.stages):
        for b, block in enumerate(stage.blocks):
            layers.append((f"stages_{s}_{b}", _seq(("downsample", stage.downsample), ("block", block)) if b == 0
                           else block))
    return layers + [("pool", _seq(("norm_pre", m.norm_pre), ("head", m.head)))]


def _split_efficientnet(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("stem", _seq(("conv_stem", m.conv_stem), ("bn1", m.bn1))), *_blocks("blocks", m.blocks),
            ("head_conv", _seq(("conv_head", m.conv_head), ("bn2", m.bn2))),
            ("pool", _pool_with_dropout(m, ("global_pool", m.global_pool)))]


def _split_mobilenetv3(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("stem", _seq(("conv_stem", m.conv_stem), ("bn1", m.bn1))), *_blocks("blocks", m.blocks),
            ("pool", _seq(("global_pool", m.global_pool))),
            ("head_conv", _pool_with_dropout(m, ("conv_head", m.conv_head), ("norm_head", m.norm_head),
                                             ("act2", m.act2), ("flatten", m.flatten)))]


SPLITTERS = {"ResNet": _split_resnet, "VisionTransformer": _split_vit, "ConvNeXt": _split_convnext,
             "EfficientNet": _split_efficientnet, "MobileNetV3": _split_mobilenetv3}
assert set(SPLITTERS) == set(FAMILY_RULES)


def family_of(model: nn.Module) -> str:
    """The splittable family a timm model belongs to (its class or a base class), else ValueError."""
    for cls in type(model).__mro__:
        if cls.__name__ in SPLITTERS and cls.__module__.startswith("timm."):
            return cls.__name__
    raise ValueError(f"a timm {type(model).__name__} has no layer rule here; families split: "
                     f"{', '.join(SPLITTERS)} (any other model joins with cltunnel.models.layered.wrap_model)")


def split_timm(model: nn.Module) -> tuple["OrderedDict[str, nn.Module]", int]:
    """The body layers of a timm model (its classifier removed in place with ``reset_classifier(0)``) and the
    width of their output, the heads' input. The layers hold the model's own modules."""
    family = family_of(model)
    if model.get_classifier() is not None and not isinstance(model.get_classifier(), nn.Identity):
        model.reset_classifier(0)
    layers = OrderedDict(SPLITTERS[family](model))
    return layers, int(getattr(model, "head_hidden_size", None) or model.num_features)


# ---------------------------------------------------------------------------------------------- building
def _cifar_stem(model: nn.Module) -> None:
    """The zoo's CIFAR stem on a timm ResNet: 3x3 stride-1 conv (deep stems: their first conv at stride 1), no
    max-pool; initialised as timm initialises its convs (Kaiming normal, fan-out)."""
    if isinstance(model.conv1, nn.Conv2d):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False,
                                device=old.weight.device)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    else:  # deep stem (resnet18d, ...): a Sequential whose first conv downsamples
        first = next(mod for mod in model.conv1.modules() if isinstance(mod, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()


def create(name: str, in_shape: tuple[int, int, int], **args: Any) -> nn.Module:
    """``timm.create_model(name, **args)`` with pretrained off unless asked, ``in_chans`` from the data and
    no classifier; ``cifar_stem`` applied (ResNets only)."""
    timm = _timm()

    ours = {k: args.pop(k) for k in OUR_ARGS if k in args}
    args.setdefault("pretrained", False)
    args.setdefault("in_chans", in_shape[0])
    if args["in_chans"] != in_shape[0]:
        raise ValueError(f"in_chans {args['in_chans']} but the data have {in_shape[0]} channels")
    model = timm.create_model(name, num_classes=0, **args)
    if ours.get("cifar_stem"):
        if family_of(model) != "ResNet":
            raise ValueError(f"cifar_stem is a ResNet option, not for a {type(model).__name__} (a ViT takes "
                             "img_size and patch_size)")
        _cifar_stem(model)
    return model


def build_body(name: str, width: float, in_shape: tuple[int, int, int], **args: Any
               ) -> tuple["OrderedDict[str, nn.Module]", int]:
    """The zoo's builder signature: body layers and feature width of ``timm:<name>``."""
    if width != 1.0:
        raise ValueError(f"width {width}: a timm model takes its sizes from args (e.g. channels, embed_dim, "
                         "depth), not model.width")
    return split_timm(create(name, in_shape, **args))


def _valid_args(name: str) -> list[str]:
    """Argument names ``timm.create_model(name, ...)`` can take: the model class's constructor's and timm's own."""
    timm = _timm()

    with torch.device("meta"):
        cls = type(timm.create_model(name, pretrained=False, num_classes=0))
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    return own + ["pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                  "cache_dir", "scriptable", "exportable", "no_jit", *OUR_ARGS]


def check(name: str, width: float, args: dict[str, Any], in_shape: tuple[int, int, int]) -> int:
    """Build ``timm:<name>`` on the meta device and run a meta batch through its body (no memory, no data,
    no download): a bad name, argument or input size costs one ConfigError line naming the closest valid
    one. Returns the number of body layers."""
    timm = _timm()

    full = f"{PREFIX}:{name}"
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.5)
        raise ConfigError(f"model.name: '{full}' is not a timm model" +
                          (f" (did you mean '{PREFIX}:{close[0]}'?)" if close else "") + f"; e.g. {EXAMPLES}")
    meta_args = {k: v for k, v in args.items() if k != "pretrained"}  # no download to check a shape
    try:
        with torch.device("meta"):
            layers, _ = build_body(name, width, in_shape, **meta_args)
            x = torch.empty(2, *in_shape)
            for layer in layers.values():
                x = layer(x)
    except TypeError as err:
        bad = str(err).split("argument")[-1].strip(" '\"") if "unexpected keyword" in str(err) else ""
        close = difflib.get_close_matches(bad, _valid_args(name), n=1) if bad else []
        raise ConfigError(f"model.args: {full} rejected {args}: {err}" +
                          (f" (did you mean '{close[0]}'?)" if close else "")) from None
    except (ValueError, AssertionError, RuntimeError, KeyError, IndexError, AttributeError) as err:
        hint = " (a ViT takes img_size and patch_size to match the data)" if "match model" in str(err) else ""
        raise ConfigError(f"model: {full} cannot be built for {'x'.join(map(str, in_shape))} inputs with args "
                          f"{args}: {str(err).splitlines()[0] if str(err) else type(err).__name__}{hint}") from None
    return len(layers)
