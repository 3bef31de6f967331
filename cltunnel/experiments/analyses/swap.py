"""The extractor/tunnel swap (thesis Table 5.4.1): E_i + T_j with the extractor = body layers 1..k of M_i
under the tunnel of M_j, and the FT rows that retrain a head (analysis ``swap``: ``swap_table.csv``,
``swap_meta.txt``); over seeds, the table beside the thesis's values, the same rows against every k read off
the substitution curves, and at each tunnel-start rule's k."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cltunnel.experiments.analyses.loading import LoadedRun
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.experiments.analyses.swap_meta import SwapMeta, rule_texts, seed_notices, swap_meta_text, swap_metas
from cltunnel.experiments.analyses.tunnel import (PROFILE_OUTPUTS, profile_series, resolve_tunnel_start,
                                                  write_tunnel_profile)
from cltunnel.measures.probes import train_probes
from cltunnel.measures.tunnel import describe_rule, rule_starts
from cltunnel.reports.figures import pyplot, save_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.store import SUBSTITUTION, SWAP_META, SWAP_TABLE, TUNNEL_PROFILE, all_seed_dirs, load_run_config


# Thesis Table 5.4.1 (VGG-19, split CIFAR-10 5/5), first and second task accuracy (%).
THESIS_TABLE_5_4_1 = {
    "E1 + T1": (92.04, 56.8), "E1 + T2": (92.5, 58.04), "E2 + T2": (50.84, 93.94), "E2 + T1": (50.66, 93.72),
    "E2 + T1 (FT)": (56.1, None), "E2 (FT)": (74.4, None),
}


def swap_table(run: LoadedRun, k: int) -> pd.DataFrame:
    """Table 5.4.1: E_i + T_j with the extractor = layers 1..k; FT rows retrain a head with the probe protocol."""
    if len(run.models) != 2:
        raise ValueError(f"the swap table needs a 2-task run; {run.run_dir} has {len(run.models)} tasks")
    L = run.n_layers
    m2 = run.model(1)
    combos = {"E1 + T1": run.model(0), "E1 + T2": run.compose(0, 1, k), "E2 + T2": m2, "E2 + T1": run.compose(1, 0, k)}
    rows = {name: {"first task": 100 * run.accuracy(m, 0), "second task": 100 * run.accuracy(m, 1)}
            for name, m in combos.items()}
    task0 = run.data.scenario.tasks[0]
    pcfg = run.probe_config()
    ft = train_probes(combos["E2 + T1"], run.data, task0, layers=[L], cfg=pcfg, progress=run.progress)[L]
    probe = train_probes(m2, run.data, task0, layers=[k], cfg=pcfg, progress=run.progress)[k]
    rows["E2 + T1 (FT)"] = {"first task": 100 * ft, "second task": np.nan}
    rows["E2 (FT)"] = {"first task": 100 * probe, "second task": np.nan}
    if run.exact_rows:
        for name, m in combos.items():
            rows[name]["first task (exact rows)"] = 100 * run.accuracy(m, 0, exact=True)
            rows[name]["second task (exact rows)"] = 100 * run.accuracy(m, 1, exact=True)
    return pd.DataFrame(rows).T


SEED_OUTPUTS = {
    "*table_5_4_1.md": "Extractor/tunnel swap in the layout of thesis Table 5.4.1, thesis column beside it.",
    "*table_5_4_1_by_rule.md": "Table 5.4.1's non-FT rows at each tunnel-start rule's k, the thesis beside them.",
    "*swap_vs_k.md": "The swap rows at every tunnel start k.",
    "*swap_vs_k.png": "Table 5.4.1's non-FT rows as functions of the tunnel start k (each rule's k marked).",
}


def swap_seeds(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> list[str]:
    """Over seeds: Table 5.4.1 (mean ± std) and, where the seeds have substitution curves, its rows against k
    and at each rule's k."""
    written = [swap_seeds_table(scenario_dir, out_dir, runs, provenance)]
    curves = [pd.read_csv(r / SUBSTITUTION) for r in runs if (r / SUBSTITUTION).exists()]
    if curves:
        written += [swap_vs_k_table(scenario_dir, out_dir, runs, curves), swap_by_rule(scenario_dir, out_dir)]
    return [w for w in written if w]


@analysis("swap", order=20, seeds=swap_seeds, outputs={**PROFILE_OUTPUTS, SWAP_META: "", SWAP_TABLE: (
    "Extractor/tunnel swap of this run in the layout of thesis Table 5.4.1: accuracy (%) of extractor Ei with "
    "tunnel Tj on each task; E2+T1 (FT) and E2 (FT) retrain a head (first task only)."), **SEED_OUTPUTS})
