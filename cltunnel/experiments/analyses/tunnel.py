"""The tunnel of the model after task 1: linear-probe accuracy and numerical rank per body layer, the k each
tunnel-start rule picks on them, the notices on degenerate profiles (analysis ``tunnel``:
``tunnel_profile.csv``/``.png``, ``tunnel_start.txt``, ``variance_profile.png``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cltunnel.config import parse_tunnel_start
from cltunnel.experiments.analyses.loading import LoadedRun, layer_widths, log_profile
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.measures.probes import RANK_MAX_FEATURES, layer_ranks, rank_cap, train_probes
from cltunnel.measures.tunnel import (check_tunnel_start, describe_rule, format_layer, kappa, profile_notices,
                                      rule_starts, tunnel_start)
from cltunnel.reports.figures import finish_axes, pyplot
from cltunnel.store import TUNNEL_PROFILE, TUNNEL_START, load_metrics, load_run_config

PROFILE_OUTPUTS = {
    "tunnel_profile.png": "Linear-probe accuracy and numerical rank per layer of the model after task 1 (thesis "
                          "Figs. 5.2.x); shaded: the tunnel from the start the rule picked.",
    TUNNEL_PROFILE: "Per layer of the model after task 1: linear-probe accuracy (%), numerical rank and its cap (the "
                    "rows sampled minus one, the layer's width or the features sampled, whichever is least), intra- "
                    "and inter-class variance.",
}


def tunnel_profile(run: LoadedRun, model_index: int = 0, task: int = 0) -> pd.DataFrame:
    """Probe accuracy and numerical rank per body layer of model ``model_index`` on ``task``'s data."""
    if (model_index, task) == (0, 0) and run.profile is not None:
        return run.profile
    model = run.models[model_index]
    t = run.data.scenario.tasks[task]
    acc = train_probes(model, run.data, t, cfg=run.probe_config(), progress=run.progress)
    rows = run.rank_rows(task)
    ranks, variances = layer_ranks(model, run.data, t, rows, run.options.probe_protocol, run.options.rank_threshold)
    caps = {k: rank_cap(len(rows), n) for k, n in layer_widths(model, run.data, t).items()}
    profile = pd.DataFrame({"layer": list(acc), "name": model.layer_names,
                            "probe_acc": [100 * a for a in acc.values()], "rank": [ranks[k] for k in acc],
                            "rank_cap": [caps[k] for k in acc],
                            "intra_class_var": [variances[k][0] for k in acc],
                            "inter_class_var": [variances[k][1] for k in acc]})
    profile = profile.set_index("layer")
    if (model_index, task) == (0, 0):
        run.profile = profile
    return profile


def resolve_tunnel_start(run: LoadedRun) -> tuple[int, pd.DataFrame | None]:
    """From ``analyses.tunnel_start`` (a layer number) or, by default, by ``analyses.tunnel_rule`` from the
    profile of the model after task 1."""
    given = parse_tunnel_start(run.options.tunnel_start, "analyses.tunnel_start")
    if given != "auto":
        return check_tunnel_start(given, run.n_layers, "analyses.tunnel_start"), None
    profile = tunnel_profile(run)
    acc, ranks = profile_series(profile)
    return run.rule_start(acc, ranks), profile


def profile_series(profile: pd.DataFrame) -> tuple[dict[int, float], dict[int, float]]:
    """A tunnel profile's probe accuracies (in [0, 1]) and ranks, layer -> value, as the rules read them."""
    return (profile["probe_acc"] / 100).to_dict(), profile["rank"].to_dict()


def write_tunnel_profile(run: LoadedRun, profile: pd.DataFrame
                         ) -> tuple[int, dict[str, int], list[str], dict[str, Any]]:
    """The profile's TensorBoard scalars; returns the k the scenario's rule picks, every rule's k, the notices
    on the profile (also printed) and its files (CSV and figure, for the analysis to return)."""
    acc, ranks = profile_series(profile)
    starts, chosen = rule_starts(acc, ranks), run.rule_start(acc, ranks)
    notices = (profile_notices(acc, starts, run.depth)
               + rank_cap_notices(profile, len(run.rank_rows()), run.options.rank_samples))
    for notice in notices if not run.notices_shown else []:
        print(f"notice ({run.run_dir}): {notice}", flush=True)
    run.notices_shown = True
    log_profile(run, "tunnel_profile", profile[["probe_acc", "rank"]])
    files = {TUNNEL_PROFILE: profile,
             "tunnel_profile.png": _plot_tunnel(profile, chosen, starts, run.rule_text(), run.depth)}
    return chosen, starts, notices, files


