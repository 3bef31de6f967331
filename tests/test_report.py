"""One page per run and scenario: every figure embedded and decodable, every table and figure captioned, the
resolved config and provenance on it; rebuilt by ``cltunnel report DIR``."""
from __future__ import annotations

import base64
import io
import re

import matplotlib.image as mpimg
import pytest

from cltunnel.cli import main as cli_main
from cltunnel.config import parse_config
from cltunnel.reports.page import caption, entries
from cltunnel.runs import report_path, run_scenario
from test_training import mnist_tiny


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory, mnist, monkeypatch_module):
    monkeypatch_module.setattr("cltunnel.runs.load_data", lambda cfg: mnist)
    raw = mnist_tiny(tmp_path_factory.mktemp("report"), scenario={"n_tasks": None, "tasks": [5, 5]},
                     training={"epochs": 3}, seeds=[0, 1], analyses={"run": ["tunnel", "swap", "substitution"]})
    cfg = parse_config(raw)
    return run_scenario(cfg, progress=False), cfg


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def page_dir(scenario_dir, where: str):
    """The scenario's directory, or its seed 0's."""
    directory, _ = scenario_dir
    return directory if where == "scenario" else directory / "seed0"


def images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


@pytest.mark.parametrize("where", ["scenario", "seed0"])
def test_the_page_is_self_contained_and_every_figure_decodes(scenario_dir, where):
    directory = page_dir(scenario_dir, where)
    page = (directory / "report.html").read_text()
    sources = images(page)
    assert len(sources) == len(list(directory.glob("*.png"))) >= 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100
    assert not re.search(r'(src|href)="(https?:|/)', page)  # nothing fetched from elsewhere
    for png in directory.glob("*.png"):
        assert caption(png.name, entries(directory, "figure")), f"{png.name} has no caption"
    md = (directory / "report.md").read_text()
    assert "## Provenance" in md and "## Resolved config" in md and "## Tables" in md


def test_a_run_page_shows_the_story_and_where_it_came_from(scenario_dir):
    directory, cfg = scenario_dir
    md = (directory / "seed0" / "report.md").read_text()
    for figure in ("history.png", "accuracy.png", "tunnel_profile.png", "substitution.png"):
        assert f"]({figure})" in md
    assert "tunnel_start" in md and "torch" in md and "commit" in md and "strategy:" in md
    scenario_md = (directory / "report.md").read_text()
    assert "[seed0](seed0/report.html)" in scenario_md and "± " in scenario_md  # mean ± std over the seeds
    assert report_path(cfg) == directory / "report.html"


def test_report_command_rebuilds_and_refuses_other_directories(scenario_dir, tmp_path, capsys):
    directory, _ = scenario_dir
    (directory / "report.html").unlink()
    assert cli_main(["report", str(directory)]) == 0
    assert (directory / "report.html").exists()
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "not a run, scenario or sweep directory" in capsys.readouterr().err


def table_rows(md: str) -> list[str]:
    """The rendered table rows of a page's Tables section (not the config or provenance)."""
    section = md.split("## Tables", 1)[1].split("## Resolved config", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("where", ["scenario", "seed0"])
def test_every_table_is_formatted_once_without_csv_debris(scenario_dir, where):
    directory = page_dir(scenario_dir, where)
    md = (directory / "report.md").read_text()
    rows = table_rows(md)
    assert rows, "no tables on the page"
    text = "\n".join(rows)
    assert "Unnamed" not in text and "mean.1" not in text and "std.1" not in text
    cells = [c.strip() for row in rows for c in row.strip("|").split("|")]
    assert not [c for c in cells if c.lower() in ("nan", "nan ± nan")]
    assert not re.search(r"\d\.\d{3,}", text), "a number with more than two decimals"
    titles = re.findall(r"^### Table \d+\. (.*)$", md, flags=re.M)
    assert len(titles) == len(set(titles)) >= 3  # each table once
    assert "## Figures" in md and re.search(r"\*\*Figure 1\.\*\* \w", md)  # figures captioned in words


def test_the_title_names_scenario_and_seed_and_notices_come_first(scenario_dir):
    directory, cfg = scenario_dir
    md = (directory / "seed0" / "report.md").read_text()
    assert md.startswith(f"# {cfg.name}, seed 0: run report\n")
    assert f"<title>{cfg.name}, seed 0: run report</title>" in (directory / "seed0" / "report.html").read_text()
    assert (directory / "report.md").read_text().startswith(f"# {directory.name}: 2 seeds (0, 1), mean ± std")
    if "## Notices" in md:
        assert md.index("## Notices") < min(md.index(h) for h in ("## Figures", "## Tables", "Directory:"))


def test_the_page_fits_a_phone(scenario_dir):
    page = (scenario_dir[0] / "seed0" / "report.html").read_text()
    assert "name='viewport' content='width=device-width" in page
    style = re.search(r"<style>(.*)</style>", page).group(1)
    assert "max-width:100%" in style.split("img{", 1)[1].split("}", 1)[0]
    assert "overflow-x:auto" in style.split("table{", 1)[1].split("}", 1)[0]
    assert re.search(r"body\{[^}]*max-width:\d+px", style)
