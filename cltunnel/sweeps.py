"""Sweeps: a base scenario × axes → runs, one process or a Ray cluster; resumable; aggregated into tables.

A sweep file::

    name: width_study
    base: ../split5.yaml             # a scenario file (relative to this one), or an inline mapping
    set: {training.epochs: 30}       # overrides for every run (dotted keys)
    axes:                            # the grid: every combination is one configuration
      model.name: [vgg13, vgg19]     # a dotted key and its values
      model.width: [0.25, 1, 2]
      strategy:                      # or named variants: label -> overrides
        naive: {strategy: naive}
        ewc_x: {strategy: {name: ewc_extractor}}
      seed: [0, 1, 2]                # seeds are runs of one configuration (mean ± std)
    backend: local                   # local (sequential) | ray
    resources: {cpus: 1, gpus: 0}    # per run: Ray's reservation; cpus also fixes torch's threads on both
                                     # backends (gpus: 0.25 lets four runs share one GPU on Ray)
    output_dir: runs/sweeps

Runs land in ``<output_dir>/<name>/<configuration>/seed<k>/`` (ordinary run directories). A finished run
has ``sweep_done.json`` and is skipped; an interrupted one resumes after its last finished task; a failed
one leaves ``sweep_error.txt`` and does not stop the others.

Bands (``expect:``, :mod:`cltunnel.expectations`) go in the base, for every configuration, or in a named
variant, for that configuration; each configuration's bands are checked before the first run (a band naming a
number that configuration will not write refuses the sweep) and, after the runs, over the sweep's seeds: one
line per band and configuration in ``expectations.txt`` of the configuration and of the sweep, on their pages.
"""
from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import itertools
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from cltunnel.config import ConfigError, RunConfig, parse_config, read_yaml, set_dotted
from cltunnel.errors import CltunnelError
from cltunnel.expectations import Outcome, evaluate, write_outcomes, write_sweep_outcomes
from cltunnel.runs import load_data_for, preflight, run_seed, saved_protocol
from cltunnel.reports.page import build_report
from cltunnel.store import (CONFIG_FILE, MANIFEST, load_manifest, mark_sweep_done, mark_sweep_failed, seed_dir,
                            seed_dirs, sweep_finished)


AXIS_ALIASES = {"split": "scenario.tasks", "width": "model.width", "model": "model.name", "seeds": "seed",
                "conv_layers": "model.args.conv_layers"}


SHORT = {"width": "w", "tasks": "split", "epochs": "ep", "lr": "lr", "n_tasks": "tasks", "conv_layers": "conv"}


SWEEP_KEYS = {"name", "base", "set", "axes", "backend", "resources", "output_dir", "ray_init", "parallel"}


@dataclass
class Job:
    """One run: a configuration (all axes but the seed) and a seed."""

    config: str
    seed: int
    overrides: dict[str, Any]
    labels: dict[str, str]


@dataclass
class Sweep:
    name: str
    base: dict[str, Any]
    axes: list[tuple[str, list[tuple[str, dict[str, Any]]]]]  # axis -> [(label, overrides)]
    seeds: list[int]
    backend: str = "local"
    resources: dict[str, float] = field(default_factory=lambda: {"cpus": 1, "gpus": 0})
    output_dir: str = "runs/sweeps"
    ray_init: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    parallel: int = 1  # local backend: runs at once, each its own process (several runs per CPU or GPU)
    configs: dict[str, RunConfig] = field(default_factory=dict)  # configuration -> parsed once (check_jobs)

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


