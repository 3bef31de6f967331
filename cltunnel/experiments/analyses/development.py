"""How early the tunnel forms (thesis E4): rank per layer at every saved epoch of a task and each layer's
relative weight change between saves (analysis ``development``: ``development.csv``/``.png``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cltunnel.experiments.analyses.loading import LoadedRun
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.measures.probes import layer_ranks
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.store import DEVELOPMENT, epoch_checkpoints
from cltunnel.training.checkpoints import load_checkpoint, model_from_checkpoint


def tunnel_development(run: LoadedRun, task: int = 0) -> pd.DataFrame:
    """Rank per layer at every saved epoch of ``task`` (and at its end), and each layer's relative weight
    change since the previous checkpoint: how early the tunnel forms (thesis E4). Weight change is over the
    layer's parameters only: BatchNorm's running statistics are buffers, and their drift would dominate."""
    paths = epoch_checkpoints(run.run_dir, task)
    if not paths:
        raise FileNotFoundError(f"{run.run_dir}: no epoch checkpoints; set training.checkpoint_every and retrain")
    t = run.data.scenario.tasks[task]
    rows_idx = run.rank_rows(task)
    records, previous = [], None
    for path in tqdm(paths, desc="development", disable=not run.progress, leave=False):
        state = load_checkpoint(path)
        model = model_from_checkpoint(state).to(run.data.device).eval()
        ranks, _ = layer_ranks(model, run.data, t, rows_idx, run.options.probe_protocol, run.options.rank_threshold)
        weights = [layer_parameters(layer) for layer in model.body]
        for k, name in enumerate(model.layer_names, start=1):
            change = np.nan
            if previous is not None:
                now, before = weights[k - 1], previous[k - 1]
                change = float((now - before).norm() / before.norm().clamp_min(1e-12))
            records.append({"epoch": state["epoch"], "layer": k, "name": name,
                            "rank": ranks[k], "weight_change": change})
        previous = weights
    return pd.DataFrame(records)


def layer_parameters(layer: torch.nn.Module) -> torch.Tensor:
    """A layer's parameters as one vector (no buffers)."""
    return torch.cat([p.detach().flatten().float() for p in layer.parameters()])


def plot_development(dev: pd.DataFrame, path: Path) -> None:
    write_figure(development_figure(dev), path)


def development_figure(dev: pd.DataFrame):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    cmap = plt.get_cmap("viridis")
    epochs = sorted(dev["epoch"].unique())
    for i, e in enumerate(epochs):
        d = dev[dev["epoch"] == e]
        color = cmap(i / max(len(epochs) - 1, 1))
        axes[0].plot(d["layer"], d["rank"], color=color, label=f"epoch {e}")
        axes[1].plot(d["layer"], d["weight_change"], color=color)
    axes[0].set_ylabel("numerical rank")
    axes[1].set_ylabel("relative weight change\nsince the last save")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(dev["layer"].unique()))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    return fig


@analysis("development", order=60, outputs={
    "development.png": "The tunnel's development over training (epoch checkpoints)."})
def development_analysis(run: LoadedRun) -> dict[str, Any]:
    dev = tunnel_development(run)
    return {DEVELOPMENT: dev, "development.png": development_figure(dev)}
