"""What a CL user expects around a run: per-epoch training curves (history.csv and TensorBoard), Avalanche's
own metrics and loggers named in the YAML and working on the device data path, none of it changing the
numbers, and all of it whole after a resume."""
from __future__ import annotations

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cltunnel.config import parse_config
from cltunnel.runs import run_seed
from cltunnel.store import load_metrics
from test_training import mnist_tiny

LOGGED = {"logging": {"eval_every": 1, "tensorboard": True},
          "evaluation": {"metrics": ["accuracy", "loss", "forgetting", "bwt"], "loggers": ["text", "csv", "tensorboard"]}}


def scalars(directory) -> dict[str, list[float]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_curves_and_avalanche_loggers_are_written_and_leave_the_numbers_alone(mnist, tmp_path):
    plain = load_metrics(run_seed(parse_config(mnist_tiny(tmp_path / "plain", training={"epochs": 2},
                                                          logging={"tensorboard": False})), 0, mnist, False))
    run_dir = run_seed(parse_config(mnist_tiny(tmp_path / "logged", training={"epochs": 2}, **LOGGED)), 0, mnist, False)
    metrics = load_metrics(run_dir)
    assert metrics["acc"] == plain["acc"]  # evaluating and logging do not touch training

    history = pd.read_csv(run_dir / "history.csv")
    assert list(history[["task", "epoch"]].itertuples(index=False, name=None)) == [(t, e) for t in range(5)
                                                                                 for e in (1, 2)]
    assert history["loss"].notna().all() and history["train_acc"].between(0, 1).all()
    for t in range(5):  # the test columns at each task's end are the accuracy matrix's row
        last = history[history["task"] == t].iloc[-1]  # tasks from 0, as in the accuracy-matrix tables
        assert [last[f"test_acc_task{j}"] for j in range(t + 1)] == metrics["acc"][t][: t + 1]
    first_epoch = history[(history["task"] == 1) & (history["epoch"] == 1)].iloc[0]
    assert first_epoch[["test_acc_task0", "test_acc_task1"]].notna().all()  # eval_every 1: mid-task columns too
    assert pd.isna(first_epoch["test_acc_task2"])

    ours = scalars(run_dir / "tensorboard")
    assert ours["train/loss"] == pytest.approx(history["loss"].tolist(), rel=1e-5)  # csv keeps 6 digits
    assert len(ours["accuracy_matrix/task0"]) == 5

    avalanche = run_dir / "avalanche"
    evals = pd.read_csv(avalanche / "csv" / "eval_results.csv")
    assert len(evals) == 5 * 5  # every test experience after every task
    # Avalanche's experience accuracy on the test stream = cltunnel's matrix (same rows, same model)
    last = evals[evals["training_exp"] == evals["training_exp"].max()].sort_values("eval_exp")
    assert last["eval_accuracy"].round(6).tolist() == [round(a, 6) for a in metrics["acc"][-1]]
    assert "Top1_Acc_Stream/eval_phase/test_stream" in (avalanche / "log.txt").read_text()
    # one TensorBoard stream: Avalanche's metrics go through the run's writer, beside the training curves
    assert any(t.startswith("Top1_Acc_Stream") for t in ours) and not (avalanche / "tensorboard").exists()


def test_history_is_whole_after_a_resume(mnist, tmp_path):
    whole = run_seed(parse_config(mnist_tiny(tmp_path / "a", training={"epochs": 2})), 0, mnist, False)
    raw = mnist_tiny(tmp_path / "b", training={"epochs": 2})
    run_seed(parse_config(raw), 0, mnist, progress=False, stop_after=1)
    resumed = run_seed(parse_config(raw), 0, mnist, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "history.csv"), pd.read_csv(whole / "history.csv"))
