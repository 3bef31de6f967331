"""One page per run, scenario or sweep: ``report.md`` and a self-contained ``report.html`` (figures embedded,
opens from disk, no server) holding every figure and table the directory has, each with a line saying what it
shows and what it reproduces, the resolved config and where the numbers came from.

The page is built from the files a run already wrote (cltunnel's tables are markdown, its figures PNG), so it
can be (re)built at any time: ``cltunnel report DIR``. A scenario's page links its seeds' pages and a sweep's
its configurations', each built on the way.
"""
from __future__ import annotations

import base64
import fnmatch
import html
import re
from pathlib import Path

import markdown
import pandas as pd

from cltunnel.expectations import EXPECTATIONS_FILE
from cltunnel.reports.captions import captions_for, entries_of, shown_by, view_of
from cltunnel.reports.provenance import load_provenance
from cltunnel.reports.tables import format_mean_std, markdown_table
from cltunnel.store import (ANALYSIS_NOTICES, CAMPAIGN_REPORT, CAPTURE_NOTES, CONFIG_FILE, METRICS_FILE, REPORT_HTML,
                            REPORT_MD, atomic_write_text, is_sweep_dir, load_run_config, seed_dirs)

# What each file shows comes from the modules that write it (cltunnel.reports.captions); a file none declares
# is shown under its name alone, by these catch-alls.
GENERIC = {"figure": [("*.png", "")], "table": [("*.md", ""), ("*.csv", "")]}
SKIPPED = (REPORT_MD, "README.md", CAMPAIGN_REPORT)  # README.md: a tables/ folder's own notes


def entries(directory: Path, kind: str) -> list[tuple[str, str]]:
    """(pattern, caption) of one kind (figure, table, note) for a directory, in page order: what the protocols,
    sweeps and analyses declared (:func:`cltunnel.reports.captions.captions_for`), then the catch-all."""
    declared = entries_of(kind, captions_for(directory))
    if kind == "note":
        return [(CAPTURE_NOTES, "")] + declared + [(ANALYSIS_NOTICES, "")]
    return declared + GENERIC[kind]


def caption(name: str, table: list[tuple[str, str]]) -> str:
    return next(text for pattern, text in table if fnmatch.fnmatch(name, pattern))


def _order(paths: list[Path], table: list[tuple[str, str]]) -> list[Path]:
    rank = {p: next(i for i, (pattern, _) in enumerate(table) if fnmatch.fnmatch(p.name, pattern)) for p in paths}
    return sorted(paths, key=lambda p: (rank[p], p.name))


def kind_of(directory: Path) -> str:
    if is_sweep_dir(directory):
        return "sweep"
    return "run" if (directory / CONFIG_FILE).exists() else "scenario"


def children(directory: Path, kind: str) -> list[Path]:
    """The pages a page links to: a scenario's seeds, a sweep's configurations."""
    if kind == "scenario":
        return seed_dirs(directory, CONFIG_FILE)
    if kind == "sweep":
        return sorted(p for p in directory.iterdir() if p.is_dir() and seed_dirs(p, CONFIG_FILE))
    return []


def report_markdown(directory: Path) -> str:
    """The page as markdown, figures linked by file name: title, notices, then results, figures, tables,
    config and provenance, numbered and captioned like a paper's appendix."""
    kind = kind_of(directory)
    results, notices = _notes(directory)
    parts = [f"# {page_title(directory, kind)}", ""]
    if notices:
        parts += ["## Notices", ""] + [f"> **Notice:** {n}  " for n in notices] + [""]
    parts += [f"Directory: `{directory.resolve()}`", ""]
    subpages = children(directory, kind)
    if subpages:
        parts += ["## " + ("Seeds" if kind == "scenario" else "Configurations"), ""]
        parts += [f"- [{p.name}]({p.name}/{REPORT_HTML})" for p in subpages] + [""]
    if results:
        parts += ["## Results in one line", ""] + results + [""]
    parts += _expectations_section(directory, kind)
    parts += _figures_section(directory) + _tables_section(directory)
    parts += _config_section(directory, kind, subpages) + _provenance_section(directory, kind, subpages)
    return "\n".join(parts) + "\n"


def page_title(directory: Path, kind: str) -> str:
    """What the page is about in words: the scenario and seed of a run, the seeds of a scenario."""
    if kind == "run":
        config = load_run_config(directory)
        return f"{config.get('name', directory.parent.name)}, seed {config.get('seed', directory.name)}: run report"
    if kind == "scenario":
        seeds = [p.name.removeprefix("seed") for p in seed_dirs(directory, CONFIG_FILE)]
        return f"{directory.name}: {len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(seeds)}), mean ± std"
    return f"{directory.name}: sweep report"


