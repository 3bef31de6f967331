"""Run a scenario: check it, then each seed through its protocol, then the protocol's tables over seeds.

The protocol is looked up in :mod:`cltunnel.experiments` (a task sequence, feature erosion, ...); this
module holds no per-protocol branches. :func:`preflight` checks everything that can be checked before data
is loaded (dataset, split, model and its arguments, tunnel starts against its depth, the strategy class and
its arguments, the output directory), so a bad scenario costs one line and no minutes.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from cltunnel.config import ConfigError, RunConfig, parse_tunnel_start
from cltunnel.data.device import resolve_device
from cltunnel.data.images import DATASETS, ImageData, load_data
from cltunnel.data.scenarios import resolve_class_order, task_sizes
from cltunnel.expectations import check_expect, evaluate, write_outcomes
from cltunnel.experiments import Protocol, protocol_for, protocol_for_saved
from cltunnel.experiments.analyses import check_analyses
from cltunnel.measures.tunnel import check_tunnel_start
from cltunnel.models.zoo import check_model
from cltunnel.reports.page import build_report
from cltunnel.reports.provenance import record_provenance
from cltunnel.store import (CONFIG_FILE, REPORT_HTML, check_writable, finished_tasks, load_run_config, run_lock,
                            scenario_dir_of, seed_dir, seed_dirs)
from cltunnel.training.avalanche_metrics import check_evaluation
from cltunnel.training.strategies import check_strategy_args

TUNNEL_START_ARGS = ("tunnel_start", "layer")  # strategy arguments that name a layer of the body


def preflight(cfg: RunConfig, create: bool = False) -> Protocol:
    """Every check that needs no data; raises a one-line error naming the key. Returns the protocol.
    ``create``: a real run about to start makes its output directory here (a dry run writes nothing)."""
    protocol = protocol_for(cfg)
    if protocol.needs_data:
        _check_data_section(cfg, protocol)
    check_expect(cfg)
    resolve_device(cfg.device)
    check_writable(cfg.output_dir, create=create)
    return protocol


def _check_data_section(cfg: RunConfig, protocol: Protocol) -> None:
    """The dataset, its split and class order, and (for protocols that train ``model:``) the model against it."""
    dataset = DATASETS.get(cfg.data.name, "data.name")  # unknown: one line with the closest name
    n_classes, in_shape = dataset.classes, dataset.shape
    sizes = task_sizes(cfg, n_classes)
    resolve_class_order(cfg, n_classes)
    if protocol.trains_model_section:
        heads = sizes if cfg.scenario.mode == "task" else [n_classes]
        n_layers = check_model(cfg.model.name, cfg.model.width, cfg.model.args, heads, in_shape)
        check_strategy_args(cfg.strategy)
        check_evaluation(cfg.evaluation)
        check_analyses(cfg.analyses.run)  # built-in names and users' "module:function", imported here
        _check_tunnel_starts(cfg, n_layers)


def _check_tunnel_starts(cfg: RunConfig, n_layers: int) -> None:
    given = {"analyses.tunnel_start": cfg.analyses.tunnel_start}
    given |= {f"strategy.args.{k}": cfg.strategy.args[k] for k in TUNNEL_START_ARGS if k in cfg.strategy.args}
    for where, value in given.items():
        k = parse_tunnel_start(value, where)
        if k != "auto":
            check_tunnel_start(k, n_layers, f"{where} ({cfg.model.name})", minimum=0 if where.endswith(".layer") else 1)


def load_data_for(cfg: RunConfig) -> ImageData | None:
    """The scenario's dataset, or None for a protocol that draws its data from the seed."""
    return load_data(cfg) if protocol_for(cfg).needs_data else None


def run_seed(cfg: RunConfig, seed: int, data: ImageData | None = None, progress: bool = True,
             stop_after: int | None = None) -> Path:
    """Train (or resume) one seed, holding its directory's lock; return its run directory. ``stop_after``
    ends a task sequence early (tests of resume)."""
    data = data if data is not None else load_data_for(cfg)
    options = {"stop_after": stop_after} if stop_after is not None else {}
    with run_lock(seed_dir(cfg, seed)):
        record_provenance(seed_dir(cfg, seed), resolve_device(cfg.device))
        return protocol_for(cfg).run_seed(cfg, seed, data, progress, **options)


def run_scenario(cfg: RunConfig, progress: bool = True) -> Path:
    """Check the scenario, run every seed, then its tables over seeds and (``logging.report``) its report
    pages; returns the scenario directory."""
    protocol = preflight(cfg, create=True)
    data = load_data_for(cfg)
    for seed in cfg.seeds:
        run_seed(cfg, seed, data, progress)
    scenario_dir = scenario_dir_of(cfg)
    protocol.aggregate(scenario_dir)
    write_outcomes(scenario_dir, evaluate(cfg))  # the bands of expect: (the page shows them)
    if cfg.logging.report:
        build_report(scenario_dir)
    return scenario_dir


def report_path(cfg: RunConfig) -> Path:
    """The page to open after a run: the seed's for a one-seed scenario, else the scenario's (mean ± std)."""
    directory = seed_dir(cfg, cfg.seeds[0]) if len(cfg.seeds) == 1 else scenario_dir_of(cfg)
    return directory / REPORT_HTML


def saved_protocol(directory: str | Path) -> Protocol | None:
    """The protocol whose seeds were written to ``directory`` (a scenario or a seed directory)."""
    directory = Path(directory)
    runs = [directory] if (directory / CONFIG_FILE).exists() else seed_dirs(directory, CONFIG_FILE)
    return protocol_for_saved(load_run_config(runs[0]) or {}) if runs else None


def describe_plan(cfg: RunConfig) -> str:
    """What ``cltunnel run`` would do, without loading data: the resolved scenario and each seed's state."""
    protocol = preflight(cfg)
    lines = [yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "",
             f"protocol: {protocol.name}; output: {scenario_dir_of(cfg)}"]
    for seed in cfg.seeds:
        where = seed_dir(cfg, seed)
        done = where in seed_dirs(where.parent, protocol.finished)
        tasks = finished_tasks(where) if where.exists() else []
        state = "finished" if done else f"resumes after {len(tasks)} saved task(s)" if tasks else "new"
        lines.append(f"  seed {seed}: {where} [{state}]")
    return "\n".join(lines)
