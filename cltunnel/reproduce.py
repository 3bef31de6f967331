"""``cltunnel reproduce``: re-run the committed references of ``tables/`` and compare every number they pin.

The manifest, ``tables/REFERENCES.yaml``, holds one entry per reference folder: the command that makes it (as
typed in the checkout's root: ``cltunnel ...``, or ``python benchmarks/NAME.py ...`` for a benchmark script of
the checkout, whose output must then be a path relative to where it runs, never the committed file's), where
that command writes (``output``, relative to the directory it runs in),
the commit that made it, its cost on the 2-core CPU and the device it needs, and what it pins:

- ``compare``: files of the reference whose every cell is compared with the re-run's (numbers within
  ``tolerance``, absolute; text equal): CSVs, or markdown files whose first pipe table is compared;
- ``pins``: single numbers, ``FILE[ROW][COLUMN]`` (a CSV cell: the row by its label in the first column, or
  ``#i`` by position; in a mean ± std table the column of its mean block) with ``value`` and ``tolerance``;
- ``quick``: a reduced command CI can afford, with its own pins (measured at ``made_at``);
- ``threads``: torch's CPU threads the reference was made with (set for the re-run: a CPU run is
  deterministic for a given thread count, and some, narrow_resnet's, change with it);
- ``timing``: the ratios a timing reference reports (img/s, seconds: they move between runs, so it is
  listed, never re-run and compared; ``reproduce`` says so).

``reproduce NAME...`` runs each command in a fresh temporary directory (paths of the checkout made absolute),
then prints one line per reference: ``match`` or ``DRIFT`` with the worst number, its old and its new value.
It exits 1 on a drift or a failed command. ``--record`` writes the date and commit of each match into the
manifest (``last_reproduced``).
"""
from __future__ import annotations

import datetime
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cltunnel.config import ConfigError, read_yaml

MANIFEST = Path("tables") / "REFERENCES.yaml"
EXIT_DRIFT = 1
ENTRY_KEYS = {"path", "command", "output", "made_at", "made_by", "cost", "cost_minutes", "device", "status",
              "changed_since", "compare", "pins", "quick", "last_reproduced", "reading", "threads", "timing"}
BENCHMARKS = Path("benchmarks")  # a reference command may run a script here: python benchmarks/NAME.py ...


@dataclass
class Drift:
    name: str
    old: Any
    new: Any
    size: float  # |new - old|, inf for text or a missing number


@dataclass
class Result:
    reference: str
    checked: int
    drifts: list[Drift]
    error: str | None = None
    seconds: float = 0.0

    def line(self, quick: bool) -> str:
        form = " (quick form)" if quick else ""
        took = f", {self.seconds / 60:.1f} min"
        if self.error:
            return f"FAILED {self.reference}{form}: {self.error}"
        if not self.drifts:
            return f"match {self.reference}{form}: {self.checked} numbers as pinned{took}"
        worst = max(self.drifts, key=lambda d: d.size)
        return (f"DRIFT {self.reference}{form}: {len(self.drifts)} of {self.checked} numbers; worst {worst.name}: "
                f"{_show(worst.old)} -> {_show(worst.new)}{took}")


