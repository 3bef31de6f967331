"""Wall time of one small real-data sweep (split MNIST, MLP, 2 splits x N seeds) on the sequential backend and
on local Ray, in the same process; prints both and their ratio, and checks the numbers agree.

    CLTUNNEL_DATA=../shared/data python benchmarks/sweep_backends.py --seeds 2 --ray-cpus 2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from cltunnel.sweeps import expand, load_sweep, run_sweep

BASE = {"data": {"name": "mnist", "train_per_class": 500, "test_per_class": 100}, "scenario": {"tasks": [5, 5]},
        "model": {"name": "mlp", "width": 0.5, "args": {"depth": 4}},
        "training": {"epochs": 5, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "augment": False}, "device": "cpu"}


def timed(path: Path, backend: str) -> tuple[float, dict]:
    sweep = load_sweep(path)
    start = time.perf_counter()
    run_sweep(sweep, backend, progress=False)
    seconds = time.perf_counter() - start
    accs = {(j.config, j.seed): json.loads((sweep.directory / j.config / f"seed{j.seed}" / "metrics.json").read_text())["acc"]
            for j in expand(sweep)}
    return seconds, accs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times, results = {}, {}
        for backend in ("local", "ray"):
            raw = {"name": "bench", "base": BASE, "axes": {"split": [[5, 5], [3, 7]], "seed": list(range(args.seeds))},
                   "resources": {"cpus": 1}, "ray_init": {"num_cpus": args.ray_cpus, "include_dashboard": False},
                   "output_dir": f"{tmp}/{backend}"}
            path = Path(tmp) / f"{backend}.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            times[backend], results[backend] = timed(path, backend)
        runs = 2 * args.seeds
        print(f"{runs} runs | local (sequential, 1 thread per run): {times['local']:.1f}s | "
              f"ray ({args.ray_cpus} CPUs, 1 per run; includes starting Ray): {times['ray']:.1f}s | "
              f"local/ray = {times['local'] / times['ray']:.2f} | same numbers: {results['local'] == results['ray']}")


if __name__ == "__main__":
    main()
