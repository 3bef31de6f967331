"""Meta-learned synthetic data that is not forgotten (thesis chapter 2, E7).

A conditional generator G(z, class) writes ``samples_per_class`` images per class; a small learner S (two conv
layers and one FC, BatchNorm after each) learns split MNIST class-incrementally (one 10-way head) from those
images only: ``inner_steps`` SGD steps per task, ``batch_per_class`` images of each of the task's classes per
step, with S's learning rate and momentum learned alongside G. After the whole sequence S's loss on real
training images of every class is back-propagated through every inner step into G (``torch.func.functional_call``
over S's parameters as tensors, ``torch.autograd.grad(create_graph=True)`` for the inner gradients). A fresh S
and a shuffled task order every meta-step keep G from fitting one initialisation or one order.

Afterwards the same learners (the conv learner and a plain MLP) learn the task sequence from three sources
with the learned lr and momentum: G's samples (``synthetic``), real images (``real``), and samples of a
conditional VAE fitted to the real images (``generative``; the thesis used a conditional GAN, a VAE trains
reliably in a minute on a CPU). Outputs: accuracy on the classes seen so far after each task (Figure 2.4.2),
final accuracy against the number of inner steps per task (Figure 2.4.3) and the forgetting table.

BatchNorm here normalises with the statistics of the batch it sees, in training and evaluation alike
(``track_running_stats=False``): running averages are not part of a functional inner loop. Evaluation
therefore pushes the whole test set (every class) through S in one batch, and accuracy on "seen classes"
is read from those rows, so the batch S normalises is the same for every source and every task.
"""
from __future__ import annotations

import json
import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from cltunnel.config import ConfigError, RunConfig, register_section
from cltunnel.data.device import resolve_device
from cltunnel.data.images import ImageData
from cltunnel.data.scenarios import build_scenario
from cltunnel.experiments.representations import GaussianLatent
from cltunnel.models.layered import LayeredModel
from cltunnel.reports.figures import pyplot, save_figure, write_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.experiments.registry import Protocol, register_protocol
from cltunnel.store import atomic_save, load_run_config, save_run_config, seed_dir, seed_dirs
from cltunnel.training.checkpoints import safe_load






FINISHED = "seen_accuracy.csv"  # in a seed directory: written once every (source, learner) is evaluated
SYNTHETIC_SOURCES = ("synthetic", "real", "generative")
SYNTHETIC_LEARNERS = ("conv", "mlp")
OUTPUTS = {"samples.png": "Samples of the learned synthetic data."}  # what the page says under each figure


# ------------------------------------------------------------------------------------ config section
@dataclasses.dataclass
class SyntheticConfig:
    """``synthetic:``: meta-learned synthetic data (thesis chapter 2). Defaults are the CPU-minutes budget;
    the thesis trained G far longer."""

    meta_steps: int = 300
    meta_lr: float = 3e-4  # Adam on G and the learner's lr, momentum (200 steps on MNIST: 1e-2 diverged, 1e-4 slower)
    meta_clip: float = 1.0  # largest meta-gradient norm (0: no clipping)
    samples_per_class: int = 250
    inner_steps: int = 5  # per task
    batch_per_class: int = 20  # batch 40 for two classes per task
    latent: int = 32
    generator_hidden: int = 256
    learner_channels: int = 8  # conv learner: c and 2c channels
    mlp_hidden: int = 128
    init_lr: float = 0.05
    init_momentum: float = 0.5
    meta_batch: int = 500  # real training images (all classes) in S's loss after the sequence
    test_per_class: int = 200  # real test images per class in the evaluation batch (0: the whole test set)
    eval_learners: int = 5  # fresh learners per (source, learner, steps) at evaluation
    eval_inner_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 5, 10, 20])
    sources: list[str] = dataclasses.field(default_factory=lambda: list(SYNTHETIC_SOURCES))
    learners: list[str] = dataclasses.field(default_factory=lambda: list(SYNTHETIC_LEARNERS))
    cvae_epochs: int = 5
    checkpoint_every: int = 50

    def validate(self, cfg: RunConfig) -> None:
        for key, valid in (("sources", SYNTHETIC_SOURCES), ("learners", SYNTHETIC_LEARNERS)):
            bad = [v for v in getattr(self, key) if v not in valid]
            if bad:
                raise ConfigError(f"synthetic.{key}: unknown {bad}; valid: {', '.join(valid)}")
        values = {k: getattr(self, k) for k in ("samples_per_class", "inner_steps", "batch_per_class", "meta_batch",
                                                 "eval_learners", "checkpoint_every")}
        values["eval_inner_steps"] = min(self.eval_inner_steps, default=1)
        bad = [k for k, v in values.items() if v < 1] + [k for k in ("meta_steps", "test_per_class")
                                                         if getattr(self, k) < 0]
        if bad:
            raise ConfigError(f"synthetic: {', '.join(bad)} must be positive (meta_steps, test_per_class: not negative)")


