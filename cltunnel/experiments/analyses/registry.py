"""Analyses by name, and how what one returns becomes files: the one API the built-in analyses and a user's
share.

``@analysis(name, caption=...)`` makes a function ``LoadedRun -> result`` an analysis. It owns its name,
its outputs (file name or glob -> caption, shown on the page; :mod:`cltunnel.reports.captions`), how the page
shows its CSVs (``shown_by``: the figure that shows one in full; ``views``: a reshaping for the page) and,
optionally, its table over a scenario's seeds. What it returns is written into the run directory by :func:`write_result`:

- a pandas ``DataFrame``: ``<name>.csv`` and ``<name>.md`` (the markdown table the page shows);
- a matplotlib ``Figure``: ``<name>.png`` (through :func:`cltunnel.reports.figures.write_figure`: 120 dpi);
- a ``str``: ``<name>.txt`` (one-line results, shown verbatim at the top of the page);
- a dict of these: each key a file. A key without a suffix becomes ``<name>_<key>`` with the suffixes above; a
  key with one (``"tunnel_profile.csv"``, ``"swap_meta.txt"``) is the file's exact name;
- ``None``: nothing.

A CSV keeps the frame's index unless it is the default 0..n-1. Anything else is refused before a file is
written. Built-in analyses live in this package and are named in ``analyses.run`` by name; a user's is
named ``"module:function"`` (the module importable from the working directory, as a strategy class is).
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cltunnel.config import ConfigError
from cltunnel.registry import Registry
from cltunnel.reports.captions import declare, declare_shown_by, declare_view
from cltunnel.reports.figures import write_figure
from cltunnel.reports.tables import markdown_table

SeedsTable = Callable[[Path, Path, "list[Path]", "list[str]"], "str | None"]
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SUFFIXES = (".csv", ".md", ".png", ".txt")


@dataclass(frozen=True)
class Analysis:
    """One analysis: its name, entry point, caption and the captions of the files it writes."""

    name: str
    function: Callable[..., Any]  # LoadedRun -> what write_result writes
    caption: str = ""  # for the files the declared outputs do not name
    outputs: Mapping[str, str] = field(default_factory=dict)  # file name or glob -> caption (page)
    seeds: SeedsTable | None = None  # (scenario dir, out dir, seed dirs, provenance) -> markdown or None
    order: int = 100  # its place in the default list (analyses.run empty: every built-in, in this order)
    shown_by: Mapping[str, str] = field(default_factory=dict)  # CSV glob -> the figure that shows it in full
    views: Mapping[str, Callable[[pd.DataFrame], pd.DataFrame]] = field(default_factory=dict)  # CSV glob -> page table

    @property
    def origin(self) -> str:
        """Where it is defined, as ``analyses.run`` names a user's: ``module:function``."""
        return f"{self.function.__module__}:{self.function.__qualname__}"

    @property
    def built_in(self) -> bool:
        return self.function.__module__.startswith("cltunnel.")

    def captions_of(self, files: list[str]) -> dict[str, str]:
        """The captions of a call's files: the declared outputs, and the analysis's caption for the rest."""
        named = {f: self.caption for f in files if not any(_matches(f, p) for p in self.outputs)}
        return {**dict(self.outputs), **named}


