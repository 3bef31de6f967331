"""Narrow ResNets on toy maps (issue 26, Kuehn, Kuntz & Wöhrer 2026): width-1 monotone presets cannot beat
the isotonic bound 9/160 on x², the folding ones can; the critical-point, fold and unbounded-region measures
find what a hand-written map has; bad settings are one line before any work; a seed resumes."""
from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from cltunnel.cli import main as cli_main
from cltunnel.config import parse_config
from cltunnel.experiments import protocol_for
from cltunnel.experiments import narrow_resnet as nr
from cltunnel.experiments.narrow_resnet import NarrowResnetConfig



@pytest.fixture(autouse=True)
def one_thread():
    """These toy networks train faster on one thread; the setting is restored so that no later test (one
    comparing an in-process run with a subprocess, say) inherits it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_x2(regime: str, depth: int, nc: NarrowResnetConfig, seed: int = 0) -> dict[str, float]:
    data = nr.task_data("x2", seed, nc)
    spec = nr.resolve_regime(regime, depth, 1, nc)
    key = nr.model_key("x2", spec, depth)
    torch.manual_seed(nr.model_seed(seed, key))
    model = nr.NarrowResNet(1, depth, spec, nc.activation, batchnorm=False)
    nr.train(model, data, "x2", nc, nr.model_seed(seed, key))
    return nr.measure(model, "x2", data, spec, nc)


def test_the_bound_is_the_best_monotone_fit_on_the_grid_the_error_is_measured_on():
    """9/160 is the least MSE of a monotone map against x² on U[-1, 1]; on the quadrature grid the MSE is
    measured on, the best monotone fit (pool adjacent violators) is at it, not below."""
    x = nr.x2_grid().numpy()
    y = x ** 2
    blocks = [[v, 1] for v in y]  # non-increasing fit of a symmetric target: the same error as non-decreasing
    merged: list[list[float]] = []
    for value, weight in blocks:
        merged.append([value, weight])
        while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
            (v1, w1), (v2, w2) = merged.pop(-2), merged.pop()
            merged.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2])
    fit = np.concatenate([[v] * int(w) for v, w in merged])
    best = float(((fit - y) ** 2).mean())
    assert best == pytest.approx(nr.MONOTONE_BOUND, rel=1e-3) and best >= nr.MONOTONE_BOUND - 1e-6


def test_width_one_mlp_and_ode_stay_above_9_160_and_resnet_or_augmented_goes_below():
    """mlp (eps 0) is monotone by construction at any depth; ode (eps 1, delta 1/L) is invertible while every
    block weight stays above -L, which training did not reach at these depths (at L = 2 or 4 it can: measured,
    see tables/README.md); a standard ResNet or an augmented MLP fits x² far below the bound."""
    nc = NarrowResnetConfig(tasks=["x2"], epochs=40, batch_size=16, points=300)
    for regime, depths in (("mlp", [1, 3, 8]), ("ode", [8, 12])):
        for depth in depths:
            m = fit_x2(regime, depth, nc)
            assert m["error"] >= nr.MONOTONE_BOUND and m["critical_points"] == 0 and m["fold"] == 0, (regime, depth, m)
    folding = {(regime, depth): fit_x2(regime, depth, nc)["error"] for regime in ("resnet", "augmented")
               for depth in (2, 4)}
    assert min(folding.values()) < 0.5 * nr.MONOTONE_BOUND, folding


def test_monotone_and_folding_blocks_by_construction():
    """Random width-1 weights: an eps = 0 network never has a critical point; an ode block with weight
    below -L folds."""
    nc = NarrowResnetConfig()
    x = nr.box_grid(3.0, 401, 1)
    for trial in range(20):
        torch.manual_seed(trial)
        mlp = nr.NarrowResNet(1, 4, nr.resolve_regime("mlp", 4, 1, nc), "tanh", False).double().eval()
        with torch.no_grad():
            for p in mlp.parameters():
                p.mul_(5)
        assert nr.critical_points_1d(mlp, x) == 0
    ode = nr.NarrowResNet(1, 4, nr.resolve_regime("ode", 4, 1, nc), "tanh", False).double().eval()
    with torch.no_grad():
        ode.input[0].weight.fill_(1.0)
        ode.blocks[0].fc.weight.fill_(-8.0)  # slope 1 + (-8/4) tanh' < 0 near 0
    assert nr.critical_points_1d(ode, x) == 2
    assert nr.folds(nr.determinant_sign([ode.input, *ode.blocks], x))


def test_critical_point_counter_finds_the_known_critical_points():
    grid = nr.box_grid(3.0, 241, 1)
    assert nr.critical_points_1d(lambda x: torch.sin(2 * x[:, 0]), grid) == 4  # ±π/4, ±3π/4
    assert nr.critical_points_1d(lambda x: x[:, 0] ** 3 - x[:, 0], grid) == 2  # ±1/√3
    assert nr.critical_points_1d(lambda x: torch.tanh(x[:, 0]), grid) == 0
    axis = np.linspace(-3, 3, 241)
    a, b = 0.013, -0.007  # off the grid's nodes
    double_well = lambda x: ((x[:, 0] - a) ** 2 - 1) ** 2 + (x[:, 1] - b) ** 2  # minima (a±1, b), saddle (a, b)
    index = nr.critical_cells_2d(double_well, axis)
    rows, cols = np.nonzero(index)
    centre = (axis[:-1] + axis[1:]) / 2
    found = sorted(zip(centre[cols].round(2), centre[rows].round(2), index[rows, cols]))
    assert [(x1, kind) for x1, _, kind in found] == [(-0.99, 1), (0.01, -1), (1.01, 1)]
    assert all(abs(x2 - b) < 0.02 for _, x2, _ in found)
    steep = lambda x: 40 * torch.tanh(20 * (x[:, 0] - a)) + (x[:, 1] - b) ** 2  # a sharp ramp: no critical point
    assert not nr.critical_cells_2d(steep, axis).any()


class Fold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] ** 2, x[:, 1]], 1)


class Twist(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] ** 3 + x[:, 0] + x[:, 1], torch.tanh(x[:, 1])], 1)


def test_fold_and_unbounded_region_of_hand_written_maps():
    grid = nr.box_grid(2.0, 41, 2)
    assert nr.folds(nr.determinant_sign([Fold()], grid).reshape(41, 41))
    assert not nr.folds(nr.determinant_sign([Twist()], grid).reshape(41, 41))
    r = np.hypot(*np.meshgrid(np.linspace(-3, 3, 61), np.linspace(-3, 3, 61)))
    centre = r <= 0.4
    assert not nr.unbounded_region(r <= 0.7, centre)
    strip = (r <= 0.7) | (np.abs(np.meshgrid(np.linspace(-3, 3, 61), np.linspace(-3, 3, 61))[1]) < 0.2)
    assert nr.unbounded_region(strip, centre)
    assert nr.unbounded_region(r >= 2.5, centre) is None  # no region holds the disk: nothing to judge


BAD_BASE = {"name": "bad", "data": {"name": "mnist"}, "scenario": {"n_tasks": 1}, "device": "cpu",
            "narrow_resnet": {"tasks": ["x2"]}}


@pytest.mark.parametrize("change, fragment", [
    ({"width": 0}, "narrow_resnet.width: must be at least 1"),
    ({"regimes": [{"eps": 1, "delta": -0.5}]}, "narrow_resnet.regimes[0].delta: must not be negative"),
    ({"regimes": ["mlp", "odee"]}, "narrow_resnet.regimes[1]: unknown preset 'odee' (did you mean 'ode'?)"),
    ({"tasks": ["x3"]}, "narrow_resnet.tasks: unknown ['x3']"),
    ({"depths": [0]}, "narrow_resnet.depths"),
    ({"augmented_width": 1}, "narrow_resnet.augmented_width: must be above"),
], ids=["width 0", "negative delta", "unknown preset", "unknown task", "depth 0", "augmented not wider"])
def test_bad_settings_are_one_line_before_any_work(tmp_path, capsys, change, fragment):
    raw = copy.deepcopy(BAD_BASE)
    raw["narrow_resnet"].update(change)
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(raw))
    rc = cli_main(["run", str(scenario), "--no-progress", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def tiny_config(out) -> object:
    return parse_config({"name": "nr", "data": {"name": "mnist"}, "scenario": {"n_tasks": 1}, "output_dir": str(out),
                         "narrow_resnet": {"tasks": ["x2", "disk_ring"], "regimes": ["mlp", {"eps": 0.1, "delta": 1}],
                                           "depths": [1, 2], "epochs": 2, "points": 60, "grid": 21}})


def test_a_seed_resumes_after_a_kill_and_a_finished_one_does_nothing(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "a")
    assert protocol_for(cfg).name == "narrow_resnet"
    trained = []
    real_train = nr.train
    monkeypatch.setattr(nr, "train", lambda model, data, task, nc, seed: trained.append(task) or
                        real_train(model, data, task, nc, seed))
    run_dir = nr.run_narrow_resnet(cfg, 0, None, progress=False, stop_after=3)  # killed after 3 of 8 models
    assert len(nr.load_models(run_dir)) == 3 and not (run_dir / nr.FINISHED).exists()
    nr.run_narrow_resnet(cfg, 0, None, progress=False)
    assert len(trained) == 8 and (run_dir / nr.FINISHED).exists()
    stamp = (run_dir / nr.FINISHED).stat().st_mtime_ns
    nr.run_narrow_resnet(cfg, 0, None, progress=False)
    assert len(trained) == 8 and (run_dir / nr.FINISHED).stat().st_mtime_ns == stamp  # nothing ran, nothing written
    fresh = nr.run_narrow_resnet(tiny_config(tmp_path / "b"), 0, None, progress=False)
    assert (fresh / nr.FINISHED).read_text() == (run_dir / nr.FINISHED).read_text()  # resumed = uninterrupted
    md = nr.aggregate_narrow_resnet(run_dir.parent)
    assert "eps=0.1 delta=1, L=2" in md and "unbounded region" in md
    for name in ("nr_x2.csv", "nr_x2.md", "nr_disk_ring.md", "nr_x2.png", "nr_disk_ring_regions.png"):
        assert (run_dir.parent / name).exists(), name


# ------------------------------------------------------------------ issue 33: the authors' protocol
def test_the_weight_bound_on_hand_set_blocks_and_batchnorm_rescales_the_weight():
    """δ‖W_eff‖₂ < ε is the theorem's no-fold bound; with BN the block applies γ/sqrt(running var)·W."""
    nc = NarrowResnetConfig()
    model = nr.NarrowResNet(1, 2, nr.resolve_regime("resnet", 2, 1, nc), "tanh", batchnorm=True, input_layer=False)
    with torch.no_grad():
        model.blocks[0].fc.weight.fill_(-3.0)
        model.blocks[1].fc.weight.fill_(0.6)
        model.blocks[1].bn.running_var.fill_(0.25 - model.blocks[1].bn.eps)  # γ/σ = 2: W_eff = 1.2
    bound = nr.weight_bound(model.double().eval(), nr.resolve_regime("resnet", 2, 1, nc))
    assert bound["bound_violations"] == 2 and bound["min_eig"] == pytest.approx(-3.0 / np.sqrt(1 + 1e-5), rel=1e-6)
    assert bound["bound_ratio"] == pytest.approx(3.0 / np.sqrt(1 + 1e-5), rel=1e-6)
    safe = nr.weight_bound(model, nr.Regime("strong skip", 4.0, 1.0, 1))
    assert safe["bound_violations"] == 0
    assert nr.weight_bound(model, nr.resolve_regime("mlp", 2, 1, nc))["bound_violations"] == 2  # ε = 0: no bound
    x = nr.box_grid(3.0, 401, 1)
    assert nr.folds(nr.determinant_sign(list(model.blocks), x))  # the violating block (δw = -3 < -ε) folds


