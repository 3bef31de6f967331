"""The feature-erosion protocol's curve (:mod:`cltunnel.experiments.erosion`): clean and squared test accuracy
every few epochs across its phases."""
from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin

from cltunnel.data.device import DeviceData
from cltunnel.training.accuracy import exact_rows_accuracy, predict_accuracy

TRAIN_ACC_ROWS = 5000  # training accuracy (is pre-training near 100 %?) is read on at most this many rows


class TestCurvePlugin(SupervisedPlugin):
    """Clean and squared test accuracy every ``every`` epochs, appended to ``curve``, with the accuracy on the
    images the phase trains on (unaugmented), since the protocol pre-trains to (near) 100 % training accuracy."""

    transient = True  # holds the views (whole datasets): never part of a checkpoint

    def __init__(self, views: dict[str, DeviceData], curve: list[dict[str, Any]], every: int, epochs: int) -> None:
        super().__init__()
        self.views, self.curve, self.every, self.epochs = views, curve, every, epochs
        self.phase, self.offset = "", 0

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        epoch = strategy.clock.train_exp_epochs + 1
        if epoch % self.every == 0 or epoch == self.epochs:
            row = {"phase": self.phase, "epoch": self.offset + epoch}
            trained_on = strategy.run_context.data
            task = trained_on.scenario.tasks[0]
            row["train"] = 100 * predict_accuracy(strategy.model, trained_on, task, task.train_idx[:TRAIN_ACC_ROWS],
                                                  split="eval_train")
            for name, view in self.views.items():
                test_task = view.scenario.tasks[0]
                acc = predict_accuracy(strategy.model, view, test_task)
                row[name] = 100 * acc
                if view.scenario.data.has_lossy_test_rows and len(test_task.test_lossless_idx):
                    row[f"{name} exact rows"] = 100 * exact_rows_accuracy(strategy.model, view, test_task, acc)
            self.curve.append(row)