# ------------------------------------------------------------------------------------------ parsing
def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """The sweep file, every configuration parsed and checked (:func:`check_jobs`). ``overrides`` (dotted
    keys; a campaign plan's ``set:``) apply to every run after the file's own ``set:`` and axes."""
    path = Path(path)
    raw = read_yaml(path, "sweep", SWEEP_KEYS)
    base = raw.get("base")
    if isinstance(base, str):
        try:
            base = read_yaml(path.parent / base, "scenario")
        except ConfigError as err:
            raise ConfigError(f"{path}: base: {err}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base: give a scenario file or a scenario mapping")
    base = copy.deepcopy(base)
    for dotted, value in (raw.get("set") or {}).items():
        set_dotted(base, dotted, value)
    axes, seeds = _parse_axes(raw.get("axes") or {}, base)
    for dotted, value in (overrides or {}).items():
        set_dotted(base, dotted, value)
    sweep = Sweep(raw.get("name", path.stem), base, axes, seeds, raw.get("backend", "local"),
                  {"cpus": 1, "gpus": 0, **(raw.get("resources") or {})}, raw.get("output_dir", "runs/sweeps"),
                  raw.get("ray_init") or {}, raw, raw.get("parallel", 1))
    if not isinstance(sweep.parallel, int) or isinstance(sweep.parallel, bool) or sweep.parallel < 1:
        raise ConfigError(f"{path}: parallel: runs at once, a whole number of at least 1, got {sweep.parallel!r}")
    if sweep.backend not in ("local", "ray"):
        raise ConfigError(f"{path}: backend: '{sweep.backend}' is not one of local, ray")
    check_jobs(sweep, expand(sweep), path)
    return sweep


def _parse_axes(raw_axes: dict[str, Any], base: dict[str, Any]):
    axes, seeds = [], list(base.get("seeds", [0]))
    for key, values in raw_axes.items():
        key = AXIS_ALIASES.get(key, key)
        if key == "seed":
            seeds = [int(v) for v in values]
        elif isinstance(values, dict):
            axes.append((key, [(str(label), dict(over or {})) for label, over in values.items()]))
        elif isinstance(values, list) and values:
            axes.append((key, [(_label(key, v), {key: v}) for v in values]))
        else:
            raise ConfigError(f"axes.{key}: give a list of values or a mapping of named variants")
    return axes, seeds


def _label(key: str, value: Any) -> str:
    last = key.split(".")[-1]
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    if last == "name" or isinstance(value, dict):
        return text if not isinstance(value, dict) else str(value.get("name", value.get("class", "custom")))
    return f"{SHORT.get(last, last)}{text}"


def expand(sweep: Sweep) -> list[Job]:
    """Every (configuration, seed), in a stable order: axes in file order, seeds innermost."""
    jobs = []
    for combo in itertools.product(*[values for _, values in sweep.axes]) if sweep.axes else [()]:
        labels = {axis: label for (axis, _), (label, _) in zip(sweep.axes, combo)}
        overrides: dict[str, Any] = {}
        for _, over in combo:
            overrides.update(over)
        name = "_".join(labels.values()) or sweep.name
        jobs += [Job(name, seed, overrides, labels) for seed in sweep.seeds]
    return jobs


def job_config(sweep: Sweep, job: Job) -> RunConfig:
    """A run's config: its configuration, parsed once per sweep (seeds differ only in ``seeds``)."""
    if job.config not in sweep.configs:
        raw = copy.deepcopy(sweep.base)
        for dotted, value in job.overrides.items():
            set_dotted(raw, dotted, copy.deepcopy(value))
        raw.update(name=job.config, seeds=[job.seed], output_dir=str(sweep.directory))
        sweep.configs[job.config] = parse_config(raw)
    return dataclasses.replace(sweep.configs[job.config], seeds=[job.seed])


def run_dir(sweep: Sweep, job: Job) -> Path:
    return sweep.directory / job.config / f"seed{job.seed}"


# ------------------------------------------------------------------------------------------ running
@dataclass
class JobResult:
    config: str
    seed: int
    status: str  # done | skipped | failed
    seconds: float = 0.0
    error: str = ""


def run_job(cfg_dict: dict[str, Any], seed: int, cwd: str, data: Any = None, threads: int | None = None,
            progress: bool = False) -> JobResult:
    """Train (or resume) one run; never raises, so one failure cannot stop a sweep. Importable by Ray.

    ``threads`` (the sweep's ``resources.cpus``) fixes torch's CPU threads on either backend: float sums
    depend on it, so the same value gives the same numbers sequentially and on Ray. ``progress`` shows the
    run's own bars (the local backend, one run at a time, under the sweep's bar)."""
    os.chdir(cwd)  # user strategy modules resolve against the sweep's working directory
    if threads:
        torch.set_num_threads(threads)

    cfg = parse_config(cfg_dict)
    out = seed_dir(cfg, seed)
    start = time.perf_counter()
    try:
        run_seed(cfg, seed, data, progress=progress)
    except Exception:  # noqa: BLE001 - reported to the sweep, which goes on
        mark_sweep_failed(out, traceback.format_exc())
        return JobResult(cfg.name, seed, "failed", time.perf_counter() - start, traceback.format_exc(limit=3))
    seconds = time.perf_counter() - start
    mark_sweep_done(out, seconds)
    return JobResult(cfg.name, seed, "done", seconds)