def test_delta_over_depth_and_the_presets():
    nc = NarrowResnetConfig()
    ode = nr.resolve_regime({"name": "ode", "eps": 1, "delta": "2/L"}, 20, 2, nc)
    assert ode == nr.Regime("ode", 1.0, 0.1, 2)
    assert nr.resolve_regime("near_mlp", 6, 2, nc) == nr.Regime("near_mlp", 0.1, 1.0, 2)
    assert nr.regime_name({"eps": 1, "delta": "2/L"}) == "eps=1 delta=2/L"
    own = NarrowResnetConfig(tasks=["disk_ring"], depths=[2, 3], regimes=["mlp", {"name": "ode", "eps": 1, "delta": "2/L",
                                                                                  "depths": [20]}])
    assert [key for key, _ in nr.jobs(own, 0)] == ["disk_ring/mlp/L2", "disk_ring/mlp/L3", "disk_ring/ode/L20"]


def test_retries_stop_at_the_first_accepted_try_and_report_a_failure(monkeypatch):
    nc = NarrowResnetConfig(tasks=["x2"], epochs=2, batch_size=10, points=60, retries=3, input_layer=[], batchnorm=[])
    data = nr.task_data("x2", 0, nc)
    spec = nr.model_spec("x2", nr.resolve_regime("mlp", 1, 1, nc), 1, nc, 0, False)
    _, _, easy = nr.train_accepted(spec, data, dataclasses.replace(nc, accept={"x2": 0.01}), 0, "k")
    assert easy["tries"] == 1 and easy["accepted"] == 1.0
    _, _, hard = nr.train_accepted(spec, data, dataclasses.replace(nc, accept={"x2": 0.9999}), 0, "k")
    assert hard["tries"] == 3 and hard["accepted"] == 0.0 and len(set(hard["scores"])) == 3  # fresh inits
    assert hard["attempt"] == 1 + int(np.argmax(hard["scores"]))  # none accepted: the best try is kept


