"""A campaign: a plan of runs in priority order, run in one call within a time budget, packed for the trip home.

A GPU window is short (minutes) and rare. ``cltunnel campaign PLAN --budget S --out DIR`` takes the plan's
entries in order, skips those whose results ``tables/`` already holds, estimates each run's seconds from
its image count and a throughput measured on this device the way the run trains, first-step compilation
included (or the plan's figure), corrected by how long the runs of this call actually took; never starts a
run it cannot finish in what is left; reports a run that fails with its error and starts the next; and packs
every table, figure, metrics file and provenance line (no checkpoints) into at most 8 files of at most
16 MiB under DIR after every run, so a call cut off still returns what finished. CAMPAIGN.md says what was
estimated against what it took. ``--dry-run`` lists what it would run, in seconds: it measures nothing.

Plan file::

    name: paper
    entries:
      - name: splits_seed2                     # a label
        what: VGG-19 w1 (3,7) and (7,3), seed 2 # one line for the report
        scenario: ../scenarios/split3_7.yaml    # or sweep: ../sweeps/width_study.yaml (its runs are the units)
        seeds: [2]                              # scenario entries: which seeds (default: the file's)
        set: {analyses.run: [tunnel, swap]}     # dotted overrides
        done_if: ../tables/gpu-h100/split3_7/seed2/metrics.json   # skip when this exists
        images_per_second: 9700                 # optional: else measured on the device at the start
        overhead: 0.5                           # analyses etc., as a share of training time (default 0.5)
"""
from __future__ import annotations

import io
import shlex
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cltunnel.config import ConfigError, RunConfig, load_config, read_yaml
from cltunnel.data.device import resolve_device
from cltunnel.data.images import DATASETS
from cltunnel.experiments import protocol_for
from cltunnel.models.zoo import build_model
from cltunnel.reports.provenance import provenance
from cltunnel.runs import preflight, run_seed
from cltunnel.store import CAMPAIGN_REPORT, scenario_dir_of, seed_dir
from cltunnel.training.capture import CapturedStep
from cltunnel.training.capture_rules import proven_config
from cltunnel.training.fast_data import TemperatureCrossEntropy, amp_enabled, capture_mode
from cltunnel.sweeps import expand, job_config, load_sweep

PLAN_KEYS = {"name", "entries"}
ENTRY_KEYS = {"name", "what", "scenario", "sweep", "seeds", "set", "done_if", "images_per_second", "overhead"}
MAX_FILES, MAX_BYTES = 8, 16 * 2**20
STARTUP_SECONDS = 20.0  # per run: data to the device, model build (compilation is measured: Throughput)


@dataclass
class Unit:
    """One run of the campaign: a scenario at one seed."""

    entry: str
    cfg: RunConfig
    seed: int
    estimate: float | None = 0.0  # seconds; None: to be measured on the device
    status: str = "todo"
    seconds: float = 0.0
    why: str = ""


@dataclass
class Entry:
    name: str
    what: str
    units: list[Unit]
    done_if: Path | None
    images_per_second: float | None
    overhead: float
    outputs: list[Path] = field(default_factory=list)


def load_plan(path: str | Path) -> tuple[str, list[Entry]]:
    """Parse and check every entry (every run's config through preflight) before anything runs."""
    path = Path(path)
    raw = read_yaml(path, "plan", PLAN_KEYS)
    entries = [_entry(path.parent, e, i) for i, e in enumerate(raw.get("entries") or [])]
    if not entries:
        raise ConfigError(f"{path}: entries: the plan lists no runs")
    return raw.get("name", path.stem), entries


def _entry(root: Path, raw: dict[str, Any], index: int) -> Entry:
    where = f"entries[{index}]"
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {', '.join(sorted(ENTRY_KEYS))}")
    name = raw.get("name", f"entry{index}")
    if ("scenario" in raw) == ("sweep" in raw):
        raise ConfigError(f"{where} ({name}): give exactly one of 'scenario' or 'sweep'")
    if "sweep" in raw:
        sweep = load_sweep(root / raw["sweep"], raw.get("set"))  # parses and checks each configuration once
        units = [Unit(name, job_config(sweep, job), job.seed) for job in expand(sweep)]
    else:
        cfg = load_config(root / raw["scenario"], raw.get("set"))
        preflight(cfg)
        units = [Unit(name, cfg, seed) for seed in (raw.get("seeds") or cfg.seeds)]
    done_if = root / raw["done_if"] if raw.get("done_if") else None
    return Entry(name, raw.get("what", ""), units, done_if, raw.get("images_per_second"),
                 float(raw.get("overhead", 0.5)))