# A free-form mapping before cltunnel 0.2: its fingerprint counts only the keys that differ from the defaults, as
# the mapping's did, so runs made then still resume.
register_section("synthetic", SyntheticConfig, order=30, listed_when_unset=True, sparse_fingerprint=True)
Pool = list[tuple[int, torch.Tensor]]  # one task's images: (class id, that class's images) per class


Params = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------- models
def learner(kind: str, in_shape: tuple[int, int, int], n_classes: int, cfg: SyntheticConfig) -> LayeredModel:
    """S: conv c → conv 2c → FC, BatchNorm after each (batch statistics only), or a one-hidden-layer MLP."""
    c, h, w = in_shape

    def bn(n: int, dims: int) -> nn.Module:
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(n, track_running_stats=False)

    if kind == "conv":
        k = cfg.learner_channels
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(
            conv1=nn.Sequential(nn.Conv2d(c, k, 3, padding=1), bn(k, 2), nn.ReLU(), nn.MaxPool2d(2)),
            conv2=nn.Sequential(nn.Conv2d(k, 2 * k, 3, padding=1), bn(2 * k, 2), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten()))
        d = 2 * k * (h // 4) * (w // 4)
    elif kind == "mlp":
        layers = OrderedDict(fc1=nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, cfg.mlp_hidden),
                                               bn(cfg.mlp_hidden, 1), nn.ReLU()))
        d = cfg.mlp_hidden
    else:
        raise ValueError(f"learner kind {kind!r}; valid: {', '.join(SYNTHETIC_LEARNERS)}")
    return LayeredModel(layers, {"0": nn.Sequential(nn.Linear(d, n_classes), bn(n_classes, 1))}, arch=f"learner_{kind}")


class ConditionalGenerator(nn.Module):
    """G(z, class) → an image in the learner's input space (standardised pixels, unbounded)."""

    def __init__(self, n_classes: int, out_shape: tuple[int, int, int], latent: int, hidden: int) -> None:
        super().__init__()
        self.n_classes, self.out_shape, self.latent = n_classes, out_shape, latent
        self.net = nn.Sequential(nn.Linear(latent + n_classes, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 2 * hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(2 * hidden, int(np.prod(out_shape))))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(labels, self.n_classes).to(z.dtype)
        return self.net(torch.cat([z, onehot], 1)).view(-1, *self.out_shape)

    def pool(self, classes: list[int], per_class: int, gen: torch.Generator) -> Pool:
        z = torch.randn(len(classes) * per_class, self.latent, generator=gen, device=gen.device,
                        dtype=self.net[0].weight.dtype)
        labels = torch.tensor(classes, device=z.device).repeat_interleave(per_class)
        return list(zip(classes, self(z, labels).split(per_class)))


class InnerOptimiser(nn.Module):
    """The learner's SGD learning rate and momentum, meta-learned (log and logit keep them in range)."""

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(float(np.log(lr))))
        self.logit_momentum = nn.Parameter(torch.tensor(float(np.log(momentum / (1 - momentum)))))

    @property
    def lr(self) -> torch.Tensor:
        return self.log_lr.exp()

    @property
    def momentum(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_momentum)


