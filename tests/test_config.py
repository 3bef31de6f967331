from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cltunnel.config import ConfigError, load_config, parse_config
from cltunnel.data.scenarios import build_scenario

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"name": "cifar10"}, "scenario": {"tasks": [5, 5]}, "model": {"name": "vgg19"}}


def test_every_shipped_scenario_parses_and_names_are_unique():
    paths = sorted((REPO / "scenarios").rglob("*.yaml"))
    names = [load_config(p).name for p in paths]
    assert len(paths) >= 13 and len(set(names)) == len(names)


def test_paper_settings_in_split_scenarios():
    for name, tasks in (("split5", [5, 5]), ("split3_7", [3, 7]), ("split7_3", [7, 3])):
        cfg = load_config(REPO / "scenarios" / f"{name}.yaml")
        t = cfg.training
        assert cfg.scenario.tasks == tasks and cfg.model.name == "vgg19" and cfg.model.width == 1.0
        assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (0.1, 0.9, 1e-4, 128, 30)
        assert t.lr_milestones == [] and cfg.scenario.mode == "task"


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'training.learning_rate' \(did you mean 'lr'\?\)") as err:
        parse_config({**BASE, "training": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key 'training.epoch' \(did you mean 'epochs'\?\)"):
        parse_config({**BASE, "training": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'scenaro'.*did you mean 'scenario'"):
        parse_config({**BASE, "scenaro": {}})
    assert "valid keys here" in str(err.value)


def test_yaml_scientific_notation_string_is_coerced_and_bad_numbers_named():
    cfg = parse_config({**BASE, "training": {"weight_decay": "1e-4"}})
    assert cfg.training.weight_decay == 1e-4
    with pytest.raises(ConfigError, match=r"training.epochs: expected an integer"):
        parse_config({**BASE, "training": {"epochs": "many"}})


def test_split_that_does_not_add_up_names_the_numbers(cifar10):
    cfg = parse_config({**BASE, "scenario": {"tasks": [3, 5]}})
    with pytest.raises(ConfigError, match=r"3 \+ 5 = 8 classes, but dataset 'cifar10' has 10"):
        build_scenario(cfg, cifar10)
    with pytest.raises(ConfigError, match="do not split into 3 equal tasks"):
        build_scenario(parse_config({**BASE, "scenario": {"n_tasks": 3}}), cifar10)


def test_bad_class_order_is_refused(cifar10):
    cfg = parse_config({**BASE, "scenario": {"tasks": [5, 5], "class_order": [0, 1, 2]}})
    with pytest.raises(ConfigError, match="class_order: must be a permutation of 0..9"):
        build_scenario(cfg, cifar10)


def test_unknown_model_and_strategy_list_the_valid_names():
    from cltunnel.models.zoo import build_model
    from cltunnel.training.strategies import resolve_strategy

    with pytest.raises(ValueError, match=r"unknown model 'vgg20'.*vgg19"):
        build_model("vgg20", [5], (3, 32, 32))
    cfg = parse_config({**BASE, "strategy": "ewk"})
    with pytest.raises(ConfigError, match=r"unknown strategy 'ewk'.*naive, ewc"):
        resolve_strategy(cfg.strategy)
    with pytest.raises(ConfigError, match="cannot import module 'nowhere.at_all'"):
        resolve_strategy(parse_config({**BASE, "strategy": {"class": "nowhere.at_all:X"}}).strategy)


def test_choice_fields_are_checked():
    with pytest.raises(ConfigError, match=r"scenario.mode: 'domain' is not one of task, class"):
        parse_config({**BASE, "scenario": {"tasks": [5, 5], "mode": "domain"}})
    with pytest.raises(ConfigError, match="test_rows"):
        parse_config({**BASE, "data": {"name": "cifar10", "test_rows": "clean"}})


def test_unquoted_on_off_in_yaml_reach_the_choice_fields(tmp_path):
    """PyYAML reads `channels_last: on` as True; the user meant the choice 'on', not a type error."""
    path = tmp_path / "s.yaml"
    path.write_text("data: {name: cifar10}\nscenario: {tasks: [5, 5]}\nmodel: {name: vgg19}\n"
                    "training: {channels_last: on, amp: off}\n")
    cfg = load_config(path)
    assert (cfg.training.channels_last, cfg.training.amp) == ("on", "off")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_gpu_says_so():
    from cltunnel.data.device import resolve_device

    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_missing_scenario_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="scenario file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_ignores_seeds_and_device_but_not_training():
    a = parse_config({**BASE, "seeds": [0]})
    b = parse_config({**BASE, "seeds": [1, 2], "device": "cpu"})
    c = parse_config({**BASE, "training": {"lr": 0.01}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