def rank_cap_notices(profile: pd.DataFrame, rows: int | None = None, rank_samples: int | None = None) -> list[str]:
    """Layers whose rank reached its cap, grouped by what sets the cap, each group with its own cap and remedy:
    the rows sampled (``rows`` - 1: raise ``analyses.rank_samples``, or, where the task has fewer training rows
    than that, only more rows help; the review of issue 33 found a notice advising the option on a 500-row
    task), the features sampled (``RANK_MAX_FEATURES``: the rank measures the feature sample) or the layer's
    width (the layer is full rank). Without ``rows`` every capped layer is read as row-capped."""
    if "rank_cap" not in profile:
        return []
    capped = {int(k): int(row["rank_cap"]) for k, row in profile.iterrows() if row["rank"] >= row["rank_cap"]}
    groups: dict[str, list[str]] = {}
    for k, cap in capped.items():
        if rows is None or cap == rows - 1:
            if rows is not None and rank_samples is not None and rows < rank_samples:
                remedy = (f"the task has only {rows} training rows (analyses.rank_samples is {rank_samples}), so "
                          "the rank there measures the sample; only more training rows lift the cap")
            else:
                remedy = "the rows sampled: there the rank measures the sample; raise analyses.rank_samples"
        elif cap == RANK_MAX_FEATURES:
            remedy = f"the {RANK_MAX_FEATURES} features sampled: there the rank measures the feature sample"
        else:
            remedy = "the layer's width: the layer is full rank"
        groups.setdefault(remedy, []).append(f"{k} (cap {cap})")
    return [f"the numerical rank reached its cap at layer(s) {', '.join(layers)}; the cap is {remedy}"
            for remedy, layers in groups.items()]


def _plot_tunnel(profile: pd.DataFrame, start: int, starts: dict[str, int], rule: str, depth: int):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = profile.index.to_numpy()
    ax.plot(x, profile["probe_acc"], marker="o", color="C0", label="linear probe accuracy")
    ax.set_xlabel("layer")
    ax.set_ylabel("probe accuracy (%)", color="C0")
    ax.axvspan(start - 0.5, x.max() + 0.5, color="grey", alpha=0.15, label=f"tunnel from {format_layer(start, depth)}")
    for (name, k), style in zip(starts.items(), (":", "--", "-.")):
        ax.axvline(k, color="k", linestyle=style, linewidth=1, label=f"rule {name}: k={k}")
    ax.set_title(rule, fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, profile["rank"], marker="s", color="C3", label="numerical rank")
    ax2.set_ylabel("numerical rank", color="C3")
    ax.set_xticks(x)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="center right", fontsize=8, framealpha=0.9)
    return fig


def plot_per_layer(frame: pd.DataFrame, lines: dict[str, str], start: int, **axis: Any):
    """Columns of a per-layer frame against the layer, the tunnel (from ``start``) shaded: the figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = frame.index.to_numpy()
    for (column, label), marker in zip(lines.items(), "os"):
        ax.plot(x, frame[column], marker=marker, label=label)
    ax.axvspan(start - 0.5, x.max() + 0.5, color="grey", alpha=0.15, label="tunnel")
    ax.set(xlabel="layer", xticks=x, **axis)
    return finish_axes(fig, [ax])


@analysis("tunnel", order=10, outputs={**PROFILE_OUTPUTS, TUNNEL_START: "", "variance_profile.png": (
    "Intra- and inter-class variance of each layer's representations (thesis §5.2): the tunnel compresses the "
    "within-class spread.")})
def tunnel_analysis(run: LoadedRun) -> dict[str, Any]:
    """The tunnel profile of the model after task 1, each rule's k on it (``tunnel_start.txt``) and the
    per-layer class variances."""
    profile = tunnel_profile(run)
    chosen, starts, notices, files = write_tunnel_profile(run, profile)
    acc, _ = profile_series(profile)
    lines = [f"{run.rule_text()} (used): {format_layer(chosen, run.depth)}"]
    lines += [f"{describe_rule(rule)}: {format_layer(k, run.depth)}" for rule, k in starts.items()]
    lines += [f"rule 'last' at 0.98: {format_layer(tunnel_start(acc, 0.98, 'last'), run.depth)}",
              f"kappa (eta 0.99): {kappa(acc, run.depth):.3f}", *[f"notice: {n}" for n in notices]]
    files[TUNNEL_START] = "\n".join(lines) + "\n"
    # intra- and inter-class variance per layer (the thesis's Figure 5.3 style)
    files["variance_profile.png"] = plot_per_layer(
        profile, {"intra_class_var": "intra-class variance", "inter_class_var": "inter-class variance"}, chosen,
        ylabel="variance", yscale="log")
    return files


TABLE_5_2_1_RULES = {">0.95": ("last", 0.95), ">0.98": ("last", 0.98), "peak 0.95": ("peak", 0.95),
                     "rank 0.1": ("rank", 0.10)}


def tunnel_table(root: str | Path) -> str:
    """Table 5.2.1 across every run under ``root`` that has a tunnel profile: architecture, depth, dataset, the
    number of classes the profiled model was trained on (task 1's: fewer classes, longer tunnel) and the tunnel
    start by the thesis's rule at 95 % and 98 % and by the peak and rank rules, as the median over that
    set-up's seeds."""
    rows = []
    for path in sorted(Path(root).rglob(TUNNEL_PROFILE)):
        cfg = load_run_config(path.parent)
        classes = load_metrics(path.parent)["classes"][0]
        acc, ranks = profile_series(pd.read_csv(path, index_col=0))
        rows.append({"architecture": f"{cfg['model']['name']} (width {cfg['model']['width']:g})",
                     "depth": len(acc) + 1, "dataset": cfg["data"]["name"], "classes": len(classes),
                     **{c: tunnel_start(acc, share, rule, ranks) for c, (rule, share) in TABLE_5_2_1_RULES.items()}})
    if not rows:
        raise FileNotFoundError(f"{root}: no {TUNNEL_PROFILE} below it; run the 'tunnel' analysis first")
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
