"""Accuracy matrices and forgetting tables (CSV + markdown + LaTeX via pandas/tabulate) and their figures.

A run directory holds ``metrics.json``; a scenario directory holds one ``seed<k>/`` run per seed and gets
the same tables as mean ± std over seeds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cltunnel.reports.captions import declare_written
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.store import (ACCURACY_FIGURE, ACCURACY_MATRIX, CL_METRICS_TABLE, CONFIG_FILE, EXACT_ROWS, FORGETTING,
                            METRICS_FILE, load_metrics, load_run_config, seed_dirs)

# Shown in place of FWT in task-incremental runs: before task j, head j has had no gradient, so a[j-1][j] and
# the untrained model's b[j] are both chance and their difference is noise, not transfer.
FWT_TASK_IL = "n/a (head j is untrained before task j)"
STD_NOTE = "mean ± std over seeds; std is the sample standard deviation (ddof 1, divides by n - 1)"


def accuracy_frame(acc: list[list[float]]) -> pd.DataFrame:
    """Row i: after training task i; column j: accuracy (%) on task j."""
    a = 100 * np.asarray(acc, dtype=float)
    return pd.DataFrame(a, index=[f"after task {i}" for i in range(len(a))],
                        columns=[f"task {j}" for j in range(a.shape[1])])


def forgetting_frame(acc: list[list[float]], class_lists: list[list[int]] | None = None) -> pd.DataFrame:
    """Per task: accuracy right after learning it, after the last task, and their difference (forgetting)."""
    a = 100 * np.asarray(acc, dtype=float)
    last = len(a) - 1
    rows = []
    for j in range(a.shape[1]):
        rows.append({"task": f"task {j}" + (f" {class_lists[j]}" if class_lists else ""),
                     "just trained": a[j, j], "after last task": a[last, j],
                     "forgetting": a[j, j] - a[last, j] if j < last else np.nan})
    rows.append({"task": "average", "just trained": np.mean(np.diag(a)), "after last task": a[last].mean(),
                 "forgetting": np.mean([a[j, j] - a[last, j] for j in range(last)]) if last else np.nan})
    return pd.DataFrame(rows).set_index("task")


def cl_metrics_frame(acc: list[list[float]], acc_init: list[float] | None = None,
                     mode: str = "class") -> pd.DataFrame:
    """The continual-learning summary numbers (%) of one accuracy matrix ``a[i][j]`` (after task i, on task
    j; T tasks), with ``acc_init`` the untrained model's accuracy per task (for FWT):

    - ACC = mean_j a[T-1][j]; average incremental accuracy = mean_i (mean_{j<=i} a[i][j]) (Rebuffi et al.)
    - BWT = mean_{j<T-1} (a[T-1][j] - a[j][j]); FWT = mean_{j>=1} (a[j-1][j] - acc_init[j]) (Lopez-Paz & Ranzato)
    - forgetting (last) = mean_{j<T-1} (a[j][j] - a[T-1][j]) = -BWT (the thesis's tables)
    - forgetting (max) = mean_{j<T-1} (max_{j<=l<T-1} a[l][j] - a[T-1][j]) (Chaudhry et al. 2018)

    ``mode`` is the scenario's: in a task-incremental run (``"task"``) FWT is NaN (shown as
    :data:`FWT_TASK_IL`), since a[j-1][j] reads head j before it ever trained, as chance as the untrained model.
    """
    a = 100 * np.asarray(acc, dtype=float)
    n, last = a.shape[1], len(a) - 1
    old = range(min(last, n))
    rows = {
        "ACC": a[last].mean(),
        "BWT": np.mean([a[last, j] - a[j, j] for j in old]) if last else np.nan,
        "FWT": _fwt(a, acc_init) if mode == "class" else np.nan,
        "forgetting (last)": np.mean([a[j, j] - a[last, j] for j in old]) if last else np.nan,
        "forgetting (max)": np.mean([a[j:last, j].max() - a[last, j] for j in old]) if last else np.nan,
        "average incremental accuracy": np.mean([a[i, : i + 1].mean() for i in range(len(a))]),
    }
    return pd.DataFrame({"value": rows})


def _fwt(a: np.ndarray, acc_init: list[float] | None) -> float:
    """Lopez-Paz & Ranzato's FWT (%): NaN without the untrained baseline (runs before cltunnel 0.2), not 0."""
    if acc_init is None or len(a) < 2:
        return np.nan
    return float(np.mean([a[j - 1, j] - 100 * acc_init[j] for j in range(1, len(a))]))


