"""Feature erosion (thesis chapter 4): a shortcut learned late erodes the features learned before it.

Pre-train on clean images, then keep training, same hyper-parameters, on images where a small square in a
fixed corner has a colour that encodes the class. Clean test accuracy falls while squared test accuracy
rises: the network swaps its features for the shortcut. Optionally a third, clean phase measures loss of
plasticity against a model trained from scratch on the same budget.

Phases are the run's "tasks" as far as checkpoints go (``task<i>.pt`` after phase i), so an interrupted
run resumes after its last finished phase. Outputs: ``erosion_curve.csv/.png`` (clean and squared test
accuracy every ``eval_every`` epochs across phases, Figure 4.1.1), ``erosion_profile.csv/.png`` (probe
accuracy and rank per layer before/after, Figure 4.2.2), ``erosion_cka.csv/.png`` (layer-by-layer CKA between
the model before and after, Figure 4.2.1) and ``erosion_summary.json/.md``.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cltunnel.config import ConfigError, RunConfig, register_section
from cltunnel.data.device import DeviceData, resolve_device
from cltunnel.data.images import ImageData
from cltunnel.data.scenarios import avalanche_benchmark, build_scenario
from cltunnel.experiments.analyses import LoadedRun, cross_cka_matrix, plot_cka_matrix, tunnel_profile
from cltunnel.models.layered import LayeredModel
from cltunnel.models.zoo import make_model, model_spec
from cltunnel.reports.figures import pyplot, save_figure, write_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.experiments.registry import Protocol, register_protocol
from cltunnel.store import (EROSION_SUMMARY, load_run_config, partial_checkpoint_path, save_metrics, save_run_config,
                            seed_dir, seed_dirs)
from cltunnel.training.checkpoints import (latest_checkpoint, load_checkpoint, load_model_state, load_partial_task,
                                           model_from_checkpoint, save_partial_task, save_task_checkpoint)
from cltunnel.training.plain_state import decode
from cltunnel.training.accuracy import predict_accuracy
from cltunnel.training.fast_data import RunContext, TemperatureCrossEntropy, amp_enabled, channels_last_enabled
from cltunnel.training.plugins import MidTaskResumePlugin, ProgressPlugin, TestCurvePlugin
from cltunnel.training.strategies import build_strategy


PHASES = ("clean", "squared", "relearn")
FINISHED = EROSION_SUMMARY  # in a seed directory: written after the before/after analyses
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
OUTPUTS = {  # what the page says under each figure (run, scenario and sweep pages)
    "erosion_curve.png": "Feature erosion (thesis ch. 4): clean and squared test accuracy over the phases' epochs.",
    "erosion_profile.png": "Probe accuracy per layer before and after erosion (thesis ch. 4).",
    "erosion_cka.png": "CKA per layer between the models before and after erosion (thesis ch. 4).",
    "erosion_ratio.png": "Erosion against the share of squared training images (thesis ch. 4).",
}


# ------------------------------------------------------------------------------------ config section
@dataclasses.dataclass
class ErosionConfig:
    """``erosion:`` (thesis chapter 4): pre-train clean, then keep training on images whose corner square's
    colour encodes the class; optionally clean again (loss of plasticity, against training from scratch)."""

    ratio: float = 1.0  # share of training images that carry the square
    square: int = 4  # side of the square, pixels
    corner: str = "top_left"  # top_left | top_right | bottom_left | bottom_right
    pretrain_epochs: int = 160
    erosion_epochs: int = 160
    relearn_epochs: int = 0  # > 0: a third, clean phase, and a model trained from scratch for as many epochs
    eval_every: int = 1  # epochs between clean/squared test evaluations

    def validate(self, cfg: RunConfig) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"erosion.ratio: a share of training images in [0, 1], got {self.ratio}")
        if self.corner not in CORNERS:
            raise ConfigError(f"erosion.corner: '{self.corner}' is not one of {', '.join(CORNERS)}")
        if (self.square < 1 or self.pretrain_epochs < 0 or self.erosion_epochs < 1 or self.relearn_epochs < 0
                or self.eval_every < 1):
            raise ConfigError("erosion: square, erosion_epochs and eval_every must be at least 1; epochs not negative")
        if cfg.scenario.tasks is not None and len(cfg.scenario.tasks) != 1 or cfg.scenario.n_tasks not in (None, 1):
            raise ConfigError("erosion: runs on one task holding every class (scenario: {tasks: [10]}), "
                              f"got scenario.tasks={cfg.scenario.tasks}, n_tasks={cfg.scenario.n_tasks}")


register_section("erosion", ErosionConfig, order=10, listed_when_unset=True)


# ----------------------------------------------------------------------------------------- squares
def square_colours(n_classes: int, seed: int = 0) -> torch.Tensor:
    """One RGB colour per class (uint8, n × 3): the 10 tab10 colours first, then seeded random ones."""
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
             (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    extra = torch.randint(0, 256, (max(0, n_classes - 10), 3), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor(tab10, dtype=torch.uint8), extra.to(torch.uint8)])[:n_classes]


def add_squares(x: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, size: int, corner: str,
                colours: torch.Tensor) -> torch.Tensor:
    """A copy of uint8 images ``x`` (N, C, H, W) where the rows in ``rows`` carry their class's square.
    Single-channel images get the colour's mean."""
    out = x.clone()
    h, w = x.shape[2], x.shape[3]
    ys = slice(0, size) if corner.startswith("top") else slice(h - size, h)
    xs = slice(0, size) if corner.endswith("left") else slice(w - size, w)
    colour = colours[labels[rows]].to(x.device)  # (n, 3)
    if x.shape[1] == 1:
        colour = colour.float().mean(1, keepdim=True).round().to(torch.uint8)
    out[rows, :, ys, xs] = colour[:, :, None, None]
    return out


