"""Narrow ResNets cannot fold (Kuehn, Kuntz & Wöhrer 2026, "Universal approximation constraints of narrow
ResNets: the tunnel effect"; the essay *The Tunnel Wall*): toy input-output maps, no image data.

The network is the authors' (twoehrer/Narrow_ResNet_Constraints): an input layer ``act(Vx + c)`` to the
residual width, L blocks ``h -> eps*h + delta*act(BN(Wh + b))``, a linear output (a sigmoid for the two
classification tasks, trained with binary cross-entropy), Adam at lr 0.01. The regimes are named presets
(``mlp``: eps 0, delta 1; ``ode``: eps 1, delta 1/L; ``resnet``: eps = delta = 1; ``augmented``: the authors'
augmented MLP, eps 0, delta 1, width above the input dimension) or explicit {eps, delta, width}. Tasks:

- ``x2``: fit x² on U[-1, 1] (MSE). Every monotone map has MSE >= 9/160 against x² (the isotonic bound), and
  a width-1 network whose blocks are monotone is monotone: with eps = 0 every block is (a composition of
  monotone maps), whatever the weights; with eps > 0 a block folds only where its slope eps + delta*w*act'
  turns negative, so ``ode`` (eps 1, delta 1/L) needs a block weight below -L: whether training gets there
  is measured, not assumed.
- ``disk_ring``: 2,000 points, a disk (r <= 0.4, the enclosed class) against a ring (0.5 <= r <= 1).
- ``xor``: U[-1, 1]², class |x2| > |x1| (the boundary is two crossing lines: it needs a saddle).

Measures per model, on a grid of the box [-box, box]^d (data in [-1, 1]^d), in float64 and eval mode:
the error (MSE over a grid of [-1, 1] for x2: the population MSE by quadrature; else test error %); the
critical points of the input-output map f (1-D: sign changes of f'; 2-D: grid cells around which ∇f winds,
i.e. extrema and saddles); whether the hidden map Φ (input to the last block, d -> width) folds, i.e. its
Jacobian determinant changes sign (width = d only); for ``disk_ring`` whether the predicted disk region that
holds the data's disk reaches the border of the box (the unbounded "tunnel" of the paper).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from cltunnel.config import ConfigError, RunConfig, closest, coerce, register_section
from cltunnel.experiments.registry import Protocol, register_protocol
from cltunnel.reports.figures import pyplot, save_figure, write_figure
from cltunnel.reports.tables import write_table
from cltunnel.store import atomic_save, atomic_write_text, save_run_config, seed_dir, seed_dirs
from cltunnel.training.checkpoints import safe_load

FINISHED = "narrow_resnet.csv"  # in a seed directory: one row per (task, regime, depth), written last
OUTPUTS = {  # what the page says under each figure (the scenario's page; the first seed's models)
    "*_x2.png": "x² (Kuehn, Kuntz & Wöhrer): the first seed's learned maps against x², one panel per depth, and MSE by "
                "depth per regime (mean ± std over seeds) against the monotone bound 9/160.",
    "*_regions.png": "Decision regions over the box, one panel per regime and depth: the 0.5 boundary (black), the "
                     "hidden map's fold curve (det J = 0, dashed green), critical points (+ extremum, × saddle) and "
                     "the test data; 'unbounded': the predicted disk reaches the box's border (the paper's tunnel).",
    "*_levels.png": "The authors' level-set figure: 20 level sets of the predicted probability, the 0.5 level in "
                    "black, the test data on top.",
    "*_trajectories.png": "The authors' trajectory figure at width 2: test points through the blocks in the hidden "
                          "plane (dot: after the input layer, cross: after block L) and the output's 0.5 line.",
}
MODELS = "models.pt"  # in a seed directory: every trained model with its spec and measures (the resume record)
MONOTONE_BOUND = 9 / 160  # least MSE of a monotone map against x² on U[-1, 1]
X2_VARIANCE = 4 / 45  # Var(x²) on U[-1, 1]: the MSE of the best constant
CONSTANT_FIT = 0.9 * X2_VARIANCE  # an x² fit above this explains under a tenth of the variance: a constant fit
DISK, RING = 0.4, (0.5, 1.0)


# ------------------------------------------------------------------------------------ config section
NARROW_RESNET_PRESETS = ("mlp", "near_mlp", "ode", "resnet", "augmented")
NARROW_RESNET_TASKS = {"x2": 1, "disk_ring": 2, "xor": 2}  # task -> input dimension
NARROW_RESNET_REGIME_KEYS = ("name", "eps", "delta", "width", "depths")  # depths: this regime's own
# What narrow_resnet.task_settings may set for one task (the rest is the section's).
NARROW_RESNET_TASK_KEYS = ("depths", "regimes", "epochs", "batch_size", "lr", "points", "retries", "batchnorm_axis",
                           "keep_best")
NARROW_RESNET_ACTIVATIONS = ("tanh", "relu")
PER_DEPTH = re.compile(r"\s*([0-9.]+)\s*/\s*L\s*")  # a delta of "c/L": c / depth (the authors' ODE regime: 2/L)


@dataclass
class NarrowResnetConfig:
    """``narrow_resnet:``: toy input-output maps of narrow ResNets (Kuehn, Kuntz & Wöhrer 2026), blocks
    x -> eps*x + delta*act(BN(Wx + b)) after an input layer. Defaults: the authors' settings at CPU-minutes size."""

    tasks: list[str] = field(default_factory=lambda: list(NARROW_RESNET_TASKS))
    regimes: list[Any] = field(default_factory=lambda: ["mlp", "ode", "resnet", "augmented"])  # a preset or {name, eps, delta, width}
    depths: list[int] = field(default_factory=lambda: [2, 6, 20])  # residual blocks L
    width: int | None = None  # residual width of every regime but `augmented`; default: the task's input dimension
    augmented_width: int | None = None  # width of the `augmented` preset; default: input dimension + 1
    activation: str = "tanh"  # tanh (the authors' figures) | relu
    batchnorm: list[str] = field(default_factory=lambda: ["disk_ring", "xor"])  # tasks with BN in the blocks (authors: 2-D)
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01  # Adam
    points: int = 2000  # data points per task (x2: training points; its error is on a grid of [-1, 1])
    test_share: float = 0.3  # share of the 2-D points held out for test accuracy
    box: float = 3.0  # the box [-box, box]^d (data in [-1, 1]^d) searched for critical points and unbounded regions
    grid: int = 241  # grid points per axis of that box
    # The authors' protocol (twoehrer/Narrow_ResNet_Constraints; scenarios/narrow_resnet_authors.yaml). The
    # defaults keep the settings above as they were.
    input_layer: list[str] | None = None  # tasks with an input layer act(Vx + c); empty: every task (authors: 2-D only)
    batchnorm_axis: list[bool] | None = None  # set: every regime once per value (overrides `batchnorm`)
    retries: int = 1  # fresh initialisations tried until `accept` is reached (authors: up to 10)
    accept: dict[str, float] = field(default_factory=dict)  # task -> score to reach: 2-D test accuracy, x2 1 - MSE
    keep_best: bool = False  # the authors' rule: after an epoch that does not improve the test score, the best state
    standardise: bool = False  # 2-D points standardised per axis (the authors' StandardScaler)
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> its own NARROW_RESNET_TASK_KEYS

    def validate(self, cfg: RunConfig) -> None:
        check_section(self)


