"""Every bad input a user can give ``cltunnel run`` ends in one line naming the problem, exit code 2, and no
traceback, before any work: the battery below runs the CLI as a user would, each case one mistake."""
from __future__ import annotations

import copy
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cltunnel.cli import main as cli_main
from cltunnel.config import set_dotted

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "bad", "data": {"name": "mnist", "train_per_class": 20, "test_per_class": 10},
        "scenario": {"n_tasks": 5}, "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
        "training": {"epochs": 1}, "device": "cpu"}

# (case, dotted keys to set, the fragment the one-line message must hold)
CASES = [
    ("unknown top-level key", {"trainig": {}}, "unknown key 'trainig' (did you mean 'training'?)"),
    ("unknown training key", {"training.learning_rate": 0.1}, "did you mean 'lr'"),
    ("unknown model", {"model.name": "vgg20"}, "model.name: unknown model 'vgg20'"),
    ("unknown dataset", {"data.name": "cifar11"}, "data.name: unknown dataset 'cifar11'"),
    ("model argument out of range", {"model.name": "vgg19", "model.args": {"conv_layers": 40}, "data.name": "cifar10"},
     "conv_layers must be in 1..16"),
    ("model argument typo", {"model.args": {"depht": 3}}, "model.args: mlp rejected {'depht': 3}"),
    ("negative learning rate", {"training.lr": -0.1}, "training.lr: must not be negative"),
    ("negative width", {"model.width": -0.5}, "model.width: must be positive"),
    ("momentum of 1.5", {"training.momentum": 1.5}, "training.momentum: must be in [0, 1)"),
    ("negative weight decay", {"training.weight_decay": -1e-4}, "training.weight_decay"),
    ("tunnel start beyond the depth", {"analyses.tunnel_start": 99}, "analyses.tunnel_start (mlp): 99 is not a layer"),
    ("tunnel start not a number", {"analyses.tunnel_start": "middle"}, "analyses.tunnel_start: 'auto' or a layer"),
    ("strategy argument typo", {"strategy": {"name": "ewc", "args": {"ewc_lamda": 1.0}}},
     "takes no argument 'ewc_lamda' (did you mean 'ewc_lambda'?)"),
    ("strategy argument cltunnel sets", {"strategy": {"name": "naive", "args": {"train_epochs": 3}}},
     "are set by cltunnel"),
    ("unknown strategy", {"strategy": "ewcc"}, "strategy.name: unknown strategy 'ewcc'"),
    ("strategy module missing", {"strategy": {"class": "nowhere.module:Strategy"}}, "cannot import module 'nowhere"),
    ("strategy class not a template", {"strategy": {"class": "collections:OrderedDict"}}, "SupervisedTemplate"),
    ("strategy tunnel start beyond the depth", {"strategy": {"name": "freeze_tunnel", "args": {"tunnel_start": 50}}},
     "strategy.args.tunnel_start (mlp): 50 is not a layer"),
    ("split that does not add up", {"scenario": {"tasks": [5, 4]}}, "scenario.tasks: 5 + 4 = 9 classes"),
    ("unequal n_tasks", {"scenario.n_tasks": 3}, "scenario.n_tasks: 10 classes"),
    ("class order not a permutation", {"scenario.class_order": [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]},
     "scenario.class_order: must be a permutation"),
    ("tasks and n_tasks", {"scenario.tasks": [5, 5]}, "give 'tasks' or 'n_tasks', not both"),
    ("zero epochs", {"training.epochs": 0}, "training.epochs: must be at least 1"),
    ("batch size not a number", {"training.batch_size": "big"}, "training.batch_size: expected an integer"),
    ("unknown amp mode", {"training.amp": "fp8"}, "training.amp: 'fp8' is not one of"),
    ("unknown test rows", {"data.test_rows": "some"}, "data.test_rows"),
    ("lr milestone at epoch 0", {"training.lr_milestones": [0]}, "training.lr_milestones"),
    ("zero temperature", {"training.temperature": 0}, "training.temperature: must be positive"),
    ("unknown analysis", {"analyses.run": ["swapp"]}, "analyses.run: unknown analysis 'swapp' (did you mean 'swap'?)"),
    ("analysis module missing", {"analyses.run": ["nowhere_module:norms"]}, "cannot import analysis module 'nowhere_module'"),
    ("tunnel threshold above 1", {"analyses.tunnel_threshold": 1.5}, "analyses.tunnel_threshold"),
    ("no whole-set PC iteration", {"analyses.block_pc_iterations": 0}, "analyses.block_pc_iterations: must be at least 1"),
    ("PC tolerance of 1", {"analyses.block_pc_tolerance": 1.0}, "analyses.block_pc_tolerance: is a share in (0, 1)"),
    ("erosion ratio above 1", {"scenario": {"tasks": [10]}, "erosion": {"ratio": 2}}, "erosion.ratio"),
    ("unknown synthetic source", {"synthetic": {"sources": ["gan"]}}, "synthetic.sources: unknown ['gan']"),
    ("unknown representation model", {"representations": {"models": ["GAN"]}}, "representations.models"),
    ("two protocols at once", {"scenario": {"tasks": [10]}, "erosion": {"ratio": 0.5}, "synthetic": {}},
     "runs one protocol"),
    ("a GPU that is not there", {"device": "cuda:7"}, "device"),
    ("an empty extractor", {"analyses": {"tunnel_start": 0}}, "analyses.tunnel_start (mlp): 0 is not a layer"),
]