def scenario_mode(run_dir: Path) -> str:
    """``scenario.mode`` from a run's saved config ("task" or "class"); the config default ("task") when the
    run has no config or no mode, as its model was then built with one head per task."""
    if not (Path(run_dir) / CONFIG_FILE).exists():
        return "task"
    return (load_run_config(run_dir).get("scenario") or {}).get("mode", "task")


def run_frames(metrics: dict[str, Any], mode: str = "class") -> dict[str, pd.DataFrame]:
    """Every table of one run; the exact-pixel test rows get their own tables when the data has lossy rows."""
    frames = {ACCURACY_MATRIX: accuracy_frame(metrics["acc"]),
              FORGETTING: forgetting_frame(metrics["acc"], metrics.get("classes")),
              CL_METRICS_TABLE: cl_metrics_frame(metrics["acc"], metrics.get("acc_init"), mode)}
    if metrics.get("acc_lossless"):
        frames[ACCURACY_MATRIX + EXACT_ROWS] = accuracy_frame(metrics["acc_lossless"])
        frames[FORGETTING + EXACT_ROWS] = forgetting_frame(metrics["acc_lossless"], metrics.get("classes"))
        frames[CL_METRICS_TABLE + EXACT_ROWS] = cl_metrics_frame(metrics["acc_lossless"],
                                                                 metrics.get("acc_init_lossless"), mode)
    return frames


