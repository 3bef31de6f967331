"""Resume inside a task: with ``training.resume_every`` a run killed mid-task continues at the last saved
epoch (weights, momentum, strategy and clock, batch order, RNG) and ends with the numbers of a run never
stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cltunnel.config import parse_config
from cltunnel.runs import run_seed
from cltunnel.store import load_metrics, partial_checkpoint_path
from cltunnel.training import loop

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def scenario(out: Path, strategy: str = "replay", **training) -> dict:
    return {"name": "long", "data": {"name": "mnist", "train_per_class": 300, "test_per_class": 50},
            "scenario": {"tasks": [5, 5]}, "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
            "training": {"epochs": 5, "augment": False, "lr_milestones": [3], "resume_every": 1, **training},
            "strategy": {"name": strategy, "args": {"mem_size": 100}}, "device": "cpu", "output_dir": str(out)}


class Killed(Exception):
    pass


def stop_after_epoch(monkeypatch, task: int, epoch: int) -> None:
    """Make the run raise right after ``epoch`` epochs of ``task`` (as a kill would, minus the process)."""
    save = loop.MidTaskResumePlugin.after_training_epoch

    def stop(self, strategy, **kwargs):
        save(self, strategy, **kwargs)
        if self.task == task and self.epochs_done == epoch:
            raise Killed()

    monkeypatch.setattr(loop.MidTaskResumePlugin, "after_training_epoch", stop)


@pytest.mark.parametrize("strategy", ["replay", "avalanche_replay"])  # ours; Avalanche's buffer, drawn again
def test_a_run_stopped_inside_a_task_resumes_to_the_same_numbers(mnist, tmp_path, monkeypatch, strategy):
    whole = load_metrics(run_seed(parse_config(scenario(tmp_path / "whole", strategy, resume_every=0)), 0, mnist,
                                  False))

    stop_after_epoch(monkeypatch, task=1, epoch=3)
    cfg = parse_config(scenario(tmp_path / "stopped", strategy))
    with pytest.raises(Killed):
        run_seed(cfg, 0, mnist, progress=False)
    run_dir = tmp_path / "stopped" / "long" / "seed0"
    partial = partial_checkpoint_path(run_dir, 1)
    assert partial.exists() and not (run_dir / "metrics.json").exists()
    monkeypatch.undo()
    resumed = load_metrics(run_seed(cfg, 0, mnist, progress=False))
    assert resumed["acc"] == whole["acc"]  # bit-identical: saving states does not change the numbers either
    assert not partial.exists()  # removed once the task ended


def kill_when_written(command: list[str], marker: Path, run_dir: Path) -> None:
    """Start ``command`` (a real ``cltunnel run``), SIGKILL it as soon as ``marker`` exists, check it had not
    finished."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()


def rerun(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_sigkill_after_a_finished_task_then_the_same_command(mnist, tmp_path):
    """Without resume_every: killed once task 1's checkpoint is written (inside task 2), the same command
    redoes task 2 from that checkpoint and ends with the numbers of a run never stopped."""
    raw = scenario(tmp_path / "killed", epochs=6, resume_every=0)
    raw.update(strategy="naive")
    raw["data"]["train_per_class"] = 600
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "killed" / "long" / "seed0"
    command = [sys.executable, "-m", "cltunnel.cli", "run", str(path), "--no-progress"]
    kill_when_written(command, run_dir / "task0.pt", run_dir)
    assert "task 1/2" not in rerun(command).stdout  # task 1 is not trained again
    whole = load_metrics(run_seed(parse_config({**raw, "output_dir": str(tmp_path / "whole")}), 0, mnist, False))
    assert json.loads((run_dir / "metrics.json").read_text())["acc"] == whole["acc"]


def test_sigkill_inside_a_single_long_task_then_the_same_command(mnist, tmp_path):
    raw = scenario(tmp_path / "killed", epochs=10)
    raw.update(scenario={"tasks": [10]}, strategy="naive")
    raw["data"]["train_per_class"] = 600
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "killed" / "long" / "seed0"
    command = [sys.executable, "-m", "cltunnel.cli", "run", str(path), "--no-progress"]
    kill_when_written(command, partial_checkpoint_path(run_dir, 0), run_dir)
    assert "resuming task 1 after epoch" in rerun(command).stdout
    whole = load_metrics(run_seed(parse_config({**raw, "output_dir": str(tmp_path / "whole")}), 0, mnist, False))
    assert json.loads((run_dir / "metrics.json").read_text())["acc"] == whole["acc"]


def test_an_erosion_phase_stopped_part_way_resumes_to_the_same_curve(mnist, tmp_path, monkeypatch):
    """Erosion phases are long single tasks (160 epochs each in the thesis): one stopped inside its squared
    phase continues there, with the same test curve and accuracies as a run never stopped."""
    raw = {"name": "erode", "data": {"name": "mnist", "train_per_class": 100, "test_per_class": 50},
           "scenario": {"tasks": [10]}, "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
           "training": {"epochs": 1, "lr": 0.05, "augment": False, "resume_every": 1},
           "erosion": {"square": 6, "pretrain_epochs": 2, "erosion_epochs": 4, "relearn_epochs": 2},
           "analyses": {"probe": {"epochs": 1}, "rank_samples": 200}, "device": "cpu"}
    whole = load_metrics(run_seed(parse_config({**raw, "output_dir": str(tmp_path / "whole")}), 0, mnist, False))
    stop_after_epoch(monkeypatch, task=1, epoch=3)  # phase 1 = the squared phase
    cfg = parse_config({**raw, "output_dir": str(tmp_path / "stopped")})
    with pytest.raises(Killed):
        run_seed(cfg, 0, mnist, progress=False)
    assert partial_checkpoint_path(tmp_path / "stopped" / "erode" / "seed0", 1).exists()
    monkeypatch.undo()
    resumed = load_metrics(run_seed(cfg, 0, mnist, progress=False))
    for key in ("acc", "curve", "scratch"):
        assert resumed[key] == whole[key], key


def test_epoch_checkpoints_of_a_resumed_run_are_those_of_an_uninterrupted_one(mnist, tmp_path, monkeypatch):
    """Issue 24, epochs: the epoch checkpoints are named from Avalanche's clock, which the resume puts back;
    the plugin's own count restarted at 0 and overwrote task1_epoch0001.pt with the model after epoch 4."""
    import torch

    from cltunnel.store import epoch_checkpoints

    whole_dir = run_seed(parse_config(scenario(tmp_path / "whole", checkpoint_every=1, resume_every=0)), 0, mnist,
                         False)
    stop_after_epoch(monkeypatch, task=1, epoch=3)
    cfg = parse_config(scenario(tmp_path / "stopped", checkpoint_every=1))
    with pytest.raises(Killed):
        run_seed(cfg, 0, mnist, progress=False)
    monkeypatch.undo()
    resumed_dir = run_seed(cfg, 0, mnist, progress=False)
    for task in (0, 1):
        whole, resumed = epoch_checkpoints(whole_dir, task), epoch_checkpoints(resumed_dir, task)
        assert [p.name for p in whole] == [p.name for p in resumed] and len(whole) == 5
        for a, b in zip(whole, resumed):
            sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
            assert sa["epoch"] == sb["epoch"]
            assert all(torch.equal(v, sb["layers"][n][k]) for n in sa["layers"] for k, v in sa["layers"][n].items())
