"""Running the registered analyses on one run (:func:`run_analyses`), and their tables across runs: a
scenario's seeds as mean ± std (:func:`aggregate_seeds`) and the tunnel start across set-ups (thesis Table
5.2.1, :func:`tunnel_table`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from cltunnel.config import AnalysesConfig, ConfigError
from cltunnel.data.images import ImageData
from cltunnel.experiments.analyses.block_structure import block_seeds_table
from cltunnel.experiments.analyses.cka import cka_seeds_table
from cltunnel.experiments.analyses.loading import load_run
from cltunnel.experiments.analyses.ood import ood_seeds_table
from cltunnel.experiments.analyses.registry import ANALYSES
from cltunnel.experiments.analyses.substitution import plot_substitution
from cltunnel.experiments.analyses.swap import swap_by_rule, swap_seeds_table, swap_vs_k_table
from cltunnel.experiments.analyses.tunnel import profile_series
from cltunnel.measures.tunnel import describe_rule, format_layer, tunnel_start
from cltunnel.store import load_metrics, load_run_config


def run_analyses(run_dir: str | Path, names: list[str] | None = None, device: str = "auto",
                 options: AnalysesConfig | None = None, progress: bool = True, data: ImageData | None = None,
                 tunnel_start: str | None = None) -> dict[str, Any]:
    """Run the named analyses (default: the scenario's ``analyses.run``, else all) on one run;
    ``tunnel_start`` overrides the configured extractor length."""
    run = load_run(run_dir, device, options, progress, data)
    if tunnel_start is not None:
        run.options = dataclasses.replace(run.options, tunnel_start=tunnel_start)
    wanted = names or run.options.run or list(ANALYSES)
    unknown = [n for n in wanted if n not in ANALYSES]
    if unknown:
        raise ConfigError(f"analyses: unknown {unknown}; valid: {', '.join(ANALYSES)}")
    results: dict[str, Any] = {}
    for name in wanted:
        results[name] = ANALYSES[name](run)
    return results


TABLE_5_2_1_RULES = {">0.95": ("last", 0.95), ">0.98": ("last", 0.98), "peak 0.95": ("peak", 0.95),
                     "rank 0.1": ("rank", 0.10)}


def tunnel_table(root: str | Path) -> str:
    """Table 5.2.1 across every run under ``root`` that has a tunnel profile: architecture, depth, dataset, the
    number of classes the profiled model was trained on (task 1's: fewer classes, longer tunnel) and the tunnel
    start by the thesis's rule at 95 % and 98 % and by the peak and rank rules, as the median over that
    set-up's seeds."""
    rows = []
    for path in sorted(Path(root).rglob("tunnel_profile.csv")):
        cfg = load_run_config(path.parent)
        classes = load_metrics(path.parent)["classes"][0]
        acc, ranks = profile_series(pd.read_csv(path, index_col=0))
        rows.append({"architecture": f"{cfg['model']['name']} (width {cfg['model']['width']:g})",
                     "depth": len(acc) + 1, "dataset": cfg["data"]["name"], "classes": len(classes),
                     **{c: tunnel_start(acc, share, rule, ranks) for c, (rule, share) in TABLE_5_2_1_RULES.items()}})
    if not rows:
        raise FileNotFoundError(f"{root}: no tunnel_profile.csv below it; run the 'tunnel' analysis first")
    runs = pd.DataFrame(rows)
    keys = ["architecture", "depth", "dataset", "classes"]
    table = runs.groupby(keys, sort=False).agg(**{c: (c, "median") for c in TABLE_5_2_1_RULES},
                                               runs=(">0.95", "size")).reset_index()
    for c in TABLE_5_2_1_RULES:
        table[c] = [format_layer(int(round(k)), n) for k, n in zip(table[c], table["depth"])]
    root = Path(root)
    table.to_csv(root / "table_5_2_1.csv", index=False)
    md = ("### Tunnel start across runs (thesis Table 5.2.1; median over runs)\n\n" + table.to_markdown(index=False)
          + "\n\n" + "\n".join(f"- {c}: {describe_rule(rule, share)}" for c, (rule, share) in TABLE_5_2_1_RULES.items())
          + "\n- k (share of depth); the thesis's table uses the 'last' rule\n")
    (root / "table_5_2_1.md").write_text(md)
    return md


def aggregate_seeds(scenario_dir: str | Path, out_dir: str | Path | None = None, provenance: list[str] = ()
                    ) -> list[str]:
    """Mean ± std over seed<k>/ of every analysis output present; returns the markdown written."""
    scenario_dir = Path(scenario_dir)
    out_dir = Path(out_dir) if out_dir else scenario_dir
    runs = sorted(p for p in scenario_dir.glob("seed*") if p.is_dir())
    written = []
    swaps = swap_seeds_table(scenario_dir, out_dir, runs, provenance)
    if swaps is not None:
        written.append(swaps)
    curves = [pd.read_csv(r / "substitution.csv") for r in runs if (r / "substitution.csv").exists()]
    if curves:
        allc = pd.concat(curves)
        allc.to_csv(out_dir / f"{scenario_dir.name}_substitution.csv", index=False)
        plot_substitution(allc, out_dir / f"{scenario_dir.name}_substitution.png", scenario_dir.name)
        written.append(swap_vs_k_table(scenario_dir, out_dir, runs, curves))
        by_rule = swap_by_rule(scenario_dir, out_dir)
        if by_rule:
            written.append(by_rule)
    blocks = block_seeds_table(scenario_dir, out_dir, runs, provenance)
    if blocks is not None:
        written.append(blocks)
    ckas = cka_seeds_table(scenario_dir, out_dir, runs, provenance)
    if ckas is not None:
        written.append(ckas)
    oods = ood_seeds_table(scenario_dir, out_dir, runs, provenance)
    if oods is not None:
        written.append(oods)
    return written