def run_sweep(sweep: Sweep, backend: str | None = None, progress: bool = True, parallel: int | None = None
              ) -> list[JobResult]:
    """Run what is missing, then write the combined tables; returns one result per run. ``parallel`` (or
    the file's ``parallel:``) runs that many at once on the local backend, each in its own process."""
    sweep.parallel = parallel or sweep.parallel
    if sweep.parallel < 1:
        raise ConfigError(f"--parallel: runs at once, at least 1, got {sweep.parallel}")
    jobs = expand(sweep)
    sweep.directory.mkdir(parents=True, exist_ok=True)
    (sweep.directory / MANIFEST).write_text(yaml.safe_dump(_manifest(sweep, jobs), sort_keys=False))
    results = [JobResult(j.config, j.seed, "skipped") for j in jobs if sweep_finished(run_dir(sweep, j))]
    todo = [j for j in jobs if not sweep_finished(run_dir(sweep, j))]
    bar = tqdm(total=len(jobs), initial=len(results), desc=f"sweep {sweep.name}", unit="run", disable=not progress)
    runner = _run_ray if (backend or sweep.backend) == "ray" else _run_parallel if sweep.parallel > 1 else _run_local
    results += runner(sweep, todo, bar)
    bar.close()
    aggregate_sweep(sweep.directory)
    write_sweep_bands(sweep, evaluate_sweep(sweep))
    if any(seed_dirs(sweep.directory / job.config, CONFIG_FILE) for job in jobs):
        build_report(sweep.directory)
    return results


def evaluate_sweep(sweep: Sweep) -> dict[str, list[Outcome]]:
    """Each configuration's ``expect:`` bands over the sweep's seeds, as a scenario's over its own (a run
    that failed or has not run has its numbers "not written": its bands are violated)."""
    configs = {job.config: job for job in expand(sweep)}.values()
    return {job.config: evaluate(job_config(sweep, job), sweep.seeds) for job in configs}


def write_sweep_bands(sweep: Sweep, by_config: dict[str, list[Outcome]]) -> None:
    """``expectations.txt`` in every configuration's directory (its page) and the sweep's (every configuration's
    lines, named)."""
    for config, outcomes in by_config.items():
        write_outcomes(sweep.directory / config, outcomes)
    write_sweep_outcomes(sweep.directory, by_config)


def check_jobs(sweep: Sweep, jobs: list[Job], path: Path) -> None:
    """Every configuration of the sweep through :func:`cltunnel.runs.preflight` when the sweep is loaded,
    before the first run starts; all the bad ones are named at once, not one per failed run minutes apart."""
    bad = []
    for job in {j.config: j for j in jobs}.values():
        try:
            preflight(job_config(sweep, job))
        except CltunnelError as err:
            bad.append(f"configuration '{job.config}': {err}")
    if bad:
        raise ConfigError(f"{path}: {len(bad)} of {len({j.config for j in jobs})} configurations are invalid; "
                          "nothing was run:\n  " + "\n  ".join(bad))


def _tick(bar: tqdm, results: list[JobResult], running: int) -> None:
    failed = sum(r.status == "failed" for r in results)
    bar.update(1)
    bar.set_postfix(done=bar.n - failed, running=running, failed=failed)


def _run_local(sweep: Sweep, jobs: list[Job], bar: tqdm) -> list[JobResult]:
    threads = torch.get_num_threads()  # run_job fixes them per run; the caller's process gets its own back
    try:
        return _run_local_jobs(sweep, jobs, bar)
    finally:
        torch.set_num_threads(threads)


def _run_local_jobs(sweep: Sweep, jobs: list[Job], bar: tqdm) -> list[JobResult]:
    cache: dict[str, Any] = {}
    results: list[JobResult] = []
    for i, job in enumerate(jobs):
        cfg = job_config(sweep, job)
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in cache:
            try:
                cache[key] = load_data_for(cfg)
            except Exception:  # noqa: BLE001 - run_job reports it per run
                cache[key] = None
        bar.set_postfix_str(f"running {job.config} seed {job.seed}")
        results.append(run_job(cfg.to_dict(), job.seed, os.getcwd(), cache[key], _threads(sweep), not bar.disable))
        _tick(bar, results, running=min(1, len(jobs) - i - 1))
    return results


