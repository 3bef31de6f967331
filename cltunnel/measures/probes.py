"""Where the tunnel starts: per-layer linear probes, numerical rank, CKA, class variance (thesis §1, E4).

Probes for all layers train together: features of every body layer come from one forward pass (cached on
the device when they fit, else recomputed per batch), and one Adam step updates every layer's probe. The
probes are independent (each one's loss touches only its own weights and Adam is per-parameter), so this
equals training them one by one, at a fraction of the cost.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from cltunnel.config import ConfigError
from cltunnel.data.device import DeviceData
from cltunnel.data.scenarios import Task
from cltunnel.measures.similarity import class_variance, numerical_rank
from cltunnel.models.layered import LayeredModel


@dataclass
class ProbeConfig:
    """The thesis's probe protocol (the default): Adam, lr 1e-3, no weight decay, 30 epochs, batch 512, every
    training row and every feature."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    cache_bytes: int = 4 << 30  # cache every layer's features when they fit in this many bytes
    seed: int = 0
    train_share: float = 1.0  # share of the training rows that fit the probe (the rest is held out unused)
    weight_norm: float = 0.0  # adds weight_norm * ||W||_F to each probe's loss
    max_dims: int | None = None  # a fixed random subset of at most this many features per layer


# e7mul/tunnel_project's probes (tunnel_methods.py): an 80/20 random split of the training features (the 20 %
# is only monitored there: the probe evaluated is the last epoch's), cross-entropy + 1e-3 * ||W||, at most
# 10,000 random feature dimensions per layer; its rank: torch.linalg.matrix_rank of the covariance of at most
# 8,000 random dimensions at the default tolerance (see ``rank_threshold``).
OFFICIAL_PROBES = {"train_share": 0.8, "weight_norm": 1e-3, "max_dims": 10_000}
RANK_MAX_FEATURES = 8000  # both protocols rank at most this many random dimensions


def probe_protocol(name: str, overrides: dict | None = None) -> ProbeConfig:
    """The probe settings of a named protocol (``thesis`` or ``official``), then the scenario's overrides."""
    base = OFFICIAL_PROBES if name == "official" else {}
    try:
        return ProbeConfig(**{**base, **(overrides or {})})
    except TypeError as err:
        valid = ", ".join(f.name for f in dataclasses.fields(ProbeConfig))
        raise ConfigError(f"analyses.probe: {err}; valid: {valid}") from None


def rank_threshold(protocol: str, dim: int, thesis_threshold: float) -> float:
    """Singular values of the covariance count towards the rank above sigma_1 times this. The thesis: a set
    share (1e-3). The official code: matrix_rank's default for a float32 d x d covariance, d * eps(float32)
    (about 1e-3 for 8,000 dimensions, 6e-5 for a 512-wide layer) — computed from the centred features'
    singular values, which are the covariance's eigenvalues, without forming the d x d matrix."""
    if protocol != "official":
        return thesis_threshold
    return min(dim, RANK_MAX_FEATURES) * torch.finfo(torch.float32).eps


@torch.no_grad()
def layer_ranks(model: LayeredModel, data: DeviceData, task: Task, rows: torch.Tensor, protocol: str = "thesis",
                thesis_threshold: float = 1e-3) -> tuple[dict[int, int], dict[int, tuple[float, float]]]:
    """Numerical rank (and intra-/inter-class variance) of every body layer's representation of ``rows``."""
    ranks, variances = {}, {}
    for k in range(1, len(model.body) + 1):
        feats, labels = layer_features(model, data, task, "eval_train", [k], rows=rows)
        threshold = rank_threshold(protocol, feats[k].shape[1], thesis_threshold)
        ranks[k] = numerical_rank(feats[k], threshold, max_features=RANK_MAX_FEATURES)
        variances[k] = class_variance(feats[k], labels)
    return ranks, variances


def rank_cap(n_rows: int, n_features: int) -> int:
    """The largest numerical rank ``n_rows`` centred rows of ``n_features`` features can show (features above
    RANK_MAX_FEATURES are subsampled): where a layer's rank reaches a cap set by the rows or the features
    sampled, the rank measures the sample, not the layer (more rows, or a larger ``analyses.rank_samples``
    where the task has them, lift a row cap); a cap set by the layer's width means the layer is full rank."""
    return min(n_rows - 1, n_features, RANK_MAX_FEATURES)


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
    probes = nn.ModuleDict({str(k): _seeded_probe(dims[k], n_classes, cfg.seed * 1000 + k, cfg.max_dims)
                            for k in layers})
    probes = probes.to(data.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # batch order: the same whichever layers train
    opt = torch.optim.Adam(probes.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_all = len(task.train_idx)
    fitting = torch.arange(n_all) if cfg.train_share >= 1 else \
        torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed + 1))[: int(cfg.train_share * n_all)]
    n_train = len(fitting)
    cached = n_all * sum(dims[k] for k in layers) * 4 <= cfg.cache_bytes
    feats, labels = layer_features(model, data, task, "train", layers) if cached else (None, None)
    bar = tqdm(range(cfg.epochs), desc="probes", disable=not progress, leave=False)
    for _ in bar:
        order = fitting[torch.randperm(n_train, generator=gen)].to(data.device)
        for start in range(0, n_train, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if cached:
                batch, y = {k: feats[k][idx] for k in layers}, labels[idx]
            else:
                batch, y = _features_for_rows(model, data, task, task.train_idx.to(data.device)[idx], layers)
            loss = sum(nn.functional.cross_entropy(probes[str(k)](batch[k]), y) for k in layers)
            if cfg.weight_norm:
                loss = loss + cfg.weight_norm * sum(probes[str(k)].linear.weight.norm() for k in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probes


class Probe(nn.Module):
    """A linear probe on a layer's flattened features, or on a fixed random subset of them (``dims``)."""

    def __init__(self, linear: nn.Linear, dims: torch.Tensor | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("dims", dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x if self.dims is None else x[:, self.dims])


def _seeded_probe(d_in: int, n_classes: int, seed: int, max_dims: int | None = None) -> Probe:
    """nn.Linear's default init from a generator of its own: a layer's probe starts the same whether it
    trains alone or with the others (and so does its feature subset)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dims = torch.randperm(d_in, generator=gen)[:max_dims].sort().values if max_dims and d_in > max_dims else None
    width = d_in if dims is None else len(dims)
    linear = nn.Linear(width, n_classes)
    bound = 1 / math.sqrt(width)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        linear.bias.uniform_(-bound, bound, generator=gen)
    return Probe(linear, dims)


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
