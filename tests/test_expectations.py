"""``expect:`` bands: refused before training when the run will not write the number, read back from the
files a run wrote, held or violated per seed or on the mean, shown on the page, exit 3 from ``cltunnel run``."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cltunnel.cli import main as cli_main
from cltunnel.config import ConfigError, parse_config
from cltunnel.expectations import EXIT_VIOLATED, EXPECTATIONS_FILE, check_expect, evaluate, read_number, write_outcomes
from cltunnel.reports.page import build_report
from cltunnel.reports.tables import render
from cltunnel.store import save_metrics, save_run_config, seed_dir


def scenario(tmp_path: Path, expect: dict, **over) -> dict:
    raw = {"name": "bands", "data": {"name": "cifar10"}, "scenario": {"tasks": [5, 5]},
           "model": {"name": "vgg11", "width": 0.125}, "device": "cpu", "output_dir": str(tmp_path),
           "seeds": [0, 1], "expect": expect}
    raw.update(over)
    return raw


@pytest.mark.parametrize("expect, message", [
    ({"a[2][0]": [0, 100]}, "no a\\[2\\]\\[0\\]"),
    ({"swap[E1 + T2][first task]": [0, 100]}, "add swap to analyses.run"),
    ({"FWT": [0, 100]}, "FWT is not reported in task-incremental runs"),
    ({"k": [1, 5]}, "add tunnel to analyses.run"),
    ({"ACCC": [0, 100]}, "not a number a run writes"),
    ({"ACC": [60, 40]}, "low 60 is above high 40"),
    ({"ACC": 50}, "a band is \\[low, high\\]"),
    ({"over": "median", "ACC": [0, 100]}, "expect.over: each"),
    ({"forgetting[1]": [0, 100]}, "j < 1"),
    ({"ACC - a[0][9]": [0, 100]}, "no a\\[0\\]\\[9\\]"),
])
def test_a_band_the_run_will_not_write_is_refused(tmp_path, expect, message):
    with pytest.raises(ConfigError, match=message):
        check_expect(parse_config(scenario(tmp_path, expect)))


def test_bands_that_the_run_writes_pass_the_check(tmp_path):
    cfg = parse_config(scenario(tmp_path, {"a[1][0]": [0, 100], "exact.ACC": [0, 100], "forgetting": [0, 50],
                                           "swap[E2 (FT)][first task] - swap[E2 + T2][first task]": [2, 50],
                                           "k[rank]": [1, 15], "ACC": {"band": [10, 90], "over": "mean"}},
                                analyses={"run": ["tunnel", "swap"]}))
    assert [b.over for b in check_expect(cfg)] == ["each"] * 5 + ["mean"]
    with pytest.raises(ConfigError, match="exact-row numbers are written only for CIFAR-10"):
        check_expect(parse_config(scenario(tmp_path, {"exact.ACC": [0, 100]}, data={"name": "mnist"})))
    with pytest.raises(ConfigError, match="narrow_resnet protocol"):
        check_expect(parse_config({"narrow_resnet": {}, "expect": {"ACC": [0, 1]}}))


def fake_seed(cfg, seed: int, acc: list[list[float]], tunnel: str | None = None) -> Path:
    """A finished seed as the task sequence writes it (metrics.json, then the tables render() writes)."""
    run = seed_dir(cfg, seed)
    run.mkdir(parents=True)
    save_run_config(run, cfg, seed)
    save_metrics(run, {"scenario": cfg.name, "seed": seed, "acc": acc, "classes": [[0, 1], [2, 3]]})
    render(run)
    if tunnel:
        (run / "tunnel_start.txt").write_text(tunnel)
    return run


TUNNEL_TXT = ("rule 'rank': first layer after the rank peak with numerical rank <= 0.1 x the peak (used): 8 (42%)\n"
              "rule 'last': first layer with probe accuracy >= 0.95 x the last layer's: 1 (5%)\n"
              "rule 'rank': first layer after the rank peak with numerical rank <= 0.1 x the peak: 8 (42%)\n"
              "rule 'last' at 0.98: 2 (11%)\n")


def test_bands_read_the_written_numbers_per_seed_and_on_the_mean(tmp_path):
    expect = {"a[0][0]": [50, 70], "a[1][1]": [70, 100], "ACC": {"band": [55, 60], "over": "mean"},
              "forgetting[0]": [10, 30], "BWT": [-30, -10], "k[last]": [1, 1], "k": [8, 8], "k[rank]": [7, 9],
              "a[0][0] - a[1][0]": [19, 21]}
    cfg = parse_config(scenario(tmp_path, expect, analyses={"run": ["tunnel"]}))
    fake_seed(cfg, 0, [[0.6, 0.1], [0.4, 0.8]], TUNNEL_TXT)   # ACC 60, forgetting 20
    fake_seed(cfg, 1, [[0.75, 0.1], [0.45, 0.65]], TUNNEL_TXT)  # ACC 55, forgetting 30; a[0][0] 75 is outside
    assert read_number(seed_dir(cfg, 0), "a[1][0]") == pytest.approx(40)
    assert read_number(seed_dir(cfg, 1), "forgetting") == pytest.approx(30)
    outcomes = {o.band.name: o for o in evaluate(cfg)}
    held = {name: o.held for name, o in outcomes.items()}
    assert held == {"a[0][0]": False, "a[1][1]": False, "ACC": True, "forgetting[0]": True, "BWT": True,
                    "k[last]": True, "k": True, "k[rank]": True, "a[0][0] - a[1][0]": False}
    assert outcomes["a[0][0]"].line() == ("VIOLATED: a[0][0] in [50, 70] for every seed: 60.00 (seed 0), "
                                          "75.00 (seed 1, outside)")
    assert outcomes["ACC"].line() == "held: ACC in [55, 60] as the mean: mean over 2 seeds = 57.50"
    # the same ACC band over every seed holds too (55 and 60 are inside); over the mean with a narrower band not
    narrow = parse_config(scenario(tmp_path, {"ACC": {"band": [58, 60], "over": "mean"}, "over": "mean",
                                              "a[1][1]": [70, 75]}))
    assert [o.held for o in evaluate(narrow)] == [False, True]  # mean a[1][1] = 72.5
    # a number the files do not hold (the swap analysis did not run) is violated, "not written"
    missing = parse_config(scenario(tmp_path, {"swap[E1 + T1][first task]": [0, 100]}, analyses={"run": ["swap"]}))
    (outcome,) = evaluate(missing)
    assert not outcome.held and "not written" in outcome.line() and math.isnan(outcome.values[0])


def test_the_page_shows_the_bands_and_a_seed_page_its_scenarios(tmp_path):
    cfg = parse_config(scenario(tmp_path, {"a[0][0]": [50, 70], "ACC": [0, 10]}, seeds=[0]))
    fake_seed(cfg, 0, [[0.6, 0.1], [0.4, 0.8]])
    scenario_dir = seed_dir(cfg, 0).parent
    write_outcomes(scenario_dir, evaluate(cfg))
    assert (scenario_dir / EXPECTATIONS_FILE).read_text().splitlines()[1].startswith("VIOLATED: ACC in [0, 10]")
    build_report(scenario_dir)
    page = (seed_dir(cfg, 0) / "report.md").read_text()
    assert "## Expected bands (of the scenario, over its seeds): 1 of 2 violated" in page
    assert "- held: a[0][0] in [50, 70] for every seed: 60.00 (seed 0)" in page
    write_outcomes(scenario_dir, [])  # a scenario without bands leaves no stale file
    assert not (scenario_dir / EXPECTATIONS_FILE).exists()


@pytest.mark.slow
def test_cli_run_exits_3_on_a_violated_band_and_2_before_training_on_a_bad_one(mnist, tmp_path, capsys):
    raw = {"data": {"name": "mnist", "train_per_class": 50, "test_per_class": 30}, "scenario": {"n_tasks": 2,
           "class_order": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}, "model": {"name": "mlp", "args": {"depth": 3}, "width": 0.25},
           "training": {"epochs": 2, "lr": 0.1, "momentum": 0.0, "augment": False}, "device": "cpu",
           "logging": {"tensorboard": False}, "expect": {"a[0][0]": [0, 100], "ACC": [99.9, 100]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert cli_main(["run", str(path), "--output-dir", str(out), "--no-progress"]) == EXIT_VIOLATED
    printed = capsys.readouterr().out
    assert "expect: held: a[0][0] in [0, 100] for every seed" in printed
    assert "expect: VIOLATED: ACC in [99.9, 100] for every seed" in printed
    assert "## Expected bands (of the scenario, over its seeds): 1 of 2 violated" in (out / "s" / "seed0" / "report.md").read_text()
    path.write_text(yaml.safe_dump({**raw, "expect": {"a[0][0]": [0, 100]}}))
    assert cli_main(["run", str(path), "--output-dir", str(out), "--no-progress"]) == 0  # finished: nothing trains
    path.write_text(yaml.safe_dump({**raw, "expect": {"a[0][2]": [0, 100]}}))
    assert cli_main(["run", str(path), "--output-dir", str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "no a[0][2]" in capsys.readouterr().err and not (tmp_path / "out2" / "s").exists()


def test_a_sweep_checks_each_configurations_bands_over_its_seeds(tmp_path, capsys):
    """Bands in the base apply to every configuration; a named variant adds one (``expect.NAME``) or states its
    own (``expect:``, replacing the base's); a band one configuration
    will not write refuses the sweep before any run; after the runs each configuration's bands are read over
    the sweep's seeds (each or mean), written for its page and the sweep's, printed, and exit 3."""
    from cltunnel.store import SWEEP_DONE
    from cltunnel.sweeps import evaluate_sweep, expand, job_config, load_sweep

    base = scenario(tmp_path, {"over": "mean", "ACC": [55, 60]})
    short = {"scenario.tasks": [5, 5], "expect.a[0][0]": {"band": [50, 70], "over": "each"}}
    raw = {"name": "sw", "base": base, "axes": {"split": {"short": short, "long": {"scenario.tasks": [3, 7]}},
                                                "seed": [0, 1]}, "output_dir": str(tmp_path / "out")}
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump({**raw, "axes": {**raw["axes"], "split": {
        **raw["axes"]["split"], "three": {"scenario.tasks": [3, 3, 4], "expect": {"a[2][2]": [0, 100]}},
        "two": {"scenario.tasks": [4, 6], "expect": {"a[2][2]": [0, 100]}}}}}, sort_keys=False))
    with pytest.raises(ConfigError, match="(?s)1 of 4 configurations are invalid.*'two': expect.a\\[2\\]\\[2\\]: the "
                                          "accuracy matrix is 2 x 2"):
        load_sweep(path)  # refused before a run: "three" writes a[2][2], "two" does not
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    sweep = load_sweep(path)
    for job in expand(sweep):  # finished runs (as fake_seed writes them): the sweep runs nothing
        acc = [[0.6, 0.1], [0.4, 0.8]] if job.seed == 0 else [[0.75, 0.1], [0.45, 0.65]]  # ACC 60, 55
        (fake_seed(job_config(sweep, job), job.seed, acc) / SWEEP_DONE).write_text("{}")
    assert cli_main(["sweep", str(path), "--no-progress"]) == EXIT_VIOLATED
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("expect: ")]
    assert printed == [
        "expect: held: short: ACC in [55, 60] as the mean: mean over 2 seeds = 57.50",
        "expect: VIOLATED: short: a[0][0] in [50, 70] for every seed: 60.00 (seed 0), 75.00 (seed 1, outside)",
        "expect: held: long: ACC in [55, 60] as the mean: mean over 2 seeds = 57.50"]
    assert {c: [o.held for o in found] for c, found in evaluate_sweep(sweep).items()} == {"short": [True, False],
                                                                                          "long": [True]}
    assert (sweep.directory / "long" / EXPECTATIONS_FILE).read_text().startswith("held: ACC in [55, 60] as the mean")
    assert "## Expected bands (each configuration's, over its seeds): 1 of 3 violated" in \
        (sweep.directory / "report.md").read_text()
    assert "## Expected bands: 1 of 2 violated" in (sweep.directory / "short" / "report.md").read_text()
