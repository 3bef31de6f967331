"""A campaign on CPU with a tiny plan: it runs what fits the budget, says why it skipped the rest, and packs
every result but the checkpoints into at most 8 files of at most 16 MiB."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from cltunnel.campaign import MAX_BYTES, MAX_FILES, load_plan, training_images
from cltunnel.cli import main as cli_main

pytestmark = pytest.mark.slow

SMALL = {"name": "small", "data": {"name": "mnist", "train_per_class": 50, "test_per_class": 20},
         "scenario": {"n_tasks": 5}, "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
         "training": {"epochs": 1, "augment": False}, "device": "cpu", "seeds": [0]}
BIG = {**SMALL, "name": "big", "data": {"name": "cifar10"}, "model": {"name": "vgg19", "width": 1.0},
       "scenario": {"tasks": [5, 5]}, "training": {"epochs": 30}}


def write_plan(tmp_path: Path) -> Path:
    for raw in (SMALL, BIG):
        (tmp_path / f"{raw['name']}.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "runs")}))
    (tmp_path / "held.json").write_text("{}")
    plan = {"name": "tiny", "entries": [
        {"name": "held", "what": "already in tables/", "scenario": "small.yaml", "done_if": "held.json"},
        {"name": "big", "what": "does not fit", "scenario": "big.yaml", "images_per_second": 1000},
        {"name": "small", "what": "fits", "scenario": "small.yaml", "set": {"training.epochs": 2}}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def test_the_plan_is_checked_whole_before_anything_runs(tmp_path):
    path = write_plan(tmp_path)
    name, entries = load_plan(path)
    assert name == "tiny" and [e.name for e in entries] == ["held", "big", "small"]
    assert training_images(entries[1].units[0].cfg) == 50_000 * 30
    bad = yaml.safe_load(path.read_text())
    bad["entries"][2]["set"] = {"model.width": -1}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="model.width: must be positive"):
        load_plan(path)


def test_a_sweep_entry_parses_each_configuration_once_with_the_plans_overrides(tmp_path, monkeypatch):
    import cltunnel.sweeps as sweeps

    sweep = {"name": "widths", "base": {**SMALL, "output_dir": str(tmp_path / "runs")},
             "axes": {"model.width": [0.25, 0.5], "seed": [0, 1]}}
    (tmp_path / "widths.yaml").write_text(yaml.safe_dump(sweep))
    plan = {"name": "p", "entries": [{"name": "w", "sweep": "widths.yaml", "set": {"training.epochs": 2}}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    parsed = []
    real = sweeps.parse_config
    monkeypatch.setattr(sweeps, "parse_config", lambda raw: parsed.append(raw["name"]) or real(raw))
    units = load_plan(tmp_path / "plan.yaml")[1][0].units
    assert sorted(parsed) == ["w0.25", "w0.5"]  # once per configuration, not again per seed or for the overrides
    assert [(u.cfg.name, u.seed, u.cfg.seeds) for u in units] == [("w0.25", 0, [0]), ("w0.25", 1, [1]),
                                                                   ("w0.5", 0, [0]), ("w0.5", 1, [1])]
    assert {u.cfg.training.epochs for u in units} == {2} and units[0].cfg.model.width == 0.25
    plan["entries"][0]["set"] = {"training.temperature": -1}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(Exception, match="(?s)2 of 2 configurations are invalid.*training.temperature"):
        load_plan(tmp_path / "plan.yaml")


def test_dry_run_lists_what_would_run_and_runs_nothing(tmp_path, capsys):
    assert cli_main(["campaign", str(write_plan(tmp_path)), "--budget", "600", "--out", str(tmp_path / "out"),
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| small | small | 0 | would run | estimate: throughput measured on the device" in out
    assert "| big | big | 0 | skipped | needs ~" in out
    assert "| held | small | 0 | skipped | tables/ already holds it" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_campaign_runs_what_fits_and_packs_without_checkpoints(tmp_path, capsys):
    assert cli_main(["campaign", str(write_plan(tmp_path)), "--budget", "240", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| small | small | 0 | done |" in out and "| big | big | 0 | skipped | needs ~" in out
    assert (tmp_path / "runs" / "small" / "seed0" / "metrics.json").exists()
    assert not (tmp_path / "runs" / "big").exists()
    packed = sorted((tmp_path / "out").glob("tiny.tar.gz*"))
    assert 1 <= len(packed) <= MAX_FILES and all(p.stat().st_size <= MAX_BYTES for p in packed)
    with tarfile.open(packed[0]) as tar:
        names = tar.getnames()
    assert "tiny/CAMPAIGN.md" in names and "tiny/small/seed0/metrics.json" in names
    assert "tiny/small/seed0/accuracy_matrix.csv" in names and not any(n.endswith(".pt") for n in names)
    report = (tmp_path / "out" / "CAMPAIGN.md").read_text()
    assert "torch:" in report and "device:" in report and "commit:" in report and "command:" in report


def test_a_failing_run_is_reported_and_the_next_one_runs_packed_after_each(tmp_path, capsys, monkeypatch, real_data_dir):
    """One failure must not cost a GPU window: the failed run is in CAMPAIGN.md with its error, the next run
    runs, and the pack is written after every run (here checked as it stood right after the failure)."""
    import cltunnel.campaign as campaign_module

    path = write_plan(tmp_path)
    plan = yaml.safe_load(path.read_text())
    plan["entries"] = [{"name": "broken", "scenario": "small.yaml", "images_per_second": 1000},
                       {"name": "small", "scenario": "small.yaml", "set": {"training.epochs": 2}}]
    path.write_text(yaml.safe_dump(plan))
    real_run, packs = campaign_module.run_seed, []

    def run_seed(cfg, seed, **kw):
        if cfg.training.epochs == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(cfg, seed, **kw)
    real_pack = campaign_module.pack

    def pack(out, name, sources, report):
        packs.append(report)
        return real_pack(out, name, sources, report)
    monkeypatch.setattr(campaign_module, "run_seed", run_seed)
    monkeypatch.setattr(campaign_module, "pack", pack)
    assert cli_main(["campaign", str(path), "--budget", "600", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| broken | small | 0 | failed | RuntimeError: CUDA error: an illegal memory access" in out
    assert "| small | small | 0 | done |" in out and "estimated" in out and "taken" in out
    assert len(packs) == 3 and "| broken | small | 0 | failed |" in packs[0] and "| small | small | 0 | todo |" in packs[0]


def test_a_dry_run_measures_nothing(tmp_path, capsys, monkeypatch):
    """A dry run answers in seconds: no throughput is measured (entries without the plan's figure say it
    will be measured on the device)."""
    import cltunnel.campaign as campaign_module

    def forbidden(cfg, *args, **kwargs):
        raise AssertionError("a dry run measured throughput")
    monkeypatch.setattr(campaign_module, "measure_throughput", forbidden)
    assert cli_main(["campaign", str(write_plan(tmp_path)), "--budget", "600", "--out", str(tmp_path / "out"),
                     "--dry-run"]) == 0
    assert "| small | small | 0 | would run | estimate: throughput measured on the device at the start |" in \
        capsys.readouterr().out
