"""A user's analysis is one module of their own (issue 31): named in the YAML as ``"module:function"``, run
after training like the built-ins (which go through the same ``@analysis`` API), its returns written as
CSV/markdown/PNG and shown on the run's page under its caption; a module that fails to import is one line
before any training, and one that raises or returns the wrong type costs one line naming it, the run's other
outputs kept."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cltunnel.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SCENARIO = {"name": "user_analysis", "data": {"name": "mnist", "train_per_class": 60, "test_per_class": 30},
            "scenario": {"tasks": [5, 5]}, "model": {"name": "mlp", "width": 0.125, "args": {"depth": 4}},
            "training": {"epochs": 2, "batch_size": 64, "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0,
                         "augment": False},
            "analyses": {"run": ["tunnel", "my_analyses:weight_norms", "my_analyses:probe_last_model"],
                         "probe": {"epochs": 2}, "rank_samples": 200},
            "seeds": [0], "device": "cpu"}
WEIGHT_CAPTION = "Frobenius norm of each body layer's weights after each task"


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """The README's example, run as a user would: ``cltunnel run`` from the directory holding the module."""
    work = tmp_path_factory.mktemp("user_analysis")
    shutil.copy(REPO / "examples" / "my_analyses.py", work / "my_analyses.py")
    (work / "scenario.yaml").write_text(yaml.safe_dump(SCENARIO))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        rc = cli_main(["run", "scenario.yaml", "--no-progress", "--output-dir", str(work / "runs")])
    assert rc == 0
    return work, work / "runs" / "user_analysis" / "seed0"


def test_a_user_analysis_is_written_and_shown_under_its_caption(user_run):
    work, run_dir = user_run
    table = pd.read_csv(run_dir / "weight_norms_table.csv", index_col=0)
    assert list(table.index) == [1, 2, 3] and (table["norm after task 1"] > 0).all()
    assert (table["relative change"] > 0).all()  # the second task moved every layer
    assert (run_dir / "weight_norms_table.md").read_text().startswith("### Weight norms table\n")
    assert (run_dir / "weight_norms_figure.png").read_bytes()[:4] == b"\x89PNG"
    probes = pd.read_csv(run_dir / "probe_last_model.csv", index_col=0)
    assert probes.shape == (3, 2) and probes.to_numpy().max() > 30  # above chance (20 % on five classes)
    assert (run_dir / "tunnel_profile.csv").exists() and (run_dir / "tunnel_profile.png").exists()
    md = (run_dir / "report.md").read_text()
    figure = next(line for line in md.splitlines() if "(weight_norms_figure.png)</small>" in line)
    assert WEIGHT_CAPTION in figure and figure.startswith("**Figure ")
    table_at = md.index("Weight norms table")
    assert WEIGHT_CAPTION in md[table_at:table_at + 400]
    assert "beside the model after the first task" in md  # the second analysis's caption
    assert "weight_norms_figure.png" in (run_dir / "captions.json").read_text()
    assert "## Notices" not in md or "failed" not in md


def test_the_page_keeps_a_user_caption_when_rebuilt_without_the_module(user_run, tmp_path, monkeypatch):
    """``cltunnel report`` in another directory (the module not importable) still captions the user's files."""
    _, run_dir = user_run
    monkeypatch.chdir(tmp_path)
    (run_dir / "report.md").unlink()
    assert cli_main(["report", str(run_dir)]) == 0
    assert WEIGHT_CAPTION in (run_dir / "report.md").read_text()