register_section("narrow_resnet", NarrowResnetConfig, order=40, listed_when_unset=True, needs_scenario=False)


def check_section(nc: NarrowResnetConfig) -> None:
    """What the section's fields alone do not say: known tasks and presets, sizes in range, task_settings that
    hold for their task, regimes that fit a task without an input layer."""
    for key, values, valid in (("tasks", nc.tasks, list(NARROW_RESNET_TASKS)), ("batchnorm", nc.batchnorm, list(NARROW_RESNET_TASKS))):
        bad = [v for v in values if v not in valid]
        if bad or (key == "tasks" and not values):
            raise ConfigError(f"narrow_resnet.{key}: unknown {bad}; valid: {', '.join(valid)}" if bad else
                              f"narrow_resnet.tasks: give at least one of {', '.join(valid)}")
    if nc.activation not in NARROW_RESNET_ACTIVATIONS:
        raise ConfigError(f"narrow_resnet.activation: '{nc.activation}' is not one of {', '.join(NARROW_RESNET_ACTIVATIONS)}")
    names = [_check_regime(r, f"narrow_resnet.regimes[{i}]") for i, r in enumerate(nc.regimes)]
    if not names or len(set(names)) < len(names):
        raise ConfigError(f"narrow_resnet.regimes: give one or more regimes with distinct names, got {names}")
    dims = max(NARROW_RESNET_TASKS[t] for t in nc.tasks)
    checks = [("depths", nc.depths, bool(nc.depths) and min(nc.depths) >= 1, "at least one depth, each at least 1"),
              ("width", nc.width, nc.width is None or nc.width >= 1, "must be at least 1 (or empty: the input dimension)"),
              ("augmented_width", nc.augmented_width, nc.augmented_width is None or nc.augmented_width > dims,
               f"must be above the tasks' input dimension ({dims})"),
              ("lr", nc.lr, nc.lr > 0, "must be positive"), ("test_share", nc.test_share, 0 < nc.test_share < 1,
                                                             "is a share in (0, 1)"),
              ("box", nc.box, nc.box > 1, "must be above 1 (the data's extent)"), ("grid", nc.grid, nc.grid >= 5,
                                                                                   "must be at least 5")]
    checks += [(k, getattr(nc, k), getattr(nc, k) >= 1, "must be at least 1") for k in ("epochs", "batch_size")]
    checks += [("points", nc.points, nc.points >= 20, "must be at least 20")]
    checks += [("retries", nc.retries, nc.retries >= 1, "must be at least 1")]
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"narrow_resnet.{key}: {rule}, got {value!r}")
    for key in ("input_layer",):
        bad = [v for v in (getattr(nc, key) or []) if v not in NARROW_RESNET_TASKS]
        if bad:
            raise ConfigError(f"narrow_resnet.{key}: unknown {bad}; valid: {', '.join(NARROW_RESNET_TASKS)}")
    if nc.batchnorm_axis is not None and (not nc.batchnorm_axis or any(not isinstance(v, bool) for v in nc.batchnorm_axis)
                                          or len(set(nc.batchnorm_axis)) < len(nc.batchnorm_axis)):
        raise ConfigError(f"narrow_resnet.batchnorm_axis: distinct true/false values, got {nc.batchnorm_axis!r}")
    for task, score in nc.accept.items():
        if task not in NARROW_RESNET_TASKS:
            raise ConfigError(f"narrow_resnet.accept: unknown task '{task}'; valid: {', '.join(NARROW_RESNET_TASKS)}")
        if not isinstance(score, (int, float)) or not 0 < score <= 1:
            raise ConfigError(f"narrow_resnet.accept.{task}: a score in (0, 1] (test accuracy; x2: 1 - MSE), got {score!r}")
    for task, over in nc.task_settings.items():
        if task not in NARROW_RESNET_TASKS or not isinstance(over, dict):
            raise ConfigError(f"narrow_resnet.task_settings: '{task}' is not a task ({', '.join(NARROW_RESNET_TASKS)}) "
                              "with a mapping of settings")
        unknown = [k for k in over if k not in NARROW_RESNET_TASK_KEYS]
        if unknown:
            raise ConfigError(f"narrow_resnet.task_settings.{task}: unknown {unknown}; valid: {', '.join(NARROW_RESNET_TASK_KEYS)}")
        if over:
            try:
                check_section(dataclasses.replace(nc, tasks=[task], task_settings={}, **over))
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("narrow_resnet.", f"narrow_resnet.task_settings.{task}.", 1)) from None
    for task in nc.tasks:
        tc = dataclasses.replace(nc, **nc.task_settings.get(task, {}))
        if nc.input_layer is not None and task not in nc.input_layer:
            dims = NARROW_RESNET_TASKS[task]
            wide = [_check_regime(r, "") for r in tc.regimes
                    if r == "augmented" or (isinstance(r, dict) and int(r.get("width", tc.width or dims)) != dims)
                    or (isinstance(r, str) and (tc.width or dims) != dims)]
            if wide:
                raise ConfigError(f"narrow_resnet.input_layer: {task} has no input layer, so its regimes keep the input's "
                                  f"width {dims}; {wide} do not")


def _check_regime(spec: Any, where: str) -> str:
    """A regime is a preset name or a mapping {name, eps, delta, width}; returns its name (built by
    :func:`resolve_regime`)."""
    if isinstance(spec, str):
        if spec not in NARROW_RESNET_PRESETS:
            raise ConfigError(f"{where}: unknown preset '{spec}'{closest(spec, list(NARROW_RESNET_PRESETS))}; valid: "
                              f"{', '.join(NARROW_RESNET_PRESETS)} or a mapping {{eps, delta}}")
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a preset ({', '.join(NARROW_RESNET_PRESETS)}) or a mapping {{eps, delta}}, got {spec!r}")
    unknown = [k for k in spec if k not in NARROW_RESNET_REGIME_KEYS]
    if unknown or "eps" not in spec or "delta" not in spec:
        raise ConfigError(f"{where}: give eps and delta (optional: name, width); got keys {sorted(map(str, spec))}")
    if "depths" in spec and (not isinstance(spec["depths"], list) or not spec["depths"]
                             or any(not isinstance(d, int) or d < 1 for d in spec["depths"])):
        raise ConfigError(f"{where}.depths: a list of depths, each at least 1, got {spec['depths']!r}")
    for key in ("eps", "delta", "width"):
        if key == "delta" and isinstance(spec[key], str) and PER_DEPTH.fullmatch(spec[key]):
            continue  # "2/L": delta = 2 / depth (the authors' ODE regime)
        if key in spec:
            value = coerce(spec[key], int if key == "width" else float, f"{where}.{key}")
            if value < (1 if key == "width" else 0):
                raise ConfigError(f"{where}.{key}: " + ("must be at least 1" if key == "width" else "must not be negative")
                                  + f", got {spec[key]!r}")
    return regime_mapping_name(spec)


