"""Softmax temperature against tunnel strength (thesis chapter 6, Table 6.3.1, E8), read off a sweep whose
axes include ``training.temperature``: per architecture and T, κ (the first layer whose probe reaches 99 % of
the best probe accuracy, over depth; lower = a longer tunnel) and ρ (the OOD probe's drop from its best layer
to the last, over the best; higher = a tunnel that discards more out-of-distribution information).

The thesis's finding is "higher T gives lower κ and higher ρ"; the report says per architecture whether the
sweep's numbers agree, rather than assuming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cltunnel.experiments.registry import SWEEP_REPORTS, SweepReport
from cltunnel.reports.captions import declare_written
from cltunnel.reports.figures import pyplot, save_figure
from cltunnel.reports.tables import write_table
from cltunnel.store import OOD_RHO, TUNNEL_START, load_manifest, load_metrics, load_run_config, seed_dirs

TEMPERATURE_AXIS = "training.temperature"


def _value(path: Path, key: str) -> float:
    """The number after ``key: `` in a one-line result file the analyses wrote (κ in tunnel_start.txt, ρ in
    ood_rho.txt); NaN when the run has none."""
    lines = path.read_text().splitlines() if path.exists() else []
    return next((float(line.split(": ")[1]) for line in lines if line.startswith(key)), np.nan)


def _temperatures(columns: list[str]) -> list[float]:
    """T of each ``<symbol> (T=<t>)`` column."""
    return [float(c.split("T=")[1].rstrip(")")) for c in columns]


def temperature_frames(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Rows: architecture (the other axes' labels); columns: κ, ρ and the network's own test accuracy at each
    T (mean, std over seeds): κ and ρ of a network that did not learn describe no tunnel, so its accuracy
    stands beside them."""
    manifest = load_manifest(sweep_dir)
    records = []
    for config, info in manifest["configs"].items():
        labels = {k: v for k, v in info["labels"].items() if k not in (TEMPERATURE_AXIS, "seed")}
        for run in seed_dirs(sweep_dir / config):
            records.append({"architecture": " ".join(str(v) for v in labels.values()) or _model_label(run),
                            "T": float(load_run_config(run)["training"]["temperature"]),
                            "kappa": _value(run / TUNNEL_START, "kappa"),
                            "rho": _value(run / OOD_RHO, "rho"),
                            "acc": 100 * float(np.mean(load_metrics(run)["acc"][-1]))})
    runs = pd.DataFrame(records)
    if runs.empty:
        return runs, runs, 0
    grouped = runs.groupby(["architecture", "T"])[["kappa", "rho", "acc"]]
    mean, std = grouped.mean(), grouped.std()
    wide = [frame.unstack("T") for frame in (mean, std)]
    symbols = {"kappa": "κ", "rho": "ρ", "acc": "acc %"}
    for frame in wide:
        frame.columns = [f"{symbols[m]} (T={t:g})" for m, t in frame.columns]
    return wide[0], wide[1], int(grouped.size().min())


def _model_label(run: Path) -> str:
    model = load_run_config(run)["model"]
    depth = (model.get("args") or {}).get("depth")
    return f"{model['name']}{depth or ''} (width {float(model.get('width', 1)):g})"


def trend(values: pd.Series) -> str:
    """Whether a quantity falls or rises with T over the measured temperatures (sign of its rank correlation)."""
    values = values.dropna()
    if len(values) < 2:
        return "too few temperatures"
    corr = pd.Series(_temperatures(list(values.index))).rank().corr(pd.Series(values.to_numpy()).rank())
    if np.isnan(corr) or abs(corr) < 1e-9:
        return "flat"
    return f"{'rises' if corr > 0 else 'falls'} with T (rank correlation {corr:+.2f})"


def temperature_report(sweep_dir: str | Path) -> str:
    """``table_6_3_1.{csv,md,tex,png}``: κ and ρ by architecture and T, with the thesis's reading checked."""
    sweep_dir = Path(sweep_dir)
    mean, std, n = temperature_frames(sweep_dir)
    if mean.empty:
        return ""
    notes = [f"seeds per cell: {n} or more; κ from the tunnel analysis (eta 0.99), ρ from the ood analysis; acc %: the "
             "network's own test accuracy (mean over its tasks after the last)"]
    for arch, row in mean.iterrows():
        kappa = trend(row[[c for c in row.index if c.startswith("κ")]])
        rho = trend(row[[c for c in row.index if c.startswith("ρ")]])
        notes.append(f"{arch}: κ {kappa}; ρ {rho} (thesis: κ falls, ρ rises)")
    md = write_table(mean, std, n, sweep_dir / "table_6_3_1", "Softmax temperature and the tunnel (thesis Table 6.3.1)",
                     notes)
    plot_temperature(mean, std, sweep_dir / "table_6_3_1.png")
    return md


def plot_temperature(mean: pd.DataFrame, std: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, symbol in zip(axes, ("κ", "ρ")):
        columns = [c for c in mean.columns if c.startswith(symbol)]
        temps = _temperatures(columns)
        for arch in mean.index:
            ax.errorbar(temps, mean.loc[arch, columns], yerr=std.loc[arch, columns].fillna(0), marker="o", ms=4,
                        capsize=3, label=arch)
        ax.set(xscale="log", xlabel="softmax temperature T", ylabel=symbol,
               title={"κ": "κ: where probing saturates (/depth)", "ρ": "ρ: OOD probe drop, best to last layer"}[symbol])
    save_figure(fig, axes, path)


SWEEP_REPORTS.register("temperature", SweepReport(lambda sweep_dir, manifest: TEMPERATURE_AXIS in manifest["axes"],
                                                  lambda sweep_dir, manifest: temperature_report(sweep_dir), order=20))
declare_written({
    "table_6_3_1.png": "Softmax temperature T against κ and ρ per architecture (thesis Table 6.3.1, ch. 6).",
    "table_6_3_1.md": "κ and ρ by architecture and softmax temperature (thesis Table 6.3.1; the reading checked).",
}, place=70)