def run_cli(tmp_path: Path, capsys, raw: dict, *extra: str) -> tuple[int, str]:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(raw))
    rc = cli_main(["run", str(scenario), "--no-progress", *extra])
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    assert fragment in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case, changes, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, case, changes, fragment):
    if case == "a GPU that is not there" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        set_dotted(raw, dotted, copy.deepcopy(value))
    if "scenario" in changes and "tasks" in changes["scenario"]:
        raw["scenario"].pop("n_tasks", None)
    rc, err = run_cli(tmp_path, capsys, raw, "--output-dir", str(tmp_path / "out"))
    assert_one_line(rc, err, fragment)
    assert not (tmp_path / "out" / "bad").exists()  # nothing was started


def test_the_base_scenario_of_the_battery_is_valid(tmp_path, capsys):
    scenario = tmp_path / "ok.yaml"
    scenario.write_text(yaml.safe_dump(BASE))
    assert cli_main(["check", str(scenario), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "protocol: task_sequence" in out and "[new]" in out


def test_missing_scenario_file_and_invalid_yaml(tmp_path, capsys):
    assert_one_line(cli_main(["run", str(tmp_path / "nope.yaml")]), capsys.readouterr().err, "scenario file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: mnist\n")
    assert_one_line(cli_main(["run", str(bad)]), capsys.readouterr().err, "not valid YAML")


def test_output_directory_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, err = run_cli(tmp_path, capsys, BASE, "--output-dir", str(blocker / "runs"))
    assert_one_line(rc, err, "output_dir: cannot create or write")


@pytest.mark.skipif(not os.access("/proc", os.W_OK | os.X_OK), reason="needs a /proc that passes the write check")
def test_output_directory_whose_parent_passes_the_write_check_but_holds_no_directory(tmp_path, capsys):
    """/proc passes the write check (as root), yet no directory can be made in it: once a traceback from
    the run lock, now the one-line error of the preflight."""
    rc, err = run_cli(tmp_path, capsys, BASE, "--output-dir", "/proc/cltunnel-runs")
    assert_one_line(rc, err, "output_dir: cannot create /proc/cltunnel-runs")


def test_missing_and_damaged_data_files_are_named(tmp_path, capsys, real_data_dir):
    rc, err = run_cli(tmp_path, capsys, {**BASE, "data": {**BASE["data"], "root": str(tmp_path / "empty")}},
                      "--output-dir", str(tmp_path / "out"))
    assert_one_line(rc, err, "dataset 'mnist': no train and no test split")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    source = (real_data_dir / "mnist.npz").read_bytes()
    (damaged / "mnist.npz").write_bytes(source[: len(source) // 3])
    shutil.copy(real_data_dir / "SHA256SUMS", damaged / "SHA256SUMS")
    rc, err = run_cli(tmp_path, capsys, {**BASE, "data": {**BASE["data"], "root": str(damaged)}},
                      "--output-dir", str(tmp_path / "out"))
    assert_one_line(rc, err, f"data file {damaged / 'mnist.npz'} is damaged")
    assert "SHA256 differs" in err


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    """Only expected failures are turned into one line: an unexpected exception keeps its traceback."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(BASE))
    code = ("import sys, cltunnel.runs as r, cltunnel.cli as c\n"
            "def boom(*a, **k): raise ZeroDivisionError('a bug')\n"
            "r.run_scenario = boom\n"
            f"sys.exit(c.main(['run', {str(scenario)!r}, '--output-dir', {str(tmp_path / 'out')!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr


def test_version_overrides_and_scenarios_by_name_from_any_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the shipped scenarios are still found by name
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("cltunnel ")
    assert cli_main(["list"]) == 0 and "quickstart" in capsys.readouterr().out
    assert cli_main(["check", "quickstart", "--set", "training.epochs=2", "--set", "model.width=0.25"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "width: 0.25" in out
    assert_one_line(cli_main(["check", "quickstart", "--set", "training.epochs"]), capsys.readouterr().err,
                    "--set 'training.epochs': give key=value")
    assert_one_line(cli_main(["check", "quickstart", "--set", "training.epochs=-1"]), capsys.readouterr().err,
                    "training.epochs: must be at least 1")
