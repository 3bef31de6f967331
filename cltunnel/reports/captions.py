"""What the page says under a file, declared by the module that writes it.

An analysis declares its outputs (file name or glob -> caption) once, with ``@analysis``, and a protocol with
``register_protocol`` (the experiments layer); the declaration lands here, in :data:`DECLARED`, when its module
is imported, and the driver also writes the captions of the analyses that ran into the run directory
(:data:`~cltunnel.store.CAPTIONS_FILE`), so a page rebuilt later by a process that never imported a user's
analysis still has them. The page reads a
directory's own file first, then the declarations. The kind of an output follows its suffix: ``.png`` a
figure, ``.csv``/``.md`` a table, ``.txt`` one-line results shown verbatim at the top of the page.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from cltunnel.registry import Registry
from cltunnel.store import CAPTIONS_FILE, atomic_write_text

DECLARED: Registry[tuple[int, str]] = Registry("output caption")  # pattern -> (place, caption)


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
    """(pattern, caption) for a directory: its own captions file first, then every declaration."""
    own = read_captions(directory)
    declared = sorted(DECLARED.items(), key=lambda item: item[1][0])  # stable: declaration order within a place
    return list(own.items()) + [(p, text) for p, (_, text) in declared if p not in own]


def entries_of(kind: str, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The entries of one kind: ``figure`` (.png), ``table`` (.csv, .md) or ``note`` (.txt)."""
    suffixes = {"figure": (".png",), "table": (".csv", ".md"), "note": (".txt",)}[kind]
    return [(p, t) for p, t in entries if p.endswith(suffixes)]