class ConditionalVAE(nn.Module):
    """The "generative model fitted to real data" baseline: pixels in [0, 1], Bernoulli likelihood."""

    def __init__(self, n_classes: int, shape: tuple[int, int, int], latent: int = 16, hidden: int = 400) -> None:
        super().__init__()
        d = int(np.prod(shape))
        self.n_classes, self.shape, self.latent_dim = n_classes, shape, latent
        self.encoder = nn.Sequential(nn.Linear(d + n_classes, hidden), nn.ReLU())
        self.latent = GaussianLatent(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent + n_classes, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def loss(self, x01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(labels, self.n_classes).float()
        z = self.latent(self.encoder(torch.cat([x01.flatten(1), onehot], 1)))
        logits = self.decoder(torch.cat([z, onehot], 1))
        bce = nn.functional.binary_cross_entropy_with_logits(logits, x01.flatten(1), reduction="none").sum(1).mean()
        return bce + self.latent.kl

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(len(labels), self.latent_dim, generator=gen, device=gen.device)
        onehot = nn.functional.one_hot(labels, self.n_classes).float()
        return torch.sigmoid(self.decoder(torch.cat([z, onehot], 1))).view(-1, *self.shape)


# ------------------------------------------------------------------------------------ the inner loop
def draw_batch(pool: Pool, per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of each of the task's classes, drawn with replacement from its pool."""
    xs, ys = [], []
    for cls, images in pool:
        xs.append(images[torch.randint(len(images), (per_class,), generator=gen, device=gen.device)])
        ys.append(torch.full((per_class,), cls, device=images.device))
    return torch.cat(xs), torch.cat(ys)


def initial_params(model: nn.Module) -> Params:
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


def learn_sequence(model: LayeredModel, params: Params, pools: list[Pool], steps: int, per_class: int,
                   lr: torch.Tensor, momentum: torch.Tensor, gen: torch.Generator, differentiable: bool,
                   after_task: Callable[[int, Params], None] | None = None) -> Params:
    """SGD with momentum through the tasks' pools in order; with ``differentiable`` the returned parameters
    keep the graph back to the pools, lr and momentum (the meta-gradient's path)."""
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    for t, pool in enumerate(pools):
        for _ in range(steps):
            x, y = draw_batch(pool, per_class, gen)
            loss = nn.functional.cross_entropy(functional_call(model, params, (x, 0)), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
            velocity = {n: momentum * v + g for (n, v), g in zip(velocity.items(), grads)}
            params = {n: p - lr * velocity[n] for n, p in params.items()}
            if not differentiable:
                params = {n: p.detach().requires_grad_() for n, p in params.items()}
                velocity = {n: v.detach() for n, v in velocity.items()}
        if after_task is not None:
            after_task(t, params)
    return params


def sequence_loss(generator: ConditionalGenerator, hyper: InnerOptimiser, model: LayeredModel,
                  task_classes: list[list[int]], real_x: torch.Tensor, real_y: torch.Tensor, cfg: SyntheticConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """The meta-objective: S learns the tasks from G's samples only, then its loss on real images."""
    pools = [generator.pool(classes, cfg.samples_per_class, gen) for classes in task_classes]
    params = learn_sequence(model, initial_params(model), pools, cfg.inner_steps, cfg.batch_per_class, hyper.lr,
                            hyper.momentum, gen, differentiable=True)
    return nn.functional.cross_entropy(functional_call(model, params, (real_x, 0)), real_y)


# ------------------------------------------------------------------------------------- meta-training
class RealImages:
    """The scenario's images on the device, standardised, grouped by class (the real source and the meta-loss)."""

    def __init__(self, data: ImageData, device: torch.device, test_per_class: int = 0) -> None:
        mean, std = data.channel_stats()
        self.mean, self.std = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
        self.x_train = self.standardise(data.x_train.to(device))
        self.y_train = data.y_train.to(device).long()
        rows = torch.arange(len(data.y_test))
        if test_per_class:  # the first rows of each class: the same evaluation batch for every source and seed
            rows = torch.cat([rows[data.y_test == c][:test_per_class] for c in range(data.num_classes)])
        self.x_test = self.standardise(data.x_test[rows].to(device))
        self.y_test = data.y_test[rows].to(device).long()
        self.by_class = {c: self.x_train[self.y_train == c] for c in range(data.num_classes)}
        self.shape: tuple[int, int, int] = tuple(data.x_train.shape[1:])
        self.n_classes = data.num_classes

    def standardise(self, x_uint8_or_01: torch.Tensor) -> torch.Tensor:
        x = x_uint8_or_01.float() / 255 if x_uint8_or_01.dtype == torch.uint8 else x_uint8_or_01
        return (x - self.mean) / self.std

    def pool(self, classes: list[int]) -> Pool:
        return [(c, self.by_class[c]) for c in classes]

    def meta_batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self.x_train), (n,), generator=gen, device=gen.device)
        return self.x_train[rows], self.y_train[rows]


def step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """One RNG per (seed, meta-step): a resumed meta-training draws exactly what an uninterrupted one would."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step)
    return gen


def fresh_learner(kind: str, real: RealImages, cfg: SyntheticConfig, seed: int) -> LayeredModel:
    torch.manual_seed(seed)
    return learner(kind, real.shape, real.n_classes, cfg).to(real.x_train.device)


def meta_train(real: RealImages, task_classes: list[list[int]], cfg: SyntheticConfig, seed: int, run_dir: Path,
               progress: bool) -> tuple[ConditionalGenerator, InnerOptimiser, list[float]]:
    """Train G (and the inner lr and momentum); checkpointed every ``checkpoint_every`` steps, resumable."""
    device = real.x_train.device
    torch.manual_seed(seed)
    generator = ConditionalGenerator(real.n_classes, real.shape, cfg.latent, cfg.generator_hidden).to(device)
    hyper = InnerOptimiser(cfg.init_lr, cfg.init_momentum).to(device)
    opt = torch.optim.Adam([*generator.parameters(), *hyper.parameters()], lr=cfg.meta_lr)
    path, losses, start = run_dir / "generator.pt", [], 0
    if path.exists():
        state = safe_load(path, map_location=device)
        generator.load_state_dict(state["generator"])
        hyper.load_state_dict(state["hyper"])
        opt.load_state_dict(state["optimizer"])
        losses, start = state["meta_loss"], state["step"]
    bar = tqdm(range(start, cfg.meta_steps), desc="meta-training G", disable=not progress, initial=start,
               total=cfg.meta_steps)
    for step in bar:
        gen = step_generator(device, seed, step)
        order = torch.randperm(len(task_classes), generator=gen, device=device).tolist()
        model = fresh_learner("conv", real, cfg, seed * 100_003 + step)
        x, y = real.meta_batch(cfg.meta_batch, gen)
        loss = sequence_loss(generator, hyper, model, [task_classes[t] for t in order], x, y, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.meta_clip:
            nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.meta_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{hyper.lr.item():.3f}", mom=f"{hyper.momentum.item():.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.meta_steps:
            atomic_save({"generator": generator.state_dict(), "hyper": hyper.state_dict(),
                         "optimizer": opt.state_dict(), "meta_loss": losses, "step": step + 1}, path)
    return generator, hyper, losses


def fit_cvae(real: RealImages, cfg: SyntheticConfig, seed: int, run_dir: Path, progress: bool) -> ConditionalVAE:
    path = run_dir / "cvae.pt"
    torch.manual_seed(seed)
    cvae = ConditionalVAE(real.n_classes, real.shape).to(real.x_train.device)
    if path.exists():
        cvae.load_state_dict(safe_load(path, map_location=real.x_train.device))
        return cvae.eval()
    x01 = real.x_train * real.std + real.mean  # back to [0, 1] pixels
    opt = torch.optim.Adam(cvae.parameters(), lr=1e-3)
    gen = step_generator(x01.device, seed, -1)
    for _ in tqdm(range(cfg.cvae_epochs), desc="conditional VAE", disable=not progress, leave=False):
        for rows in torch.randperm(len(x01), generator=gen, device=gen.device).split(128):
            loss = cvae.loss(x01[rows], real.y_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    atomic_save(cvae.state_dict(), path)
    return cvae.eval()


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy_matrix_row(model: LayeredModel, params: Params, real: RealImages, task_classes: list[list[int]]
                        ) -> list[float]:
    """Accuracy on each task's test images (argmax over all 10 classes), from one pass of the whole test set."""
    pred = functional_call(model, params, (real.x_test, 0)).argmax(1)
    hits = pred == real.y_test
    return [hits[torch.isin(real.y_test, torch.tensor(c, device=hits.device))].float().mean().item()
            for c in task_classes]


def source_pools(source: str, task_classes: list[list[int]], real: RealImages, cfg: SyntheticConfig,
                 generator: ConditionalGenerator, cvae: ConditionalVAE | None, gen: torch.Generator) -> list[Pool]:
    if source == "real":
        return [real.pool(c) for c in task_classes]
    if source == "synthetic":
        with torch.no_grad():
            return [[(c, x.detach()) for c, x in generator.pool(classes, cfg.samples_per_class, gen)]
                    for classes in task_classes]
    labels = [torch.full((cfg.samples_per_class,), c, device=gen.device) for c in range(real.n_classes)]
    return [[(c, real.standardise(cvae.sample(labels[c], gen))) for c in classes] for classes in task_classes]


def evaluate(source: str, kind: str, steps: int, real: RealImages, task_classes: list[list[int]],
             cfg: SyntheticConfig, generator: ConditionalGenerator, hyper: InnerOptimiser,
             cvae: ConditionalVAE | None, seed: int) -> np.ndarray:
    """acc[r, i, j]: learner r's accuracy (%) on task j's classes after learning tasks 0..i from ``source``."""
    lr, momentum = hyper.lr.detach(), hyper.momentum.detach()
    out = np.zeros((cfg.eval_learners, len(task_classes), len(task_classes)))
    for r in range(cfg.eval_learners):
        gen = step_generator(real.x_train.device, seed, 10_000_000 + r)
        pools = source_pools(source, task_classes, real, cfg, generator, cvae, gen)
        model = fresh_learner(kind, real, cfg, seed * 7919 + r)

        def record(t: int, params: Params) -> None:
            out[r, t] = 100 * np.asarray(accuracy_matrix_row(model, params, real, task_classes))

        learn_sequence(model, initial_params(model), pools, steps, cfg.batch_per_class, lr, momentum, gen,
                       differentiable=False, after_task=record)
    return out


def seen_accuracy(acc: np.ndarray, task_classes: list[list[int]], real: RealImages) -> np.ndarray:
    """Per learner and task i: accuracy on the test images of tasks 0..i (weighted by their sizes)."""
    sizes = np.array([sum(int((real.y_test == c).sum()) for c in cls) for cls in task_classes], dtype=float)
    return np.stack([(acc[:, i, : i + 1] * sizes[: i + 1]).sum(1) / sizes[: i + 1].sum()
                     for i in range(acc.shape[1])], 1)


# --------------------------------------------------------------------------------------------- a run
def run_synthetic(cfg: RunConfig, seed: int, data: ImageData, progress: bool = True) -> Path:
    """Meta-train G for one seed, then every (source, learner) through the task sequence; CSVs in the run dir."""
    sc = cfg.synthetic
    device = resolve_device(cfg.device)
    run_dir = seed_dir(cfg, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg, seed)
    task_classes = [t.classes for t in build_scenario(cfg, data).tasks]
    real = RealImages(data, device, sc.test_per_class)
    generator, hyper, losses = meta_train(real, task_classes, sc, seed, run_dir, progress)
    cvae = fit_cvae(real, sc, seed, run_dir, progress) if "generative" in sc.sources else None
    curves, finals = [], []
    jobs = [(s, k) for s in sc.sources for k in sc.learners]
    for source, kind in tqdm(jobs, desc="sources x learners", disable=not progress, leave=False):
        for steps in sorted(set(sc.eval_inner_steps) | {sc.inner_steps}):
            acc = evaluate(source, kind, steps, real, task_classes, sc, generator, hyper, cvae, seed)
            seen = seen_accuracy(acc, task_classes, real)
            finals.append({"source": source, "learner": kind, "inner_steps": steps,
                           "final_acc": float(seen[:, -1].mean())})
            if steps == sc.inner_steps:
                last = acc.shape[1] - 1
                forgetting = np.mean([acc[:, j, j] - acc[:, last, j] for j in range(last)])
                curves += [{"source": source, "learner": kind, "after_task": i, "seen_acc": float(seen[:, i].mean()),
                            "just_trained": float(acc[:, i, i].mean()), "forgetting": float(forgetting)}
                           for i in range(acc.shape[1])]
    pd.DataFrame(curves).to_csv(run_dir / "seen_accuracy.csv", index=False)
    pd.DataFrame(finals).to_csv(run_dir / "inner_steps.csv", index=False)
    (run_dir / "meta.json").write_text(json.dumps({"meta_loss": losses, "lr": hyper.lr.item(),
                                                   "momentum": hyper.momentum.item(), "task_classes": task_classes}))
    plot_samples(run_dir, generator, cvae, real, seed)
    print(f"[{cfg.name} seed {seed}] learned lr {hyper.lr.item():.3f}, momentum {hyper.momentum.item():.2f}; final "
          + ", ".join(f"{f['source']}/{f['learner']} {f['final_acc']:.1f}%" for f in finals
                      if f["inner_steps"] == sc.inner_steps), flush=True)
    return run_dir


# -------------------------------------------------------------------------------------- aggregation
def aggregate_synthetic(scenario_dir: str | Path) -> str:
    """The forgetting table and final accuracy by inner steps (mean ± std over seeds); Figures 2.4.2 and 2.4.3."""
    scenario_dir = Path(scenario_dir)
    runs = seed_dirs(scenario_dir, FINISHED)
    if not runs:
        return ""
    curves = pd.concat([pd.read_csv(r / "seen_accuracy.csv").assign(seed=r.name) for r in runs])
    finals = pd.concat([pd.read_csv(r / "inner_steps.csv").assign(seed=r.name) for r in runs])
    for frame in (curves, finals):
        frame["row"] = frame.learner + " learner, " + frame.source
    cols = {"seen_acc": "final accuracy, all classes", "forgetting": "forgetting (just trained − final)",
            "just_trained": "last task just trained"}
    last = curves[curves.after_task == curves.after_task.max()]
    n_learners = load_run_config(runs[0])["synthetic"].get("eval_learners", 5)
    notes = [f"seeds: {[r.name for r in runs]}, each the mean of {n_learners} fresh learners",
             "class-incremental split MNIST, one 10-way head; accuracy in %",
             "thesis finding: the synthetic sequence is forgotten far less than the real one"]
    forgetting = [g.set_index("row")[list(cols)].rename(columns=cols) for _, g in last.groupby("seed")]
    by_steps = [g.pivot(index="row", columns="inner_steps", values="final_acc").loc[g.row.unique()]
                for _, g in finals.groupby("seed")]
    md = [write_table(*aggregate(forgetting), len(runs), scenario_dir / f"{scenario_dir.name}_forgetting",
                             f"{scenario_dir.name}: learning split MNIST from each source (thesis chapter 2)", notes),
          write_table(*aggregate(by_steps), len(runs), scenario_dir / f"{scenario_dir.name}_inner_steps",
                             f"{scenario_dir.name}: final accuracy, all classes, by inner steps per task "
                             "(Figure 2.4.3)", notes[:2])]
    plot_per_learner(curves.assign(tasks=curves.after_task + 1), "tasks", "seen_acc",
                     scenario_dir / f"{scenario_dir.name}_seen_accuracy.png", "Fig. 2.4.2",
                     xlabel="tasks learned", ylabel="accuracy on seen classes (%)")
    plot_per_learner(finals, "inner_steps", "final_acc", scenario_dir / f"{scenario_dir.name}_inner_steps.png",
                     "Fig. 2.4.3", xscale="log", xlabel="inner steps per task", ylabel="final accuracy, all classes (%)")
    return "\n".join(md)


def plot_per_learner(frame: pd.DataFrame, x: str, y: str, path: Path, figure: str, **axis: Any) -> None:
    """One panel per learner, one line per source: ``y`` against ``x``, averaged over seeds."""
    plt = pyplot()
    kinds = list(dict.fromkeys(frame.learner))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for source, part in frame[frame.learner == kind].groupby("source", sort=False):
            mean = part.groupby(x)[y].mean()
            ax.plot(mean.index, mean.values, marker="o", label=source)
        ax.set(title=f"{kind} learner ({figure})", ylim=(0, 100), **axis)
    save_figure(fig, axes[0], path)


def plot_samples(run_dir: Path, generator: ConditionalGenerator, cvae: ConditionalVAE | None, real: RealImages,
                 seed: int) -> None:
    """Ten samples per class from G (and the conditional VAE), to look at what the learner is taught with."""
    plt = pyplot()
    gen = step_generator(real.x_train.device, seed, -2)
    labels = torch.arange(real.n_classes, device=gen.device).repeat_interleave(10)
    rows = [("G (meta-learned)", generator(torch.randn(len(labels), generator.latent, generator=gen,
                                                                 device=gen.device), labels).detach())]
    if cvae is not None:
        rows.append(("conditional VAE", real.standardise(cvae.sample(labels, gen))))
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 5), squeeze=False)
    for ax, (title, x) in zip(axes[0], rows):
        x = x[:, 0].view(real.n_classes, 10, *x.shape[-2:]).permute(0, 2, 1, 3).reshape(real.n_classes * x.shape[-2], -1)
        ax.imshow(x.cpu().numpy(), cmap="gray")
        ax.set(title=title, xticks=[], yticks=[])
    write_figure(fig, run_dir / "samples.png", dpi=100)


def summary(scenario_dir: Path, cfg: RunConfig) -> str:
    """What ``cltunnel run`` prints: the forgetting table over the scenario's seeds."""
    return (scenario_dir / f"{scenario_dir.name}_forgetting.md").read_text()


register_protocol(Protocol("synthetic", "synthetic", run_synthetic, aggregate_synthetic, FINISHED, summary,
                           trains_model_section=False, outputs=OUTPUTS, place=90))
