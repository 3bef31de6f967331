"""Run the test suite's CPU-sized band scenario over several seeds and print the spread of its numbers.

The bands in tests/test_training.py were set from this script's output (see the comment there):
    CLTUNNEL_DATA=../shared/data python benchmarks/calibrate_bands.py --seeds 0 1 2 3 4 5
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bands import BAND_SCENARIO  # noqa: E402

from cltunnel.config import parse_config  # noqa: E402
from cltunnel.runs import load_data, run_seed  # noqa: E402
from cltunnel.tables import load_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_config({**BAND_SCENARIO, "output_dir": out})
        data = load_data(cfg)
        rows = []
        for seed in args.seeds:
            m = load_metrics(run_seed(cfg, seed, data, progress=False))
            a = np.asarray(m["acc"]) * 100
            rows.append((a[0, 0], a[1, 1], a[0, 0] - a[1, 0]))
            print(f"seed {seed}: task0 just trained {a[0, 0]:.1f}, task1 just trained {a[1, 1]:.1f}, "
                  f"forgetting task0 {a[0, 0] - a[1, 0]:.1f}", flush=True)
    r = np.asarray(rows)
    for i, name in enumerate(["task0 just trained", "task1 just trained", "forgetting task0"]):
        print(f"{name}: mean {r[:, i].mean():.2f} std {r[:, i].std(ddof=1):.2f} "
              f"min {r[:, i].min():.2f} max {r[:, i].max():.2f}")


if __name__ == "__main__":
    main()
