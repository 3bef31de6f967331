"""The run-directory layout, in one place: where a scenario's and a seed's runs live, which file says a seed
is finished, its saved config and metrics, task and epoch checkpoint names, a sweep's manifest, and atomic
writes.

Every reader and writer of a run directory goes through these names, so the layout changes in one file:

    <output_dir>/<scenario>/seed<k>/config.yaml     the resolved scenario, with its seed
                                   /task<t>.pt      after task t (layers, heads, optimizer, strategy state)
                                   /epochs/task<t>_epoch<e>.pt
                                   /metrics.json    written last by a task sequence: the seed is finished
    <sweep output>/sweep.yaml                       the sweep's configurations and axis labels
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from cltunnel.errors import CltunnelError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"  # the resolved scenario of one seed's run, with its seed
CHECKPOINT_PATTERN = "task{}.pt"
EPOCH_DIR = "epochs"
CAPTURE_NOTES = "capture.txt"  # what training decided about the captured step, as "notice: ..." lines
MANIFEST = "sweep.yaml"  # in a sweep's output directory: its configurations and axis labels
LOCK_FILE = "run.lock"  # in a seed directory while a process writes it: "<pid> <host>"
SWEEP_DONE = "sweep_done.json"  # in a run directory: the sweep finished this run
SWEEP_ERROR = "sweep_error.txt"  # in a run directory: why the sweep's run of it failed
CAPTIONS_FILE = "captions.json"  # file name or pattern -> caption, of the outputs the analyses that ran declared
ANALYSIS_NOTICES = "analysis_notices.txt"  # one line per user analysis that failed (the page shows them)
TENSORBOARD_DIR = "tensorboard"  # the run's one TensorBoard stream: training curves, Avalanche's metrics, profiles
HISTORY_FILE = "history.csv"  # the training curves, one row per epoch
HISTORY_FIGURE = "history.png"
REPORT_MD, REPORT_HTML = "report.md", "report.html"  # the page of a run, scenario or sweep directory
CAMPAIGN_REPORT = "CAMPAIGN.md"  # a campaign's report, beside its packed results

# A run's tables (reports.tables: <stem>.csv/.md/.tex) that expectations read back, and the suffix of their
# exact-pixel-rows twins; the figure of the accuracy matrix's rows.
ACCURACY_MATRIX, FORGETTING, CL_METRICS_TABLE = "accuracy_matrix", "forgetting", "cl_metrics"
EXACT_ROWS = "_exact_rows"
ACCURACY_FIGURE = "accuracy.png"
EROSION_SUMMARY = "erosion_summary.json"  # in an erosion seed directory: its summary numbers, written last

# The analyses' files that other modules read back (seed tables, sweeps, Table 5.2.1): named here only.
TUNNEL_PROFILE = "tunnel_profile.csv"
TUNNEL_START = "tunnel_start.txt"
SWAP_TABLE = "swap_table.csv"
SWAP_META = "swap_meta.txt"
SUBSTITUTION = "substitution.csv"
CKA_M1_M2 = "cka_m1_m2.csv"
OOD_PROBES = "ood_probes.csv"
OOD_RHO = "ood_rho.txt"
OOD_STRENGTH = "ood_strength.csv"
BLOCK_STRUCTURE = "block_structure.csv"
BLOCK_SUMMARY = "block_structure_summary.csv"
DEVELOPMENT = "development.csv"


class RunLocked(CltunnelError):
    """Another live process is writing this run directory."""


def scenario_dir_of(cfg: Any) -> Path:
    """Where a scenario's seeds and its tables over seeds go: ``<output_dir>/<name>/``."""
    return Path(cfg.output_dir) / cfg.name


def seed_dir(cfg: Any, seed: int) -> Path:
    """Where one seed of a scenario writes: ``<output_dir>/<name>/seed<k>/`` (what seed_dirs lists)."""
    return scenario_dir_of(cfg) / f"seed{seed}"


def seed_dirs(scenario_dir: str | Path, finished: str = METRICS_FILE) -> list[Path]:
    """The seed directories holding ``finished`` (a file name or glob: the file a protocol writes last)."""
    return sorted(p for p in Path(scenario_dir).glob("seed*") if p.is_dir() and any(p.glob(finished)))


def all_seed_dirs(scenario_dir: str | Path) -> list[Path]:
    """Every ``seed<k>/`` of a scenario directory, finished or not."""
    return sorted(p for p in Path(scenario_dir).glob("seed*") if p.is_dir())


