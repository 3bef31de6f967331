"""Tunnel-aware CL strategies: act on the split of the body into extractor and tunnel.

The tunnel-effect work finds the tunnel (the deep layers after the probe accuracy saturates) task-agnostic
and forgetting concentrated in the extractor. Three ways to act on that, each an Avalanche plugin (the
mechanism, one module each in :mod:`cltunnel.training.plugins`) wrapped in a thin strategy class here (so YAML
can name it and it composes with other plugins):

* :class:`LayerwiseEWCPlugin` — EWC whose penalty covers only the extractor (or only the tunnel, or all:
  the matched controls), with importances computed on cltunnel's device data path;
* :class:`FreezeLayersPlugin` — the tunnel's parameters and BatchNorm statistics stay as after task 1;
* :class:`LayerReplayPlugin` at the tunnel start — replay stored extractor outputs through the tunnel and
  old heads, instead of replaying images through the whole network (at layer 0: plain experience replay).

Convention, shared with the analyses: with tunnel start ``k`` (the extractor's last layer, 1..n) the extractor
is body layers 1..k and the tunnel is layers k+1..n. ``tunnel_start: auto`` finds k after the first task from linear probes of that
model (the thesis's 95 % rule; :class:`~cltunnel.training.tunnel_start.TunnelStart`) and keeps it for the rest
of the run. Truncating the network to its
extractor is a model, not a strategy: ``model: {name: vgg19, args: {conv_layers: k}}``.
"""
from __future__ import annotations

from typing import Any

from avalanche.training import Naive

from cltunnel.training.plugins.freeze_layers import FreezeLayersPlugin
from cltunnel.training.plugins.layer_replay import LayerReplayPlugin
from cltunnel.training.plugins.layerwise_ewc import LayerwiseEWCPlugin, fisher_diagonal
from cltunnel.training.tunnel_start import TunnelStart

__all__ = ["FeatureReplay", "FreezeLayersPlugin", "FreezeTunnel", "LayerReplayPlugin", "LayerwiseEWC",
           "LayerwiseEWCPlugin", "Replay", "TunnelStart", "fisher_diagonal"]  # the plugins' former home too


class LayerwiseEWC(Naive):
    """Fine-tuning plus :class:`LayerwiseEWCPlugin` (default: the extractor alone is penalised)."""

    def __init__(self, *, ewc_lambda: float = 5.0, penalise: str = "extractor", tunnel_start: int | str = "auto",
                 tunnel_threshold: float | None = None, tunnel_rule: str = "last", probe_epochs: int = 10,
                 plugins: list | None = None,
                 **kwargs: Any) -> None:
        plugin = LayerwiseEWCPlugin(ewc_lambda, penalise, tunnel_start, threshold=tunnel_threshold, rule=tunnel_rule,
                                    probe_epochs=probe_epochs)
        super().__init__(plugins=[plugin, *(plugins or [])], **kwargs)


class FreezeTunnel(Naive):
    """Fine-tuning with the tunnel frozen after task 1."""

    def __init__(self, *, tunnel_start: int | str = "auto", tunnel_threshold: float | None = None,
                 tunnel_rule: str = "last", probe_epochs: int = 10,
                 plugins: list | None = None, **kwargs: Any) -> None:
        freeze = FreezeLayersPlugin(tunnel_start, "tunnel", threshold=tunnel_threshold, rule=tunnel_rule,
                                    probe_epochs=probe_epochs)
        super().__init__(plugins=[freeze, *(plugins or [])], **kwargs)


class Replay(Naive):
    """Experience replay on the device: a class-balanced-by-task buffer of images, one replayed batch per step."""

    def __init__(self, *, mem_size: int = 500, alpha: float = 1.0, plugins: list | None = None, **kwargs: Any) -> None:
        super().__init__(plugins=[LayerReplayPlugin(mem_size, 0, alpha), *(plugins or [])], **kwargs)


class FeatureReplay(Naive):
    """Fine-tuning plus replay of stored extractor outputs through the tunnel and the old tasks' heads;
    ``freeze_extractor: true`` keeps the stored features exact (Pellegrini et al.'s latent replay)."""

    def __init__(self, *, mem_size: int = 500, tunnel_start: int | str = "auto", alpha: float = 1.0,
                 freeze_extractor: bool = False, tunnel_threshold: float | None = None, tunnel_rule: str = "last",
                 probe_epochs: int = 10, plugins: list | None = None, **kwargs: Any) -> None:
        replay = LayerReplayPlugin(mem_size, tunnel_start, alpha, threshold=tunnel_threshold, rule=tunnel_rule,
                                   probe_epochs=probe_epochs)
        own = [replay, FreezeLayersPlugin(tunnel_start, "extractor")] if freeze_extractor else [replay]
        if freeze_extractor:
            own[1].tunnel = replay.tunnel  # one tunnel start for both, found once
        super().__init__(plugins=[*own, *(plugins or [])], **kwargs)