def swap_analysis(run: LoadedRun) -> dict[str, Any]:
    """Table 5.4.1 of this run at the tunnel start (``analyses.tunnel_start``, or the rule's k on the tunnel
    profile, whose files come along), with how k was chosen and the notices (``swap_meta.txt``)."""
    k, profile = resolve_tunnel_start(run)
    files: dict[str, Any] = {}
    notices = []
    if profile is not None:
        _, _, notices, files = write_tunnel_profile(run, profile)
    for notice in run.head_notices():
        print(f"notice: {notice}", flush=True)
        notices.append(notice)
    df = swap_table(run, k)
    df.attrs["tunnel_start"] = k
    how = run.rule_text() if profile is not None else "fixed: analyses.tunnel_start"
    return {**files, SWAP_TABLE: df, SWAP_META: swap_meta_text(run, SwapMeta(k, how, notices))}


SWAP_ROWS = {"E1 + T1": ("M1[1:x]+M2[x+1:n]", "n"), "E1 + T2": ("M1[1:x]+M2[x+1:n]", "k"),
             "E2 + T2": ("M1[1:x]+M2[x+1:n]", "0"), "E2 + T1": ("M2[1:x]+M1[x+1:n]", "k")}


def swap_vs_k(curves: pd.DataFrame) -> pd.DataFrame:
    """The four non-FT rows of Table 5.4.1 at every tunnel start k, read off one seed's substitution curves:
    E1 + T2 at k is M1[1:k]+M2[k+1:n] and E2 + T1 is M2[1:k]+M1[k+1:n]; E1 + T1 (= M1, x = n) and
    E2 + T2 (= M2, x = 0) do not depend on k. Columns ``<row> / task <t>``; the gaps the thesis reads as
    "the tunnel is task-agnostic" (E1 + T2 - E1 + T1 on task 1, E2 + T1 - E2 + T2 on task 2) beside them."""
    n = int(curves["x"].max())
    at = {(d, t): g.set_index("x")["accuracy"] for (d, t), g in curves.groupby(["direction", "task"])}
    ks = range(n + 1)
    frame = pd.DataFrame(index=pd.Index(ks, name="k"))
    for row, (direction, where) in SWAP_ROWS.items():
        for task in sorted(curves["task"].unique()):
            x = {"n": [n] * len(ks), "0": [0] * len(ks), "k": list(ks)}[where]
            frame[f"{row} / task {task}"] = at[(direction, task)].loc[x].to_numpy()
    frame["E1 + T2 - E1 + T1 (task 1)"] = frame["E1 + T2 / task 1"] - frame["E1 + T1 / task 1"]
    frame["E2 + T1 - E2 + T2 (task 2)"] = frame["E2 + T1 / task 2"] - frame["E2 + T2 / task 2"]
    return frame


def plot_swap_vs_k(mean: pd.DataFrame, std: pd.DataFrame, starts: list[int], path: Path, title: str,
                   rules: dict[str, list[int]] | None = None) -> None:
    """Each non-FT row of Table 5.4.1 on its own task against k, mean ± std over seeds; the tunnel starts
    the runs used are marked (grey), and each rule's k (median over seeds) along the top."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, task, rows in ((axes[0], 1, ("E1 + T1", "E1 + T2")), (axes[1], 2, ("E2 + T2", "E2 + T1"))):
        for row in rows:
            col = f"{row} / task {task}"
            ax.plot(mean.index, mean[col], marker="o", markersize=3, label=row)
            ax.fill_between(mean.index, mean[col] - std[col].fillna(0), mean[col] + std[col].fillna(0), alpha=0.2)
        for k in sorted(set(starts)):
            ax.axvline(k, color="grey", linestyle=":", linewidth=1)
        for (rule, ks), color in zip((rules or {}).items(), ("C2", "C3", "C4")):
            k = float(np.median(ks))
            ax.axvline(k, color=color, linestyle="--", linewidth=1, label=f"rule {rule}: k={k:g}")
        ax.set(title=f"{title}: task {task}", xlabel="k (extractor = layers 1..k)")
    axes[0].set_ylabel("accuracy (%)")
    save_figure(fig, axes, path)


def swap_seeds_table(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> str | None:
    """Mean ± std over the seeds' ``swap_table.csv``, beside the thesis's values where the set-up is the
    thesis's (``<scenario>_table_5_4_1.*``); None where no seed has a swap table."""
    swaps = [pd.read_csv(r / SWAP_TABLE, index_col=0) for r in runs if (r / SWAP_TABLE).exists()]
    if not swaps:
        return None
    mean, std = aggregate(swaps)
    metas = swap_metas(runs)
    starts = [str(meta.k) for _, meta in metas]
    shown_mean, shown_std = mean.copy(), std.copy()
    if _is_table_5_4_1_setup(runs[0]):
        for i, col in enumerate(("first task", "second task")):
            shown_mean[f"thesis {col}"] = [THESIS_TABLE_5_4_1.get(n, (None, None))[i] for n in mean.index]
            shown_std[f"thesis {col}"] = np.nan  # a single published run: shown without ±
        reference = "thesis values: VGG-19 width 1, split CIFAR-10 (5,5), Table 5.4.1"
    else:
        reference = "no thesis reference values: Table 5.4.1 reports the full VGG-19 at width 1 on the (5,5) split only"
    shown_mean = shown_mean.astype(float)
    notes = [f"tunnel start (extractor = layers 1..k) per seed: {starts} ({'; '.join(rule_texts(metas))})",
             *seed_notices(metas), *provenance, reference]
    return write_table(shown_mean, shown_std, len(swaps), out_dir / f"{scenario_dir.name}_table_5_4_1",
                       f"{scenario_dir.name}: extractor/tunnel swap (Table 5.4.1 layout, %)", notes)