def regime_mapping_name(spec: dict[str, Any]) -> str:
    """An explicit regime's name: its own, else "eps=.. delta=..", as given ("2/L" stays "2/L")."""
    delta = spec["delta"] if isinstance(spec["delta"], str) else f"{float(spec['delta']):g}"
    return str(spec.get("name", f"eps={float(spec['eps']):g} delta={delta}"))


# ------------------------------------------------------------------------------------------- regimes
@dataclass(frozen=True)
class Regime:
    """One row of the table: skip weight eps, residual weight delta, residual width, at one depth."""

    name: str
    eps: float
    delta: float
    width: int


def delta_at(delta: Any, depth: int) -> float:
    """delta as given, or "c/L": c / depth (the authors' ODE regime, delta = 2/L)."""
    if isinstance(delta, str):
        return float(PER_DEPTH.fullmatch(delta).group(1)) / depth
    return float(delta)


def resolve_regime(spec: Any, depth: int, input_dim: int, nc: NarrowResnetConfig) -> Regime:
    """A preset or an explicit mapping (checked by :func:`check_section`) at depth L for a d-dimensional task."""
    narrow = nc.width or input_dim
    if isinstance(spec, dict):
        return Regime(regime_mapping_name(spec), float(spec["eps"]), delta_at(spec["delta"], depth),
                      int(spec.get("width", narrow)))
    eps, delta, width = {"mlp": (0.0, 1.0, narrow), "near_mlp": (0.1, 1.0, narrow), "ode": (1.0, 1.0 / depth, narrow),
                         "resnet": (1.0, 1.0, narrow), "augmented": (0.0, 1.0, nc.augmented_width or input_dim + 1)}[spec]
    return Regime(spec, eps, delta, width)


def for_task(nc: NarrowResnetConfig, task: str) -> NarrowResnetConfig:
    """The section with the task's own settings (task_settings) in place."""
    return dataclasses.replace(nc, **nc.task_settings.get(task, {})) if nc.task_settings.get(task) else nc


def has_input_layer(nc: NarrowResnetConfig, task: str) -> bool:
    return nc.input_layer is None or task in nc.input_layer


def batchnorm_values(nc: NarrowResnetConfig, task: str) -> list[bool]:
    return list(nc.batchnorm_axis) if nc.batchnorm_axis is not None else [task in nc.batchnorm]


def regime_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else resolve_regime(spec, 1, 1, NarrowResnetConfig()).name


# ------------------------------------------------------------------------------------------- the model
class Block(nn.Module):
    """h -> eps*h + delta*act(BN(Wh + b)): eps the skip, delta the residual weight."""

    def __init__(self, width: int, eps: float, delta: float, act: nn.Module, batchnorm: bool) -> None:
        super().__init__()
        self.eps, self.delta = eps, delta
        self.fc = nn.Linear(width, width)
        nn.init.xavier_normal_(self.fc.weight)  # the authors' initialisation
        nn.init.zeros_(self.fc.bias)
        self.bn = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.act = act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.eps * h + self.delta * self.act(self.bn(self.fc(h)))


class NarrowResNet(nn.Module):
    """Input layer act(Vx + c) to the residual width, L blocks, a linear output to one number (a logit for
    the classification tasks, the fitted value for x2)."""

    def __init__(self, input_dim: int, depth: int, regime: Regime, activation: str, batchnorm: bool,
                 input_layer: bool = True) -> None:
        super().__init__()
        act = nn.Tanh() if activation == "tanh" else nn.ReLU()
        # without an input layer (the authors' 1-D fits) the blocks act on the input itself
        self.input = nn.Sequential(nn.Linear(input_dim, regime.width), act) if input_layer else nn.Identity()
        self.blocks = nn.Sequential(*[Block(regime.width, regime.eps, regime.delta, act, batchnorm)
                                      for _ in range(depth)])
        self.output = nn.Linear(regime.width, 1)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Φ: the input through the input layer and every block (what the output layer reads)."""
        return self.blocks(self.input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x)).squeeze(-1)


# ------------------------------------------------------------------------------------------------ data
def task_data(task: str, seed: int, nc: NarrowResnetConfig) -> dict[str, torch.Tensor]:
    """Training (and, 2-D, test) points of a task, drawn from the seed alone: every regime and depth of a
    seed sees the same points."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    if task == "x2":
        x = rng.uniform(-1, 1, (nc.points, 1))
        return {"x_train": torch.tensor(x), "y_train": torch.tensor(x[:, 0] ** 2)}
    if task == "disk_ring":
        half = nc.points // 2
        r = np.concatenate([DISK * np.sqrt(rng.uniform(0, 1, half)),  # uniform on the disk and on the annulus
                            np.sqrt(rng.uniform(RING[0] ** 2, RING[1] ** 2, nc.points - half))])
        angle = rng.uniform(0, 2 * np.pi, nc.points)
        x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1)
        y = (np.arange(nc.points) < half).astype(float)  # 1: the disk, the enclosed class
    else:  # xor: the authors' level set x2² - x1² >= 0
        x = rng.uniform(-1, 1, (nc.points, 2))
        y = (np.abs(x[:, 1]) >= np.abs(x[:, 0])).astype(float)
    mean, std = np.zeros(2), np.ones(2)
    if nc.standardise:  # the authors' StandardScaler, fitted on every point before the split
        mean, std = x.mean(0), x.std(0)
        x = (x - mean) / std
    order = rng.permutation(nc.points)
    n_test = int(round(nc.test_share * nc.points))
    test, train = order[:n_test], order[n_test:]
    return {"x_train": torch.tensor(x[train]), "y_train": torch.tensor(y[train]),
            "x_test": torch.tensor(x[test]), "y_test": torch.tensor(y[test]),
            "mean": torch.tensor(mean), "std": torch.tensor(std)}