def analysable_runs(target: str | Path) -> list[Path]:
    """A run directory with task checkpoints, or the seed directories of a scenario directory."""
    target = Path(target)
    return [target] if finished_tasks(target) else all_seed_dirs(target)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a run killed mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_path(run_dir: Path, task: int) -> Path:
    return run_dir / CHECKPOINT_PATTERN.format(task)


def partial_checkpoint_path(run_dir: Path, task: int) -> Path:
    """A resumable state inside task ``task`` (``training.resume_every``); removed when the task ends."""
    return run_dir / f"task{task}_partial.pt"


def finished_tasks(run_dir: Path) -> list[int]:
    """Tasks with a checkpoint in ``run_dir``, in order."""
    return sorted(int(p.stem[4:]) for p in run_dir.glob("task*.pt") if p.stem[4:].isdigit())


def epoch_checkpoint_path(run_dir: Path, task: int, epoch: int) -> Path:
    return run_dir / EPOCH_DIR / f"task{task}_epoch{epoch:04d}.pt"


def epoch_checkpoints(run_dir: Path, task: int) -> list[Path]:
    return sorted((run_dir / EPOCH_DIR).glob(f"task{task}_epoch*.pt"))


def load_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE}: not a finished cltunnel run")
    return json.loads(path.read_text())


def save_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=1))


def save_run_config(run_dir: Path, cfg: Any, seed: int) -> None:
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump({**cfg.to_dict(), "seed": seed}, sort_keys=False))


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The saved scenario of a run, as plain YAML data (readable without rebuilding the run)."""
    return yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())


def mark_sweep_done(run_dir: Path, seconds: float) -> None:
    """The sweep finished this run: later calls of the sweep skip it (and a failure it had is forgotten)."""
    (run_dir / SWEEP_ERROR).unlink(missing_ok=True)
    (run_dir / SWEEP_DONE).write_text(json.dumps({"seconds": seconds}))


def mark_sweep_failed(run_dir: Path, error: str) -> None:
    """Why the sweep's run of this directory failed (the traceback); the sweep goes on with the others."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SWEEP_ERROR).write_text(error)


def sweep_finished(run_dir: Path) -> bool:
    return (run_dir / SWEEP_DONE).exists()


def written_tables(directory: Path) -> list[Path]:
    """The markdown tables a directory holds, its page aside."""
    return sorted(p for p in Path(directory).glob("*.md") if p.name != REPORT_MD)


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def load_manifest(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's ``sweep.yaml`` in its output directory: its configurations and their axis labels."""
    return yaml.safe_load((Path(sweep_dir) / MANIFEST).read_text())


def check_writable(directory: str | Path, where: str = "output_dir", create: bool = False) -> None:
    """``directory`` is a writable directory, or could be created in one: checked before any work. A dry run
    creates nothing; a real run (``create``) makes the directory here, so that a place that passes the check
    but cannot hold a directory (under /proc, say) is the same one-line error, not a traceback later."""
    path = Path(directory).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise CltunnelError(f"{where}: cannot create or write {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CltunnelError(f"{where}: cannot create or write {path}: {existing} is not writable")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CltunnelError(f"{where}: cannot create {path} ({err.strerror or err})") from None


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One writer per run directory: a second process on the same seed directory is refused, naming the
    holder; a lock left by a process that has died is taken over, with a notice."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CltunnelError(f"cannot create the run directory {run_dir} ({err.strerror or err})") from None
    path, me = run_dir / LOCK_FILE, f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _refuse_or_take_over(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        if path.exists() and path.read_text() == me:
            path.unlink()


def _refuse_or_take_over(path: Path) -> None:
    try:
        pid_text, host = (path.read_text().split() + ["", ""])[:2]
    except FileNotFoundError:
        return  # released between our attempt and this read: try again
    if host != socket.gethostname():
        raise RunLocked(f"{path.parent} is being written by process {pid_text} on {host} ({path}); if that "
                        "process is gone, delete the lock file")
    if pid_text.isdigit() and _alive(int(pid_text)):
        raise RunLocked(f"{path.parent} is being written by process {pid_text} (lock {path}); wait for it to "
                        "finish or stop it")
    print(f"notice: taking over {path} from process {pid_text}, which is no longer running", flush=True)
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def append_notice(path: Path, line: str) -> None:
    """One "notice: ..." line added to a run's notes file (the report page shows each notice once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"notice: {line}\n")
