"""End-to-end runs on real data at CPU size: bands, determinism, resume, checkpoints, strategies, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bands import BAND_SCENARIO, bands_hold
from cltunnel import store
from cltunnel.training.checkpoints import CheckpointMismatch, load_checkpoint, model_from_checkpoint
from cltunnel.cli import main as cli_main
from cltunnel.config import ConfigError, parse_config
from cltunnel.runs import run_seed
from cltunnel.data.scenarios import build_scenario
from cltunnel.store import load_metrics
from cltunnel.data.device import DeviceData
from cltunnel.training.accuracy import predict_accuracy

REPO = Path(__file__).resolve().parents[1]


def merged(raw: dict, over: dict) -> dict:
    out = dict(raw)
    for key, value in over.items():
        out[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key != "strategy" else value
    return out


def tiny(tmp_path: Path, **over) -> dict:
    raw = {"name": "tiny", "data": {"name": "cifar10", "train_per_class": 100, "test_per_class": 40},
           "scenario": {"tasks": [5, 5]}, "model": {"name": "vgg11", "width": 0.125},
           "training": {"epochs": 2, "lr": 0.05}, "device": "cpu", "output_dir": str(tmp_path)}
    return merged(raw, over)


def mnist_tiny(tmp_path: Path, **over) -> dict:
    raw = tiny(tmp_path, data={"name": "mnist", "train_per_class": 100, "test_per_class": 50},
               scenario={"n_tasks": 5, "tasks": None}, model={"name": "mlp", "args": {"depth": 3}, "width": 0.25},
               training={"epochs": 10, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "augment": False})
    return merged(raw, over)


# The bands of tests/bands.py's scenario (VGG-19 width 1/8, 1,000 images/class, 6 epochs/task, lr 0.1) are its
# expect: section, checked by the mechanism a user's scenario gets (cltunnel.expectations); their calibration is
# noted there. One more band is not a number the run writes, so it is asserted here:
BANDS = {# a probe on the head's input of M1 (task 1 data) minus M1's own task-1 accuracy: -0.9, +2.2 for this
         # scenario (seeds 0, 1 of sweeps/cpu/strategies_cpu.yaml, naive) and +3.6, +8.8 for its 8-conv-layer
         # truncation (the probe trains 30 epochs on fixed features, the head only 6 epochs with the body)
         "probe_vs_model": (-6.0, 12.0)}
# Relations of the thesis that did NOT hold robustly at this size (seeds 0-3), so they are not asserted:
# E2+T1(FT) >= E2+T1 on task 1 (7.6 1.8 -4.0 11.3) and E1+T2 > E2+T2 on task 1 (0.4 4.4 5.4 10.3): in a
# network this small and short-trained, much of the forgetting sits above layer 8 (see tables/README.md).


@pytest.mark.slow
def test_band_scenario_lands_in_calibrated_bands(cifar10, tmp_path):
    from cltunnel.expectations import check_expect

    cfg = parse_config({**BAND_SCENARIO, "output_dir": str(tmp_path)})
    assert len(check_expect(cfg)) == 4
    run_dir = run_seed(cfg, 0, cifar10, progress=False)  # trains, then the swap analysis (analyses.run)
    acc = 100 * np.asarray(load_metrics(run_dir)["acc"])
    outcomes = bands_hold(cfg)
    assert outcomes[0].values[0] == pytest.approx(acc[0, 0]) and outcomes[2].values[0] == pytest.approx(acc[0, 0] - acc[1, 0])
    swap = pd.read_csv(run_dir / "swap_table.csv", index_col=0)["first task"]
    assert swap["E2 + T2"] == pytest.approx(acc[1, 0]) and swap["E1 + T1"] == pytest.approx(acc[0, 0])
    assert outcomes[3].values[0] == pytest.approx(swap["E2 (FT)"] - swap["E2 + T2"])
    from cltunnel.measures.probes import train_probes
    from cltunnel.experiments.analyses import load_run

    run = load_run(run_dir, "cpu", cfg.analyses, progress=False, data=cifar10)
    last = run.n_layers  # the head's input
    probe = train_probes(run.models[0], run.data, run.data.scenario.tasks[0], layers=[last], progress=False)[last]
    assert BANDS["probe_vs_model"][0] <= 100 * probe - acc[0, 0] <= BANDS["probe_vs_model"][1]
    for name in ("accuracy_matrix", "forgetting", "forgetting_exact_rows"):
        for ext in ("csv", "md", "tex"):
            assert (run_dir / f"{name}.{ext}").stat().st_size > 0
    assert (run_dir / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_after_interruption_gives_the_uninterrupted_numbers(cifar10, tmp_path):
    full = run_seed(parse_config(tiny(tmp_path / "a")), 0, cifar10, progress=False)
    cfg_b = parse_config(tiny(tmp_path / "b"))
    part = run_seed(cfg_b, 0, cifar10, progress=False, stop_after=0)
    assert store.finished_tasks(part) == [0] and not (part / "metrics.json").exists()
    resumed = run_seed(cfg_b, 0, cifar10, progress=False)
    assert load_metrics(full)["acc"] == load_metrics(resumed)["acc"]
    a, b = load_checkpoint(full / "task1.pt"), load_checkpoint(resumed / "task1.pt")
    for name in a["layers"]:
        for key in a["layers"][name]:
            assert torch.equal(a["layers"][name][key], b["layers"][name][key]), (name, key)
    # a different configuration in the same directory is refused, not silently mixed
    with pytest.raises(CheckpointMismatch, match="training.lr: checkpoint 0.05, now 0.01"):
        run_seed(parse_config(tiny(tmp_path / "b", training={"lr": 0.01})), 0, cifar10, progress=False)


@pytest.mark.slow
def test_checkpoint_rebuilds_the_model_that_made_the_metrics(cifar10, tmp_path):
    cfg = parse_config(tiny(tmp_path))
    run_dir = run_seed(cfg, 0, cifar10, progress=False)
    state = load_checkpoint(run_dir / "task1.pt")
    assert state["layer_names"][0] == "conv1" and set(state["heads"]) == {"0", "1"}
    assert "state" in state["optimizer"] and state["config"]["training"]["lr"] == 0.05
    model = model_from_checkpoint(state)
    data = DeviceData.create(build_scenario(cfg, cifar10), torch.device("cpu"), False, False)
    recomputed = [predict_accuracy(model, data, t) for t in data.scenario.tasks]
    assert recomputed == pytest.approx(load_metrics(run_dir)["acc"][1], abs=1e-9)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "task0.pt"
    store.atomic_save({"v": 1}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(store.torch, "save", broken_save)
    with pytest.raises(OSError):
        store.atomic_save({"v": 2}, path)
    assert torch.load(path)["v"] == 1 and [p.name for p in tmp_path.iterdir()] == ["task0.pt"]


# mnist_tiny's tasks have 100 test images each: accuracies are whole points, so a band edge at .5 is exactly a
# strict "above" or "below" the whole point beside it.
@pytest.mark.slow
def test_class_incremental_naive_forgets_old_classes_on_mnist(mnist, tmp_path):
    # each task learned (> 90 %); one shared head: earlier classes are overwritten (catastrophic forgetting, < 20 %)
    learned = {"a[0][0]": [90.5, 100], "a[4][4]": [90.5, 100]}
    forgotten = {f"a[4][{j}]": [0, 19.5] for j in range(4)}
    cfg = parse_config(mnist_tiny(tmp_path, scenario={"mode": "class"}, expect={**learned, **forgotten}))
    run_dir = run_seed(cfg, 0, mnist, progress=False)
    assert np.asarray(load_metrics(run_dir)["acc"]).shape == (5, 5)
    bands_hold(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ewc", "lwf", "replay"])
def test_registered_avalanche_strategies_train_multi_head(mnist, tmp_path, strategy):
    learned = {f"a[{i}][{i}]": [85.5, 100] for i in range(5)}  # every 2-class task learned (> 85 %; chance 50 %)
    cfg = parse_config(mnist_tiny(tmp_path, strategy=strategy, expect=learned))
    run_seed(cfg, 0, mnist, progress=False)
    bands_hold(cfg)


@pytest.mark.slow
def test_cli_run_list_and_table(tmp_path, capsys, monkeypatch):
    scenario = tmp_path / "s.yaml"
    raw = tiny(tmp_path / "out")
    raw.pop("output_dir")
    raw.pop("name")  # the file's stem names the scenario
    scenario.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(scenario), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "task 2/2 done" in out and "forgetting" in out
    run_dir = tmp_path / "out" / "s" / "seed0"
    assert json.loads((run_dir / "metrics.json").read_text())["scenario"] == "s"
    assert cli_main(["table", str(run_dir)]) == 0 and "accuracy matrix" in capsys.readouterr().out
    assert cli_main(["analyze", str(run_dir), "--analyses", "cka,cka_layers", "--device", "cpu", "--no-progress"]) == 0
    assert "CKA between M1 and M2" in capsys.readouterr().out and (run_dir / "cka_layers_model1.png").exists()
    assert cli_main(["analyze", str(run_dir), "--analyses", "swapp", "--device", "cpu"]) == 2
    assert "unknown analysis 'swapp' (did you mean 'swap'?)" in capsys.readouterr().err
    monkeypatch.chdir(REPO)
    assert cli_main(["list"]) == 0 and "vgg19" in capsys.readouterr().out
    scenario.write_text(yaml.safe_dump({**raw, "trainig": {}}))
    assert cli_main(["run", str(scenario)]) == 2
    assert "unknown key 'trainig' (did you mean 'training'?)" in capsys.readouterr().err


@pytest.mark.slow
def test_analyses_on_a_real_run_agree_with_its_training_metrics(cifar10, tmp_path):
    """Surgery endpoints reproduce the accuracy matrix; swap table, curves and CKA are written."""
    from cltunnel.experiments.analyses import aggregate_seeds, run_analyses

    raw = tiny(tmp_path, analyses={"run": ["swap", "substitution", "cka", "cka_layers"], "probe": {"epochs": 3}})
    run_dir = run_seed(parse_config(raw), 0, cifar10, progress=False)
    acc = 100 * np.asarray(load_metrics(run_dir)["acc"])
    swap = pd.read_csv(run_dir / "swap_table.csv", index_col=0)
    assert swap.loc["E1 + T1", "first task"] == pytest.approx(acc[0, 0])
    assert swap.loc["E2 + T2", "first task"] == pytest.approx(acc[1, 0])
    assert swap.loc["E2 + T2", "second task"] == pytest.approx(acc[1, 1])
    assert 0 <= swap.loc["E2 (FT)", "first task"] <= 100
    curves = pd.read_csv(run_dir / "substitution.csv")
    fwd = curves[curves["direction"].str.startswith("M1")]
    L = curves["x"].max()
    assert fwd[(fwd.x == 0) & (fwd.task == 1)]["accuracy"].item() == pytest.approx(acc[1, 0])
    assert fwd[(fwd.x == L) & (fwd.task == 1)]["accuracy"].item() == pytest.approx(acc[0, 0])
    cka = pd.read_csv(run_dir / "cka_m1_m2.csv", index_col=0)
    assert ((cka.iloc[:, 1:] > 0) & (cka.iloc[:, 1:] <= 1 + 1e-6)).all().all()
    # re-running one analysis from the CLI path with a given tunnel start
    out = run_analyses(run_dir, ["swap"], "cpu", parse_config({**raw, "analyses": {"tunnel_start": "2",
                                                                                 "probe": {"epochs": 1}}}).analyses)
    assert out["swap"]["swap_table.csv"].attrs["tunnel_start"] == 2
    md = aggregate_seeds(run_dir.parent)
    assert any("Table 5.4.1" in m for m in md) and (run_dir.parent / "tiny_substitution.png").exists()
    assert (run_dir / "cka_layers_model2.png").exists() and (run_dir / "cka_layers_model1.csv").exists()


@pytest.mark.slow
def test_ood_probes_read_mnist_through_a_cifar_backbone(cifar10, tmp_path):
    """OOD probes (MNIST as 32x32 RGB) on every layer of a real CIFAR-10 model, and rho from them."""
    raw = tiny(tmp_path, analyses={"run": ["tunnel", "ood"], "probe": {"epochs": 3}, "ood_train_per_class": 100,
                                   "ood_test_per_class": 50, "rank_samples": 300})
    run_dir = run_seed(parse_config(raw), 0, cifar10, progress=False)
    ood = pd.read_csv(run_dir / "ood_probes.csv", index_col=0)
    layers = list(pd.read_csv(run_dir / "tunnel_profile.csv", index_col=0).index)
    assert list(ood.index) == layers == list(range(1, 11)) and ood["ood_probe_acc"].between(0, 100).all()
    # MNIST digits are linearly separable from early conv features far above chance (10 %), even in a net
    # trained for 2 epochs on CIFAR-10 (measured 63 % at layer 3 here; 94 % in the 6-epoch VGG-19 of the strategy sweep)
    assert ood["ood_probe_acc"].max() > 40
    rho = float((run_dir / "ood_rho.txt").read_text().split("rho: ")[1])
    best = ood["ood_probe_acc"].max()
    assert rho == pytest.approx((best - ood["ood_probe_acc"].iloc[-1]) / best, abs=1e-4) and 0 <= rho <= 1
    assert (run_dir / "ood_probes.png").exists() and (run_dir / "variance_profile.png").exists()
    from cltunnel.experiments.analyses import TABLE_5_2_1_RULES, profile_series, run_analyses, tunnel_table
    from cltunnel.measures.tunnel import format_layer, tunnel_start

    md = tunnel_table(tmp_path)  # Table 5.2.1 over the runs below: this one, with its own tunnel starts
    acc, ranks = profile_series(pd.read_csv(run_dir / "tunnel_profile.csv", index_col=0))
    cells = [format_layer(tunnel_start(acc, share, rule, ranks), 11) for rule, share in TABLE_5_2_1_RULES.values()]
    row = next(line for line in md.splitlines() if line.startswith("| vgg11 (width 0.125) |      11 | cifar10   |         5 |"))
    assert [c.strip() for c in row.split("|")[5:9]] == cells
    assert "rule 'rank'" in md and "(used)" in (run_dir / "tunnel_start.txt").read_text()
    with pytest.raises(ConfigError, match="ood_classes"):
        run_analyses(run_dir, ["ood"], "cpu", parse_config({**raw, "analyses": {"ood_classes": [3, 12]}}).analyses)


@pytest.mark.slow
def test_single_task_run_with_epoch_checkpoints_gives_rank_over_training(cifar10, tmp_path):
    raw = tiny(tmp_path, scenario={"tasks": [10]}, training={"epochs": 2, "checkpoint_every": 1},
               analyses={"run": ["development"], "rank_samples": 300})
    run_dir = run_seed(parse_config(raw), 0, cifar10, progress=False)
    assert [p.name for p in sorted((run_dir / "epochs").iterdir())] == ["task0_epoch0001.pt", "task0_epoch0002.pt"]
    dev = pd.read_csv(run_dir / "development.csv")
    assert sorted(dev["epoch"].unique()) == [1, 2] and len(dev) == 2 * 10
    assert dev[dev.epoch == 1]["weight_change"].isna().all() and (dev[dev.epoch == 2]["weight_change"] > 0).all()
    assert ((dev["rank"] >= 1) & (dev["rank"] <= 300)).all()
    assert (run_dir / "development.png").stat().st_size > 1000


def test_probes_trained_together_equal_probes_trained_one_by_one(mnist):
    """The joint probe trainer's claim: independent probes, so one Adam over all equals one per layer."""
    from cltunnel.measures.probes import ProbeConfig, train_probes
    from cltunnel.models.zoo import make_model, model_spec

    cfg = parse_config(mnist_tiny(Path("unused")))
    scenario = build_scenario(cfg, mnist)
    model = make_model(model_spec(cfg, scenario), seed=0).eval()
    data = DeviceData.create(scenario, torch.device("cpu"), False, False)
    task = scenario.tasks[1]
    joint = train_probes(model, data, task, cfg=ProbeConfig(epochs=3, batch_size=64), progress=False)
    alone = {k: train_probes(model, data, task, layers=[k], cfg=ProbeConfig(epochs=3, batch_size=64, cache_bytes=0),
                             progress=False)[k] for k in joint}
    assert joint == pytest.approx(alone, abs=1e-9)
    assert all(0.5 <= a <= 1.0 for a in joint.values())  # 2-class task: at least chance, never above 1


