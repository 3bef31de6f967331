"""``expect:`` in a scenario: accuracy bands that the run itself checks.

A scenario states bands ``[low, high]`` for numbers its run writes::

    expect:
      over: each                 # each (default): every seed's value in the band | mean: the mean over seeds
      a[0][0]: [45, 65]          # accuracy matrix (%): after task 0, on task 0
      ACC: [30, 60]              # cl_metrics: ACC, BWT, FWT, forgetting (= forgetting (last)), forgetting_max, AIA
      forgetting[0]: [2, 22]     # the forgetting table: task 0's just-trained minus after-the-last-task accuracy
      exact.ACC: [30, 60]        # the same numbers on the exact-pixel test rows (CIFAR-10 with test_rows: all)
      swap[E1 + T2][first task]: [40, 70]          # a swap-table cell (analyses.run has swap)
      k[rank]: [7, 9]            # a rule's tunnel start (analyses.run has tunnel); k alone: the start the run used
      swap[E2 (FT)][first task] - swap[E2 + T2][first task]: [2, 50]   # a difference of two numbers
      ACC: {band: [40, 60], over: mean}            # a band's own 'over'

Feature-erosion runs band ``erosion[<column> after <phase>]`` and ``erosion[clean forgetting]`` (their
``erosion_summary.json``). :func:`check_expect` refuses, before any data is loaded, a band that names a number the
run will not write (a cell outside the task count, a swap cell without the swap analysis, FWT of a
task-incremental run, ...). :func:`evaluate` reads the numbers from the files the run wrote, one
:class:`Outcome` per band; :func:`write_outcomes` puts the lines in ``expectations.txt`` in the scenario
directory, which the report page shows. ``cltunnel run`` exits with :data:`EXIT_VIOLATED` when a band is violated.
A sweep states ``expect:`` in its base (every configuration) or in a named variant (that configuration only);
each configuration's bands are checked over the sweep's seeds (:func:`cltunnel.sweeps.evaluate_sweep`).

Values are in the units the tables print: accuracies and their differences in percent, k in layers.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cltunnel.config import TUNNEL_RULE_NAMES, ConfigError, RunConfig
from cltunnel.store import (ACCURACY_MATRIX, CL_METRICS_TABLE, EROSION_SUMMARY, EXACT_ROWS, FORGETTING, SWAP_TABLE,
                            TUNNEL_START, atomic_write_text, seed_dir)

EXPECTATIONS_FILE = "expectations.txt"  # in the scenario directory: one line per band, held or violated
EXIT_VIOLATED = 3  # `cltunnel run`'s exit status when a band is violated (2: the run could not be made)
OVER = ("each", "mean")

# cl_metrics.csv's rows by the names a band may give them
CL_METRICS = {"ACC": "ACC", "BWT": "BWT", "FWT": "FWT", "forgetting": "forgetting (last)",
              "forgetting (last)": "forgetting (last)", "forgetting_max": "forgetting (max)",
              "forgetting (max)": "forgetting (max)", "AIA": "average incremental accuracy",
              "average incremental accuracy": "average incremental accuracy"}
SWAP_ROWS = ("E1 + T1", "E1 + T2", "E2 + T2", "E2 + T1", "E2 + T1 (FT)", "E2 (FT)")
SWAP_COLUMNS = ("first task", "second task")
EROSION_COLUMNS = ("clean", "squared", "train")

_CELL = re.compile(r"a\[(\d+)\]\[(\d+)\]$")
_FORGET = re.compile(r"forgetting\[(\d+)\]$")
_SWAP = re.compile(r"swap\[([^\]]+)\]\[([^\]]+)\]$")
_K = re.compile(r"k(?:\[(\w+)\])?$")
_EROSION = re.compile(r"erosion\[([^\]]+)\]$")
_RULE_LINE = re.compile(r"rule '(\w+)': .*?: (\d+) \(")


@dataclass(frozen=True)
class Band:
    name: str  # as written in the scenario
    low: float
    high: float
    over: str  # each | mean

    def text(self) -> str:
        return f"{self.name} in [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Outcome:
    band: Band
    values: dict[int, float]  # seed -> value (NaN: not written)
    held: bool

    def line(self, config: str | None = None) -> str:
        """``held: BAND ...`` or ``VIOLATED: BAND ...`` with the values; ``config`` names a sweep's configuration."""
        mark = f"{'held' if self.held else 'VIOLATED'}: {f'{config}: ' if config else ''}{self.band.text()}"
        vals = [v for v in self.values.values()]
        if self.band.over == "mean":
            shown = f"mean over {len(vals)} seed{'s' * (len(vals) != 1)} = {_fmt(float(np.mean(vals)))}"
            return f"{mark} as the mean: {shown}"
        shown = ", ".join(f"{_fmt(v)} (seed {s}{'' if _inside(v, self.band) else ', outside'})"
                          for s, v in self.values.items())
        return f"{mark} for every seed: {shown}"


