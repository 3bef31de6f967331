"""The default protocol: tasks in sequence (split CIFAR-10 5/5 and the like), its analyses, its tables
over seeds, and its report across a sweep's configurations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cltunnel.config import RunConfig
from cltunnel.data.images import ImageData
from cltunnel.experiments.analyses import aggregate_seeds, run_analyses
from cltunnel.experiments import block_sweep, shallow, temperature  # noqa: F401  (they register sweep reports)
from cltunnel.experiments.registry import TASK_SEQUENCE, Protocol, register_protocol, sweep_reports
from cltunnel.reports.captions import declare_written
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import aggregate, forgetting_frame, render, write_table
from cltunnel.store import CKA_M1_M2, METRICS_FILE, load_manifest, load_metrics, seed_dir, seed_dirs
from cltunnel.training.loop import train_task_sequence


def run_seed(cfg: RunConfig, seed: int, data: ImageData, progress: bool = True, stop_after: int | None = None
             ) -> Path:
    """Train (or resume) one seed's tasks; once every task is done, the analyses named in ``analyses.run``."""
    run_dir, finished = train_task_sequence(cfg, seed, data, progress, stop_after)
    if finished and cfg.analyses.run:
        run_analyses(run_dir, cfg.analyses.run, cfg.device, cfg.analyses, progress, data)
    return run_dir


def aggregate_scenario(scenario_dir: Path) -> str:
    """Mean ± std tables over the finished seeds (with more than one) and the analyses' tables over seeds."""
    md = render(scenario_dir) if len(seed_dirs(scenario_dir)) > 1 else ""
    return "\n".join([md, *aggregate_seeds(scenario_dir)])


def summary(scenario_dir: Path, cfg: RunConfig) -> str:
    """What ``cltunnel run`` prints: the accuracy and forgetting tables of the seed, or over the seeds."""
    return render(seed_dir(cfg, cfg.seeds[0]) if len(cfg.seeds) == 1 else scenario_dir)


def sweep_report(sweep_dir: Path, manifest: dict[str, Any]) -> str:
    """Per configuration: its mean ± std tables and analyses; across them: the summary table, the per-layer
    CKA (M1 vs M2) of every configuration side by side, and the registered sweep reports that apply (the depth
    report of a shallow-network sweep, the temperature report of a temperature sweep, the block-structure
    grids where runs have them)."""
    for config in manifest["configs"]:
        if seed_dirs(sweep_dir / config):
            render(sweep_dir / config)
            aggregate_seeds(sweep_dir / config)
    mean, std, labels = summary_frames(sweep_dir)
    if mean.empty:
        return f"{sweep_dir}: no finished runs yet"
    n = int(labels["seeds"].max())
    notes = [f"seeds per configuration: {dict(labels['seeds'])}",
             "avg forgetting: mean over all tasks but the last of (accuracy right after the task - after the last)"]
    md = write_table(mean, std, n, sweep_dir / "summary", f"{manifest['name']}: accuracy and forgetting (%)", notes)
    md += _combined_cka(sweep_dir, list(manifest["configs"]))
    for report in sweep_reports(sweep_dir, manifest):  # depth, temperature, block structure: where they apply
        md += "\n" + report
    return md


register_protocol(Protocol(TASK_SEQUENCE, None, run_seed, aggregate_scenario, METRICS_FILE, summary, sweep_report))
declare_written({
    "cka_m1_m2.png": "Linear CKA between layers (thesis §5.6): where the network moved while learning task 2.",
    "summary.md": "Every configuration of the sweep: average accuracy and forgetting.",
}, place=60)


def summary_frames(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One row per configuration: average final accuracy, average forgetting, final accuracy per task
    (mean and std over its finished seeds), with the axis labels as columns."""
    manifest = load_manifest(sweep_dir)
    rows_mean, rows_std, labels = {}, {}, {}
    for config, info in manifest["configs"].items():
        metrics = [load_metrics(r) for r in seed_dirs(sweep_dir / config)]
        if not metrics:
            continue
        frames = [_summary_row(m["acc"]) for m in metrics]
        mean, std = aggregate(frames)
        if len(frames) == 1:
            std.iloc[0] = np.nan  # one seed: shown without ± while other rows keep theirs
        rows_mean[config], rows_std[config] = mean.iloc[0], std.iloc[0]
        labels[config] = {**info["labels"], "seeds": len(metrics)}
    mean, std = pd.DataFrame(rows_mean).T, pd.DataFrame(rows_std).T
    return mean, std, pd.DataFrame(labels).T


def _summary_row(acc: list[list[float]]) -> pd.DataFrame:
    frame = forgetting_frame(acc)
    row = {"avg acc": frame.loc["average", "after last task"], "avg forgetting": frame.loc["average", "forgetting"]}
    row.update({f"{task} final": v for task, v in frame["after last task"].drop("average").items()})
    return pd.DataFrame([row])


def _combined_cka(sweep_dir: Path, configs: list[str]) -> str:
    per_config = {}
    for config in configs:
        path = sweep_dir / config / f"{config}_{CKA_M1_M2}"
        if path.exists():
            frame = pd.read_csv(path, header=[0, 1], index_col=0)
            column = frame["mean"].iloc[:, 0]
            column.index = [int(str(label).split()[0]) for label in column.index]  # "3 conv3" -> 3
            per_config[config] = column
    if not per_config:
        return ""
    table = pd.DataFrame(per_config).sort_index()  # by layer number: models of other depths share the rows
    table.index.name = "layer"
    table.to_csv(sweep_dir / CKA_M1_M2)
    _plot_cka(table, sweep_dir / "cka_m1_m2.png")
    md = "\n### CKA between the model after task 1 and after task 2, per layer (task-1 test data, mean over seeds)\n\n"
    md += table.round(3).to_markdown() + "\n"
    (sweep_dir / "cka_m1_m2.md").write_text(md)
    return md


def _plot_cka(table: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for config in table.columns:
        ax.plot(table.index, table[config].to_numpy(), marker="o", ms=3, label=config)
    ax.set(xlabel="layer", ylabel="CKA(M1, M2)", ylim=(0, 1.05), title="where each configuration let the network move")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    write_figure(fig, path)