def x2_grid(n: int = 2000) -> torch.Tensor:
    """Midpoints of n equal cells of [-1, 1]: the MSE over them is the population MSE on U[-1, 1] by quadrature."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1


# -------------------------------------------------------------------------------------------- training
def model_seed(seed: int, key: str) -> int:
    """The initialisation of one (task, regime, depth) depends on the seed and the key only, not on which
    models ran before it: a resumed seed trains what an uninterrupted one would."""
    return seed * 1_000_003 + zlib.crc32(key.encode()) % 1_000_003


def score(model: NarrowResNet, task: str, data: dict[str, torch.Tensor]) -> float:
    """What the authors' acceptance rule reads, in eval mode: test accuracy (2-D), 1 - MSE (x2; here the
    population MSE on U[-1, 1] by quadrature, where the authors read the training points)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if task == "x2":
            xs = x2_grid()[:, None].float()
            value = 1 - float(((model(xs) - xs[:, 0] ** 2) ** 2).mean())
        else:
            value = float(((model(data["x_test"].float()) > 0).float() == data["y_test"].float()).float().mean())
    model.train(was_training)
    return value


def train(model: NarrowResNet, data: dict[str, torch.Tensor], task: str, nc: NarrowResnetConfig, seed: int
          ) -> list[float]:
    """Adam, shuffled mini-batches (a last batch of one row is dropped: BatchNorm needs two); loss per epoch.
    With ``keep_best`` the authors' rule (their train_model): after every epoch the test score is read, and
    after an epoch that does not improve on the best so far the best state is loaded back (the optimizer's
    state is kept), so the model ends at its best-test state."""
    x, y = data["x_train"].float(), data["y_train"].float()
    loss_fn = nn.MSELoss() if task == "x2" else nn.BCEWithLogitsLoss()  # sigmoid + BCE, in one stable step
    opt = torch.optim.Adam(model.parameters(), lr=nc.lr, fused=True)  # one kernel per step: a third faster here
    gen = torch.Generator().manual_seed(seed)
    losses = []
    best, best_state = 0.0, None
    model.train()
    for _ in range(nc.epochs):
        total, batches = 0.0, 0
        for rows in torch.randperm(len(x), generator=gen).split(nc.batch_size):
            if len(rows) < 2:
                continue
            loss = loss_fn(model(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / max(batches, 1))
        if nc.keep_best:
            now = score(model, task, data)
            if now > best:
                best, best_state = now, copy.deepcopy(model.state_dict())
            elif best_state is not None:
                model.load_state_dict(best_state)
    return losses


def train_accepted(spec: dict[str, Any], data: dict[str, torch.Tensor], nc: NarrowResnetConfig, seed: int, key: str
                   ) -> tuple[NarrowResNet, list[float], dict[str, Any]]:
    """The authors' train_until_threshold: fresh initialisations, up to ``retries``, until the score reaches
    ``accept[task]``. Attempt 1 is the model's own seed (so one try is what a run without retries trains);
    of the attempts the first accepted one is kept, or, when none is, the best-scoring one (the authors keep
    the last). Returns the model, its losses and {tries, attempt kept, accepted, every attempt's score}."""
    task = spec["task"]
    threshold = nc.accept.get(task)
    kept: tuple[float, NarrowResNet, list[float], int] | None = None
    scores = []
    for attempt in range(1, nc.retries + 1):
        init = model_seed(seed, key if attempt == 1 else f"{key}#try{attempt}")
        torch.manual_seed(init)
        model = build(spec)
        losses = train(model, data, task, nc, init)
        scores.append(score(model, task, data))
        if kept is None or scores[-1] > kept[0]:
            kept = (scores[-1], model, losses, attempt)
        if threshold is not None and scores[-1] >= threshold:
            kept = (scores[-1], model, losses, attempt)
            break
        if threshold is None:
            break
    _, model, losses, attempt = kept
    return model, losses, {"tries": len(scores), "attempt": attempt, "scores": scores,
                           "accepted": np.nan if threshold is None else float(kept[0] >= threshold)}


# -------------------------------------------------------------------------------------------- measures
def box_grid(box: float, n: int, dims: int) -> torch.Tensor:
    """The grid of [-box, box]^dims, n points per axis; 2-D rows in (row = x2, column = x1) image order."""
    axis = torch.linspace(-box, box, n, dtype=torch.float64)
    if dims == 1:
        return axis[:, None]
    x2, x1 = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x1.reshape(-1), x2.reshape(-1)], 1)


def grid_axis(nc: NarrowResnetConfig) -> np.ndarray:
    return np.linspace(-nc.box, nc.box, nc.grid)


