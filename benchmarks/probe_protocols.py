"""How far the tunnel start moves between the thesis's probe protocol and the authors' code's (e7mul/
tunnel_project: 80/20 split, 1e-3 |W| in the loss, <= 10,000 random dimensions, matrix_rank's tolerance),
on one finished run: the profile of the model after task 1 under both, and every rule's k under both.

    CLTUNNEL_DATA=../shared/data python benchmarks/probe_protocols.py runs/quickstart/seed0 --out tables/cpu/quickstart

Writes ``probe_protocols.csv`` (per layer: probe accuracy and rank under each protocol) and
``probe_protocols.md`` (each rule's k under each protocol) into ``--out`` (default: the run directory).
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings("ignore")

from cltunnel.experiments.analyses import load_run, profile_series, tunnel_profile  # noqa: E402
from cltunnel.config import PROBE_PROTOCOLS  # noqa: E402
from cltunnel.measures.tunnel import describe_rule, format_layer, profile_notices, rule_starts  # noqa: E402
from cltunnel.reports.provenance import provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="where the two files go (default: the run directory)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(args.run_dir, args.device, progress=True)
    profiles, rows = {}, []
    for protocol in PROBE_PROTOCOLS:
        run.options = dataclasses.replace(run.options, probe_protocol=protocol)
        run.profile = None  # computed afresh under this protocol
        profiles[protocol] = tunnel_profile(run)[["probe_acc", "rank"]].add_prefix(f"{protocol} ")
        acc, ranks = profile_series(tunnel_profile(run))
        starts = rule_starts(acc, ranks)
        for rule, k in starts.items():
            rows.append({"protocol": protocol, "rule": describe_rule(rule), "k": format_layer(k, run.depth)})
        rows += [{"protocol": protocol, "rule": "notice", "k": n} for n in profile_notices(acc, starts, run.depth)]
    table = pd.concat(profiles.values(), axis=1)
    table.to_csv(out / "probe_protocols.csv")
    starts = pd.DataFrame(rows)
    info = provenance(run.data.device)
    md = (f"### Tunnel start under the thesis's and the official probe protocol ({Path(args.run_dir)})\n\n"
          + starts.to_markdown(index=False) + "\n\n#### Per layer\n\n" + table.round(2).to_markdown() + "\n\n"
          + f"- command: `{info['command']}`; commit {info['commit']}; device {info['device']}; torch {info['torch']}\n")
    (out / "probe_protocols.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