def aggregate(frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cell-wise mean and (sample) std over seeds; std is 0 for a single seed."""
    stack = np.stack([f.to_numpy(dtype=float) for f in frames])
    mean = pd.DataFrame(stack.mean(0), index=frames[0].index, columns=frames[0].columns)
    std = pd.DataFrame(stack.std(0, ddof=1) if len(frames) > 1 else np.zeros_like(stack[0]),
                       index=frames[0].index, columns=frames[0].columns)
    return mean, std


def format_mean_std(mean: pd.DataFrame, std: pd.DataFrame, n: int,
                    missing: dict[str, str] | None = None) -> pd.DataFrame:
    """Two decimals, "m ± s" over n > 1 seeds; an undefined cell shows ``missing[row]`` (why it is undefined)
    or "–", never "nan"."""
    def cell(m: float, s: float, row: Any) -> str:
        if np.isnan(m):
            return (missing or {}).get(row, "–")
        return f"{m:.2f}" if n == 1 or np.isnan(s) else f"{m:.2f} ± {s:.2f}"

    return pd.DataFrame([[cell(m, s, row) for m, s in zip(rm, rs)]
                         for row, rm, rs in zip(mean.index, mean.to_numpy(dtype=float), std.to_numpy(dtype=float))],
                        index=mean.index, columns=mean.columns)


def markdown_table(shown: pd.DataFrame, index: bool = True) -> str:
    """A frame of formatted strings as a markdown table, cells exactly as formatted: tabulate's default would
    re-parse "-20.00" as a number and print "-20" (or 15 digits). Labels and text columns left, numbers right."""
    numbers = [shown[c].astype(str).str.match(r"[-+–]?\d|–$").any() for c in shown.columns]
    align = (("left",) if index else ()) + tuple("right" if n else "left" for n in numbers)
    return shown.to_markdown(index=index, disable_numparse=True, colalign=align)


def write_table(mean: pd.DataFrame, std: pd.DataFrame, n_seeds: int, stem: Path, title: str,
                notes: list[str] = (), missing: dict[str, str] | None = None) -> str:
    """Write ``stem``.csv (mean and std columns), .md and .tex; return the markdown. ``missing``: the text of
    an undefined (NaN) cell, by row (why it is undefined)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = {ext: stem.parent / f"{stem.name}.{ext}" for ext in ("csv", "md", "tex")}  # names may hold dots (w0.25)
    pd.concat({"mean": mean, "std": std}, axis=1).to_csv(path["csv"])
    shown = format_mean_std(mean, std, n_seeds, missing)
    md = f"### {title}\n\n" + markdown_table(shown) + "\n"
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    path["md"].write_text(md)
    path["tex"].write_text(shown.to_latex(escape=True, caption=title))
    return md


def render(directory: str | Path) -> str:
    """(Re)write the tables and figure of a run directory or of a scenario directory (all its seeds)."""
    directory = Path(directory)
    runs = [directory] if (directory / METRICS_FILE).exists() else seed_dirs(directory)
    if not runs:
        raise FileNotFoundError(f"{directory}: no {METRICS_FILE} here or in seed*/ subdirectories")
    all_metrics = [load_metrics(r) for r in runs]
    mode = scenario_mode(runs[0])  # a scenario's seeds share one config
    per_run = [run_frames(m, mode) for m in all_metrics]
    names = [k for k in per_run[0] if all(k in f for f in per_run)]
    seeds = [m.get("seed") for m in all_metrics]
    out = []
    for name in names:
        mean, std = aggregate([f[name] for f in per_run])
        notes = _notes(name, all_metrics[0], mode) + ([STD_NOTE] if len(runs) > 1 else [])
        out.append(write_table(mean, std, len(runs), directory / name, _title(name, all_metrics[0], seeds), notes,
                               _missing(name, mode)))
    plot_accuracy_curves(all_metrics, directory / ACCURACY_FIGURE)
    return "\n".join(out)


def _missing(name: str, mode: str) -> dict[str, str] | None:
    """Why a CL-metric table's FWT has no number: the reader sees the reason, not "nan" or a dash."""
    if not name.startswith(CL_METRICS_TABLE):
        return None
    return {"FWT": FWT_TASK_IL if mode == "task" else "n/a (no untrained baseline: run made before cltunnel 0.2)"}


def _title(name: str, metrics: dict[str, Any], seeds: list) -> str:
    label = name.replace("_", " ").replace("cl metrics", "CL metrics")
    return f"{metrics.get('scenario', '')}: {label} (%, seeds {seeds})"


def _notes(name: str, metrics: dict[str, Any], mode: str = "class") -> list[str]:
    key = "n_test_lossless" if name.endswith(EXACT_ROWS) else "n_test"
    notes = [f"test images per task: {metrics.get(key)} (test rows: "
             f"{'exact-pixel rows only' if name.endswith(EXACT_ROWS) else metrics.get('test_rows', 'all')})"]
    if metrics.get("acc_lossless") and not name.endswith(EXACT_ROWS):
        notes.append("this dataset's test set mixes exact and JPEG-decoded rows; see the *_exact_rows tables")
    if name.startswith(CL_METRICS_TABLE):
        fwt = ("FWT is not reported in task-incremental runs: head j has had no gradient before task j, so "
               "a[j-1][j] and the untrained model's accuracy are both chance" if mode == "task" else
               "FWT against the untrained model")
        notes.append(f"ACC, BWT, FWT: Lopez-Paz & Ranzato 2017 ({fwt}); forgetting (last) = -BWT; forgetting "
                     "(max): Chaudhry et al. 2018; average incremental accuracy: Rebuffi et al. 2017. Formulas in "
                     "the README")
    return notes


def plot_accuracy_curves(all_metrics: list[dict[str, Any]], path: Path) -> None:
    """Accuracy on each task (line) after each training task (x), mean over seeds with a std band."""
    plt = pyplot()
    acc = 100 * np.stack([np.asarray(m["acc"], dtype=float) for m in all_metrics])
    mean = acc.mean(0)
    std = acc.std(0, ddof=1) if len(acc) > 1 else np.zeros_like(mean)  # the tables' std (n-1), 0 for one seed
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = np.arange(mean.shape[0])
    for j in range(mean.shape[1]):
        ax.plot(steps[j:], mean[j:, j], marker="o", label=f"task {j}")
        ax.fill_between(steps[j:], (mean - std)[j:, j], (mean + std)[j:, j], alpha=0.2)
    ax.set_xticks(steps, [f"after {i}" for i in steps])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(all_metrics[0].get("scenario", ""))
    ax.grid(alpha=0.3)
    ax.legend()
    write_figure(fig, path)


# What the page says under a run's and a scenario's tables and the accuracy figure, first among the tables.
declare_written({
    ACCURACY_FIGURE: "Accuracy on each task after each training task (rows of the accuracy matrix; mean ± std band "
                     "over seeds): forgetting is the drop of a line.",
    f"{ACCURACY_MATRIX}.md": "Accuracy matrix: row = after training task i, column = test accuracy on task j.",
    f"{ACCURACY_MATRIX}{EXACT_ROWS}.md": "The same on the exact-pixel test rows only (CIFAR-10 rows 0-999 here; the "
                                         "rest were decoded from JPEG).",
    f"{FORGETTING}.md": "Accuracy right after each task, after the last, and the drop (forgetting).",
    f"{FORGETTING}{EXACT_ROWS}.md": "Forgetting on the exact-pixel test rows only.",
    f"{CL_METRICS_TABLE}.md": "ACC, BWT, FWT, forgetting (last and max based), average incremental accuracy (README: "
                              "formulas).",
    f"{CL_METRICS_TABLE}{EXACT_ROWS}.md": "The same metrics on the exact-pixel test rows only.",
}, place=20)