def _expectations_section(directory: Path, kind: str) -> list[str]:
    """The scenario's ``expect:`` bands, one line each, held or violated (a seed's page shows its scenario's)."""
    path = next((d / EXPECTATIONS_FILE for d in ([directory, directory.parent] if kind == "run" else [directory])
                 if (d / EXPECTATIONS_FILE).exists()), None)
    if path is None:
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    violated = sum(line.startswith("VIOLATED") for line in lines)
    where = " (of the scenario, over its seeds)" if path.parent != directory else \
        " (each configuration's, over its seeds)" if kind == "sweep" else ""
    head = f"{violated} of {len(lines)} violated" if violated else f"all {len(lines)} held"
    return [f"## Expected bands{where}: {head}", ""] + [f"- {line}" for line in lines] + [""]


def _figures_section(directory: Path) -> list[str]:
    catalogue = entries(directory, "figure")
    figures = _order(list(directory.glob("*.png")), catalogue)
    parts = ["## Figures", ""] if figures else []
    for i, fig in enumerate(figures, 1):
        parts += [f"![{fig.stem}]({fig.name})", "", f"**Figure {i}.** {caption(fig.name, catalogue)} "
                  f"<small>({fig.name})</small>", ""]
    return parts


def _tables_section(directory: Path) -> list[str]:
    """Every table once: a written markdown table, else its CSV formatted (two decimals, named columns)."""
    md = [p for p in directory.glob("*.md") if p.name not in SKIPPED]
    csv = [p for p in directory.glob("*.csv") if not p.with_suffix(".md").exists() and not shown_by(p.name)]
    catalogue = entries(directory, "table")
    tables = _order(md + csv, catalogue)
    if not tables:
        return []
    parts = ["## Tables", ""]
    for i, table in enumerate(tables, 1):
        title, body = _md_table(table) if table.suffix == ".md" else (_label(table), _csv_markdown(table))
        text = caption(table.name, catalogue)
        parts += [f"### Table {i}. {title}", ""] + ([text, ""] if text else []) + [body, ""]
    behind = [f"`{p.name}` (behind {shown_by(p.name)})" for p in sorted(directory.glob("*.csv")) if shown_by(p.name)]
    if behind:
        parts += ["Also in the directory: " + ", ".join(behind) + ".", ""]
    return parts


# A CSV's column names as a reader wants them (others: underscores become spaces).
COLUMN_NAMES = {"probe_acc": "probe accuracy (%)", "rank_cap": "rank cap", "intra_class_var": "intra-class variance",
                "inter_class_var": "inter-class variance", "train_acc": "training accuracy"}


def _label(path: Path) -> str:
    label = path.stem.replace("_", " ")
    return label[:1].upper() + label[1:]


def _md_table(path: Path) -> tuple[str, str]:
    """A table file's own heading becomes the page's numbered table title; the rest is shown as written."""
    text = path.read_text()
    heading = re.match(r"#{1,6} (.*)\n", text)
    if heading is None:
        return _label(path), text.strip()
    return heading.group(1).strip(), text[heading.end():].strip()


def _notes(directory: Path) -> tuple[list[str], list[str]]:
    """The one-line result files as a list (a bullet per file, a sub-bullet per line) and their notices,
    each once, for the top of the page."""
    results, notices = [], []
    notes = [p for pattern, _ in entries(directory, "note") for p in sorted(directory.glob(pattern))]
    for path in dict.fromkeys(notes):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        notices += [line[len("notice: "):] for line in lines if line.startswith("notice: ")]
        lines = [line for line in lines if not line.startswith("notice: ")]
        used = {line.replace(" (used)", "") for line in lines if " (used)" in line}
        if lines:  # a file of notices alone (capture.txt) has no results to list
            results += [f"- {path.name}:"] + [f"    - {line}" for line in lines if line not in used]
    return results, list(dict.fromkeys(notices))


def _csv_markdown(path: Path, max_rows: int = 40) -> str:
    frame = csv_table(path)
    more = f"\n\n({len(frame) - max_rows} more rows in {path.name})" if len(frame) > max_rows else ""
    return markdown_table(frame.head(max_rows), index=frame.index.name != "_") + more