def _show(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def repo_root(manifest: Path) -> Path:
    return manifest.resolve().parent.parent


def load_manifest(path: Path = MANIFEST) -> dict[str, dict[str, Any]]:
    raw = read_yaml(path, "references manifest")
    refs = raw.get("references")
    if not isinstance(refs, dict) or not refs:
        raise ConfigError(f"{path}: no 'references' mapping")
    for name, entry in refs.items():
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{path}: reference {name}: unknown keys {unknown}")
        for key in ("path", "device", "made_at"):
            if key not in entry:
                raise ConfigError(f"{path}: reference {name}: '{key}' missing")
    return refs


def list_references(refs: dict[str, dict[str, Any]]) -> str:
    rows = [("reference", "device", "cost", "made at", "last reproduced", "quick", "status")]
    for name, e in refs.items():
        last = e.get("last_reproduced") or {}
        last_text = f"{last.get('date', '?')} at {last.get('commit', '?')}" + (" (quick)" if last.get("quick") else "") \
            if last else "never"
        rows.append((name, str(e["device"]), str(e.get("cost", "?")), str(e["made_at"]), last_text,
                     "yes" if e.get("quick") else "-", _short(str(e.get("status", "?")))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------- reading numbers from the files a run wrote
def _table(path: Path) -> list[list[str]]:
    """A CSV's rows, or a markdown file's first pipe table (header and body, without the ``|---|`` rule)."""
    import csv

    if path.suffix == ".md":
        return _markdown_table(path.read_text())
    with open(path, newline="") as handle:
        return [row for row in csv.reader(handle)]


def _markdown_table(text: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            if rows:
                break  # the first table ends
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not all(set(cell) <= set(":-") for cell in cells):
            rows.append(cells)
    return rows


def _number(text: str) -> float | None:
    try:
        return float(text) if text.strip() != "" else math.nan
    except ValueError:
        return None


def _header_rows(rows: list[list[str]]) -> int:
    """Rows of a CSV that are headers: one, or two (and an index-name row) for write_table's mean/std files."""
    if rows and len(rows[0]) > 1 and rows[0][1] == "mean":
        third = rows[2] if len(rows) > 2 else []
        return 3 if third and all(c == "" for c in third[1:]) else 2
    return 1


def compare_files(old: Path, new: Path, tolerance: float, label: str) -> tuple[int, list[Drift]]:
    """Every cell of two CSVs: numbers within ``tolerance`` (NaN equals NaN), other text equal."""
    if not old.exists() or not new.exists():
        return 1, [Drift(label, "committed" if old.exists() else "not committed",
                         "written" if new.exists() else "not written", math.inf)]
    a, b = _table(old), _table(new)
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return 1, [Drift(label, f"{len(a)} rows", f"{len(b)} rows (or other columns)", math.inf)]
    skip, checked, drifts = _header_rows(a), 0, []
    labelled = a[0][0] == ""  # a first column of row labels (pandas' unnamed index), else rows go by position
    for i, (ra, rb) in enumerate(zip(a, b)):
        for j, (ca, cb) in enumerate(zip(ra, rb)):
            if i < skip or (j == 0 and labelled):
                if ca != cb:
                    drifts.append(Drift(f"{label} header/label ({i}, {j})", ca, cb, math.inf))
                continue
            checked += 1
            na, nb = _number(ca), _number(cb)
            name = f"{label}[{ra[0] if labelled else _row_name(ra, i - skip)}][{_column_name(a, skip, j)}]"
            if na is None or nb is None:
                if ca != cb:
                    drifts.append(Drift(name, ca, cb, math.inf))
            elif math.isnan(na) != math.isnan(nb):
                drifts.append(Drift(name, na, nb, math.inf))
            elif not math.isnan(na) and abs(na - nb) > tolerance:
                drifts.append(Drift(name, na, nb, abs(na - nb)))
    return checked, drifts


def _row_name(row: list[str], index: int) -> str:
    """A row of a file without row labels: its position (how read_cell addresses it) and its first three cells."""
    return f"#{index} " + "/".join(row[:3])


def _column_name(rows: list[list[str]], skip: int, j: int) -> str:
    if skip >= 2:  # mean/std block: "mean ACC" style
        return f"{rows[1][j]}" if rows[0][j] == "mean" else f"{rows[0][j]} {rows[1][j]}"
    return rows[0][j]


def read_cell(directory: Path, address: str) -> float:
    """``FILE[ROW][COLUMN]`` under ``directory``: the row by its first-column label (``#i``, by position, in a
    file without row labels), the column by its header (the mean block's in a mean ± std table; ``std COLUMN`` for its std); NaN where absent."""
    file, _, rest = address.partition("[")
    row_label, _, rest = rest.partition("][")
    column = rest.removesuffix("]")
    path = directory / file
    if not path.exists():
        return math.nan
    rows = _table(path)
    skip = _header_rows(rows)
    names = [_column_name(rows, skip, j) for j in range(len(rows[0]))]
    if column not in names:
        return math.nan
    j = names.index(column)
    body = rows[skip:]
    if row_label.startswith("#") or rows[0][0] != "":
        index = int(row_label[1:])
        row = body[index] if index < len(body) else None
    else:
        row = next((r for r in body if r[0] == row_label), None)
    value = _number(row[j]) if row is not None else None
    return math.nan if value is None else value


def check_pins(directory: Path, pins: dict[str, Any]) -> tuple[int, list[Drift]]:
    drifts = []
    for address, spec in (pins or {}).items():
        old, tol = float(spec["value"]), float(spec.get("tolerance", 0.0))
        new = read_cell(directory, address)
        if math.isnan(new) or abs(new - old) > tol:
            drifts.append(Drift(address, old, new, math.inf if math.isnan(new) else abs(new - old)))
    return len(pins or {}), drifts


# ---------------------------------------------------------------- running
def _argv(command: str, root: Path) -> list[str]:
    """The command as typed in the checkout's root, with this interpreter's cltunnel and the checkout's paths
    made absolute (it runs in a temporary directory)."""
    words = shlex.split(command)
    if words[0] == "cltunnel":
        out, rest = [sys.executable, "-m", "cltunnel.cli"], words[1:]
    elif words[0] == "python" and len(words) > 1 and Path(words[1]).parent == BENCHMARKS \
            and (root / words[1]).is_file():
        out, rest = [sys.executable, str(root / words[1])], words[2:]
    else:
        raise ConfigError(f"a reference command starts with 'cltunnel' or 'python benchmarks/NAME.py' (a script of "
                          f"the checkout), got {command!r}")
    outs = [b for a, b in zip(rest, rest[1:]) if a == "--out"] + [w.partition("=")[2] for w in rest
                                                                 if w.startswith("--out=")]
    if out[1:2] != ["-m"] and any((root / o).exists() for o in outs):  # either form: never the committed file
        raise ConfigError(f"{command!r}: --out names a file of the checkout; a re-run writes where it runs (give "
                          "the file's name alone, and 'output')")
    for word in rest:
        key, eq, value = word.partition("=")
        if not word.startswith("-") and (root / word).exists():
            word = str(root / word)
        elif eq and key.startswith("--") and (root / value).exists():
            word = f"{key}={root / value}"
        out.append(word)
    return out


def _environment(root: Path, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:  # torch's CPU threads change float sums, and chaotic trainings amplify them (narrow_resnet)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if "CLTUNNEL_DATA" not in env and (root.parent / "shared" / "data").is_dir():
        env["CLTUNNEL_DATA"] = str(root.parent / "shared" / "data")  # as the README's quick start
    # the manifest's checkout first, then the cltunnel this interpreter runs (a manifest outside a checkout)
    package = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([str(root), package, *filter(None, [env.get("PYTHONPATH")])])
    return env


def reproduce_one(name: str, entry: dict[str, Any], root: Path, quick: bool, keep: Path | None = None,
                  log=print) -> Result:
    spec = entry.get("quick") if quick else entry
    if entry.get("timing"):
        return Result(name, 0, [], error=f"a timing, not re-run: img/s and seconds move between runs; it reports "
                                         f"{'; '.join(entry['timing'])} (re-measure: {entry.get('command', '?')})")
    if quick and not spec:
        return Result(name, 0, [], error="no quick form in the manifest")
    if not spec.get("command"):
        return Result(name, 0, [], error=f"no command in the manifest ({entry.get('status', 'not reproducible')})")
    if str(entry["device"]).startswith("cuda") or entry["device"] == "gpu":
        import torch

        if not torch.cuda.is_available():
            return Result(name, 0, [], error="needs a GPU (no CUDA device here)")
    work = Path(tempfile.mkdtemp(prefix=f"cltunnel-reproduce-{name}-", dir=keep))
    argv = _argv(spec["command"], root)
    log(f"{name}: {spec['command']}  (in {work})")
    start = time.time()
    threads = spec.get("threads", entry.get("threads"))
    proc = subprocess.run(argv, cwd=work, env=_environment(root, threads), capture_output=True, text=True)
    seconds = time.time() - start
    (work / "reproduce.log").write_text(proc.stdout + proc.stderr)
    # a run whose own expect: bands fail exits 3 and still wrote everything: compare its numbers
    if proc.returncode not in (0, 3):
        last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
        return Result(name, 0, [], error=f"command exited {proc.returncode}: {last} (log: {work / 'reproduce.log'})",
                      seconds=seconds)
    out = work / spec.get("output", entry.get("output", ""))
    checked, drifts = check_pins(out, spec.get("pins"))
    if not quick:
        compare = entry.get("compare") or {}
        for file in compare.get("files", []):
            n, d = compare_files(root / entry["path"] / file, out / file, float(compare.get("tolerance", 0.0)), file)
            checked, drifts = checked + n, drifts + d
    return Result(name, checked, drifts, seconds=seconds)


def record(path: Path, results: list[Result], quick: bool, root: Path) -> None:
    """``last_reproduced`` of every matched reference: today, the checkout's commit, quick or full."""
    raw = yaml.safe_load(path.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip() or "?"
    for r in results:
        if r.error is None and not r.drifts:
            raw["references"][r.reference]["last_reproduced"] = {
                "date": datetime.date.today().isoformat(), "commit": commit, "quick": quick,
                "minutes": round(r.seconds / 60, 1)}
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=110))


def reproduce(names: list[str], manifest: Path = MANIFEST, quick: bool = False, keep: Path | None = None,
              record_results: bool = False, log=print) -> list[Result]:
    refs = load_manifest(manifest)
    root = repo_root(manifest)
    if not names:
        if not quick:
            raise ConfigError("name the references to re-run (`cltunnel reproduce --list`), or give --quick for "
                              "every reduced form")
        names = [n for n, e in refs.items() if e.get("quick")]
    unknown = [n for n in names if n not in refs]
    if unknown:
        raise ConfigError(f"unknown reference(s) {unknown}; `cltunnel reproduce --list` shows {', '.join(refs)}")
    results = []
    for name in names:
        result = reproduce_one(name, refs[name], root, quick, keep, log)
        log(result.line(quick))
        results.append(result)
    if record_results:
        record(manifest, results, quick, root)
    return results