def _fmt(v: float) -> str:
    return "not written" if math.isnan(v) else f"{v:.2f}"


def _inside(value: float, band: Band) -> bool:
    return not math.isnan(value) and band.low <= value <= band.high


def _terms(name: str) -> list[tuple[int, str]]:
    """``X`` or ``X - Y`` (a difference of two numbers) as signed terms; a '-' inside brackets is not one."""
    depth, cut = 0, None
    for i, ch in enumerate(name):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "-" and depth == 0 and 0 < i and name[i - 1] == " " and name[i + 1:i + 2] == " ":
            if cut is not None:
                raise ConfigError(f"expect.{name}: at most one difference 'X - Y'")
            cut = i
    if cut is None:
        return [(1, name.strip())]
    return [(1, name[:cut].strip()), (-1, name[cut + 1:].strip())]


def parse_expect(raw: Any) -> list[Band]:
    """The ``expect:`` mapping as bands (shape only; :func:`check_expect` checks them against the run)."""
    if not raw:
        return []
    if not isinstance(raw, dict):
        raise ConfigError(f"expect: a mapping of number -> [low, high] (and 'over: each|mean'), got {raw!r}")
    over = raw.get("over", "each")
    if over not in OVER:
        raise ConfigError(f"expect.over: each (every seed) or mean (the mean over seeds), got {over!r}")
    bands = []
    for name, spec in raw.items():
        if name == "over":
            continue
        where, band_over = f"expect.{name}", over
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"band", "over"})
            if unknown or "band" not in spec:
                raise ConfigError(f"{where}: [low, high] or {{band: [low, high], over: each|mean}}, got keys {unknown or list(spec)}")
            band_over, spec = spec.get("over", over), spec["band"]
            if band_over not in OVER:
                raise ConfigError(f"{where}.over: each or mean, got {band_over!r}")
        if (not isinstance(spec, list) or len(spec) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)):
            raise ConfigError(f"{where}: a band is [low, high] (two numbers), got {spec!r}")
        if spec[0] > spec[1]:
            raise ConfigError(f"{where}: low {spec[0]} is above high {spec[1]}")
        bands.append(Band(str(name), float(spec[0]), float(spec[1]), band_over))
    return bands


def check_expect(cfg: RunConfig) -> list[Band]:
    """Every band of ``cfg.expect``, each checked to name a number this run will write; raises ConfigError
    (one line naming the band and why) before any data is loaded."""
    bands = parse_expect(cfg.expect)
    for band in bands:
        for _, term in _terms(band.name):
            _check_term(term, cfg, f"expect.{band.name}")
    return bands


def _n_tasks(cfg: RunConfig) -> int:
    return len(cfg.scenario.tasks) if cfg.scenario.tasks is not None else int(cfg.scenario.n_tasks or 1)


def _exact_rows_written(cfg: RunConfig) -> bool:
    return cfg.data.name == "cifar10" and cfg.data.test_rows == "all"


