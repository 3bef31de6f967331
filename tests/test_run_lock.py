"""One writer per run directory: a second ``cltunnel run`` on a seed directory a live process is writing is
refused, naming the holder; a lock left by a dead process is taken over with a notice."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cltunnel.cli import main as cli_main
from cltunnel.store import LOCK_FILE, RunLocked, run_lock

REPO = Path(__file__).resolve().parents[1]
SCENARIO = {"name": "locked", "data": {"name": "mnist", "train_per_class": 200, "test_per_class": 20},
            "scenario": {"n_tasks": 5}, "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
            "training": {"epochs": 1, "augment": False}, "device": "cpu"}


def start(scenario: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cltunnel.cli", "run", str(scenario), "--output-dir", str(out),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_a_run_on_a_directory_another_process_writes_is_refused_then_runs(tmp_path, capsys):
    """This test's process holds the seed directory (as a live ``cltunnel run`` would); a real ``cltunnel
    run`` started on it is refused naming this process, and trains once the holder lets go."""
    scenario = tmp_path / "locked.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    seed_dir = tmp_path / "out" / "locked" / "seed0"
    with run_lock(seed_dir):
        refused = start(scenario, tmp_path / "out")
        out, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert f"is being written by process {os.getpid()}" in err and "done" not in out
    assert not (seed_dir / "task0.pt").exists()  # it touched nothing
    assert cli_main(["run", str(scenario), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "task 5/5 done" in capsys.readouterr().out  # once the holder let go, the same command trains
    assert not (seed_dir / LOCK_FILE).exists()  # released when the run ended


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "seed0"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(f"{dead.stdout.strip()} {socket.gethostname()}")
    with run_lock(run_dir):
        assert (run_dir / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert f"taking over {run_dir / LOCK_FILE} from process {dead.stdout.strip()}" in capsys.readouterr().out
    assert not (run_dir / LOCK_FILE).exists()


def test_a_live_holder_is_named(tmp_path):
    run_dir = tmp_path / "seed0"
    with run_lock(run_dir):
        with pytest.raises(RunLocked, match=f"being written by process {os.getpid()}"):
            with run_lock(run_dir):
                pass