def test_keep_best_ends_at_the_best_test_epoch(monkeypatch):
    nc = NarrowResnetConfig(tasks=["disk_ring"], epochs=6, points=200, keep_best=True, standardise=True)
    data = nr.task_data("disk_ring", 0, nc)
    assert data["x_train"].std(0).mean() == pytest.approx(1.0, abs=0.1)  # standardised
    seen = []
    real = nr.score
    monkeypatch.setattr(nr, "score", lambda m, t, d: seen.append(real(m, t, d)) or seen[-1])
    torch.manual_seed(0)
    model = nr.NarrowResNet(2, 3, nr.resolve_regime("near_mlp", 3, 2, nc), "tanh", batchnorm=True)
    nr.train(model, data, "disk_ring", nc, 0)
    assert len(seen) == 6 and real(model, "disk_ring", data) == pytest.approx(max(seen))


def test_a_constant_x2_fit_is_reported():
    nc = NarrowResnetConfig(tasks=["x2"], points=60, grid=41, input_layer=[])
    regime = nr.resolve_regime("mlp", 1, 1, nc)
    model = nr.NarrowResNet(1, 1, regime, "tanh", False, input_layer=False)
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.fill_(1 / 3)  # E[x²]: the best constant
    m = nr.measure(model, "x2", nr.task_data("x2", 0, nc), regime, nc)
    assert m["constant_fit"] == 1.0 and m["error"] == pytest.approx(nr.X2_VARIANCE, rel=1e-3)


