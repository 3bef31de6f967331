"""Example strategy: learn task 1 normally, then freeze the tunnel (body layers from ``tunnel_start`` on).

The thesis finds the tunnel task-agnostic and forgetting concentrated in the extractor, so freezing the
tunnel after task 1 should cost the second task little. Use it from YAML:

    strategy:
      class: strategies.freeze_tunnel:FreezeTunnel
      args: {tunnel_start: 9}

Any Avalanche ``SupervisedTemplate`` subclass works the same way; cltunnel adds its device data path,
checkpoints and analyses around it.
"""
from __future__ import annotations

from avalanche.training import Naive


class FreezeTunnel(Naive):
    """Naive fine-tuning, with body layers ``tunnel_start``..n frozen from the second task on."""

    def __init__(self, *, tunnel_start: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tunnel_start = tunnel_start  # 1-based layer index, as everywhere in cltunnel

    def frozen_layers(self) -> list:
        return list(self.model.body)[self.tunnel_start - 1 :]

    def _before_training_exp(self, **kwargs) -> None:
        if self.experience.current_experience > 0:
            for layer in self.frozen_layers():
                layer.requires_grad_(False)
        super()._before_training_exp(**kwargs)

    def _before_training_epoch(self, **kwargs) -> None:
        super()._before_training_epoch(**kwargs)
        if self.experience.current_experience > 0:
            for layer in self.frozen_layers():
                layer.eval()  # BatchNorm statistics stay as they were after task 1