def training_images(cfg: RunConfig) -> int:
    """Images a run pushes through training: every class's training images once per epoch its protocol trains
    (a task sequence sees each class in one task; erosion counts its phases and its scratch model)."""
    name = cfg.data.name
    per_class = cfg.data.train_per_class or (6000 if "mnist" in name else 50_000 // DATASETS[name].classes)
    return per_class * DATASETS[name].classes * protocol_for(cfg).epochs_over_data(cfg)


@dataclass
class Throughput:
    """What a model's training step costs on this device: steady images per second, and the seconds its
    first step takes beyond a steady one (compilation and the self-check where capture is on)."""

    images_per_second: float
    first_step_seconds: float


def measure_throughput(cfg: RunConfig, steps: int = 20, warmup: int = 5) -> Throughput:
    """This model's training step at the scenario's batch size, on its device, the way the run will train
    (the captured step where ``training.capture`` turns it on there and the strategy is one it captures, else
    the eager one)."""
    device = resolve_device(cfg.device)
    shape, n_classes = DATASETS[cfg.data.name].shape, DATASETS[cfg.data.name].classes
    torch.manual_seed(0)
    model = build_model(cfg.model.name, [n_classes], shape, cfg.model.width, **cfg.model.args).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.randn(cfg.training.batch_size, *shape, device=device)
    y = torch.randint(0, n_classes, (cfg.training.batch_size,), device=device)
    step = CapturedStep(model, TemperatureCrossEntropy(1.0), opt, device, amp_enabled(cfg.training, device),
                        log=lambda line: None)
    mode = capture_mode(cfg.training, device)
    captured = mode == "on" or (mode == "proven" and proven_config(cfg.strategy, cfg.evaluation.metrics))
    train = step if captured else step.eager
    times = []
    for _ in range(warmup + steps):
        began = time.perf_counter()
        train(x, y, 0)
        _sync(device)
        times.append(time.perf_counter() - began)
    steady = sum(times[warmup:]) / steps
    return Throughput(cfg.training.batch_size / steady, max(0.0, sum(times[:warmup]) - warmup * steady))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_shape(cfg: RunConfig) -> int:
    """Compiled variants a run makes: one per head (task-incremental) and batch shape (full and last)."""
    return 2 * (len(cfg.scenario.tasks or []) or cfg.scenario.n_tasks or 1)


def estimate(entries: list[Entry], log: Any = print, measure: bool = True) -> None:
    """Each unit's estimated seconds: images / throughput x (1 + overhead) + startup + first-step cost x the
    variants the run compiles. ``measure=False`` (a dry run) measures nothing: units of entries without
    the plan's ``images_per_second`` get no estimate (it is measured on the device at the start)."""
    measured: dict[str, Throughput] = {}
    for entry in entries:
        for unit in entry.units:
            key = f"{unit.cfg.model.name}/{unit.cfg.model.width}/{unit.cfg.data.name}/{unit.cfg.training.batch_size}"
            if entry.images_per_second:
                rate, first = float(entry.images_per_second), 0.0
            elif not measure:
                unit.estimate = None
                continue
            else:
                if key not in measured:
                    try:
                        measured[key] = measure_throughput(unit.cfg)
                    except Exception as err:  # noqa: BLE001 - an OOM or compile failure must not end the call
                        log(f"measuring {key} failed ({type(err).__name__}: {str(err)[:200]}); its runs are not started")
                        measured[key] = Throughput(1e-9, 0.0)
                    log(f"measured {key}: {measured[key].images_per_second:.0f} img/s, first step "
                        f"+{measured[key].first_step_seconds:.1f} s")
                rate, first = measured[key].images_per_second, measured[key].first_step_seconds
            unit.estimate = (training_images(unit.cfg) / rate * (1 + entry.overhead) + STARTUP_SECONDS
                             + first * _run_shape(unit.cfg))


def run_campaign(entries: list[Entry], budget: float, dry_run: bool = False, log: Any = print,
                 after_unit: Callable[[], None] = lambda: None) -> list[Unit]:
    """Run the units in plan order within ``budget`` seconds; returns every unit with its status and why.

    A unit that fails is reported with its error and the next one starts. Estimates are corrected by the
    largest ratio of taken to estimated seconds seen so far in this call (never below 1), so a device slower
    than its measurement does not start a run it cannot finish. ``after_unit`` runs after each finished or
    failed unit (the campaign packs there, so a call cut off still returns what finished)."""
    start = time.perf_counter()
    estimate(entries, log, measure=not dry_run)
    correction = 1.0
    for entry in entries:
        if entry.done_if is not None and entry.done_if.exists():
            for unit in entry.units:
                unit.status, unit.why = "skipped", f"tables/ already holds it ({entry.done_if})"
            continue
        for unit in entry.units:
            left = budget - (time.perf_counter() - start)
            needed = None if unit.estimate is None else unit.estimate * correction
            if needed is not None and needed > left:
                unit.status, unit.why = "skipped", f"needs ~{needed:.0f} s, {max(left, 0):.0f} s of budget left"
            elif dry_run:
                unit.status = "would run"
                unit.why = (f"~{needed / 60:.1f} min" if needed is not None
                            else "estimate: throughput measured on the device at the start")
                budget -= needed or 0.0
            else:
                _run_unit(entry, unit, log)
                if unit.status == "done" and unit.estimate:
                    correction = max(correction, unit.seconds / unit.estimate)
                after_unit()
        _aggregate(entry, log)
    return [u for e in entries for u in e.units]


def _aggregate(entry: Entry, log: Any) -> None:
    """Tables over the seeds run so far (a failure here is reported, not fatal: the runs are saved)."""
    protocol = protocol_for(entry.units[0].cfg)
    for scenario_dir in entry.outputs:
        try:
            protocol.aggregate(scenario_dir)
        except Exception as err:  # noqa: BLE001 - one table's failure must not cost the window
            log(f"[{entry.name}] aggregating {scenario_dir} failed: {type(err).__name__}: {err}")


def _run_unit(entry: Entry, unit: Unit, log: Any) -> None:
    log(f"[{entry.name}] {unit.cfg.name} seed {unit.seed}: estimated {unit.estimate or 0:.0f} s")
    began = time.perf_counter()
    try:
        run_seed(unit.cfg, unit.seed, progress=False)
    except Exception as err:  # noqa: BLE001 - reported in CAMPAIGN.md; the next run starts
        unit.seconds, unit.status = time.perf_counter() - began, "failed"
        unit.why = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        log(f"[{entry.name}] {unit.cfg.name} seed {unit.seed} failed after {unit.seconds:.0f} s: {unit.why}")
        traceback.print_exc()
    else:
        unit.seconds, unit.status = time.perf_counter() - began, "done"
        unit.why = f"{unit.seconds:.0f} s (estimated {unit.estimate or 0:.0f} s)"
    if scenario_dir_of(unit.cfg) not in entry.outputs and seed_dir(unit.cfg, unit.seed).exists():
        entry.outputs.append(scenario_dir_of(unit.cfg))


def summary(name: str, units: list[Unit], budget: float, command: str) -> str:
    lines = [f"# campaign {name}", "", f"- command: `{command}`", *[f"- {key}: {value}" for key, value in provenance().items() if key != "command"],
             f"- budget: {budget:.0f} s", "", "| entry | run | seed | status | why |", "|---|---|---|---|---|"]
    lines += [f"| {u.entry} | {u.cfg.name} | {u.seed} | {u.status} | {u.why} |" for u in units]
    ran = [u for u in units if u.status in ("done", "failed")]
    if ran:
        took, guessed = sum(u.seconds for u in ran), sum(u.estimate or 0.0 for u in ran)
        lines += ["", f"Estimated against taken, for the {len(ran)} runs started: {guessed:.0f} s estimated, "
                      f"{took:.0f} s taken ({took / max(guessed, 1e-9):.2f}x)."]
    return "\n".join(lines) + "\n"


def pack(out: Path, name: str, sources: list[Path], report: str) -> list[Path]:
    """Every result file under ``sources`` (no checkpoints) and the report, as a tar.gz cut into at most
    ``MAX_FILES`` pieces of at most ``MAX_BYTES``; join them with ``cat`` before extracting."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = report.encode()
        info = tarfile.TarInfo(f"{name}/{CAMPAIGN_REPORT}")
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
        for source in sources:
            for path in sorted(source.rglob("*")):
                if path.is_file() and path.suffix != ".pt" and not path.name.startswith("."):
                    tar.add(path, arcname=f"{name}/{source.name}/{path.relative_to(source)}")
    blob = buffer.getvalue()
    pieces = [blob[i:i + MAX_BYTES] for i in range(0, len(blob), MAX_BYTES)] or [b""]
    if len(pieces) > MAX_FILES:
        raise ConfigError(f"campaign results are {len(blob) / 2**20:.0f} MiB packed, more than {MAX_FILES} files of "
                          f"{MAX_BYTES // 2**20} MiB; run fewer entries per call")
    out.mkdir(parents=True, exist_ok=True)
    (out / CAMPAIGN_REPORT).write_text(report)
    paths = []
    for i, piece in enumerate(pieces):
        path = out / (f"{name}.tar.gz" if len(pieces) == 1 else f"{name}.tar.gz.part{i}")
        path.write_bytes(piece)
        paths.append(path)
    return paths


def campaign(plan: str | Path, budget: float, out: str | Path, dry_run: bool = False, command: str = "") -> str:
    """The whole call: load and check the plan, run what fits, pack after every run; returns the report."""
    name, entries = load_plan(plan)
    command = command or f"cltunnel campaign {shlex.quote(str(plan))} --budget {budget:g} --out {shlex.quote(str(out))}"
    all_units = [u for e in entries for u in e.units]

    def pack_now() -> list[Path]:
        """Pack what finished so far; a failure to pack (too large, disk full) is reported, not fatal: the
        last good pack stays, and the campaign goes on."""
        try:
            return pack(Path(out), name, [p for e in entries for p in e.outputs],
                        summary(name, all_units, budget, command))
        except (ConfigError, OSError) as err:
            print(f"packing failed ({type(err).__name__}: {err}); the last good pack is kept", flush=True)
            return []

    units = run_campaign(entries, budget, dry_run, after_unit=pack_now)
    report = summary(name, units, budget, command)
    if not dry_run:
        paths = pack_now()
        report += "\npacked: " + ", ".join(str(p) for p in paths) + "\n"
    return report
