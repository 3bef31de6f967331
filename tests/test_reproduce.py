"""``cltunnel reproduce``: a reference re-made from its command matches; a changed number is a drift named with
its old and new value (exit 1); the committed manifest names a reference folder for every entry."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from cltunnel.cli import main as cli_main
from cltunnel.config import ConfigError
from cltunnel.reproduce import Result, _argv, compare_files, load_manifest, read_cell, record, reproduce_one

REPO = Path(__file__).resolve().parents[1]
# a narrow-ResNet scenario of seconds: no data read, deterministic on a CPU
TINY = ("cltunnel run narrow_resnet --no-progress --seed 0 --set narrow_resnet.tasks=[x2] "
        "--set narrow_resnet.regimes=[mlp,resnet] --set narrow_resnet.depths=[2] --set narrow_resnet.epochs=3 "
        "--set narrow_resnet.points=200 --set narrow_resnet.grid=41 --set seeds=[0]")


def test_committed_manifest_names_existing_references_and_pins_their_values():
    refs = load_manifest(REPO / "tables" / "REFERENCES.yaml")
    assert {"narrow_resnet", "quickstart", "gpu_split5"} <= set(refs)
    for name, entry in refs.items():
        folder = REPO / entry["path"]
        assert folder.is_dir(), name
        for spec in (entry, entry.get("quick") or {}):  # every command one reproduce can run (or a timing's)
            assert not spec.get("command") or _argv(spec["command"], REPO), name
        for file in (entry.get("compare") or {}).get("files", []):
            assert (folder / file).exists(), f"{name}: {file}"
        for address, pin in (entry.get("pins") or {}).items():  # every pin is the committed file's number
            assert read_cell(folder, address) == pytest.approx(pin["value"], abs=pin["tolerance"]), f"{name}: {address}"


@pytest.mark.slow
def test_reproduce_matches_a_remade_reference_and_names_a_drift(tmp_path, capsys):
    # make the reference once with the same command, as a committed folder would hold it
    made = tmp_path / "made"
    made.mkdir()
    tables = tmp_path / "tables"
    tables.mkdir()
    manifest = tables / "REFERENCES.yaml"
    entry = {"path": "tables/tiny", "command": TINY, "output": "runs/narrow_resnet", "made_at": "test",
             "device": "cpu", "cost": "10 s", "compare": {"files": ["narrow_resnet_x2.csv", "seed0/narrow_resnet.csv"],
                                                         "tolerance": 1e-6}}
    manifest.write_text(yaml.safe_dump({"references": {"tiny": {**entry, "path": "tables/none", "pins": {}}}}))
    assert cli_main(["reproduce", "tiny", "--manifest", str(manifest), "--keep", str(made)]) == 1  # no reference yet
    run = next(made.glob("cltunnel-reproduce-tiny-*")) / "runs" / "narrow_resnet"
    shutil.copytree(run, tables / "tiny")
    value = read_cell(tables / "tiny", "narrow_resnet_x2.csv[mlp, L=2][MSE ×1000 on U[-1, 1]]")
    assert value == value  # a number, not NaN
    entry["pins"] = {"narrow_resnet_x2.csv[mlp, L=2][MSE ×1000 on U[-1, 1]]": {"value": value, "tolerance": 1e-6}}
    manifest.write_text(yaml.safe_dump({"references": {"tiny": entry}}))
    # one committed number that the code no longer gives: the drift is named, with its old and new value, and
    # it is the only one (every other number of the re-run matches)
    csv = tables / "tiny" / "seed0" / "narrow_resnet.csv"
    rows = csv.read_text().splitlines()
    column = rows[0].split(",").index("error")  # (the header's names hold no commas; the cells are plain)
    cells = rows[1].split(",")
    new = float(cells[column])
    cells[column] = repr(new + 0.5)
    csv.write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    capsys.readouterr()
    assert cli_main(["reproduce", "tiny", "--manifest", str(manifest)]) == 1
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("DRIFT"))
    assert re.search(r"DRIFT tiny: 1 of \d\d numbers", line) and f"seed0/narrow_resnet.csv[#0 x2/mlp/2][error]: {new + 0.5:.6g} -> {new:.6g}" in line
    result = Result("tiny", 34, [])  # --record writes a match's date and commit
    record(manifest, [result, Result("tiny2", 1, [], error="x")], quick=True, root=REPO)
    assert yaml.safe_load(manifest.read_text())["references"]["tiny"]["last_reproduced"]["quick"] is True
    assert cli_main(["reproduce", "--list", "--manifest", str(manifest)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli_main(["reproduce", "nosuch", "--manifest", str(manifest)]) == 2


def test_compare_files_checks_every_cell(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(",mean,std\n,value,value\nACC,55.0,0.0\nBWT,,0.0\n")
    b.write_text(",mean,std\n,value,value\nACC,55.0000001,0.0\nBWT,,0.0\n")
    assert compare_files(a, b, 1e-6, "t.csv") == (4, [])
    b.write_text(",mean,std\n,value,value\nACC,54.0,0.0\nBWT,1.0,0.0\n")
    checked, drifts = compare_files(a, b, 1e-6, "t.csv")
    assert checked == 4 and [d.name for d in drifts] == ["t.csv[ACC][value]", "t.csv[BWT][value]"]
    assert read_cell(tmp_path, "a.csv[ACC][value]") == 55.0 and read_cell(tmp_path, "a.csv[ACC][std value]") == 0.0


def test_a_benchmark_script_is_a_reference_command_and_its_markdown_table_is_compared(tmp_path):
    """``python benchmarks/NAME.py`` runs the checkout's script with this interpreter; an --out naming a file of
    the checkout (the committed table) is refused; anything else is not a reference command. A markdown
    table's cells are compared as a CSV's."""
    argv = _argv("python benchmarks/rank_rule_check.py --out rank_rule_check.md", REPO)
    assert argv == [sys.executable, str(REPO / "benchmarks" / "rank_rule_check.py"), "--out", "rank_rule_check.md"]
    for command, message in [("python benchmarks/rank_rule_check.py --out tables/rank_rule_check.md", "--out names a file"),
                             ("python benchmarks/rank_rule_check.py --out=tables/rank_rule_check.md", "--out names a file"),
                             ("python benchmarks/nosuch.py", "starts with 'cltunnel' or 'python benchmarks/NAME.py'"),
                             ("python -c 'print(1)'", "starts with"), ("bash x.sh", "starts with")]:
        with pytest.raises(ConfigError, match=message):
            _argv(command, REPO)
    old, new = tmp_path / "old.md", tmp_path / "new.md"
    old.write_text("Made at abc.\n\n| seed | ACC (%) | cells |\n|:--|--:|--:|\n| 0 | 90.6 | 2/4 |\n| 1 | 91.6 | 4/4 |\n\n"
                   "Over 2 seeds: 91.1.\n\n| other | table |\n|--|--|\n| x | 1 |\n")
    new.write_text(old.read_text().replace("Made at abc", "Made at def").replace("91.6", "91.8").replace("| x | 1 |", "| x | 2 |"))
    checked, drifts = compare_files(old, new, 1e-6, "t.md")  # the first table only; the prose around it is not
    assert checked == 6 and [(d.name, d.old, d.new) for d in drifts] == [("t.md[#1 1/91.6/4/4][ACC (%)]", 91.6, 91.8)]
    assert read_cell(tmp_path, "old.md[#0][ACC (%)]") == 90.6


def test_a_timing_reference_is_listed_and_never_compared(tmp_path):
    entry = {"path": "tables", "device": "cpu", "made_at": "a3fe68e", "command": "python benchmarks/speed.py",
             "timing": ["cltunnel / bare loop 0.967"]}
    result = reproduce_one("speed_cpu", entry, REPO, quick=False, keep=tmp_path)
    assert result.error.startswith("a timing, not re-run") and "cltunnel / bare loop 0.967" in result.error
    assert not list(tmp_path.iterdir())  # nothing ran
