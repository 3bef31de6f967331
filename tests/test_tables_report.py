"""The CL tables a run and a scenario write: FWT only where it measures transfer (class-incremental), the
sample standard deviation (ddof 1) wherever a mean ± std is shown, and no "nan" in a rendered cell."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.axes
import numpy as np
import pytest
import yaml

from cltunnel.reports.tables import FWT_TASK_IL, cl_metrics_frame, render

ACC = [[0.90, 0.30], [0.60, 0.80]]  # a[i][j]: after task i, on task j


def write_run(run_dir: Path, mode: str, acc=ACC, seed: int = 0, acc_init=(0.50, 0.50)) -> Path:
    """A finished run as the training loop leaves it: metrics.json and the resolved config.yaml."""
    run_dir.mkdir(parents=True)
    metrics = {"scenario": "toy", "seed": seed, "test_rows": "all", "classes": [[0, 1], [2, 3]],
               "n_test": [100, 100], "n_test_lossless": None, "acc": acc, "acc_lossless": None,
               "acc_init": list(acc_init) if acc_init is not None else None}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "toy", "scenario": {"tasks": [2, 2], "mode": mode},
                                                         "seed": seed}))
    return run_dir


def fwt_row(md: str) -> str:
    """The FWT row's value cell, as shown."""
    return next(line for line in md.splitlines() if line.startswith("| FWT")).split("|")[2].strip()


def test_task_incremental_fwt_is_not_a_number_but_says_why(tmp_path):
    run = write_run(tmp_path / "seed0", "task")
    render(run)
    md = (run / "cl_metrics.md").read_text()
    assert fwt_row(md) == FWT_TASK_IL  # not a number
    assert "task-incremental" in md  # the note says why
    assert np.isnan(cl_metrics_frame(ACC, [0.5, 0.5], mode="task")["value"]["FWT"])


def test_class_incremental_fwt_is_lopez_paz_and_ranzatos(tmp_path):
    run = write_run(tmp_path / "seed0", "class")
    render(run)
    assert "-20.00" == fwt_row((run / "cl_metrics.md").read_text())  # a[0][1] - b[1] = 30 - 50
    assert cl_metrics_frame(ACC, [0.5, 0.5], mode="class")["value"]["FWT"] == pytest.approx(-20)


def test_a_class_incremental_run_without_baseline_says_so_not_nan(tmp_path):
    run = write_run(tmp_path / "seed0", "class", acc_init=None)
    render(run)
    row = fwt_row((run / "cl_metrics.md").read_text())
    assert "n/a" in row and "nan" not in row.lower()


def test_mean_std_over_two_seeds_is_the_sample_std(tmp_path, monkeypatch):
    """Two seeds at 60 % and 80 % on task 0 after task 0: mean 70, std 14.14 (ddof 1), not 10 (ddof 0), in
    the tables and in the accuracy figure's band."""
    write_run(tmp_path / "seed0", "task", acc=[[0.60, 0.30], [0.50, 0.80]], seed=0)
    write_run(tmp_path / "seed1", "task", acc=[[0.80, 0.30], [0.50, 0.80]], seed=1)
    bands = []
    original = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **kw: bands.append((np.asarray(lo), np.asarray(hi)))
                        or original(self, x, lo, hi, **kw))
    render(tmp_path)
    md = (tmp_path / "accuracy_matrix.md").read_text()
    assert "70.00 ± 14.14" in md and "± 10.00" not in md
    assert "ddof 1" in md
    lo, hi = bands[0]
    assert hi[0] - lo[0] == pytest.approx(2 * np.std([60, 80], ddof=1))


def test_rendered_tables_have_no_nan_and_two_decimals(tmp_path):
    run = write_run(tmp_path / "seed0", "task")
    render(run)
    for md in run.glob("*.md"):
        cells = [c.strip() for line in md.read_text().splitlines() if line.startswith("|") for c in line.split("|")]
        assert not any(c.lower() == "nan" for c in cells), md.name
        assert not re.search(r"\d\.\d{3,}", " ".join(cells)), md.name
