"""Checkpoints are data, not code: a shared run directory never executes what was pickled into it.

One real run (split MNIST, EWC, so the checkpoints carry strategy state) is poisoned, damaged and aged in
copies; every entry point that reads a checkpoint is driven as a user would (the CLI in a subprocess).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cltunnel.training.checkpoints import DamagedCheckpoint, UnsafeCheckpoint, load_checkpoint, model_from_checkpoint, safe_load
from cltunnel.cli import main as cli_main
from cltunnel.config import parse_config
from cltunnel.training.plain_state import decode, encode
from cltunnel.runs import run_seed
from test_training import mnist_tiny

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker``: the stand-in for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def raw_config(out: Path) -> dict:
    return mnist_tiny(out, name="safety", scenario={"tasks": [4, 3, 3], "n_tasks": None}, strategy={"name": "ewc"},
                      training={"epochs": 2})


@pytest.fixture(scope="module")
def finished_run(mnist, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("safety")
    raw = raw_config(out)
    run_dir = run_seed(parse_config(raw), 0, mnist, progress=False)
    return run_dir, raw


def copy_run(run_dir: Path, raw: dict, dest: Path) -> tuple[Path, Path]:
    """A copy of the run under ``dest`` and a scenario file that resumes it there."""
    new_dir = dest / "safety" / "seed0"
    shutil.copytree(run_dir, new_dir)
    scenario = dest / "safety.yaml"
    scenario.write_text(yaml.safe_dump({**raw, "output_dir": str(dest)}))
    return new_dir, scenario


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cltunnel.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_checkpoints_hold_only_tensors_and_plain_values(finished_run):
    run_dir, _ = finished_run
    for path in sorted(run_dir.glob("task*.pt")):
        state = torch.load(path, weights_only=True)  # raises if anything but tensors and plain values is inside
        plugins = dict(state["strategy"]["plugins"])
        assert "EWCPlugin" in plugins and plugins["EWCPlugin"]["importances"]  # EWC's state is there, as data


def test_a_pickled_payload_is_refused_everywhere_and_never_runs(finished_run, tmp_path, capsys):
    run_dir, raw = finished_run
    poisoned, scenario = copy_run(run_dir, raw, tmp_path)
    marker = tmp_path / "payload-ran"
    last = poisoned / "task2.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, last)

    with pytest.raises(UnsafeCheckpoint, match="task2.pt"):
        model_from_checkpoint(last)
    resume = cli("run", str(scenario), "--no-progress")  # a real process, as a user resumes
    assert resume.returncode == 2 and "Traceback" not in resume.stderr, resume.stderr[-2000:]
    assert "task2.pt" in resume.stderr and "pickled" in resume.stderr, resume.stderr[-2000:]
    assert cli_main(["analyze", str(poisoned), "--analyses", "cka", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "task2.pt" in err and "pickled" in err and "Traceback" not in err, err
    assert cli_main(["table", str(poisoned)]) == 0  # tables are rebuilt from metrics.json: no checkpoint is read
    assert "accuracy matrix" in capsys.readouterr().out
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named_and_the_run_resumes_from_the_one_before(finished_run, tmp_path):
    run_dir, raw = finished_run
    damaged, scenario = copy_run(run_dir, raw, tmp_path)
    last = damaged / "task2.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(DamagedCheckpoint, match="task2.pt"):
        load_checkpoint(last)

    result = cli("run", str(scenario), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "task2.pt" in result.stdout and "damaged" in result.stdout and "task 3 is trained again" in result.stdout
    assert (damaged / "task2.pt.damaged").exists()
    original = json.loads((run_dir / "metrics.json").read_text())
    redone = json.loads((damaged / "metrics.json").read_text())
    assert redone["acc"] == original["acc"]  # the retrained task gives the same numbers


def test_an_old_pickled_checkpoint_gets_a_conversion_hint_and_converts(finished_run, tmp_path):
    from avalanche.training.utils import ParamData

    run_dir, raw = finished_run
    old, scenario = copy_run(run_dir, raw, tmp_path)
    last = old / "task2.pt"
    state = torch.load(last, weights_only=True)
    for name, saved in state["strategy"]["plugins"]:  # what cltunnel < 0.2 wrote: live ParamData objects
        if name == "EWCPlugin":
            for key in ("importances", "saved_params"):
                saved[key] = {t: {n: ParamData(p["__paramdata__"], tuple(p["shape"]), init_tensor=p["data"])
                                  for n, p in params.items()} for t, params in saved[key].items()}
    torch.save(state, last)

    with pytest.raises(UnsafeCheckpoint, match="cltunnel convert"):
        safe_load(last)
    assert cli("convert", str(last)).returncode == 2  # not without --trust
    assert cli("convert", str(last), "--trust").returncode == 0
    converted = torch.load(last, weights_only=True)
    original = torch.load(run_dir / "task2.pt", weights_only=True)
    ewc_new, ewc_old = dict(converted["strategy"]["plugins"])["EWCPlugin"], dict(original["strategy"]["plugins"])["EWCPlugin"]
    for t, params in ewc_old["importances"].items():
        for n, p in params.items():
            assert torch.equal(ewc_new["importances"][t][n]["data"], p["data"])


def test_plain_state_round_trips_what_strategies_keep():
    from collections import defaultdict

    gen = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(3, 2)
    saved = encode({"t": (1, "a"), "s": {4, 2}, "size": torch.Size([2, 3]), "gen": gen, "model": layer,
                    "d": defaultdict(dict, {0: {"x": torch.ones(2)}})})
    assert all(not isinstance(v, (tuple, set, torch.Generator, torch.nn.Module)) for v in saved.values())
    current = {"d": defaultdict(dict)}
    back = decode(saved, current, torch.nn.Linear(3, 2))
    assert back["t"] == (1, "a") and back["s"] == {2, 4} and back["size"] == torch.Size([2, 3])
    assert torch.equal(back["gen"].get_state(), gen.get_state())
    assert torch.equal(back["model"].weight, layer.weight) and back["model"] is not layer
    assert isinstance(back["d"], defaultdict) and torch.equal(back["d"][0]["x"], torch.ones(2))
