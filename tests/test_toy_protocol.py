"""A protocol is one module (issue 31): the toy protocol of ``tests/toy_protocol.py`` registers its section and
itself on import; its section is checked like the built-ins' (one line per bad value, the closest name for a
misspelt key or section); ``cltunnel run`` runs it without naming it anywhere; its files land on the run's page
under the captions the module declared; and registering it changes no other scenario's saved config."""
from __future__ import annotations

import importlib
import sys

import pandas as pd
import pytest
import yaml

from cltunnel.cli import main as cli_main
from cltunnel.config import PROTOCOL_SECTIONS, ConfigError, parse_config
from cltunnel.experiments import PROTOCOLS, protocol_for
from cltunnel.reports.captions import WRITTEN

TASK_SEQUENCE = {"data": {"name": "mnist"}, "scenario": {"tasks": [5, 5]}}


@pytest.fixture
def toy():
    """The toy module, imported (so registered) for one test and unregistered after it."""
    sys.modules.pop("toy_protocol", None)
    module = importlib.import_module("toy_protocol")
    yield module
    PROTOCOL_SECTIONS.unregister("toy")
    PROTOCOLS.unregister("toy")
    for pattern in module.OUTPUTS:
        WRITTEN.unregister(pattern)
    sys.modules.pop("toy_protocol", None)


def one_line_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_section_is_parsed_checked_and_selects_the_protocol(toy):
    cfg = parse_config({"toy": {"points": 3, "slope": "1e-1"}})  # no scenario: the toy makes no tasks
    assert isinstance(cfg.toy, toy.ToyConfig) and (cfg.toy.points, cfg.toy.slope) == (3, 0.1)
    assert protocol_for(cfg).name == "toy" and cfg.to_dict()["toy"] == {"points": 3, "slope": 0.1}
    assert one_line_error({"toy": {"points": 1}}) == "toy.points: a line needs at least 2 points, got 1"
    assert one_line_error({"toy": {"pionts": 3}}).startswith("unknown key 'toy.pionts' (did you mean 'points'?)")
    assert one_line_error({"toy": {"points": "many"}}) == "toy.points: expected an integer, got 'many'"
    assert one_line_error({"tyo": {}}).startswith("unknown key 'tyo' (did you mean 'toy'?)")
    with pytest.raises(ConfigError, match="one protocol"):
        protocol_for(parse_config({"toy": {}, "erosion": {}, "scenario": {"tasks": [10]}}))


def test_a_registered_protocol_leaves_other_scenarios_saved_config_alone(toy):
    """Only the sections of before sections registered themselves are listed (as null) when unset: a task
    sequence's config.yaml, and so its fingerprint, is the same with the toy imported or not."""
    saved = parse_config(TASK_SEQUENCE).to_dict()
    assert "toy" not in saved
    assert [k for k in saved if k in PROTOCOL_SECTIONS] == ["erosion", "representations", "synthetic", "narrow_resnet"]


def test_a_section_nobody_registered_is_an_unknown_key():
    assert "toy" not in PROTOCOL_SECTIONS
    message = one_line_error({"toy": {"points": 3}})
    assert message.startswith("unknown key 'toy'; valid keys here: ") and "erosion" in message


def test_cltunnel_run_runs_it_and_its_files_land_on_the_page(toy, tmp_path, capsys):
    scenario = tmp_path / "toy.yaml"
    scenario.write_text(yaml.safe_dump({"name": "toy", "seeds": [0, 1], "output_dir": str(tmp_path / "runs"),
                                        "toy": {"points": 4, "slope": 3}}))
    assert cli_main(["run", str(scenario), "--no-progress"]) == 0
    assert "toy: 2 seeds, mean last y 9.5" in capsys.readouterr().out  # (9 + 10) / 2
    run_dir = tmp_path / "runs" / "toy" / "seed1"
    assert pd.read_csv(run_dir / "toy_line.csv")["y"].tolist() == [1.0, 4.0, 7.0, 10.0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["toy"] == {"points": 4, "slope": 3.0}
    md = (run_dir / "report.md").read_text()
    figure = next(line for line in md.splitlines() if "(toy_line.png)</small>" in line)
    assert figure.startswith("**Figure 1.** " + toy.OUTPUTS["toy_line.png"])
    table_at = md.index("### Table 1. Toy line")
    assert toy.OUTPUTS["toy_line.csv"] in md[table_at:table_at + 200]
    assert 'src="data:image/png;base64,' in (run_dir / "report.html").read_text()


def test_a_bad_toy_value_costs_one_line_and_no_work(toy, tmp_path, capsys):
    scenario = tmp_path / "toy.yaml"
    scenario.write_text(yaml.safe_dump({"name": "toy", "output_dir": str(tmp_path / "runs"), "toy": {"points": 0}}))
    assert cli_main(["run", str(scenario), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {scenario}: toy.points: a line needs at least 2 points, got 0\n"
    assert not (tmp_path / "runs").exists()