def csv_table(path: Path) -> pd.DataFrame:
    """A CSV as a table of formatted cells: an unnamed first column is the row labels, a mean/std header pair
    becomes "m ± s", integers stay integers, other numbers get two decimals, a missing value is "–"."""
    if path.read_text().startswith(",mean,"):  # write_table's two header rows
        raw = pd.read_csv(path, header=[0, 1], index_col=0)
        return format_mean_std(raw["mean"], raw["std"], 2 if raw["std"].fillna(0).to_numpy().any() else 1)
    frame = pd.read_csv(path)
    view = view_of(path.name)  # a reshaping the writing module declared
    if view is not None:
        return view(frame)
    if str(frame.columns[0]).startswith("Unnamed"):
        frame = frame.set_index(frame.columns[0]).rename_axis(None)
    else:
        frame = frame.rename_axis("_")  # no row labels of its own: the index is not shown
    frame = frame.rename(columns=lambda c: COLUMN_NAMES.get(c, str(c).replace("_", " ")))
    return frame.apply(_format_column)


def _format_column(column: pd.Series) -> pd.Series:
    if not pd.api.types.is_numeric_dtype(column):
        return column.map(lambda v: "–" if pd.isna(v) else str(v))
    whole = column.dropna().map(lambda v: float(v).is_integer()).all()
    return column.map(lambda v: "–" if pd.isna(v) else f"{v:.0f}" if whole else f"{v:.2f}")


def _config_section(directory: Path, kind: str, subpages: list[Path]) -> list[str]:
    source = directory if kind == "run" else next(iter(subpages), None)
    if kind == "sweep" and source is not None:
        source = next(iter(seed_dirs(source, CONFIG_FILE)), None)
    if source is None or not (source / CONFIG_FILE).exists():
        return []
    label = "" if kind == "run" else f" (of {source.relative_to(directory)})"
    return ["## Resolved config" + label, "", "```yaml", (source / CONFIG_FILE).read_text().rstrip(), "```", ""]


def _provenance_section(directory: Path, kind: str, subpages: list[Path]) -> list[str]:
    runs = [directory] if kind == "run" else subpages if kind == "scenario" else []
    rows = [{"run": r.name if r != directory else ".", **entry} for r in runs for entry in load_provenance(r)]
    if not rows:
        return ["## Provenance", "", "(not recorded: runs made before cltunnel 0.2 record none)", ""]
    return ["## Provenance", "", pd.DataFrame(rows).to_markdown(index=False), ""]


def to_html(md: str, directory: Path, title: str) -> str:
    """The markdown page as one HTML file: every local PNG inlined as a data URI."""
    body = markdown.markdown(md, extensions=["tables", "fenced_code"])

    def inline(match: re.Match) -> str:
        path = directory / html.unescape(match.group(1))
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    body = body.replace(" ± ", "\u00a0±\u00a0")  # a narrow window wraps a long cell, never a "m ± s" apart
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


# Readable from a phone to a desktop: the text column is capped, wide tables and code scroll inside
# themselves instead of widening the page, figures shrink to the column.
STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:1.5em auto;padding:0 1em;color:#222;"
         "line-height:1.45}"
         "img{display:block;max-width:100%;height:auto;margin:.5em auto;border:1px solid #ddd}"
         "table{display:block;max-width:100%;overflow-x:auto;border-collapse:collapse;font-size:13px;"
         "margin:.5em 0;font-variant-numeric:tabular-nums}"
         "td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}th{background:#f4f4f4}"
         "td:first-child{white-space:nowrap}table+ul{font-size:.9em;color:#444}"
         "tbody tr:nth-child(even){background:#fafafa}"
         "pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:12px}code{font-size:12px;word-break:break-all}"
         "blockquote{margin:.4em 0;padding:.4em .8em;background:#fff8e1;border-left:4px solid #f0b400}"
         "h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}h3{font-size:1.05em;margin-top:1.4em}"
         "ul{padding-left:1.3em}small{color:#666}")


def build_report(directory: str | Path) -> Path:
    """Write ``report.md`` and ``report.html`` in ``directory`` (and in the pages it links); returns the HTML."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    if not (directory / CONFIG_FILE).exists() and not seed_dirs(directory, CONFIG_FILE) and not is_sweep_dir(directory):
        raise FileNotFoundError(f"{directory}: not a run, scenario or sweep directory (no {CONFIG_FILE} here or in "
                                f"seed*/; no {METRICS_FILE})")
    for child in children(directory, kind_of(directory)):
        build_report(child)
    md = report_markdown(directory)
    atomic_write_text(directory / REPORT_MD, md)
    atomic_write_text(directory / REPORT_HTML, to_html(md, directory, page_title(directory, kind_of(directory))))
    return directory / REPORT_HTML
