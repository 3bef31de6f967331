"""The rank rule's threshold (0.10) on profiles it was not chosen on (issue 24, item 4).

The threshold was set on the committed VGG-19 profiles (GPU width 1, CPU width 1/4). This reads every
committed tunnel profile, the VGG-19 ones and the others (VGG-13, VGG-11 and ResNet-20 of the CPU
temperature sweep, the quickstart), and prints k by each rule and the rank rule's k at 0.05 / 0.10 / 0.20 /
0.30, so the sensitivity to the threshold and the architectures where the rule finds no collapse show.

    python benchmarks/rank_rule_check.py --out tables/rank_rule_check.md

(``cltunnel reproduce rank_rule_check`` re-makes it from the committed profiles and compares every cell.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cltunnel.measures.tunnel import tunnel_start  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "tables"
THRESHOLDS = (0.05, 0.10, 0.20, 0.30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    rows = []
    for path in sorted(ROOT.glob("**/seed0/tunnel_profile.csv")):
        profile = pd.read_csv(path, index_col=0)
        acc, ranks = (profile["probe_acc"] / 100).to_dict(), profile["rank"].to_dict()
        row = {"run": str(path.parent.parent.relative_to(ROOT)), "layers": len(profile),
               "chosen on": "yes" if "vgg19_w0.25" in str(path) or "gpu-h100" in str(path) else "no",
               "last": tunnel_start(acc, None, "last"), "peak": tunnel_start(acc, None, "peak")}
        row |= {f"rank {t:.2f}": tunnel_start(acc, t, "rank", ranks) for t in THRESHOLDS}
        rows.append(row)
    text = ("k (the extractor's last layer) by rule; 'chosen on': the profiles the 0.10 threshold was set from.\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