def swap_by_rule(scenario_dir: str | Path, out_dir: str | Path | None = None) -> str:
    """Table 5.4.1's non-FT rows at each rule's k (per seed, from its tunnel profile), read off the
    substitution curves, side by side with the thesis column: does the verdict depend on the rule?
    ``<scenario>_table_5_4_1_by_rule.*`` in ``out_dir`` (default: the scenario directory)."""
    scenario_dir = Path(scenario_dir)
    out_dir = Path(out_dir) if out_dir else scenario_dir
    runs = [r for r in all_seed_dirs(scenario_dir)
            if (r / SUBSTITUTION).exists() and (r / TUNNEL_PROFILE).exists()]
    if not runs:
        return ""
    frames, ks = [], {}
    for r in runs:
        table = swap_vs_k(pd.read_csv(r / SUBSTITUTION))
        starts = rule_starts(*profile_series(pd.read_csv(r / TUNNEL_PROFILE, index_col=0)))
        frame = pd.DataFrame(index=list(SWAP_ROWS))
        for rule, k in starts.items():
            ks.setdefault(rule, []).append(k)
            for col, task in (("first task", 1), ("second task", 2)):
                frame[f"{rule}: {col}"] = [table.loc[k, f"{row} / task {task}"] for row in SWAP_ROWS]
        frames.append(frame)
    mean, std = aggregate(frames)
    if _is_table_5_4_1_setup(runs[0]):
        for i, col in enumerate(("first task", "second task")):
            mean[f"thesis {col}"] = [THESIS_TABLE_5_4_1[n][i] for n in mean.index]
            std[f"thesis {col}"] = np.nan
    notes = [f"{describe_rule(rule)}: k per seed {k}" for rule, k in ks.items()]
    notes += ["all chosen test rows (read off the substitution curves); the FT rows need a head trained at each k "
              "and are in the Table 5.4.1 file at the k the runs used"]
    return write_table(mean.astype(float), std, len(frames), out_dir / f"{scenario_dir.name}_table_5_4_1_by_rule",
                       f"{scenario_dir.name}: Table 5.4.1's rows at each tunnel-start rule's k (%)", notes)


def swap_vs_k_table(scenario_dir: Path, out_dir: Path, runs: list[Path], curves: list[pd.DataFrame]) -> str:
    """Table 5.4.1's non-FT rows against every k, mean ± std over the seeds' substitution curves, with the k
    the runs used and each rule's k marked (``<scenario>_swap_vs_k.*`` in ``out_dir``)."""
    mean, std = aggregate([swap_vs_k(c) for c in curves])
    metas = swap_metas(runs)
    starts = [meta.k for _, meta in metas]
    profiles = [pd.read_csv(r / TUNNEL_PROFILE, index_col=0) for r in runs if (r / TUNNEL_PROFILE).exists()]
    by_rule: dict[str, list[int]] = {}
    for profile in profiles:
        for rule, k in rule_starts(*profile_series(profile)).items():
            by_rule.setdefault(rule, []).append(k)
    stem = out_dir / f"{scenario_dir.name}_swap_vs_k"
    plot_swap_vs_k(mean, std, starts, stem.with_suffix(".png"), scenario_dir.name, by_rule)
    notes = [f"tunnel start the runs used ({'; '.join(rule_texts(metas))}; grey dotted lines in the figure): {starts}",
             *[f"{describe_rule(rule)}: k per seed {ks} (marked in the figure)" for rule, ks in by_rule.items()],
             "all chosen test rows (the substitution curves are not kept on the exact rows alone)",
             "the thesis's Table 5.4.1 reading: E1 + T2 ≈ E1 + T1 and E2 + T1 ≈ E2 + T2 (gaps near 0) at the tunnel start"]
    return write_table(mean, std, len(curves), stem, f"{scenario_dir.name}: Table 5.4.1's rows against k (%)", notes)


def _is_table_5_4_1_setup(run_dir: Path) -> bool:
    cfg = load_run_config(run_dir)
    model = cfg["model"]
    return ((cfg["data"]["name"], cfg["scenario"]["tasks"], model["name"], float(model.get("width", 1.0)),
             model.get("args") or {}) == ("cifar10", [5, 5], "vgg19", 1.0, {}))
