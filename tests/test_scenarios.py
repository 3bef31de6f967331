from __future__ import annotations

import numpy as np
import pytest
import torch

from cltunnel.config import parse_config
from cltunnel.data.scenarios import avalanche_benchmark, build_scenario


def _cfg(tasks=None, n_tasks=None, order=None, mode="task", name="cifar10", **data):
    sc = {"mode": mode, **({"tasks": tasks} if tasks else {"n_tasks": n_tasks})}
    if order:
        sc["class_order"] = order
    return parse_config({"data": {"name": name, **data}, "scenario": sc})


@pytest.mark.parametrize("tasks", [[5, 5], [3, 7], [7, 3]])
def test_exact_classes_per_task(cifar10, tasks):
    sc = build_scenario(_cfg(tasks), cifar10)
    assert [t.classes for t in sc.tasks] == [list(range(tasks[0])), list(range(tasks[0], 10))]
    for t in sc.tasks:
        assert set(cifar10.y_train[t.train_idx].tolist()) == set(t.classes)
        assert len(t.train_idx) == 5000 * t.n_classes and len(t.test_idx) == 1000 * t.n_classes
        assert sorted(t.label_map[t.classes].tolist()) == list(range(t.n_classes))  # ids from zero per task
    assert sc.head_sizes == tasks


def test_class_order_and_class_incremental_labels(cifar10):
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    sc = build_scenario(_cfg(n_tasks=5, order=order, mode="class"), cifar10)
    assert [t.classes for t in sc.tasks] == [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]]
    assert sc.head_sizes == [10] and {t.head for t in sc.tasks} == {0}
    assert sc.tasks[2].label_map[[5, 4]].tolist() == [4, 5]  # global ids by position in the class order


def test_lossless_rows_and_per_class_caps(cifar10):
    sc = build_scenario(_cfg([5, 5], test_rows="lossless", train_per_class=100, test_per_class=50), cifar10)
    for t in sc.tasks:
        assert cifar10.test_lossless[t.test_idx].all()
        assert torch.equal(t.test_idx, t.test_lossless_idx)
        assert torch.bincount(cifar10.y_train[t.train_idx])[t.classes].tolist() == [100] * 5
        assert len(t.test_idx) == 250


@pytest.mark.parametrize("tasks,order,mode", [([3, 7], None, "task"), ([5, 5], [3, 1, 4, 0, 5, 9, 2, 6, 8, 7], "task"),
                                              ([7, 3], None, "class")])
def test_avalanche_benchmark_holds_the_same_samples(cifar10, tasks, order, mode):
    sc = build_scenario(_cfg(tasks, order=order, mode=mode, train_per_class=40, test_per_class=20), cifar10)
    mean, std = cifar10.channel_stats()
    bm = avalanche_benchmark(sc, mean, std)
    for t, exp in zip(sc.tasks, bm.train_stream):
        assert sorted(exp.classes_in_this_experience) == sorted(t.label_map[t.classes].tolist())
        assert exp.task_label == (t.id if mode == "task" else 0)
        # Avalanche groups an experience by class (dataset order within a class): compare in that order.
        labels = t.label_map[cifar10.y_train[t.train_idx]]
        rows = t.train_idx[torch.argsort(labels, stable=True)]
        got = sorted(range(len(exp.dataset)), key=lambda i: exp.dataset.targets[i])
        assert [exp.dataset.targets[i] for i in got] == sorted(labels.tolist())
        x = torch.stack([exp.dataset[i][0] for i in got])
        expected = (cifar10.x_train[rows].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        assert torch.allclose(x, expected, atol=1e-5)
    for t, exp in zip(sc.tasks, bm.test_stream):
        assert sorted(exp.dataset.targets) == sorted(t.label_map[cifar10.y_test[t.test_idx]].tolist())


def test_cl_metrics_match_a_hand_computed_accuracy_matrix():
    from cltunnel.reports.tables import cl_metrics_frame

    acc = [[0.90, 0.10, 0.20],
           [0.95, 0.80, 0.30],
           [0.50, 0.70, 0.95]]
    got = cl_metrics_frame(acc, acc_init=[0.10, 0.20, 0.30])["value"]
    assert got["ACC"] == pytest.approx((50 + 70 + 95) / 3)
    assert got["BWT"] == pytest.approx(((50 - 90) + (70 - 80)) / 2)  # -25
    assert got["FWT"] == pytest.approx(((10 - 20) + (30 - 30)) / 2)  # -5: a[j-1][j] against the untrained model
    assert got["forgetting (last)"] == pytest.approx(25)
    assert got["forgetting (max)"] == pytest.approx(((95 - 50) + (80 - 70)) / 2)  # 27.5: the best, not the first
    assert got["average incremental accuracy"] == pytest.approx((90 + (95 + 80) / 2 + (50 + 70 + 95) / 3) / 3)
    assert np.isnan(cl_metrics_frame(acc)["value"]["FWT"])  # no untrained baseline: not a number, not zero