def _run_parallel(sweep: Sweep, jobs: list[Job], bar: tqdm) -> list[JobResult]:
    """``sweep.parallel`` runs at once, each in a fresh (spawned) process that loads its own data, with
    ``resources.cpus`` threads each (default: the machine's cores shared out); with the same thread count a
    run gives the same numbers as when run alone. Every process uses the run's device, so N runs share a GPU."""
    threads = _threads(sweep) or max(1, (os.cpu_count() or 1) // sweep.parallel)
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    results: list[JobResult] = []
    with ProcessPoolExecutor(max_workers=sweep.parallel, mp_context=context) as pool:
        pending = {pool.submit(run_job, job_config(sweep, j).to_dict(), j.seed, os.getcwd(), None, threads): j
                   for j in jobs}
        bar.set_postfix_str(f"{min(len(jobs), sweep.parallel)} runs at once")
        for future in as_completed(pending):
            job = pending[future]
            try:
                results.append(future.result())
            except Exception as err:  # noqa: BLE001 - a worker process that died
                results.append(JobResult(job.config, job.seed, "failed", error=repr(err)))
            _tick(bar, results, running=sum(not f.done() for f in pending))
    return results


def _run_ray(sweep: Sweep, jobs: list[Job], bar: tqdm) -> list[JobResult]:
    try:
        import ray
    except ImportError:
        raise ConfigError("backend ray: Ray is not installed here; install the extra: pip install -e \".[ray]\" "
                          "(or pip install \"ray[default]\"), or use --backend local") from None
    if not ray.is_initialized():  # RAY_ADDRESS, when set, connects to that cluster instead of starting one
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else sweep.ray_init), log_to_driver=False)
    env = {k: v for k, v in os.environ.items() if k.startswith("CLTUNNEL_")}  # the data directory, caches
    task = ray.remote(num_cpus=sweep.resources.get("cpus", 1), num_gpus=sweep.resources.get("gpus", 0),
                      runtime_env={"env_vars": env})(run_job)
    pending = {task.remote(job_config(sweep, j).to_dict(), j.seed, os.getcwd(), None, _threads(sweep) or 1): j
               for j in jobs}
    results: list[JobResult] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            results.append(ray.get(ready[0]))
        except Exception as err:  # noqa: BLE001 - a worker that died
            results.append(JobResult(job.config, job.seed, "failed", error=repr(err)))
        _tick(bar, results, running=len(pending))
    return results


def _threads(sweep: Sweep) -> int | None:
    cpus = sweep.source.get("resources", {}).get("cpus")  # only when the file sets it: locally, default = all
    return max(1, int(cpus)) if cpus else None


def _manifest(sweep: Sweep, jobs: list[Job]) -> dict[str, Any]:
    configs = {}
    for job in jobs:
        configs.setdefault(job.config, {"labels": job.labels, "seeds": []})["seeds"].append(job.seed)
    return {"name": sweep.name, "axes": [axis for axis, _ in sweep.axes], "configs": configs, "source": sweep.source}


def describe(sweep: Sweep) -> str:
    """The ``--dry-run`` listing: every run directory and what it changes from the base."""
    lines = [f"sweep {sweep.name}: {len(expand(sweep))} runs in {sweep.directory}"]
    for job in expand(sweep):
        state = "done" if sweep_finished(run_dir(sweep, job)) else "todo"
        lines.append(f"  {job.config}/seed{job.seed}  [{state}]  {json.dumps(job.overrides, default=str)}")
    return "\n".join(lines)


def aggregate_sweep(sweep_dir: str | Path) -> str:
    """The sweep's protocol's report: per configuration its tables over seeds, and the tables across them."""
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    protocol = next((p for p in map(saved_protocol, (sweep_dir / c for c in manifest["configs"])) if p), None)
    if protocol is None:
        return f"{sweep_dir}: no finished runs yet"
    return protocol.report_sweep(sweep_dir, manifest)