def squared_rows(n: int, ratio: float, seed: int) -> torch.Tensor:
    """Which training rows carry the square: a fixed random ``ratio`` share (round(ratio × n) rows)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: round(ratio * n)].sort().values


class Squares:
    """Stamps the class's square on the chosen training rows of a batch, after augmentation (so the square
    sits in its corner whatever the random crop), and on every test image once."""

    def __init__(self, data: ImageData, ratio: float, size: int = 4, corner: str = "top_left", seed: int = 0,
                 train_rows: torch.Tensor | None = None) -> None:
        pool = train_rows if train_rows is not None else torch.arange(len(data.y_train))
        self.rows = pool[squared_rows(len(pool), ratio, seed)]
        self.flag = torch.zeros(len(data.y_train), dtype=torch.bool)
        self.flag[self.rows] = True
        self.labels, self.size, self.corner = data.y_train, size, corner
        self.colours = square_colours(data.num_classes)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flag, labels = self.flag.to(idx.device)[idx], self.labels.to(idx.device)[idx]
        return add_squares(x, labels, torch.nonzero(flag).flatten(), self.size, self.corner, self.colours)

    def test_images(self, data: ImageData) -> ImageData:
        """``data`` with every test image squared (normalisation and training images unchanged)."""
        return data.with_test_images(add_squares(data.x_test, data.y_test, torch.arange(len(data.y_test)), self.size,
                                                 self.corner, self.colours), f"{data.name}+squares")


# ------------------------------------------------------------------------------------------ training
def phase_plan(cfg: RunConfig) -> list[tuple[str, int]]:
    e = cfg.erosion
    plan = [("clean", e.pretrain_epochs), ("squared", e.erosion_epochs)]
    return plan + ([("relearn", e.relearn_epochs)] if e.relearn_epochs else [])


def run_erosion(cfg: RunConfig, seed: int, data: ImageData, progress: bool = True) -> Path:
    """Train (or resume) the phases of one seed, then the before/after analyses; returns the run directory."""
    device = resolve_device(cfg.device)
    run_dir = seed_dir(cfg, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg, seed)
    scenario = build_scenario(cfg, data)
    squares = Squares(data, cfg.erosion.ratio, cfg.erosion.square, cfg.erosion.corner, seed,
                      scenario.tasks[0].train_idx)
    views = {name: DeviceData.create(build_scenario(cfg, d), device, cfg.training.augment,
                                     channels_last_enabled(cfg.training, device))
             for name, d in (("clean", data), ("squared", squares.test_images(data)))}
    views["squared"].overlay = squares
    spec = model_spec(cfg, scenario)
    model = make_model(spec, seed).to(device)
    state = latest_checkpoint(run_dir, cfg)
    metrics = {"scenario": cfg.name, "seed": seed, "device": str(device), "acc": [], "curve": [],
               "phases": [p for p, _ in phase_plan(cfg)], "n_squared_train": len(squares.rows),
               "n_train": len(scenario.tasks[0].train_idx), "n_test": len(scenario.tasks[0].test_idx)}
    if state is not None:
        load_model_state(model, state)
        metrics = state["metrics"]
    for i, (phase, epochs) in enumerate(phase_plan(cfg)):
        if i < len(metrics["acc"]):
            continue
        train_phase(cfg, model, views, "squared" if phase == "squared" else "clean", phase, epochs, seed * 101 + i,
                    metrics["curve"], progress, (run_dir, i))
        metrics["acc"].append([predict_accuracy(model, views["clean"], views["clean"].scenario.tasks[0])])
        save_task_checkpoint(run_dir, i, model, None, cfg, seed, metrics, spec)  # each phase builds its own optimizer
    if cfg.erosion.relearn_epochs and "scratch" not in metrics:
        metrics["scratch"] = []
        scratch = make_model(spec, seed + 1_000).to(device)
        train_phase(cfg, scratch, views, "clean", "scratch", cfg.erosion.relearn_epochs, seed * 101 + 99,
                    metrics["scratch"], progress, (run_dir, len(phase_plan(cfg))))
    save_metrics(run_dir, metrics)
    write_erosion_outputs(run_dir, cfg, metrics, views, progress)
    return run_dir


def train_phase(cfg: RunConfig, model: LayeredModel, views: dict[str, DeviceData], train_on: str, phase: str,
                epochs: int, rng_seed: int, curve: list[dict[str, Any]], progress: bool,
                resume_at: tuple[Path, int] | None = None) -> None:
    """``epochs`` epochs of the scenario's strategy on the ``train_on`` images, a fresh optimizer, same
    hyper-parameters; test accuracies appended to ``curve``. With ``resume_at`` (run directory, phase index)
    and ``training.resume_every``, a phase killed part-way continues at its last saved epoch."""
    if epochs == 0:
        return
    device = views["clean"].device
    tcfg = dataclasses.replace(cfg.training, epochs=epochs)
    amp = amp_enabled(tcfg, device)
    recorder = TestCurvePlugin(views, curve, cfg.erosion.eval_every, epochs)
    recorder.phase, recorder.offset = phase, max([r["epoch"] for r in curve], default=0)
    run_dir, index = resume_at if resume_at else (None, 0)
    resume = MidTaskResumePlugin(tcfg.resume_every if run_dir else 0, epochs, lambda t, done: save_partial_task(
        run_dir, t, done, model, strategy, cfg, {"curve": curve, "offset": recorder.offset}))
    strategy = build_strategy(cfg.strategy, model, tcfg, TemperatureCrossEntropy(tcfg.temperature), device,
                              [ProgressPlugin(progress, label=f"{phase} phase"), recorder, resume],
                              RunContext(views[train_on], rng_seed, amp))
    state = load_partial_task(run_dir, index, cfg) if run_dir else None
    resume.start_task(index, state, model)
    if state is not None:
        curve[:] = decode(state["extra"]["curve"], None, None)
        recorder.offset = state["extra"]["offset"]
    data = views[train_on].scenario
    mean, std = data.data.channel_stats()
    torch.manual_seed(rng_seed)
    strategy.train_epochs = epochs - resume.epochs_done
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        strategy.train(avalanche_benchmark(data, mean, std).train_stream[0], eval_streams=[])
    if run_dir is not None:
        partial_checkpoint_path(run_dir, index).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ outputs
def write_erosion_outputs(run_dir: Path, cfg: RunConfig, metrics: dict[str, Any], views: dict[str, DeviceData],
                          progress: bool) -> dict[str, Any]:
    curve = pd.DataFrame(metrics["curve"])
    curve.to_csv(run_dir / "erosion_curve.csv", index=False)
    plot_curve(curve, pd.DataFrame(metrics.get("scratch") or []), run_dir / "erosion_curve.png", cfg.name)
    summary = erosion_summary(curve, metrics)
    if "tunnel" in cfg.analyses.run or "cka" in cfg.analyses.run:
        summary.update(before_after(run_dir, cfg, views, progress))
    (run_dir / FINISHED).write_text(json.dumps(summary, indent=1))
    rows = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items())
    (run_dir / "erosion_summary.md").write_text(
        f"### {cfg.name}: feature erosion (seed {metrics['seed']})\n\n| | |\n|:--|--:|\n{rows}\n\n"
        f"- squares on {metrics['n_squared_train']} of {metrics['n_train']} training images (ratio "
        f"{cfg.erosion.ratio}); test accuracies on {metrics['n_test']} test images, clean and all-squared\n")
    return summary


def erosion_summary(curve: pd.DataFrame, metrics: dict[str, Any]) -> dict[str, Any]:
    """Accuracies at the phase ends (%); forgetting = clean accuracy lost in the squared phase."""
    ends = curve.groupby("phase", sort=False).last()
    out: dict[str, Any] = {}
    for phase in ends.index:
        for col in [c for c in ends.columns if c != "epoch"]:
            out[f"{col} after {phase}"] = float(ends.loc[phase, col])
    if "clean" in ends.index:
        out["clean forgetting"] = out["clean after clean"] - out["clean after squared"]
    if metrics.get("scratch"):
        out["clean after scratch"] = float(metrics["scratch"][-1]["clean"])
    return out


def plot_curve(curve: pd.DataFrame, scratch: pd.DataFrame, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for col, style in (("clean", "-"), ("squared", "--")):
        ax.plot(curve["epoch"], curve[col], style, label=f"{col} test images")
    if "train" in curve:
        ax.plot(curve["epoch"], curve["train"], color="grey", lw=0.8, label="training images of the phase")
    if not scratch.empty:
        start = curve[curve["phase"] == "relearn"]["epoch"].min() - 1
        ax.plot(scratch["epoch"] + start, scratch["clean"], ":", label="from scratch, clean test images")
    for boundary in curve.groupby("phase", sort=False)["epoch"].max().to_numpy()[:-1]:
        ax.axvline(boundary, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(0, 100), title=title)
    save_figure(fig, ax, path)


def before_after(run_dir: Path, cfg: RunConfig, views: dict[str, DeviceData], progress: bool) -> dict[str, Any]:
    """Probe accuracy and rank per layer of the model after the clean phase and after the squared phase
    (clean data; analyses.run: tunnel), and the layer-by-layer CKA between the two (analyses.run: cka)."""
    data = DeviceData.create(views["clean"].scenario, views["clean"].device, augment=False, channels_last=False)
    models = [model_from_checkpoint(load_checkpoint(run_dir / f"task{i}.pt")).to(data.device).eval() for i in (0, 1)]
    run = LoadedRun(run_dir, models, data, cfg.analyses, progress)
    out: dict[str, Any] = {}
    if "tunnel" in cfg.analyses.run:
        profiles = {name: tunnel_profile(run, i) for i, name in enumerate(("before", "after"))}
        frame = pd.concat(profiles, axis=1)
        frame.to_csv(run_dir / "erosion_profile.csv")
        plot_profiles(frame, run_dir / "erosion_profile.png")
        for name, p in profiles.items():
            out[f"mean rank {name}"] = float(p["rank"].mean())
    if "cka" in cfg.analyses.run:
        matrix = cross_cka_matrix(run, models[0], models[1])
        matrix.to_csv(run_dir / "erosion_cka.csv")
        plot_cka_matrix(matrix, run_dir / "erosion_cka.png", "CKA: before (rows) vs after erosion (columns)")
        out["mean diagonal CKA"] = float(pd.Series([matrix.iat[i, i] for i in range(len(matrix))]).mean())
    return out


def plot_profiles(frame: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in ("before", "after"):
        axes[0].plot(frame.index, frame[(name, "probe_acc")], marker="o", ms=3, label=name)
        axes[1].plot(frame.index, frame[(name, "rank")], marker="o", ms=3, label=name)
    axes[0].set(xlabel="layer", ylabel="probe accuracy, clean test (%)")
    axes[1].set(xlabel="layer", ylabel="numerical rank", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    write_figure(fig, path)


def aggregate_erosion(scenario_dir: Path) -> str:
    """Mean ± std over seeds of every summary number; the curves of all seeds in one figure."""
    runs = seed_dirs(scenario_dir, FINISHED)
    if not runs:
        return ""
    frames = [pd.DataFrame([json.loads((r / FINISHED).read_text())]).T for r in runs]
    mean, std = aggregate(frames)
    mean.columns = std.columns = ["value"]
    return write_table(mean, std, len(runs), Path(scenario_dir) / "erosion_summary",
                              f"{Path(scenario_dir).name}: feature erosion (%, seeds {[r.name for r in runs]})")


RATIO_COLUMNS = ["clean after clean", "clean after squared", "squared after squared", "clean forgetting"]


def ratio_report(sweep_dir: str | Path) -> str:
    """Forgetting against the share of squared training images (Figure 4.3.1): one row per ratio."""
    sweep_dir = Path(sweep_dir)
    per_ratio: dict[float, list[list[float]]] = {}
    for summary in sorted(sweep_dir.glob(f"*/seed*/{FINISHED}")):
        cfg = load_run_config(summary.parent)
        values = json.loads(summary.read_text())
        per_ratio.setdefault(float(cfg["erosion"]["ratio"]), []).append([values[c] for c in RATIO_COLUMNS])
    if not per_ratio:
        return ""
    ratios = sorted(per_ratio)
    frames = [pd.DataFrame(per_ratio[r], columns=RATIO_COLUMNS) for r in ratios]
    mean = pd.DataFrame([f.mean() for f in frames], index=ratios)
    std = pd.DataFrame([f.std(ddof=1) if len(f) > 1 else f.mean() * 0 for f in frames], index=ratios)
    mean.index.name = std.index.name = "ratio"
    n = min(len(f) for f in frames)
    plot_ratio(mean, std, sweep_dir / "erosion_ratio.png")
    return write_table(mean, std, n, sweep_dir / "erosion_ratio",
                              "Feature erosion by share of squared training images (test accuracy, %)",
                              [f"seeds per ratio: {n} or more"])


def plot_ratio(mean: pd.DataFrame, std: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in ("clean after squared", "squared after squared", "clean forgetting"):
        ax.errorbar(mean.index, mean[col], yerr=std[col], marker="o", ms=4, capsize=3, label=col)
    ax.axhline(mean["clean after clean"].mean(), color="grey", ls=":", label="clean, before the squares")
    ax.set(xlabel="share of training images with the square", ylabel="%", title="feature erosion by ratio")
    save_figure(fig, ax, path)


def summary(scenario_dir: Path, cfg: RunConfig) -> str:
    """What ``cltunnel run`` prints: the erosion summary of the seed, or over the seeds."""
    where = scenario_dir / f"seed{cfg.seeds[0]}" if len(cfg.seeds) == 1 else scenario_dir
    return (where / "erosion_summary.md").read_text()


def sweep_report(sweep_dir: Path, manifest: dict[str, Any]) -> str:
    """Each configuration's summary over seeds, then forgetting against the squared share (Figure 4.3.1)."""
    return "\n".join([aggregate_erosion(sweep_dir / c) for c in manifest["configs"]] + [ratio_report(sweep_dir)])


def epochs(cfg: RunConfig) -> int:
    """Passes over the training images: every phase's epochs, and the scratch model's beside the relearning."""
    e = cfg.erosion
    return e.pretrain_epochs + e.erosion_epochs + 2 * e.relearn_epochs


register_protocol(Protocol("erosion", "erosion", run_erosion, aggregate_erosion, FINISHED, summary, sweep_report,
                           outputs=OUTPUTS, place=30, epochs=epochs))