@pytest.mark.parametrize("model,expected", [({"name": "vgg19", "width": 1.0}, True),
                                            ({"name": "vgg19", "width": 0.25}, False),
                                            ({"name": "vgg19", "width": 1.0, "args": {"conv_layers": 8}}, False),
                                            ({"name": "vgg13", "width": 1.0}, False)])
def test_thesis_swap_values_are_shown_only_beside_the_thesis_model(tmp_path, model, expected):
    """Table 5.4.1's numbers are for the full VGG-19 at width 1: a narrower or cut one gets no thesis column."""
    from cltunnel.experiments.analyses import _is_table_5_4_1_setup

    cfg = {"data": {"name": "cifar10"}, "scenario": {"tasks": [5, 5]}, "model": {"args": {}, **model}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert _is_table_5_4_1_setup(tmp_path) is expected


@pytest.mark.parametrize("label, expected", [(None, "task 3"), ("squared phase", "squared phase")])
def test_progress_bar_says_which_part_of_the_run_is_training(label, expected):
    from types import SimpleNamespace

    from cltunnel.training.plugins import ProgressPlugin

    plugin = ProgressPlugin(enabled=True, label=label)
    strategy = SimpleNamespace(train_epochs=2, dataloader=range(5), experience=SimpleNamespace(current_experience=3))
    plugin.before_training_exp(strategy)
    assert plugin.bar.desc.startswith(expected) and plugin.bar.total == 10
    plugin.after_training_exp(strategy)
    assert plugin.bar is None


@pytest.mark.slow
def test_bf16_training_keeps_the_surgery_identities(mnist, tmp_path):
    """One precision for every number (issue 23, item 3): trained in bf16 autocast (forced here on the CPU,
    where it is real autocast too), the accuracy matrix and the analyses both evaluate in float32, so the swap
    table's endpoints equal the accuracy matrix exactly, as in a float32 run; and bf16 really trained (the
    training losses differ from the float32 run's)."""
    from cltunnel.experiments.analyses import run_analyses

    loss = {}
    for amp in ("bf16", "off"):
        raw = mnist_tiny(tmp_path / amp, data={"train_per_class": 300, "test_per_class": 100},
                         scenario={"n_tasks": None, "tasks": [5, 5]}, training={"epochs": 2, "amp": amp},
                         analyses={"run": ["swap"], "probe": {"epochs": 1}})
        run_dir = run_seed(parse_config(raw), 0, mnist, progress=False)
        acc = 100 * np.asarray(load_metrics(run_dir)["acc"])
        assert min(acc[0, 0], acc[1, 0], acc[1, 1]) > 50  # it learned: the identities are not between chance numbers
        swap = run_analyses(run_dir, ["swap"], "cpu", parse_config(raw).analyses, progress=False, data=mnist)["swap"]["swap_table.csv"]
        assert swap.loc["E1 + T1", "first task"] == acc[0, 0]
        assert swap.loc["E2 + T2", "first task"] == acc[1, 0]
        assert swap.loc["E2 + T2", "second task"] == acc[1, 1]
        loss[amp] = pd.read_csv(run_dir / "history.csv")["loss"].to_numpy()
    assert not np.allclose(loss["bf16"], loss["off"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, trains_old_heads", [("naive", False), ("lwf", True), ("replay", True)])
def test_swap_endpoints_equal_the_accuracy_matrix_for_every_strategy(mnist, tmp_path, capsys, strategy,
                                                                     trains_old_heads):
    """Issue 24, heads: LwF (distillation through every head) and replay (old heads see replayed batches) keep
    training old heads. Each task's head now comes from the later of the model after that task and the model
    supplying the top layers, so E1+T1 = a[0][0] and E2+T2 = (a[1][0], a[1][1]) for every strategy; where the
    strategy trained old heads, the run says so (before: E2+T2 on task 1 used M1's stale head 0)."""
    from cltunnel.experiments.analyses import read_swap_meta, run_analyses

    raw = mnist_tiny(tmp_path, data={"train_per_class": 300, "test_per_class": 100},
                     scenario={"n_tasks": None, "tasks": [5, 5]}, training={"epochs": 2}, strategy={"name": strategy},
                     analyses={"run": ["swap"], "probe": {"epochs": 1}, "tunnel_start": "2"})
    run_dir = run_seed(parse_config(raw), 0, mnist, progress=False)
    acc = 100 * np.asarray(load_metrics(run_dir)["acc"])
    swap = run_analyses(run_dir, ["swap"], "cpu", parse_config(raw).analyses, progress=False, data=mnist)["swap"]["swap_table.csv"]
    assert swap.loc["E1 + T1", "first task"] == acc[0, 0]
    assert swap.loc["E2 + T2", "first task"] == acc[1, 0]
    assert swap.loc["E2 + T2", "second task"] == acc[1, 1]
    notices = read_swap_meta(run_dir).notices
    assert any("kept training old heads" in n for n in notices) == trains_old_heads, notices