ANALYSES: Registry[Analysis] = Registry("analysis", ConfigError, replace=True)


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def analysis(name: str, caption: str = "", outputs: Mapping[str, str] | None = None, seeds: SeedsTable | None = None,
             order: int = 100, shown_by: Mapping[str, str] | None = None,
             views: Mapping[str, Callable[[pd.DataFrame], pd.DataFrame]] | None = None
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@analysis("weight_norms", caption="...")`` makes ``f(run)`` the analysis ``weight_norms``.

    ``outputs`` maps file names or globs to captions where one caption does not fit all files; ``seeds``
    combines a scenario's seeds (the built-ins' mean ± std tables); ``shown_by`` names, per CSV glob, the figure
    that shows such a CSV in full (the page lists it instead of printing it), and ``views`` reshapes a CSV into
    the table the page prints. The function is returned unchanged, with its :class:`Analysis` as ``f.analysis``."""
    if not isinstance(name, str) or not VALID_NAME.fullmatch(name):
        raise ValueError(f"analysis name {name!r}: letters, digits, '_', '-' and '.', as it names files")

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        entry = Analysis(name, function, caption, dict(outputs or {}), seeds, order, dict(shown_by or {}),
                         dict(views or {}))
        if name in ANALYSES and ANALYSES[name].origin != entry.origin:
            raise ValueError(f"analysis '{name}' is registered twice ({ANALYSES[name].origin} and {entry.origin})")
        ANALYSES.register(name, entry)
        declare(entry.outputs, order)
        declare_shown_by(entry.shown_by)
        for pattern, view in entry.views.items():
            declare_view(pattern, view)
        function.analysis = entry  # type: ignore[attr-defined]
        return function

    return register


def built_in_names() -> list[str]:
    """The built-in analyses in the order ``analyses.run`` defaults to."""
    return [a.name for a in sorted((a for a in ANALYSES.values() if a.built_in), key=lambda a: a.order)]


def load_user_analysis(spec: str, where: str = "analyses.run") -> Analysis:
    """``module:function`` imported (the working directory first on the path); a function without
    ``@analysis`` becomes one named after it. A module that fails to import or lacks the function is one line."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: '{spec}' must look like 'module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user's module: any error on import is theirs, said in one line
        raise ConfigError(f"{where}: cannot import analysis module '{module_name}' ({type(err).__name__}: "
                          f"{_first_line(err)})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        functions = [n for n, v in vars(module).items() if callable(getattr(v, "analysis", None)) or
                     (callable(v) and getattr(v, "__module__", None) == module_name and not n.startswith("_"))]
        raise ConfigError(f"{where}: module '{module_name}' has no function '{attr}'; there: {functions}")
    entry = getattr(function, "analysis", None)
    if isinstance(entry, Analysis):
        return entry
    if not VALID_NAME.fullmatch(attr):
        raise ConfigError(f"{where}: '{attr}' cannot name files")
    return Analysis(attr, function)


def resolve(names: list[str], where: str = "analyses.run") -> list[Analysis]:
    """The analyses of ``analyses.run``: built-in names (one line with the closest on a typo) and user
    ``module:function`` specs."""
    return [load_user_analysis(n, where) if ":" in n else ANALYSES.get(n, where) for n in names]


def check_analyses(names: list[str]) -> None:
    """Every name resolves: checked before any training, so a typo or a broken module is one line."""
    resolve(names)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _is_figure(value: Any) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    return isinstance(value, Figure)


def planned_files(name: str, result: Any) -> dict[str, Any]:
    """File name -> value of what an analysis returned; a TypeError names what cannot be written."""
    if result is None:
        return {}
    items = result.items() if isinstance(result, Mapping) else [(None, result)]
    files: dict[str, Any] = {}
    for key, value in items:
        if key is not None and (not isinstance(key, str) or not VALID_NAME.fullmatch(key)):
            raise TypeError(f"key {key!r} cannot name a file")
        stem = name if key is None else key if key.endswith(SUFFIXES) else f"{name}_{key}"
        if isinstance(value, pd.DataFrame):
            if stem.endswith((".csv", ".md")):
                files[stem] = value
            else:
                files[f"{stem}.csv"] = files[f"{stem}.md"] = value
        elif _is_figure(value) and not stem.endswith((".csv", ".md", ".txt")):
            files[stem if stem.endswith(".png") else f"{stem}.png"] = value
        elif isinstance(value, str) and not stem.endswith((".csv", ".png")):
            files[stem if stem.endswith((".txt", ".md")) else f"{stem}.txt"] = value
        else:
            what = "a dict of them" if isinstance(value, Mapping) else type(value).__name__
            raise TypeError(f"returned {what}{f' under {key!r}' if key else ''}; an analysis returns a "
                            "DataFrame, a Figure, a str, None or a dict of them")
    return files


def write_result(run_dir: Path, name: str, result: Any) -> list[str]:
    """Write what an analysis returned (see the module's docstring); returns the file names, in order."""
    files = planned_files(name, result)
    for file, value in files.items():
        path = Path(run_dir) / file
        if isinstance(value, pd.DataFrame):
            index = not (isinstance(value.index, pd.RangeIndex) and value.index.name is None)
            if file.endswith(".csv"):
                value.to_csv(path, index=index)
            else:
                title = Path(file).stem.replace("_", " ")
                path.write_text(f"### {title[:1].upper() + title[1:]}\n\n"
                                + markdown_table(_shown(value), index=index) + "\n")
        elif isinstance(value, str):
            path.write_text(value)
        else:
            write_figure(value, path)
    return list(files)


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """Cells as the page shows numbers: integers as integers, other numbers to two decimals, NaN as a dash."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if pd.isna(v) else f"{v:.0f}" if v.is_integer() else f"{v:.2f}"
        return "–" if v is None else str(v)

    return frame.map(cell) if hasattr(frame, "map") else frame.applymap(cell)