def user_module(where: Path, name: str, body: str) -> str:
    (where / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_a_module_that_fails_to_import_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = user_module(tmp_path, "broken_analyses_31", "import math\nmath.sqrt(-1)\n")
    raw = {**SCENARIO, "analyses": {"run": ["tunnel", f"{name}:anything"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    rc = cli_main(["run", "s.yaml", "--no-progress", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"analyses.run: cannot import analysis module '{name}' (ValueError: math domain error)" in err
    assert not (tmp_path / "out" / "user_analysis").exists()  # nothing was trained
    missing = {**SCENARIO, "analyses": {"run": [f"{name[:-3]}_x:f", "tunel"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(missing))
    assert cli_main(["check", "s.yaml", "--output-dir", str(tmp_path / "out")]) == 2
    assert "cannot import analysis module" in capsys.readouterr().err
    missing["analyses"]["run"] = ["tunel"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(missing))
    assert cli_main(["check", "s.yaml", "--output-dir", str(tmp_path / "out")]) == 2
    assert "analyses.run: unknown analysis 'tunel' (did you mean 'tunnel'?)" in capsys.readouterr().err


def test_wrong_type_and_raising_analyses_cost_one_line_each_and_keep_the_rest(user_run, monkeypatch, capsys):
    from cltunnel.experiments.analyses import run_analyses
    from cltunnel.reports.page import build_report

    work, run_dir = user_run
    monkeypatch.chdir(work)
    name = user_module(work, "bad_analyses_31", """
        import pandas as pd
        from cltunnel import analysis

        @analysis("wrong_type", caption="never shown")
        def wrong_type(run):
            return [1, 2, 3]

        @analysis("half_written", caption="never shown")
        def half_written(run):
            return {"good": pd.DataFrame({"a": [1]}), "bad": 3.5}

        def raises(run):  # until the user fixes it (a file in the run directory stands for the fix)
            return {"x": pd.DataFrame({"x": [1]}) if (run.dir / "fixed").exists() else 1 / 0}
        """)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.suffix in (".csv", ".png")}
    results = run_analyses(run_dir, [f"{name}:wrong_type", "my_analyses:probe_last_model", f"{name}:half_written",
                                     f"{name}:raises"], "cpu", progress=False)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice: analysis")]
    assert printed == [
        f"notice: analysis '{name}:wrong_type' returned what cannot be written: TypeError: returned list; an analysis "
        "returns a DataFrame, a Figure, a str, None or a dict of them; its files were not written",
        f"notice: analysis '{name}:half_written' returned what cannot be written: TypeError: returned float under "
        "'bad'; an analysis returns a DataFrame, a Figure, a str, None or a dict of them; its files were not written",
        f"notice: analysis '{name}:raises' failed: ZeroDivisionError: division by zero; its files were not written"]
    assert list(results) == ["probe_last_model"]  # the good one ran between the bad ones
    assert not list(run_dir.glob("wrong_type*")) and not list(run_dir.glob("half_written*"))  # nothing half-written
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.suffix in (".csv", ".png")}
    assert {n: b for n, b in after.items() if n in before} == before  # the run's other outputs kept (same bytes)
    build_report(run_dir)
    md = (run_dir / "report.md").read_text()
    notices = md.split("## Notices", 1)[1].split("Directory:", 1)[0]
    assert f"analysis '{name}:raises' failed: ZeroDivisionError" in notices
    assert notices.count("its files were not written") == 3
    # the fixed analysis run again: its line goes, the others' stay until they run again
    (run_dir / "fixed").write_text("")
    assert list(run_analyses(run_dir, [f"{name}:raises"], "cpu", progress=False)) == ["raises"]
    lines = (run_dir / "analysis_notices.txt").read_text().splitlines()
    assert len(lines) == 2 and not any(":raises'" in line for line in lines)
    assert pd.read_csv(run_dir / "raises_x.csv")["x"].tolist() == [1]


def test_the_built_ins_are_declared_through_the_same_decorator():
    import cltunnel
    from cltunnel.experiments.analyses import ANALYSES, built_in_names

    assert built_in_names() == ["tunnel", "swap", "substitution", "cka", "cka_layers", "development", "ood",
                                "block_structure"]
    for name in built_in_names():
        entry = ANALYSES[name]
        assert entry.function.analysis is entry and entry.built_in
        assert any(pattern.endswith((".png", ".csv", ".md")) and text for pattern, text in entry.outputs.items()), name
    assert cltunnel.analysis.__module__ == "cltunnel.experiments.analyses.registry"
    assert {"analysis", "LoadedRun", "model_from_checkpoint", "build_model", "register_model"} <= set(cltunnel.__all__)
    with pytest.raises(ValueError, match="registered twice"):
        cltunnel.analysis("tunnel")(lambda run: None)