@pytest.mark.parametrize("change, fragment", [
    ({"task_settings": {"x2": {"box": 2}}}, "narrow_resnet.task_settings.x2: unknown ['box']"),
    ({"task_settings": {"x2": {"depths": [0]}}}, "narrow_resnet.task_settings.x2.depths"),
    ({"accept": {"x2": 1.5}}, "narrow_resnet.accept.x2: a score in (0, 1]"),
    ({"input_layer": [], "regimes": ["augmented"]}, "narrow_resnet.input_layer: x2 has no input layer"),
    ({"regimes": [{"eps": 1, "delta": "2/M"}]}, "narrow_resnet.regimes[0].delta"),
    ({"batchnorm_axis": [True, True]}, "narrow_resnet.batchnorm_axis"),
    ({"regimes": [{"eps": 1, "delta": 1, "depths": [0]}]}, "narrow_resnet.regimes[0].depths: a list of depths"),
], ids=["task key", "task depth", "accept", "no input layer, wide", "delta over what", "axis twice", "regime depths"])
def test_bad_protocol_settings_are_one_line(tmp_path, capsys, change, fragment):
    test_bad_settings_are_one_line_before_any_work(tmp_path, capsys, change, fragment)


def test_cosine_schedule_is_validated():
    from cltunnel.config import ConfigError
    base = {"name": "c", "data": {"name": "mnist"}, "scenario": {"n_tasks": 1}}
    cfg = parse_config({**base, "training": {"lr_schedule": "cosine", "epochs": 3}})
    assert cfg.training.lr_schedule == "cosine"
    assert cfg.fingerprint() != parse_config({**base, "training": {"epochs": 3}}).fingerprint()
    for bad, fragment in (({"lr_schedule": "cosin"}, "training.lr_schedule: is step or cosine"),
                          ({"lr_schedule": "cosine", "lr_milestones": [2]}, "cosine takes no lr_milestones"),
                          ({"lr_schedule": "cosine", "capture": "on"}, "training.capture")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_config({**base, "training": bad})
    from cltunnel.config import StrategyConfig
    from cltunnel.training.strategies import build_strategy
    strategy = build_strategy(StrategyConfig(), nn.Linear(2, 2), cfg.training, nn.CrossEntropyLoss(), torch.device("cpu"), [])
    (plugin,) = [p for p in strategy.plugins if hasattr(p, "scheduler")]
    lrs = []
    for _ in range(3):
        lrs.append(strategy.optimizer.param_groups[0]["lr"])
        strategy.optimizer.step()
        plugin.scheduler.step()
    assert lrs == pytest.approx([0.1 * (1 + np.cos(np.pi * e / 3)) / 2 for e in range(3)])  # lr·(1 + cos(π e/E))/2


def test_the_authors_protocol_end_to_end(tmp_path):
    """x² without an input layer, the disk standardised, BatchNorm as an axis, retries reported; the level-set
    and trajectory figures written."""
    cfg = parse_config({"name": "au", "data": {"name": "mnist"}, "scenario": {"n_tasks": 1}, "output_dir": str(tmp_path),
                        "narrow_resnet": {"tasks": ["x2", "disk_ring"], "regimes": ["near_mlp"], "depths": [2],
                                          "batchnorm_axis": [True, False], "input_layer": ["disk_ring"],
                                          "standardise": True, "retries": 2, "accept": {"disk_ring": 0.99},
                                          "keep_best": True, "epochs": 2, "points": 80, "grid": 21,
                                          "task_settings": {"x2": {"batchnorm_axis": [False], "batch_size": 10}}}})
    run_dir = nr.run_narrow_resnet(cfg, 0, None, progress=False)
    rows = pd.read_csv(run_dir / nr.FINISHED)
    assert list(rows.regime) == ["near_mlp, no BN", "near_mlp, BN", "near_mlp, no BN"]
    disk = rows[rows.task == "disk_ring"]
    assert disk.tries.between(1, 2).all() and disk.accepted.isin([0, 1]).all() and disk.batchnorm.tolist() == [True, False]
    models = nr.load_models(run_dir)
    assert isinstance(models["x2/near_mlp, no BN/L2"]["spec"] and nr.build(models["x2/near_mlp, no BN/L2"]["spec"]).input,
                      nn.Identity)
    md = nr.aggregate_narrow_resnet(run_dir.parent)
    assert "tries" in md and "blocks with δ‖W‖ ≥ ε" in md and "constant fit" in md
    for name in ("au_disk_ring_levels.png", "au_disk_ring_trajectories.png", "au_x2.png"):
        assert (run_dir.parent / name).exists(), name
