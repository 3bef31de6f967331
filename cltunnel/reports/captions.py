"""What the page says under a file, declared by the module that writes it: the page names no file itself.

A protocol (its ``outputs``, through ``register_protocol``), a sweep report or the tables and figures of this
layer declare their files' captions with :func:`declare_written` (shown first, in their ``place``: the page's order). An analysis declares its
outputs (file name or glob -> caption) once, with ``@analysis`` (the experiments layer); the declaration
lands here, in :data:`DECLARED`, when its module is imported, and the driver also writes the captions of the
analyses that ran into the run directory (:data:`~cltunnel.store.CAPTIONS_FILE`), so a page rebuilt later by
a process that never imported a user's module still has them. The page reads the protocols' declarations,
then a directory's own file, then the analyses' declarations. The kind of an output follows its suffix:
``.png`` a figure, ``.csv``/``.md`` a table, ``.txt`` one-line results shown verbatim at the top of the page.

Two more declarations shape how a CSV is shown: :func:`declare_shown_by` names the figure that shows a CSV in
full (a per-epoch log, a layer x layer matrix: named under the tables, not printed), and
:func:`declare_view` gives the function that reshapes a CSV into the table the page prints.
"""
from __future__ import annotations

import json
import fnmatch
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from cltunnel.registry import Registry
from cltunnel.store import CAPTIONS_FILE, atomic_write_text

DECLARED: Registry[tuple[int, str]] = Registry("output caption")  # pattern -> (place, caption)
WRITTEN: Registry[tuple[int, str]] = Registry("protocol output caption")  # pattern -> (place, caption)
SHOWN_BY: Registry[str] = Registry("CSV shown by a figure")  # CSV pattern -> the figure that shows it in full
VIEWS: Registry[Callable[[pd.DataFrame], pd.DataFrame]] = Registry("table view")  # CSV pattern -> reshaping


def declare_written(outputs: Mapping[str, str], place: int) -> None:
    """Captions of files a protocol, a sweep report or a table of this layer writes (not an analysis): shown
    before every analysis's, in ``place`` order (ties: declaration order)."""
    for pattern, text in outputs.items():
        WRITTEN.register(pattern, (place, text))


def declare_shown_by(csv_figures: Mapping[str, str]) -> None:
    """CSV pattern -> the figure that shows it in full: the page names the CSV under its tables instead of
    printing it."""
    for pattern, figure in csv_figures.items():
        SHOWN_BY.register(pattern, figure)


def declare_view(pattern: str, view: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """How the page prints the CSVs matching ``pattern``: ``view`` turns the file's frame into the table shown."""
    VIEWS.register(pattern, view)


def shown_by(name: str) -> str | None:
    """The figure that shows a CSV in full, if one is declared."""
    return next((figure for pattern, figure in SHOWN_BY.items() if fnmatch.fnmatch(name, pattern)), None)


def view_of(name: str) -> Callable[[pd.DataFrame], pd.DataFrame] | None:
    """The declared reshaping of a CSV for the page, if any."""
    return next((view for pattern, view in VIEWS.items() if fnmatch.fnmatch(name, pattern)), None)


def declare(outputs: Mapping[str, str], order: int = 100) -> None:
    """Captions of files by name or glob, shown in ``order`` (the declaring analysis's place; a later
    declaration of the same pattern replaces the earlier)."""
    for pattern, text in outputs.items():
        place = min(order, DECLARED[pattern][0]) if pattern in DECLARED else order  # shared: the first owner's place
        DECLARED.register(pattern, (place, text))


def read_captions(directory: Path) -> dict[str, str]:
    """The captions the analyses that ran in ``directory`` declared (empty for runs made before the file)."""
    path = Path(directory) / CAPTIONS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_captions(directory: Path, captions: Mapping[str, str]) -> None:
    """Add ``captions`` to the directory's captions file (a pattern declared again takes the new text)."""
    merged = read_captions(directory) | dict(captions)
    atomic_write_text(Path(directory) / CAPTIONS_FILE, json.dumps(merged, indent=1) + "\n")


def captions_for(directory: Path) -> list[tuple[str, str]]:
    """(pattern, caption) for a directory, first match wins: the protocols' files, then the directory's own
    captions file, then every analysis's declaration."""
    own = read_captions(directory)
    written = sorted(WRITTEN.items(), key=lambda item: item[1][0])  # stable: declaration order within a place
    declared = sorted(DECLARED.items(), key=lambda item: item[1][0])
    return ([(p, text) for p, (_, text) in written] + list(own.items())
            + [(p, text) for p, (_, text) in declared if p not in own])


def entries_of(kind: str, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The entries of one kind: ``figure`` (.png), ``table`` (.csv, .md) or ``note`` (.txt)."""
    suffixes = {"figure": (".png",), "table": (".csv", ".md"), "note": (".txt",)}[kind]
    return [(p, t) for p, t in entries if p.endswith(suffixes)]
