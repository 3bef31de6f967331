"""The package's shape: layers import only downwards, protocols are found through the registry, and the
modules above the experiments hold no per-protocol branches."""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from cltunnel import experiments, runs
from cltunnel.config import PROTOCOL_SECTIONS, ConfigError, parse_config
from cltunnel.experiments import PROTOCOLS, Protocol, protocol_for, protocol_for_saved
from cltunnel.experiments.erosion import ErosionConfig

PACKAGE = Path(__file__).resolve().parents[1] / "cltunnel"


def test_layers_import_only_downwards():
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([exe], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 kept, 0 broken" in result.stdout, result.stdout[-3000:]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_config_imports_nothing_of_cltunnel_but_errors_and_the_registry():
    assert {m for m in imported_modules(PACKAGE / "config.py") if m.startswith("cltunnel")} == {"cltunnel.errors",
                                                                                              "cltunnel.registry"}


def protocols_named(module: str) -> list[str]:
    """The names and strings (docstrings aside) of a module that mention a protocol section."""
    tree = ast.parse((PACKAGE / module).read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    words = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.value for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}
    assert len(PROTOCOL_SECTIONS) >= 4  # the built-in protocols registered their sections
    return [w for w in words for section in PROTOCOL_SECTIONS if section in w.lower()]


@pytest.mark.parametrize("module", ["runs.py", "cli.py", "sweeps.py", "campaign.py", "reproduce.py", "config.py"])
def test_no_per_protocol_branches_above_the_experiments(module):
    """These modules never mention a protocol: they look it up (config.py: each protocol's section lives in its
    module and registers itself)."""
    mentioned = protocols_named(module)
    assert not mentioned, f"{module} branches on protocols: {mentioned}"


def test_every_protocol_section_has_one_registered_protocol():
    sections = [p.section for p in PROTOCOLS.values() if p.section is not None]
    assert sorted(sections) == sorted(PROTOCOL_SECTIONS)
    assert protocol_for_saved({"erosion": {"ratio": 1.0}}).name == "erosion"
    assert protocol_for_saved({"erosion": None, "synthetic": None}).name == "task_sequence"


def base(**extra) -> dict:
    return {"data": {"name": "mnist"}, "scenario": {"tasks": [10]}, **extra}


def test_the_section_picks_the_protocol_and_two_are_refused():
    assert protocol_for(parse_config(base())).name == "task_sequence"
    assert protocol_for(parse_config(base(erosion={"ratio": 0.5}))).name == "erosion"
    cfg = parse_config(base(erosion={"ratio": 0.5}))
    cfg.synthetic = parse_config(base(synthetic={"meta_steps": 1})).synthetic
    with pytest.raises(ConfigError, match="one protocol"):
        protocol_for(cfg)


def test_runs_dispatch_through_the_registry(monkeypatch, tmp_path):
    """Swapping the registered erosion protocol swaps what ``run_seed`` runs: nothing else decides."""
    calls = []

    def fake_run(cfg, seed, data, progress, **options):
        calls.append((cfg.erosion.ratio, seed, data))
        return tmp_path

    fake = Protocol("erosion", "erosion", fake_run, lambda d: "", "never")
    monkeypatch.setitem(experiments.PROTOCOLS, "erosion", fake)
    cfg = parse_config(base(erosion={"ratio": 0.25}))
    assert isinstance(cfg.erosion, ErosionConfig)
    assert runs.run_seed(cfg, 3, data="data stand-in") == tmp_path
    assert calls == [(0.25, 3, "data stand-in")]


def test_the_analyses_are_named_once_in_their_modules():
    """Each built-in analysis is one module's ``@analysis``; the driver, the config and the page name none of
    them, and the page names no file a protocol or an analysis writes (it takes the captions, the CSVs a figure
    shows and the CSV views from what the modules declare)."""
    import cltunnel.experiments  # noqa: F401  (every protocol and analysis declares its files on import)
    from cltunnel.experiments.analyses import ANALYSES, built_in_names
    from cltunnel.reports.captions import SHOWN_BY, VIEWS, WRITTEN

    names = built_in_names()
    assert len(names) >= 8
    declared = {pattern for name in names for pattern in ANALYSES[name].outputs}
    files = declared | set(WRITTEN) | set(SHOWN_BY) | set(VIEWS)
    assert {"history.png", "accuracy_matrix.md", "erosion_curve.png", "block_inner_*.csv", "*substitution.csv"} <= files
    for module in ("config.py", "experiments/analyses/driver.py", "runs.py", "cli.py", "reports/page.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and id(n) not in docstrings}
        assert not strings & (set(names) | files), module


def test_run_file_names_live_in_the_store():
    """No module but the store spells a run file the store names (what the analyses write and others read back,
    the sweep's done/error files, the pages, the tables that expectations read)."""
    from cltunnel import store

    names = [v for k, v in vars(store).items() if k.isupper() and isinstance(v, str) and "." in v]
    for path in PACKAGE.rglob("*.py"):
        if path.name == "store.py":
            continue
        tree = ast.parse(path.read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & set(names), path
