"""The tunnel (or the extractor) frozen after the first task: weights and BatchNorm statistics."""
from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin
from torch import nn

from cltunnel.config import ConfigError
from cltunnel.models.layered import LayeredModel
from cltunnel.models.surgery import extractor_layers, tunnel_layers
from cltunnel.training.tunnel_start import TunnelStart


class FreezeLayersPlugin(SupervisedPlugin):
    """From the second task on, the tunnel's (or the extractor's) weights get no gradient and its BatchNorm
    statistics stay put.

    Frozen parameters have ``grad is None``, so SGD skips them entirely (no momentum, no weight decay): they
    stay bitwise as after task 1.
    """

    def __init__(self, tunnel_start: int | str = "auto", part: str = "tunnel", **probe: Any) -> None:
        super().__init__()
        if part not in ("tunnel", "extractor"):
            raise ConfigError(f"strategy.args.freeze: {part!r} must be tunnel or extractor")
        self.part = part
        self.tunnel = TunnelStart(tunnel_start, **probe)

    def frozen(self, model: LayeredModel, k: int) -> list[nn.Module]:
        return tunnel_layers(model, k) if self.part == "tunnel" else extractor_layers(model, k)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.tunnel.resolve(strategy)  # fixes an automatic start on the first task's model

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience > 0:
            for layer in self.frozen(strategy.model, self.tunnel.resolve(strategy)):
                layer.requires_grad_(False)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience > 0:
            for layer in self.frozen(strategy.model, self.tunnel.resolve(strategy)):
                layer.eval()
