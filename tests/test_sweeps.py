"""Sweeps: exact expansion, local vs Ray, resume after a kill, failures reported, aggregation."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from cltunnel.cli import main as cli_main
from cltunnel.config import ConfigError, parse_config
from cltunnel.runs import run_seed
from cltunnel.store import SWEEP_DONE
from cltunnel.sweeps import expand, load_sweep, run_sweep

BASE = {"data": {"name": "mnist", "train_per_class": 100, "test_per_class": 50}, "scenario": {"tasks": [5, 5]},
        "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
        "training": {"epochs": 3, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "augment": False},
        "device": "cpu"}


def write_sweep(tmp_path: Path, **over) -> Path:
    raw = {"name": "tiny", "base": BASE, "axes": {"split": [[5, 5], [3, 7]], "seed": [0, 1]},
           "resources": {"cpus": 1}, "output_dir": str(tmp_path / "out"), **over}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def all_acc(sweep) -> dict:
    return {(j.config, j.seed): json.loads((sweep.directory / j.config / f"seed{j.seed}" / "metrics.json").read_text())["acc"]
            for j in expand(sweep)}


def test_dry_run_expansion_is_exact(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"model.width": [0.25, 1], "strategy": {"naive": {"strategy": "naive"},
                                       "ewcx": {"strategy": {"name": "ewc_extractor", "args": {"tunnel_start": 2}}}},
                                       "seed": [0, 1]})
    sweep = load_sweep(path)
    jobs = expand(sweep)
    assert [(j.config, j.seed) for j in jobs] == [(c, s) for c in ("w0.25_naive", "w0.25_ewcx", "w1_naive", "w1_ewcx")
                                                  for s in (0, 1)]
    assert jobs[2].overrides == {"model.width": 0.25, "strategy": {"name": "ewc_extractor", "args": {"tunnel_start": 2}}}
    assert cli_main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sweep tiny: 8 runs") and len(out) == 9 and all("[todo]" in line for line in out[1:])
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_bad_sweep_files_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep keys.*'axis'"):
        load_sweep(write_sweep(tmp_path, axis={}))
    with pytest.raises(ConfigError, match="configuration 'lr0.1_bogus'.*strategy"):
        load_sweep(write_sweep(tmp_path, axes={"training.lr": [0.1], "strategy": {"bogus": {"strategy": {"nme": 1}}}}))
    with pytest.raises(ConfigError, match="base: scenario file not found"):
        load_sweep(write_sweep(tmp_path, base="missing.yaml"))


def test_ray_backend_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    sweep = load_sweep(write_sweep(tmp_path, axes={"seed": [0]}))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        run_sweep(sweep, "ray", progress=False)


@pytest.mark.slow
def test_killed_sweep_reruns_only_what_was_missing_and_failures_do_not_stop_others(mnist, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    assert {r.status for r in run_sweep(sweep, progress=False)} == {"done"}
    reference = all_acc(sweep)
    # Simulate a kill: one run lost its end (resumes from task 0's checkpoint), one never started.
    half = sweep.directory / "split3-7" / "seed0"
    for name in (SWEEP_DONE, "task1.pt", "metrics.json"):
        (half / name).unlink()
    gone = sweep.directory / "split3-7" / "seed1"
    shutil.rmtree(gone)  # files and the tensorboard folder: as if it never started
    gone.mkdir()
    kept = sweep.directory / "split5-5" / "seed0" / "task1.pt"
    stamp, task0_stamp = kept.stat().st_mtime_ns, (half / "task0.pt").stat().st_mtime_ns
    results = run_sweep(sweep, progress=False)
    ran = sorted((r.config, r.seed) for r in results if r.status == "done")
    assert ran == [("split3-7", 0), ("split3-7", 1)] and sum(r.status == "skipped" for r in results) == 2
    assert kept.stat().st_mtime_ns == stamp and (half / "task0.pt").stat().st_mtime_ns == task0_stamp
    assert all_acc(sweep) == reference
    summary = (sweep.directory / "summary.md").read_text()
    assert "split5-5" in summary and "split3-7" in summary and "±" in summary
    # A run that fails while training (valid config: an lr that diverges) is reported; the others finish.
    # (A configuration that cannot run at all is refused before the first run: see the test below.)
    bad = load_sweep(write_sweep(tmp_path, name="bad", axes={"lr": {
        "broken": {"training.lr": 1.0e12}, "naive": {"training.lr": 0.1}}, "seed": [0]}))
    results = {r.config: r for r in run_sweep(bad, progress=False)}
    assert results["broken"].status == "failed" and "diverged" in results["broken"].error
    assert results["naive"].status == "done" and (bad.directory / "broken" / "seed0" / "sweep_error.txt").exists()
    assert cli_main(["sweep", str(tmp_path / "bad.yaml"), "--no-progress"]) == 1  # failures -> non-zero exit


@pytest.mark.slow
def test_ray_backend_gives_the_sequential_numbers(mnist, tmp_path):
    ray = pytest.importorskip("ray")
    local = load_sweep(write_sweep(tmp_path / "a"))
    run_sweep(local, "local", progress=False)
    remote = load_sweep(write_sweep(tmp_path / "b", ray_init={"num_cpus": 2, "include_dashboard": False}))
    try:
        results = run_sweep(remote, "ray", progress=False)
    finally:
        ray.shutdown()
    assert [r.status for r in results] == ["done"] * 4
    assert all_acc(remote) == all_acc(local)


def test_parallel_local_runs_give_the_sequential_numbers(mnist, tmp_path):
    """Two runs at once, each its own process with one thread (resources.cpus), equal the runs one by one."""
    sequential = load_sweep(write_sweep(tmp_path / "a"))
    run_sweep(sequential, "local", progress=False)
    parallel = load_sweep(write_sweep(tmp_path / "b", parallel=2))
    results = run_sweep(parallel, "local", progress=False)
    assert [r.status for r in results] == ["done"] * 4
    assert all_acc(parallel) == all_acc(sequential)


def test_interrupted_run_inside_a_sweep_resumes_from_its_checkpoint(mnist, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, axes={"seed": [0]}))
    job = expand(sweep)[0]
    cfg = parse_config({**BASE, "name": job.config, "output_dir": str(sweep.directory)})
    run_seed(cfg, 0, mnist, progress=False, stop_after=0)
    stamp = (sweep.directory / job.config / "seed0" / "task0.pt").stat().st_mtime_ns
    assert [r.status for r in run_sweep(sweep, progress=False)] == ["done"]
    assert (sweep.directory / job.config / "seed0" / "task0.pt").stat().st_mtime_ns == stamp


def test_local_sweep_shows_each_runs_progress_under_its_own_bar(mnist, tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"seed": [0]})
    sweep = load_sweep(path)
    assert [r.status for r in run_sweep(sweep, progress=True)] == ["done"]
    err = capsys.readouterr().err
    assert "sweep tiny" in err and "running tiny seed 0" in err and "task 1" in err  # the run's own task bars
    assert cli_main(["sweep", str(path), "--no-progress"]) == 0  # nothing left to run: it names what it wrote
    tables_line, report_line = capsys.readouterr().out.splitlines()[-2:]
    assert tables_line == f"tables: {sweep.directory / 'summary.md'}"
    assert report_line == f"report: {sweep.directory / 'report.html'}"  # the sweep's page, last


def test_every_bad_configuration_is_named_before_the_first_run(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"model.width": [0.25, -1.0], "training.lr": [0.1, -0.1], "seed": [0]})
    assert cli_main(["sweep", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "3 of 4 configurations are invalid; nothing was run" in err
    assert "model.width: must be positive" in err and "training.lr: must not be negative" in err
    assert not list((tmp_path / "out").glob("tiny/*/seed0"))  # not one run started
