"""The README a newcomer navigates (issue 31): its links and anchors resolve, its layout table names every
module of the package, and it keeps the test command CI runs (``.ci/run`` calls it "the README's test
command")."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^#{1,6} (.*)", line)
        if heading:
            found.add(github_anchor(heading.group(1)))
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (fragment and dest.suffix == ".md" and fragment not in anchors(dest)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_layout_table_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("\n## Layout"):]
    package = REPO / "cltunnel"
    missing = [str(m.relative_to(package)) for m in sorted(package.rglob("*.py"))
               if f"`{m.relative_to(package).as_posix()}`" not in layout]
    assert not missing, f"README's Layout has no row for {missing}"


def test_the_readme_keeps_the_commands_ci_and_the_quick_start_use():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[dev]" && python -m pytest -q' in readme
    assert "cltunnel run scenarios/quickstart.yaml" in readme
    assert 'pip install -e ".[dev]" && lint-imports && python -m pytest -q' in (REPO / ".ci" / "run").read_text()