def _check_term(term: str, cfg: RunConfig, where: str) -> None:
    protocol = next(iter(cfg.protocol_sections), None)  # the section that selects the protocol, if any
    if protocol == "erosion":
        return _check_erosion_term(term, cfg, where)
    if protocol is not None:
        raise ConfigError(f"{where}: bands name numbers of task-sequence and erosion runs; this scenario runs the "
                          f"{protocol} protocol, whose tables are not banded (give no 'expect:')")
    exact = term.startswith("exact.")
    name = term.removeprefix("exact.")
    if exact and not _exact_rows_written(cfg):
        raise ConfigError(f"{where}: exact-row numbers are written only for CIFAR-10 with data.test_rows: all "
                          f"(this run: {cfg.data.name}, test_rows {cfg.data.test_rows})")
    n = _n_tasks(cfg)
    if m := _CELL.match(name):
        i, j = int(m.group(1)), int(m.group(2))
        if i >= n or j >= n:
            raise ConfigError(f"{where}: the accuracy matrix is {n} x {n} (a[0..{n - 1}][0..{n - 1}]), "
                              f"there is no a[{i}][{j}]")
    elif name in CL_METRICS:
        row = CL_METRICS[name]
        if row != "ACC" and row != "average incremental accuracy" and n < 2:
            raise ConfigError(f"{where}: {row} needs at least 2 tasks; this run has {n}")
        if row == "FWT" and cfg.scenario.mode == "task":
            raise ConfigError(f"{where}: FWT is not reported in task-incremental runs (head j is untrained before "
                              f"task j); use scenario.mode: class or band another number")
    elif m := _FORGET.match(name):
        if int(m.group(1)) >= n - 1:
            raise ConfigError(f"{where}: forgetting[j] exists for the tasks before the last (j < {n - 1})")
    elif m := _SWAP.match(name):
        _check_swap(m.group(1).strip(), m.group(2).strip(), exact, cfg, n, where)
    elif m := _K.match(name):
        if exact:
            raise ConfigError(f"{where}: k has no exact-row form")
        rule = m.group(1)
        if "tunnel" not in cfg.analyses.run:
            raise ConfigError(f"{where}: the tunnel starts are written by the tunnel analysis; add tunnel to analyses.run")
        if rule is not None and rule not in TUNNEL_RULE_NAMES:
            raise ConfigError(f"{where}: unknown rule '{rule}'; valid: {', '.join(TUNNEL_RULE_NAMES)} (or k alone: "
                              "the start the analyses used)")
    else:
        raise ConfigError(f"{where}: not a number a run writes; valid: a[i][j], ACC, BWT, FWT, forgetting, "
                          "forgetting_max, AIA, forgetting[j], swap[ROW][first task|second task], k, k[last|peak|rank]"
                          " (exact.<name> on the exact rows), or 'X - Y' of two of them")


def _check_swap(row: str, column: str, exact: bool, cfg: RunConfig, n: int, where: str) -> None:
    if "swap" not in cfg.analyses.run:
        raise ConfigError(f"{where}: the swap table is written by the swap analysis; add swap to analyses.run")
    if n != 2:
        raise ConfigError(f"{where}: the swap table needs a 2-task run; this one has {n} tasks")
    if row not in SWAP_ROWS:
        raise ConfigError(f"{where}: unknown swap row '{row}'; valid: {', '.join(SWAP_ROWS)}")
    base = column.removesuffix(" (exact rows)")
    if base not in SWAP_COLUMNS:
        raise ConfigError(f"{where}: unknown swap column '{column}'; valid: {', '.join(SWAP_COLUMNS)}")
    if row.endswith("(FT)") and (base != "first task" or exact or base != column):
        raise ConfigError(f"{where}: the (FT) rows are measured on the first task, all rows, only")
    if (exact or base != column) and not _exact_rows_written(cfg):
        raise ConfigError(f"{where}: exact-row columns are written only for CIFAR-10 with data.test_rows: all")


def _erosion_keys(cfg: RunConfig) -> list[str]:
    e = cfg.erosion
    phases = (["clean"] if e.pretrain_epochs > 0 else []) + ["squared"] + (["relearn"] if e.relearn_epochs > 0 else [])
    keys = [f"{col} after {phase}" for phase in phases for col in EROSION_COLUMNS]
    keys += ["clean forgetting"] if "clean" in phases else []
    keys += ["clean after scratch"] if e.relearn_epochs > 0 else []
    return keys


def _check_erosion_term(term: str, cfg: RunConfig, where: str) -> None:
    m = _EROSION.match(term)
    keys = _erosion_keys(cfg)
    if m is None or m.group(1).strip() not in keys:
        raise ConfigError(f"{where}: a feature-erosion run writes erosion[KEY] with KEY one of {', '.join(keys)}")


