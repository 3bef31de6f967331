"""Where a result came from: the command, the code's commit, the device, torch and the time, recorded by
every run (``provenance.json`` in its directory, one entry per process that worked on it) and shown by
reports and campaigns."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cltunnel import __version__
from cltunnel.store import atomic_write_text

PROVENANCE_FILE = "provenance.json"


def commit() -> str:
    """The commit of the checkout cltunnel runs from (its own directory, not the caller's), or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device | None = None) -> str:
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        return torch.cuda.get_device_name(torch.device(device) if device is not None else 0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(device: str | torch.device | None = None) -> dict[str, str]:
    return {"command": shlex.join(["cltunnel" if Path(sys.argv[0]).name == "cltunnel" else sys.argv[0],
                                   *sys.argv[1:]]),
            "commit": commit(), "cltunnel": __version__, "device": device_name(device), "torch": torch.__version__,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def record_provenance(run_dir: Path, device: str | torch.device | None = None) -> None:
    """Add this process's entry to the run's provenance.json (a resumed run lists every process)."""
    path = run_dir / PROVENANCE_FILE
    entries = load_provenance(run_dir)
    entries.append(provenance(device))
    atomic_write_text(path, json.dumps(entries, indent=1) + "\n")


def load_provenance(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / PROVENANCE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        return []  # a damaged record is not worth stopping a run for; the new entry replaces it
