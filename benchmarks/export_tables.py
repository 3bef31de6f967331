"""Copy a run, scenario or sweep directory's tables and figures (no checkpoints) into tables/, with a
PROVENANCE.md naming the command, device, commit and date.

    python benchmarks/export_tables.py runs/sweeps/shallow_cpu tables/cpu/shallow_cpu \
        --command "cltunnel sweep sweeps/cpu/shallow_cpu.yaml" --device "2-core CPU"
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
from pathlib import Path

KEEP = {".csv", ".md", ".tex", ".png", ".json", ".yaml", ".txt"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--command", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    source, target = Path(args.source), Path(args.target)
    copied = 0
    for path in source.rglob("*"):
        if path.is_file() and path.suffix in KEEP and "epochs" not in path.parts:
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            copied += 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (target / "PROVENANCE.md").write_text(
        f"- command: `{args.command}`\n- device: {args.device}\n- code commit: {commit}\n"
        f"- exported: {datetime.date.today()}\n" + (f"- note: {args.note}\n" if args.note else ""))
    print(f"{copied} files -> {target}")


if __name__ == "__main__":
    main()
