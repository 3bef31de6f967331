"""Replay at one layer's output: images at layer 0 (experience replay), stored extractor outputs at the tunnel
start (latent replay)."""
from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cltunnel.config import ConfigError
from cltunnel.models.layered import LayeredModel
from cltunnel.models.surgery import tunnel_layers
from cltunnel.training.fast_data import run_data
from cltunnel.training.tunnel_start import TunnelStart


class LayerReplayPlugin(SupervisedPlugin):
    """Replay at the output of body layer ``layer``: 0 = images (experience replay), the tunnel start =
    extractor outputs (latent replay, after Pellegrini et al. 2020, without freezing the extractor).

    After each task, ``mem_size`` slots are shared equally among the tasks seen; a task's slots hold random
    training rows (images are re-augmented like the training data when replayed; deeper layers store
    float16 features of the unaugmented rows, computed once). While a later task trains, every step adds
    ``alpha`` × the cross-entropy of a replayed batch passed through the layers above and each row's own
    task head. Stored features do not follow the extractor as it keeps learning: if forgetting sits in the
    extractor (the thesis's finding), feature replay should help little.
    """

    def __init__(self, mem_size: int = 500, layer: int | str = 0, alpha: float = 1.0,
                 batch_size: int | None = None, **probe: Any) -> None:
        super().__init__()
        self.mem_size, self.alpha, self.batch_size = mem_size, alpha, batch_size
        self.tunnel = TunnelStart(layer, minimum=0, **probe)
        self.buffer: dict[int, dict[str, Any]] = {}  # task id -> rows, labels, head (and features for layer > 0)
        self.generator: torch.Generator | None = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        data = run_data(strategy)
        if data is None:
            raise ConfigError("strategy: this replay runs on cltunnel's data path (cltunnel run)")
        with torch.no_grad():
            self._store(strategy, data, self.tunnel.resolve(strategy))

    def _store(self, strategy: Any, data: Any, k: int) -> None:
        task = data.scenario.tasks[strategy.experience.current_experience]
        quota = self.mem_size // (len(self.buffer) + 1)
        self.buffer = {t: {key: v[:quota] if torch.is_tensor(v) else v for key, v in slot.items()}
                       for t, slot in self.buffer.items()}
        gen = torch.Generator(device="cpu").manual_seed(strategy.run_context.seed * 7919 + task.id)
        rows = task.train_idx[torch.randperm(len(task.train_idx), generator=gen)[:quota]].to(data.device)
        slot = {"rows": rows, "labels": data.label_maps[task.id][data.y_train[rows]], "head": task.head}
        if k > 0:
            was_training = strategy.model.training
            strategy.model.eval()
            slot["features"] = torch.cat([strategy.model.features(x, upto=k).half()
                                          for x, _, _ in data.batches(task, "eval_train", 500, rows=rows)])
            strategy.model.train(was_training)
        self.buffer[task.id] = slot

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not self.buffer or strategy.experience.current_experience == 0:
            return
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(strategy.run_context.seed)
        strategy.loss = strategy.loss + self.alpha * self.replay_loss(strategy)

    def replay_loss(self, strategy: Any) -> torch.Tensor:
        """Mean cross-entropy of one batch drawn uniformly from the buffer."""
        model: LayeredModel = strategy.model
        data = strategy.run_context.data
        k = self.tunnel.resolve(strategy)
        slots = list(self.buffer.values())
        sizes = torch.tensor([len(slot["rows"]) for slot in slots])
        n = self.batch_size or strategy.train_mb_size
        pick = torch.randint(int(sizes.sum()), (n,), generator=self.generator)
        owner = torch.bucketize(pick, sizes.cumsum(0), right=True)
        offsets = sizes.cumsum(0) - sizes
        loss = torch.zeros((), device=strategy.device)
        for i, slot in enumerate(slots):
            idx = (pick[owner == i] - offsets[i]).to(data.device)
            if len(idx) == 0:
                continue
            if k == 0:
                h = data.x_train[slot["rows"][idx]]
                h = data.normalise(data.augment(h, strategy.dataloader.generator) if data.augment else h)
            else:
                h = slot["features"][idx].float()
            for layer in tunnel_layers(model, k):
                h = layer(h)
            logits = model.head_for(slot["head"])(h).float()
            loss = loss + nn.functional.cross_entropy(logits, slot["labels"][idx], reduction="sum")
        return loss / n
