"""Where the tunnel starts: per-layer linear probes, numerical rank, CKA, class variance (thesis §1, E4).

Probes for all layers train together: features of every body layer come from one forward pass (cached on
the device when they fit, else recomputed per batch), and one Adam step updates every layer's probe. The
probes are independent (each one's loss touches only its own weights and Adam is per-parameter), so this
equals training them one by one, at a fraction of the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from cltunnel.data.device import DeviceData
from cltunnel.data.scenarios import Task
from cltunnel.models.layered import LayeredModel


@dataclass
class ProbeConfig:
    """The thesis's probe protocol: Adam, lr 1e-3, no weight decay, 30 epochs, batch 512."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    cache_bytes: int = 4 << 30  # cache every layer's features when they fit in this many bytes
    seed: int = 0


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float()


@torch.no_grad()
def layer_features(model: LayeredModel, data: DeviceData, task: Task, split: str, layers: list[int],
                   rows: torch.Tensor | None = None, batch_size: int = 500, dtype: torch.dtype = torch.float32
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Flattened representations of the given body layers (1-based) for a task's rows, and their labels."""
    model.eval()
    feats: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    labels = []
    for x, y, _ in data.batches(task, split if split == "test" else "eval_train", batch_size, rows=rows):
        outs = model.layer_outputs(x, layers)
        for k in layers:
            feats[k].append(outs[k].flatten(1).to(dtype))
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def layer_dims(model: LayeredModel, data: DeviceData, task: Task) -> dict[int, int]:
    x = next(iter(data.batches(task, "test", 2)))[0]
    with torch.no_grad():
        model.eval()
        return {k: v[0].numel() for k, v in model.layer_outputs(x).items()}


def train_probes(model: LayeredModel, data: DeviceData, train_task: Task, test_task: Task | None = None,
                 layers: list[int] | None = None, cfg: ProbeConfig | None = None, progress: bool = True
                 ) -> dict[int, float]:
    """Test accuracy of a linear probe on each body layer's output (train on ``train_task``'s training rows,
    test on ``test_task``'s test rows, the same task by default). Features of frozen layers; no augmentation.
    """
    layers = layers or list(range(1, len(model.body) + 1))
    probes = fit_probes(model, data, train_task, layers, cfg, progress)
    return probe_accuracy(model, data, test_task or train_task, probes, layers)


def fit_probes(model: LayeredModel, data: DeviceData, task: Task, layers: list[int], cfg: ProbeConfig | None = None,
               progress: bool = True) -> nn.ModuleDict:
    """One linear probe per layer (``probes[str(k)]``) trained on ``task``'s training rows, all together."""
    cfg = cfg or ProbeConfig()
    model.eval()
    dims = layer_dims(model, data, task)
    n_classes = int(task.label_map.max()) + 1
    probes = nn.ModuleDict({str(k): _seeded_probe(dims[k], n_classes, cfg.seed * 1000 + k) for k in layers})
    probes = probes.to(data.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # batch order: the same whichever layers train
    opt = torch.optim.Adam(probes.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = len(task.train_idx)
    cached = n_train * sum(dims[k] for k in layers) * 4 <= cfg.cache_bytes
    feats, labels = layer_features(model, data, task, "train", layers) if cached else (None, None)
    bar = tqdm(range(cfg.epochs), desc="probes", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(n_train, generator=gen).to(data.device)
        for start in range(0, n_train, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if cached:
                batch, y = {k: feats[k][idx] for k in layers}, labels[idx]
            else:
                batch, y = _features_for_rows(model, data, task, task.train_idx.to(data.device)[idx], layers)
            loss = sum(nn.functional.cross_entropy(probes[str(k)](batch[k]), y) for k in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probes


def _seeded_probe(d_in: int, n_classes: int, seed: int) -> nn.Linear:
    """nn.Linear's default init from a generator of its own: a layer's probe starts the same whether it
    trains alone or with the others."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probe = nn.Linear(d_in, n_classes)
    bound = 1 / math.sqrt(d_in)
    with torch.no_grad():
        probe.weight.uniform_(-bound, bound, generator=gen)
        probe.bias.uniform_(-bound, bound, generator=gen)
    return probe


@torch.no_grad()
def _features_for_rows(model, data, task, rows, layers):
    x = data.normalise(data.x_train[rows])
    outs = model.layer_outputs(x, layers)
    return {k: _flat(outs[k]) for k in layers}, data.label_maps[task.id][data.y_train[rows]]


@torch.no_grad()
def probe_accuracy(model: LayeredModel, data: DeviceData, task: Task, probes: nn.ModuleDict, layers: list[int],
                   rows: torch.Tensor | None = None) -> dict[int, float]:
    """Test accuracy of each layer's probe on ``task``'s test rows (or the given ones, e.g. the exact-pixel rows)."""
    model.eval()
    correct = {k: 0 for k in layers}
    total = 0
    for x, y, _ in data.batches(task, "test", 500, rows=rows):
        outs = model.layer_outputs(x, layers)
        for k in layers:
            correct[k] += (probes[str(k)](_flat(outs[k])).argmax(1) == y).sum().item()
        total += len(y)
    return {k: correct[k] / max(total, 1) for k in layers}
