"""Strategies on real data: a user's class from YAML, tunnel-aware strategies, stateful resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cltunnel.measures.probes import ProbeConfig, train_probes
from cltunnel.measures.tunnel import tunnel_start
from cltunnel.training.checkpoints import load_checkpoint, model_from_checkpoint
from cltunnel.config import parse_config
from cltunnel.training.plain_state import restore_object
from cltunnel.runs import run_seed
from cltunnel.data.scenarios import build_scenario
from cltunnel.store import load_metrics
from cltunnel.data.device import DeviceData
from cltunnel.models.surgery import parameter_names
from cltunnel.training.tunnel_aware import LayerwiseEWCPlugin
from test_training import mnist_tiny, tiny

pytestmark = pytest.mark.slow


def changed_layers(run_dir) -> list[bool]:
    t0, t1 = load_checkpoint(run_dir / "task0.pt"), load_checkpoint(run_dir / "task1.pt")
    return [not all(torch.equal(t0["layers"][n][p], t1["layers"][n][p]) for p in t0["layers"][n])
            for n in t0["layer_names"]]


@pytest.mark.parametrize("warmup, body_moves", [(2, False), (1, True)])
def test_user_strategy_class_from_yaml_runs_its_own_hook(cifar10, tmp_path, warmup, body_moves):
    raw = tiny(tmp_path, strategy={"class": "strategies.warmup_heads:WarmupHeads", "args": {"warmup_epochs": warmup}})
    run_dir = run_seed(parse_config(raw), 0, cifar10, progress=False)
    assert changed_layers(run_dir) == [body_moves] * len(changed_layers(run_dir))
    t0, t1 = load_checkpoint(run_dir / "task0.pt"), load_checkpoint(run_dir / "task1.pt")
    assert not torch.equal(t0["heads"]["1"]["weight"], t1["heads"]["1"]["weight"])  # the new head learned


def test_freeze_tunnel_leaves_the_tunnel_bitwise_unchanged(cifar10, tmp_path):
    raw = tiny(tmp_path, strategy={"name": "freeze_tunnel", "args": {"tunnel_start": 5}})
    moved = changed_layers(run_seed(parse_config(raw), 0, cifar10, progress=False))
    assert moved == [k <= 5 for k in range(1, len(moved) + 1)]  # extractor 1..5 learns, tunnel 6..n frozen


def test_extractor_ewc_penalises_only_extractor_parameters(cifar10, tmp_path):
    raw = tiny(tmp_path, strategy={"name": "ewc_extractor", "args": {"tunnel_start": 3}})
    run_dir = run_seed(parse_config(raw), 0, cifar10, progress=False, stop_after=0)
    state = load_checkpoint(run_dir / "task0.pt")
    model = model_from_checkpoint(state)
    plugin = LayerwiseEWCPlugin(100.0, "extractor", 3)
    saved = dict(state["strategy"]["plugins"])["LayerwiseEWCPlugin"]
    restore_object(plugin, {"__object__": "LayerwiseEWCPlugin", "state": saved}, model)
    extractor = parameter_names(model, "extractor", 3)
    first3 = {f"body.{name}." for name in model.layer_names[:3]}
    assert set(plugin.saved_params[0]) == extractor == {n for n, _ in model.named_parameters()
                                                        if any(n.startswith(f) for f in first3)}
    assert len(extractor) == 9  # conv weight, BN weight and bias of layers 1-3
    assert all(float(v) == 0 for v in plugin.penalty_terms(model).values())  # at the saved point
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in extractor:
                p.add_(1.0)  # move every tunnel parameter and head
    assert sum(float(v) for v in plugin.penalty_terms(model).values()) == 0
    with torch.no_grad():
        model.body[0][0].weight.add_(1.0)
    terms = plugin.penalty_terms(model)
    first_conv = f"body.{model.layer_names[0]}.0.weight"
    assert float(terms[first_conv]) > 0 and set(terms) == extractor
    assert all(float(v) == 0 for n, v in terms.items() if n != first_conv)


@pytest.mark.parametrize("strategy", [{"name": "ewc"}, {"name": "lwf"}, {"name": "replay"}, {"name": "si"},
                                      {"name": "mas"}, {"name": "feature_replay", "args": {"tunnel_start": 2}},
                                      {"name": "ewc_extractor", "args": {"tunnel_start": 1}},
                                      {"name": "freeze_tunnel", "args": {"tunnel_start": 1}}])
def test_stateful_strategies_resume_to_the_uninterrupted_numbers(mnist, tmp_path, strategy):
    raw = mnist_tiny(tmp_path / "a", strategy=strategy, training={"epochs": 3})
    whole = load_metrics(run_seed(parse_config(raw), 0, mnist, progress=False))["acc"]
    raw = mnist_tiny(tmp_path / "b", strategy=strategy, training={"epochs": 3})
    run_seed(parse_config(raw), 0, mnist, progress=False, stop_after=1)  # a fresh process would hold no state
    resumed = load_metrics(run_seed(parse_config(raw), 0, mnist, progress=False))["acc"]
    assert resumed == whole


@pytest.mark.parametrize("memory", [{"name": "agem", "args": {"patterns_per_exp": 100}},
                                    {"name": "avalanche_replay", "args": {"mem_size": 100}}])
def test_avalanche_memories_resume_to_the_uninterrupted_numbers(mnist, tmp_path, memory):
    """AGEM's memory and Avalanche's replay buffer (dataset objects, no plain form) are drawn again on resume
    with the same seeds; both act here (the numbers differ from naive), so an empty memory would show."""
    def final(out, strategy, stop=None):
        raw = mnist_tiny(out, strategy=strategy, training={"epochs": 5, "momentum": 0.9})
        if stop is not None:
            run_seed(parse_config(raw), 0, mnist, progress=False, stop_after=stop)
        return load_metrics(run_seed(parse_config(raw), 0, mnist, progress=False))["acc"]

    whole = final(tmp_path / "a", memory)
    assert final(tmp_path / "b", memory, stop=1) == whole
    assert final(tmp_path / "c", "naive") != whole


def test_replay_rescues_class_incremental_learning_and_feature_replay_stores_extractor_outputs(mnist, tmp_path):
    def final(strategy):
        raw = mnist_tiny(tmp_path / str(len(list(tmp_path.iterdir()))), scenario={"mode": "class"}, strategy=strategy)
        run_dir = run_seed(parse_config(raw), 0, mnist, progress=False)
        return np.asarray(load_metrics(run_dir)["acc"])[-1], run_dir

    naive, _ = final({"name": "naive"})
    replay, _ = final({"name": "replay", "args": {"mem_size": 500}})
    latent, run_dir = final({"name": "feature_replay", "args": {"tunnel_start": 2, "freeze_extractor": True}})
    # Measured (seed 0): old tasks 0.00 naive, 0.75 replay; task 0 0.00 naive, 0.74 latent replay.
    assert naive[:4].max() < 0.05 and replay[:4].mean() > 0.5 and latent[0] > naive[0] + 0.3
    state = load_checkpoint(run_dir / "task4.pt")
    slot = dict(state["strategy"]["plugins"])["LayerReplayPlugin"]["buffer"][0]
    model = model_from_checkpoint(state).eval()
    cfg = parse_config(mnist_tiny(tmp_path, scenario={"mode": "class"}))
    data = DeviceData.create(build_scenario(cfg, mnist), torch.device("cpu"), False, False)
    with torch.no_grad():  # the extractor was frozen after task 0, so task 0's stored features stay exact
        x = data.normalise(data.x_train[slot["rows"]])
        assert torch.allclose(slot["features"].float(), model.features(x, upto=2), atol=2e-2, rtol=1e-2)
    assert len(slot["rows"]) == 500 // 5


def test_automatic_tunnel_start_is_the_probe_rule_on_the_first_model(mnist, tmp_path):
    raw = mnist_tiny(tmp_path, strategy={"name": "freeze_tunnel"}, training={"epochs": 3})
    run_dir = run_seed(parse_config(raw), 0, mnist, progress=False, stop_after=0)
    state = load_checkpoint(run_dir / "task0.pt")
    found = dict(state["strategy"]["plugins"])["FreezeLayersPlugin"]["tunnel"]["state"]["value"]
    cfg = parse_config(raw)
    data = DeviceData.create(build_scenario(cfg, mnist), torch.device("cpu"), False, False)
    acc = train_probes(model_from_checkpoint(state), data, data.scenario.tasks[0], cfg=ProbeConfig(epochs=10),
                       progress=False)
    assert found == tunnel_start(acc, 0.95) and 1 <= found <= 3