def read_number(run_dir: Path, name: str) -> float:
    """One seed's value of a band's number (``X`` or ``X - Y``) from the files the run wrote; NaN if absent."""
    return float(sum(sign * _read_term(Path(run_dir), term) for sign, term in _terms(name)))


def _mean_frame(path: Path) -> pd.DataFrame | None:
    """A table written by reports.tables.write_table: its 'mean' block (a seed's own values)."""
    if not path.exists():
        return None
    frame = pd.read_csv(path, header=[0, 1], index_col=0)
    return frame["mean"]


def _cell(frame: pd.DataFrame | None, row: str, column: str) -> float:
    if frame is None or row not in frame.index or column not in frame.columns:
        return math.nan
    return float(frame.loc[row, column])


def _read_term(run_dir: Path, term: str) -> float:
    if m := _EROSION.match(term):
        path = run_dir / EROSION_SUMMARY
        return float(json.loads(path.read_text()).get(m.group(1).strip(), math.nan)) if path.exists() else math.nan
    suffix = EXACT_ROWS if term.startswith("exact.") else ""
    name = term.removeprefix("exact.")
    if m := _CELL.match(name):
        return _cell(_mean_frame(run_dir / f"{ACCURACY_MATRIX}{suffix}.csv"), f"after task {m.group(1)}", f"task {m.group(2)}")
    if name in CL_METRICS:
        return _cell(_mean_frame(run_dir / f"{CL_METRICS_TABLE}{suffix}.csv"), CL_METRICS[name], "value")
    if m := _FORGET.match(name):
        frame = _mean_frame(run_dir / f"{FORGETTING}{suffix}.csv")
        if frame is None:
            return math.nan
        rows = [r for r in frame.index if str(r).split(" [")[0] == f"task {m.group(1)}"]
        return _cell(frame, rows[0], "forgetting") if rows else math.nan
    if m := _SWAP.match(name):
        path = run_dir / SWAP_TABLE
        column = m.group(2).strip()
        column += " (exact rows)" if suffix and not column.endswith(" (exact rows)") else ""
        return _cell(pd.read_csv(path, index_col=0) if path.exists() else None, m.group(1).strip(), column)
    if m := _K.match(name):
        return tunnel_starts(run_dir).get(m.group(1) or "used", math.nan)
    return math.nan


def tunnel_starts(run_dir: Path) -> dict[str, float]:
    """Each rule's k from ``tunnel_start.txt`` (and ``used``: the k the analyses used)."""
    path = Path(run_dir) / TUNNEL_START
    if not path.exists():
        return {}
    starts: dict[str, float] = {}
    for line in path.read_text().splitlines():
        if (m := _RULE_LINE.match(line)) is None:
            continue
        starts["used" if "(used)" in line else m.group(1)] = float(m.group(2))
    return starts


def evaluate(cfg: RunConfig, seeds: list[int] | None = None) -> list[Outcome]:
    """Each band against the seeds' written numbers (``cfg.seeds`` by default)."""
    outcomes = []
    for band in parse_expect(cfg.expect):
        values = {s: read_number(seed_dir(cfg, s), band.name) for s in (seeds if seeds is not None else cfg.seeds)}
        vals = list(values.values())
        if band.over == "mean":
            held = not any(math.isnan(v) for v in vals) and _inside(float(np.mean(vals)), band)
        else:
            held = all(_inside(v, band) for v in vals)
        outcomes.append(Outcome(band, values, held))
    return outcomes


def write_outcomes(scenario_dir: Path, outcomes: list[Outcome]) -> Path | None:
    """``expectations.txt`` (one line per band) in the scenario directory; an earlier file goes when the
    scenario states no bands."""
    return _write_lines(Path(scenario_dir), [o.line() for o in outcomes])


def write_sweep_outcomes(sweep_dir: Path, by_config: dict[str, list[Outcome]]) -> Path | None:
    """The sweep's ``expectations.txt``: every configuration's bands, one line each, named by configuration
    (each configuration's own directory gets its lines from :func:`write_outcomes`)."""
    return _write_lines(Path(sweep_dir), [o.line(config) for config, outcomes in by_config.items() for o in outcomes])


def _write_lines(directory: Path, lines: list[str]) -> Path | None:
    path = directory / EXPECTATIONS_FILE
    if not lines:
        path.unlink(missing_ok=True)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