def input_gradient(f: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and ∇f(x) for a map applied row by row (eval mode: rows do not interact)."""
    x = x.clone().requires_grad_()
    y = f(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), grad.detach()


def count_sign_changes(values: np.ndarray) -> int:
    """Sign changes along a 1-D sequence, exact zeros skipped (a flat, saturated stretch is no critical point)."""
    signs = np.sign(values)
    signs = signs[signs != 0]
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def wrapped_turns(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Along the last axis (a closed path, first point repeated at the end): the total turn in full turns and
    the largest single step, each step taken as the shorter way round."""
    steps = np.angle(np.exp(1j * np.diff(angles, axis=-1)))
    return steps.sum(-1) / (2 * np.pi), np.abs(steps).max(-1)


def cell_boundaries(axis: np.ndarray, cells: np.ndarray, per_edge: int) -> np.ndarray:
    """Points around the boundary of the cells (row, column indices into an axis x axis grid), counter-
    clockwise from the lower left corner, the first point repeated: (cells, 4 * per_edge + 1, 2) as (x1, x2)."""
    t = np.linspace(0, 1, per_edge, endpoint=False)
    x0, x1 = axis[cells[:, 1]][:, None], axis[cells[:, 1] + 1][:, None]
    y0, y1 = axis[cells[:, 0]][:, None], axis[cells[:, 0] + 1][:, None]
    xs = np.concatenate([x0 + t * (x1 - x0), x1 + 0 * t, x1 - t * (x1 - x0), x0 + 0 * t, x0], 1)
    ys = np.concatenate([y0 + 0 * t, y0 + t * (y1 - y0), y1 + 0 * t, y1 - t * (y1 - y0), y0], 1)
    return np.stack([xs, ys], -1)


def winding_cells(gradient: Any, axis: np.ndarray, per_edge: int = 32, sharp: float = np.pi / 2) -> np.ndarray:
    """Index of the gradient field around every cell of the grid axis x axis ((n-1) x (n-1), rows along x2):
    +1 around an extremum, -1 around a saddle, 0 elsewhere. The index is the gradient's turn along the cell's
    boundary; where a step between two corners turns by more than ``sharp`` (a steep ridge the corners cannot
    resolve) the boundary is walked again at ``per_edge`` points per edge, and a cell still unresolved, or
    with a corner where the gradient vanishes (a flat, saturated stretch), counts 0."""
    n = len(axis)
    x2, x1 = np.meshgrid(axis, axis, indexing="ij")
    g = gradient(np.stack([x1.ravel(), x2.ravel()], 1)).reshape(n, n, 2)
    angle, norm = np.arctan2(g[..., 1], g[..., 0]), np.hypot(g[..., 0], g[..., 1])
    ring = [(slice(None, -1), slice(None, -1)), (slice(None, -1), slice(1, None)), (slice(1, None), slice(1, None)),
            (slice(1, None), slice(None, -1)), (slice(None, -1), slice(None, -1))]
    turns, step = wrapped_turns(np.stack([angle[r, c] for r, c in ring], -1))
    flat = np.stack([norm[r, c] for r, c in ring[:4]], -1).min(-1) <= 1e-12 * max(norm.max(), 1e-300)
    index = np.where(step <= sharp, np.rint(turns), 0).astype(int)
    redo = np.argwhere((step > sharp) & ~flat)
    if len(redo):
        path = cell_boundaries(axis, redo, per_edge)
        gp = gradient(path.reshape(-1, 2)).reshape(len(redo), -1, 2)
        fine_turns, fine_step = wrapped_turns(np.arctan2(gp[..., 1], gp[..., 0]))
        index[redo[:, 0], redo[:, 1]] = np.where(fine_step <= sharp, np.rint(fine_turns), 0)
    return np.where(flat, 0, index)


def critical_points_1d(f: Any, x: torch.Tensor) -> int:
    """Critical points of f: R -> R on the grid x: sign changes of f'."""
    return count_sign_changes(input_gradient(f, x)[1][:, 0].numpy())


def critical_cells_2d(f: Any, axis: np.ndarray) -> np.ndarray:
    """Winding index of ∇f around each cell of the grid axis x axis."""
    return winding_cells(lambda x: input_gradient(f, torch.as_tensor(x))[1].numpy(), axis)


def jacobian(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian (points, out, in) of a map applied row by row."""
    x = x.clone().requires_grad_()
    out = layer(x)
    rows = [torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0] for i in range(out.shape[1])]
    return torch.stack(rows, 1)


def determinant_sign(layers: list[Any], x: torch.Tensor) -> np.ndarray:
    """Sign of det J of the composition of square layers, as the product of each layer's determinant sign:
    one determinant of the whole product loses its sign to rounding where the map saturates."""
    sign = torch.ones(len(x), dtype=torch.float64)
    h = x
    for layer in layers:
        sign = sign * torch.sign(torch.linalg.det(jacobian(layer, h)))
        with torch.no_grad():
            h = layer(h)
    return sign.numpy()


def folds(det: np.ndarray) -> bool:
    """The map folds where its Jacobian determinant changes sign between neighbouring grid points."""
    signs = np.sign(det)
    pairs = [(signs[:, :-1], signs[:, 1:]), (signs[:-1, :], signs[1:, :])] if det.ndim == 2 else [(signs[:-1], signs[1:])]
    return any(bool(np.any(a * b < 0)) for a, b in pairs)


def unbounded_region(inside: np.ndarray, seeds_mask: np.ndarray) -> bool | None:
    """Whether a region (boolean image) that holds any of ``seeds_mask`` reaches the image's border: the
    enclosed class escaping to the edge of the box, the paper's unbounded "tunnel". None when no region holds
    any of them (a model that predicts no disk where the disk is has no region to judge)."""
    labels, _ = ndimage.label(inside)  # 4-connectivity
    held = set(np.unique(labels[seeds_mask & inside])) - {0}
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    return bool(held & border) if held else None


def effective_weights(model: NarrowResNet) -> list[torch.Tensor]:
    """Each block's weight as the eval-mode block applies it: diag(γ/sqrt(running var + eps))·W with BatchNorm
    (BN rescales the rows of W), W without."""
    out = []
    for block in model.blocks:
        w = block.fc.weight.detach().double()
        if isinstance(block.bn, nn.BatchNorm1d):
            w = (block.bn.weight.detach().double() / torch.sqrt(block.bn.running_var.double() + block.bn.eps))[:, None] * w
        out.append(w)
    return out


def weight_bound(model: NarrowResNet, regime: Regime) -> dict[str, float]:
    """The theorem's bound on the trained blocks: a block h -> eps*h + delta*act(W_eff h + b) with a
    1-Lipschitz act (tanh, ReLU) is invertible, so cannot fold, when delta*||W_eff||_2 < eps. Returns how
    many blocks violate it (with eps = 0 every block does: no bound holds), the largest delta*||W_eff||_2/eps
    and the most negative real eigenvalue of delta*W_eff (a width-1 block folds only where eps + delta*w*act'
    < 0, i.e. needs delta*w < -eps)."""
    norms, eigs = [], []
    for w in effective_weights(model):
        norms.append(regime.delta * float(torch.linalg.matrix_norm(w, 2)))
        eigs.append(regime.delta * float(torch.linalg.eigvals(w).real.min()))
    if not norms:
        return {"bound_violations": 0.0, "bound_ratio": np.nan, "min_eig": np.nan}
    return {"bound_violations": float(sum(n >= regime.eps for n in norms)),
            "bound_ratio": max(norms) / regime.eps if regime.eps > 0 else np.inf, "min_eig": min(eigs)}


def measure(model: NarrowResNet, task: str, data: dict[str, torch.Tensor], regime: Regime, nc: NarrowResnetConfig
            ) -> dict[str, float]:
    """Error, critical points, fold, the weight bound, (x2) whether the fit is a constant and (disk_ring)
    the unbounded region of a trained model, in float64."""
    model = model.double().eval()
    dims = NARROW_RESNET_TASKS[task]
    grid = box_grid(nc.box, nc.grid, dims)
    square = regime.width == dims
    with torch.no_grad():
        if task == "x2":
            xs = x2_grid()[:, None]
            error = float(((model(xs) - xs[:, 0] ** 2) ** 2).mean())
        else:
            error = 100 * float(((model(data["x_test"]) > 0).double() != data["y_test"]).double().mean())
    out = {"error": error, "fold": np.nan, "unbounded": np.nan, **weight_bound(model, regime)}
    if task == "x2":
        out["constant_fit"] = float(error >= CONSTANT_FIT)
    if dims == 1:
        out["critical_points"] = critical_points_1d(model, grid)
    else:
        out["critical_points"] = int(np.count_nonzero(critical_cells_2d(model, grid_axis(nc))))
    if square:
        det = determinant_sign([model.input, *model.blocks], grid)
        out["fold"] = float(folds(det.reshape(nc.grid, nc.grid) if dims == 2 else det))
    if task == "disk_ring":
        with torch.no_grad():
            disk = (model(grid) > 0).view(nc.grid, nc.grid).numpy()
        raw = grid * data.get("std", torch.ones(2)) + data.get("mean", torch.zeros(2))  # the grid in the data's units
        unbounded = unbounded_region(disk, (raw.norm(dim=1) <= DISK).view(nc.grid, nc.grid).numpy())
        out["unbounded"] = np.nan if unbounded is None else float(unbounded)
    model.float()
    return out


# --------------------------------------------------------------------------------------------- a seed
def model_key(task: str, regime: Regime, depth: int) -> str:
    return f"{task}/{regime.name}/L{depth}"


def model_spec(task: str, regime: Regime, depth: int, nc: NarrowResnetConfig, seed: int, batchnorm: bool
               ) -> dict[str, Any]:
    """Everything a model's numbers depend on: a saved model is reused only when its spec is unchanged. The
    authors' protocol settings enter only when set, so models saved before them are still reused."""
    spec = {"task": task, "depth": depth, **asdict(regime), "batchnorm": batchnorm, "seed": seed,
            **{k: getattr(nc, k) for k in ("activation", "epochs", "batch_size", "lr", "points", "test_share", "box",
                                           "grid")}}
    extra = {"input_layer": has_input_layer(nc, task), "retries": nc.retries, "accept": nc.accept.get(task),
             "keep_best": nc.keep_best, "standardise": nc.standardise and NARROW_RESNET_TASKS[task] == 2}
    default = {"input_layer": True, "retries": 1, "accept": None, "keep_best": False, "standardise": False}
    return {**spec, **{k: v for k, v in extra.items() if v != default[k]}}


def build(spec: dict[str, Any]) -> NarrowResNet:
    regime = Regime(spec["name"], spec["eps"], spec["delta"], spec["width"])
    return NarrowResNet(NARROW_RESNET_TASKS[spec["task"]], spec["depth"], regime, spec["activation"], spec["batchnorm"],
                        spec.get("input_layer", True))


def jobs(nc: NarrowResnetConfig, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(key, spec) of every model of a seed, task by task; with a batchnorm axis each regime's name says
    which side it is ("mlp, BN", "mlp, no BN")."""
    out = []
    for task in nc.tasks:
        tc = for_task(nc, task)
        for spec in tc.regimes:
            for bn in batchnorm_values(tc, task):
                for depth in spec.get("depths", tc.depths) if isinstance(spec, dict) else tc.depths:
                    regime = resolve_regime(spec, depth, NARROW_RESNET_TASKS[task], tc)
                    if tc.batchnorm_axis is not None:
                        regime = dataclasses.replace(regime, name=f"{regime.name}, {'BN' if bn else 'no BN'}")
                    out.append((model_key(task, regime, depth), model_spec(task, regime, depth, tc, seed, bn)))
    return out


def load_models(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / MODELS
    return safe_load(path, map_location="cpu") if path.exists() else {}


def run_narrow_resnet(cfg: RunConfig, seed: int, data: Any = None, progress: bool = True,
                      stop_after: int | None = None) -> Path:
    """Train and measure every (task, regime, depth) of one seed; ``data`` is unused (the tasks are drawn from
    the seed). Each model is saved as it finishes, so a killed seed resumes with the next one; a finished seed
    with an unchanged config trains nothing. ``stop_after`` returns after that many new models (tests of resume)."""
    nc = cfg.narrow_resnet
    run_dir = seed_dir(cfg, seed)
    todo = jobs(nc, seed)
    saved = load_models(run_dir)
    missing = [(key, spec) for key, spec in todo if saved.get(key, {}).get("spec") != spec]
    if not missing and (run_dir / FINISHED).exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg, seed)
    datasets: dict[str, dict[str, torch.Tensor]] = {}
    for trained, (key, spec) in enumerate(tqdm(missing, desc=f"narrow ResNets, seed {seed}", disable=not progress)):
        if stop_after is not None and trained >= stop_after:
            return run_dir
        task = spec["task"]
        tc = for_task(nc, task)
        datasets.setdefault(task, task_data(task, seed, tc))
        model, losses, tries = train_accepted(spec, datasets[task], tc, seed, key)
        regime = Regime(spec["name"], spec["eps"], spec["delta"], spec["width"])
        measures = measure(model, task, datasets[task], regime, tc)
        if tc.retries > 1 or tc.accept.get(task) is not None:
            measures.update({k: float(tries[k]) for k in ("tries", "attempt", "accepted")})
        saved[key] = {"spec": spec, "state": model.state_dict(), "losses": losses, "measures": measures,
                      "scores": tries["scores"]}
        atomic_save(saved, run_dir / MODELS)
    rows = [{"task": spec["task"], "regime": spec["name"], **{k: spec[k] for k in ("depth", "eps", "delta", "width")},
             "batchnorm": spec["batchnorm"], **saved[key]["measures"], "final_loss": saved[key]["losses"][-1]}
            for key, spec in todo]
    atomic_write_text(run_dir / FINISHED, pd.DataFrame(rows).to_csv(index=False))
    print(f"[{cfg.name} seed {seed}] " + "; ".join(
        f"{r['task']} {r['regime']} L={r['depth']}: {r['error']:.3g}" for r in rows), flush=True)
    return run_dir


# ------------------------------------------------------------------------------------------ aggregation
COLUMNS = {"error": None, "critical_points": "critical points", "fold": "folds (share of seeds)",
           "unbounded": "unbounded region (share of seeds)", "constant_fit": "constant fit (share of seeds)",
           "bound_violations": "blocks with δ‖W‖ ≥ ε", "min_eig": "min eig δW", "tries": "tries",
           "accepted": "accepted (share of seeds)"}
ERROR_NAME = {"x2": "MSE ×1000 on U[-1, 1]", "disk_ring": "test error %", "xor": "test error %"}
ERROR_SCALE = {"x2": 1000.0}  # tables print two decimals: the MSE in thousandths (the bound 9/160 is 56.25)


def task_frames(rows: pd.DataFrame, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows regime × depth in the scenario's order; mean and std (ddof 1) over seeds of each measure."""
    part = rows[rows.task == task].copy()
    part["error"] *= ERROR_SCALE.get(task, 1.0)
    part["row"] = part.regime + ", L=" + part.depth.astype(str)
    order = list(dict.fromkeys(part.sort_values(["order", "depth"]).row))
    columns = [c for c in COLUMNS if c in part and part[c].notna().any()]
    grouped = part.groupby("row")[columns]
    mean, std = grouped.mean().loc[order], grouped.std(ddof=1).loc[order]
    names = {c: COLUMNS[c] or ERROR_NAME[task] for c in columns}
    mean, std = mean.rename(columns=names), std.rename(columns=names)
    mean.index.name = std.index.name = "regime, depth"
    return mean, std


def part_columns(rows: pd.DataFrame, task: str) -> list[str]:
    part = rows[rows.task == task]
    return [c for c in part if part[c].notna().any()]


def aggregate_narrow_resnet(scenario_dir: str | Path) -> str:
    """One table per task (regime × depth: error, critical points, folds, unbounded region; mean ± std over
    seeds), the 1-D figure (maps against x², MSE by depth against 9/160) and the decision regions of the first
    seed for each 2-D task."""
    scenario_dir = Path(scenario_dir)
    runs = seed_dirs(scenario_dir, FINISHED)
    if not runs:
        return ""
    rows = pd.concat([pd.read_csv(r / FINISHED).assign(seed=r.name) for r in runs], ignore_index=True)
    rows["order"] = rows.groupby("seed").cumcount()
    md = []
    for task in dict.fromkeys(rows.task):
        mean, std = task_frames(rows, task)
        notes = [f"seeds: {[r.name for r in runs]}; std over seeds with ddof 1",
                 {"x2": f"a monotone map has MSE >= 9/160 (56.25 ×1000); critical points: sign changes of f' on [-box, box]",
                  "disk_ring": "critical points: grid cells around which ∇f winds (extrema, saddles); unbounded: the "
                               "predicted disk region holding the data's disk reaches the border of the box (share "
                               "of the seeds that predict any disk there)",
                  "xor": "critical points: grid cells around which ∇f winds (the boundary needs a saddle)"}[task],
                 "folds: the hidden map's Jacobian determinant changes sign on the grid (width = input dimension "
                 "only; – for wider regimes)",
                 "blocks with δ‖W‖ ≥ ε: the theorem's bound (a block with δ‖W_eff‖₂ < ε, W_eff = γ/σ·W with BN, is "
                 "invertible and cannot fold) violated, of L blocks (ε = 0: every block); min eig δW: the most "
                 "negative real eigenvalue of δ·W_eff over the blocks (width 1 folds only below -ε)"]
        if "tries" in part_columns(rows, task):
            notes.append("tries: initialisations trained until the score reached the acceptance threshold (the "
                         "authors' retries); accepted: the kept model reached it (else the best try is kept)")
        if task == "x2":
            notes.append(f"constant fit: MSE ≥ 0.9·Var(x²) = {1000 * CONSTANT_FIT:.1f} ×1000 (a fit explaining under "
                         "a tenth of x²'s variance; the constant's MSE is 88.9)")
        md.append(write_table(mean, std, len(runs), scenario_dir / f"{scenario_dir.name}_{task}",
                              f"{scenario_dir.name}: {task}, narrow ResNets by regime and depth", notes))
    models = load_models(runs[0])
    if "x2" in set(rows.task):
        plot_x2(rows[rows.task == "x2"], models, scenario_dir / f"{scenario_dir.name}_x2.png")
    for task in [t for t in dict.fromkeys(rows.task) if t != "x2"]:
        plot_regions(task, models, scenario_dir / f"{scenario_dir.name}_{task}_regions.png", runs[0].name)
        plot_levels(task, models, scenario_dir / f"{scenario_dir.name}_{task}_levels.png", runs[0].name)
        if any(e["spec"]["task"] == task and e["spec"]["width"] == 2 for e in models.values()):
            plot_trajectories(task, models, scenario_dir / f"{scenario_dir.name}_{task}_trajectories.png", runs[0].name)
    return "\n".join(md)


def plot_x2(rows: pd.DataFrame, models: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: the first seed's learned maps against x², one panel per depth. Right: MSE by depth per regime
    (mean ± std over seeds) against the monotone bound 9/160."""
    plt = pyplot()
    depths = sorted(rows.depth.unique())
    fig, axes = plt.subplots(1, len(depths) + 1, figsize=(3.6 * (len(depths) + 1), 3.4), squeeze=False)
    xs = torch.linspace(-1.2, 1.2, 241, dtype=torch.float64)
    for ax, depth in zip(axes[0], depths):
        ax.plot(xs, xs ** 2, color="black", lw=2, label="x²")
        for key, entry in models.items():
            if entry["spec"]["task"] == "x2" and entry["spec"]["depth"] == depth:
                with torch.no_grad():
                    ax.plot(xs, _loaded(entry)(xs[:, None]), lw=1.2, label=entry["spec"]["name"])
        ax.set(title=f"L = {depth}: learned maps", xlabel="x", ylim=(-0.3, 1.5))
    ax = axes[0, -1]
    for regime, part in rows.groupby("regime", sort=False):
        stats = part.groupby("depth").error.agg(["mean", "std"])
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", ms=4, capsize=3, label=regime)
    ax.axhline(MONOTONE_BOUND, color="black", ls="--", lw=1, label="9/160 (monotone bound)")
    ax.set(xscale="log", yscale="log", xlabel="depth L", ylabel="MSE (mean ± std over seeds)", title="MSE against x²")
    ax.set_xticks(depths, [str(d) for d in depths], minor=False)
    ax.minorticks_off()
    save_figure(fig, axes[0], path)


def _loaded(entry: dict[str, Any]) -> NarrowResNet:
    model = build(entry["spec"])
    model.load_state_dict(entry["state"])
    return model.double().eval()


def plot_regions(task: str, models: dict[str, dict[str, Any]], path: Path, seed_name: str) -> None:
    """Predicted class over the box, one panel per (regime, depth): the decision boundary, the fold curve
    (det J of the hidden map = 0, dashed), critical points (+: extremum, x: saddle) and the test data."""
    fig, axes, entries, regimes, depths = _panels(task, models)
    for entry in entries:
        spec = entry["spec"]
        _draw_regions(axes[regimes.index(spec["name"]), depths.index(spec["depth"])], _loaded(entry), entry, task)
    spec = entries[0]["spec"]
    data = "standardised data" if spec.get("standardise") else "data in [-1, 1]²"
    fig.suptitle(f"{task}: decision regions ({seed_name}; box [-{spec['box']:g}, {spec['box']:g}]², {data})")
    _write_panels(fig, path)


def _draw_regions(ax: Any, model: NarrowResNet, entry: dict[str, Any], task: str) -> None:
    spec, m = entry["spec"], entry["measures"]
    n, box = spec["grid"], spec["box"]
    axis, grid, prob = _prediction(model, spec)
    ax.imshow(prob, origin="lower", extent=(-box, box, -box, box), cmap="coolwarm", vmin=0, vmax=1, alpha=0.6)
    ax.contour(axis, axis, prob, levels=[0.5], colors="black", linewidths=1)
    if spec["width"] == 2:
        sign = determinant_sign([model.input, *model.blocks], grid).reshape(n, n)
        if sign.min() < 0 < sign.max():
            ax.contour(axis, axis, sign, levels=[0], colors="darkgreen", linewidths=1, linestyles="dashed")
    index = critical_cells_2d(model, axis)
    centre = (axis[:-1] + axis[1:]) / 2
    for value, marker in ((1, "P"), (-1, "X")):
        rows, cols = np.nonzero(index == value)
        ax.scatter(centre[cols], centre[rows], marker=marker, s=40, color="gold", edgecolor="black", zorder=3)
    _scatter_test(ax, spec, alpha=0.5)
    tunnel = "" if np.isnan(m["unbounded"]) else (", unbounded" if m["unbounded"] else ", bounded")
    ax.set(title=f"{spec['name']} (ε={spec['eps']:g}, δ={spec['delta']:.3g}, w={spec['width']}), L={spec['depth']}\n"
                 f"error {m['error']:.1f}%, {m['critical_points']:.0f} crit.{tunnel}",
           xticks=[-box, -1, 0, 1, box], yticks=[-box, -1, 0, 1, box])
    ax.title.set_fontsize(8)


def _prediction(model: NarrowResNet, spec: dict[str, Any]) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """The box's axis, its grid of points and the predicted probability on it (grid x grid), for the region and
    level-set figures."""
    n, box = spec["grid"], spec["box"]
    grid = box_grid(box, n, 2)
    with torch.no_grad():
        prob = torch.sigmoid(model(grid)).view(n, n).numpy()
    return np.linspace(-box, box, n), grid, prob


def _scatter_test(ax: Any, spec: dict[str, Any], alpha: float) -> None:
    """The model's test points on a panel, coloured by class."""
    data = spec_data(spec)
    x, y = data["x_test"].numpy(), data["y_test"].numpy()
    ax.scatter(x[:, 0], x[:, 1], c=np.where(y > 0, "darkred", "navy"), s=1.5, alpha=alpha)


def spec_data(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The data a saved model was trained on, from its spec."""
    return task_data(spec["task"], spec["seed"], NarrowResnetConfig(points=spec["points"], test_share=spec["test_share"],
                                                                    standardise=spec.get("standardise", False)))


def _panels(task: str, models: dict[str, dict[str, Any]], keep: Any = None) -> tuple[Any, Any, list, list, list]:
    plt = pyplot()
    entries = [e for e in models.values() if e["spec"]["task"] == task and (keep is None or keep(e))]
    regimes, depths = list(dict.fromkeys(e["spec"]["name"] for e in entries)), sorted({e["spec"]["depth"] for e in entries})
    fig, axes = plt.subplots(len(regimes), len(depths), figsize=(3.2 * len(depths), 3.2 * len(regimes)), squeeze=False)
    drawn = {(regimes.index(e["spec"]["name"]), depths.index(e["spec"]["depth"])) for e in entries}
    for (row, col), ax in np.ndenumerate(axes):  # a regime not run at this depth: no empty axes on the page
        if (row, col) not in drawn:
            ax.axis("off")
    return fig, axes, entries, regimes, depths


def _write_panels(fig: Any, path: Path) -> None:
    """Lay the panels out below the figure's title (``tight_layout`` alone lets the title run into the first
    row's panel titles), then write the PNG."""
    lines = fig.get_suptitle().count("\n") + 1 if fig.get_suptitle() else 0
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * lines / fig.get_figheight()))
    write_figure(fig, path, dpi=110, tight=False)


def _title(spec: dict[str, Any], m: dict[str, float]) -> str:
    fold = "" if np.isnan(m.get("fold", np.nan)) else (", folds" if m["fold"] else ", no fold")
    return (f"{spec['name']} (ε={spec['eps']:g}, δ={spec['delta']:.3g}, w={spec['width']}), L={spec['depth']}\n"
            f"error {m['error']:.1f}%{fold}, {m.get('bound_violations', np.nan):.0f}/{spec['depth']} over bound")


def plot_levels(task: str, models: dict[str, dict[str, Any]], path: Path, seed_name: str) -> None:
    """The authors' level-set figure: 20 level sets of the predicted probability over the box, the 0.5 level
    in black, the test data on top, one panel per (regime, depth)."""
    fig, axes, entries, regimes, depths = _panels(task, models)
    for entry in entries:
        spec = entry["spec"]
        ax = axes[regimes.index(spec["name"]), depths.index(spec["depth"])]
        axis, _, prob = _prediction(_loaded(entry), spec)
        ax.contourf(axis, axis, prob, levels=np.linspace(0, 1, 21), cmap="coolwarm", alpha=0.8)
        ax.contour(axis, axis, prob, levels=[0.5], colors="black", linewidths=1.2)
        _scatter_test(ax, spec, alpha=0.6)
        ax.set(title=_title(spec, entry["measures"]), aspect="equal")
        ax.title.set_fontsize(8)
    fig.suptitle(f"{task}: level sets of the prediction ({seed_name}), test data on top")
    _write_panels(fig, path)


def hidden_states(model: NarrowResNet, x: torch.Tensor) -> torch.Tensor:
    """(points, L + 1, width): the input layer's output and every block's, in eval mode."""
    with torch.no_grad():
        h = [model.input(x)]
        for block in model.blocks:
            h.append(block(h[-1]))
    return torch.stack(h, 1)


def plot_trajectories(task: str, models: dict[str, dict[str, Any]], path: Path, seed_name: str, points: int = 150
                      ) -> None:
    """The authors' trajectory figure at width 2: test points through the blocks in the hidden plane (start
    dot, end cross, by class) and the output layer's decision line on the last hidden state."""
    fig, axes, entries, regimes, depths = _panels(task, models, lambda e: e["spec"]["width"] == 2)
    for entry in entries:
        spec = entry["spec"]
        ax = axes[regimes.index(spec["name"]), depths.index(spec["depth"])]
        model = _loaded(entry)
        data = spec_data(spec)
        x, y = data["x_test"][:points], data["y_test"][:points].numpy()
        h = hidden_states(model, x).numpy()
        for label, color in ((0.0, "navy"), (1.0, "darkred")):
            rows = h[y == label]
            for path_ in rows:
                ax.plot(path_[:, 0], path_[:, 1], color=color, lw=0.4, alpha=0.35)
            ax.scatter(rows[:, 0, 0], rows[:, 0, 1], color=color, s=3)
            ax.scatter(rows[:, -1, 0], rows[:, -1, 1], color=color, s=10, marker="x")
        w, b = model.output.weight.detach()[0].numpy(), float(model.output.bias.detach()[0])
        lo, hi = h[..., 0].min(), h[..., 0].max()
        if abs(w[1]) > 1e-12:
            xs = np.linspace(lo, hi, 2)
            ax.plot(xs, -(w[0] * xs + b) / w[1], color="black", ls="--", lw=1)
        ax.set_ylim(h[..., 1].min() - 0.1, h[..., 1].max() + 0.1)
        ax.set(title=_title(spec, entry["measures"]))
        ax.title.set_fontsize(8)
    fig.suptitle(f"{task}: hidden trajectories at width 2 ({seed_name})\n●: after the input layer, ×: after block L; "
                 "dashed: the output's 0.5 line", fontsize=10)
    _write_panels(fig, path)


def summary(scenario_dir: Path, cfg: RunConfig) -> str:
    """What ``cltunnel run`` prints: the tables the aggregation wrote, one per task."""
    paths = [scenario_dir / f"{scenario_dir.name}_{task}.md" for task in cfg.narrow_resnet.tasks]
    return "\n".join(p.read_text() for p in paths if p.exists())


register_protocol(Protocol("narrow_resnet", "narrow_resnet", run_narrow_resnet, aggregate_narrow_resnet, FINISHED,
                           summary, trains_model_section=False, needs_data=False, outputs=OUTPUTS, place=85))
