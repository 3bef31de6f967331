"""Run the test suite's CPU-sized band scenario over several seeds and print the spread of its numbers.

The bands in tests/bands.py (its expect: section, checked by the run) were set from this script's output:
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

import pandas as pd  # noqa: E402

from cltunnel.config import parse_config  # noqa: E402
from cltunnel.data.images import load_data  # noqa: E402
from cltunnel.runs import run_seed  # noqa: E402
from cltunnel.store import load_metrics  # noqa: E402


NAMES = ["task0 just trained", "task1 just trained", "forgetting task0", "E2(FT) - E2+T2 on task 1",
         "E2+T1(FT) - E2+T1 on task 1", "E1+T2 - E2+T2 on task 1"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_config({**BAND_SCENARIO, "output_dir": out})
        data = load_data(cfg)
        rows = []
        for seed in args.seeds:
            run_dir = run_seed(cfg, seed, data, progress=False)  # with the swap analysis (analyses.run)
            a = np.asarray(load_metrics(run_dir)["acc"]) * 100
            swap = pd.read_csv(run_dir / "swap_table.csv", index_col=0)["first task"]
            rows.append((a[0, 0], a[1, 1], a[0, 0] - a[1, 0], swap["E2 (FT)"] - swap["E2 + T2"],
                         swap["E2 + T1 (FT)"] - swap["E2 + T1"], swap["E1 + T2"] - swap["E2 + T2"]))
            print(f"seed {seed}: " + ", ".join(f"{n} {v:.1f}" for n, v in zip(NAMES, rows[-1])), flush=True)
    r = np.asarray(rows)
    for i, name in enumerate(NAMES):
        print(f"{name}: mean {r[:, i].mean():.2f} std {r[:, i].std(ddof=1):.2f} "
              f"min {r[:, i].min():.2f} max {r[:, i].max():.2f}")


if __name__ == "__main__":
    main()
