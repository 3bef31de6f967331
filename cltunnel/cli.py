"""``cltunnel run | check | list | analyze | sweep | campaign | table | report | reproduce | convert``: argument parsing and one-line errors.

Expected failures (:class:`~cltunnel.errors.CltunnelError`) print one line and exit 2; anything else is a
bug and keeps its traceback. A run whose scenario states ``expect:`` bands prints one line per band and exits 3
(:data:`~cltunnel.expectations.EXIT_VIOLATED`) when one is violated; so does ``sweep`` (each configuration's bands)
when every run finished, and 1 when a run failed; ``reproduce`` exits 1 on a drift.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from cltunnel import __version__
from cltunnel.config import ConfigError, load_config
from cltunnel.errors import CltunnelError
from cltunnel.store import REPORT_HTML, is_sweep_dir, written_tables

# The commands import the torch/Avalanche stack themselves (about 12 s on a small CPU), so that --version,
# --help and a mistyped command answer at once: the one place in the package where imports sit in functions
# for a reason other than an optional dependency.

warnings.filterwarnings("ignore", message="no QP solver found")


SCENARIO_DIRS = (Path("scenarios"), Path(sys.prefix) / "share" / "cltunnel" / "scenarios",
                 Path(__file__).resolve().parents[1] / "scenarios")  # here, installed with the package, the checkout


def scenario_path(name: str) -> Path:
    """A scenario file as given, or a shipped scenario by name (``quickstart``, ``cpu/split5_vgg19_w0.25_cpu``)
    from ./scenarios, the installed copy, or the checkout the package runs from."""
    given = Path(name)
    if given.exists() or given.suffix in (".yaml", ".yml") and given.parent != Path("."):
        return given
    for directory in SCENARIO_DIRS:
        for candidate in (directory / name, directory / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    return given  # load_config names it as not found


def shipped_scenarios() -> tuple[Path | None, list[str]]:
    directory = next((d for d in SCENARIO_DIRS if d.is_dir() and any(d.rglob("*.yaml"))), None)
    names = sorted(str(p.relative_to(directory).with_suffix("")) for p in directory.rglob("*.yaml")) if directory else []
    return directory, names


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: give key=value, e.g. --set training.epochs=2")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.seed is not None:
        overrides["seeds"] = [args.seed]
    if args.device:
        overrides["device"] = args.device
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    from cltunnel.expectations import EXIT_VIOLATED, evaluate
    from cltunnel.experiments import protocol_for
    from cltunnel.runs import report_path, run_scenario

    if args.dry_run:
        return _cmd_check(args)
    try:
        cfg = load_config(scenario_path(args.scenario), _overrides(args))
        out = run_scenario(cfg, progress=not args.no_progress)
    except CltunnelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(protocol_for(cfg).summarise(out, cfg))
    print(f"results: {out}")
    if cfg.logging.report:
        print(f"report: {report_path(cfg)}")
    outcomes = evaluate(cfg)  # expect: one line per band, as in expectations.txt
    for outcome in outcomes:
        print(f"expect: {outcome.line()}")
    return EXIT_VIOLATED if any(not o.held for o in outcomes) else 0


def _cmd_report(args: argparse.Namespace) -> int:
    import cltunnel.experiments  # noqa: F401  (the analyses declare their files' captions on import)
    from cltunnel.reports.page import build_report

    try:
        print(f"report: {build_report(args.directory)}")
    except (CltunnelError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from cltunnel.runs import describe_plan

    try:
        print(describe_plan(load_config(scenario_path(args.scenario), _overrides(args))))
    except CltunnelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("ok: checked without loading data")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from cltunnel.models.zoo import FAMILIES, MODELS
    from cltunnel.training.strategies import STRATEGIES

    if args.scenarios:
        where, names = Path(args.scenarios), sorted(str(p) for p in Path(args.scenarios).rglob("*.yaml"))
    else:
        where, names = shipped_scenarios()
    print(f"scenarios ({where}; run one by name: cltunnel run quickstart):", ", ".join(names) or "(none found)")
    print("models:", ", ".join(sorted(MODELS)))
    for family in FAMILIES.values():
        print(family.describe())
    print("strategies:", ", ".join(STRATEGIES), "(or strategy: {class: 'package.module:ClassName'})")
    from cltunnel.experiments.analyses import built_in_names

    print("analyses:", ", ".join(built_in_names()), "(or analyses: {run: ['module:function']})")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from cltunnel.experiments.analyses import tunnel_table
    from cltunnel.experiments.registry import TASK_SEQUENCE
    from cltunnel.reports.tables import render
    from cltunnel.runs import saved_protocol
    from cltunnel.sweeps import aggregate_sweep

    try:
        if args.tunnel:
            print(tunnel_table(args.run_dir))
        elif is_sweep_dir(args.run_dir):
            print(aggregate_sweep(args.run_dir))
        elif (protocol := saved_protocol(args.run_dir)) is None or protocol.name == TASK_SEQUENCE:
            print(render(args.run_dir))  # one seed's or a scenario's accuracy and forgetting tables
        else:
            print(protocol.aggregate(Path(args.run_dir)))
    except (CltunnelError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from cltunnel.experiments.analyses import aggregate_seeds, run_analyses
    from cltunnel.store import analysable_runs

    target = Path(args.run_dir)
    runs = analysable_runs(target)
    if not runs:
        print(f"error: {target}: no task checkpoints here or in seed*/ subdirectories", file=sys.stderr)
        return 2
    names = args.analyses.split(",") if args.analyses else None
    try:
        for run in runs:
            run_analyses(run, names, args.device, progress=not args.no_progress,
                         tunnel_start=str(args.tunnel_start) if args.tunnel_start is not None else None)
            print(f"analysed {run}")
    except (CltunnelError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scenario_dir = target if runs[0] != target else target.parent
    print("\n".join(aggregate_seeds(scenario_dir)))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from cltunnel.expectations import EXIT_VIOLATED
    from cltunnel.sweeps import describe, evaluate_sweep, load_sweep, run_sweep

    try:
        sweep = load_sweep(args.sweep)
        if args.dry_run:
            print(describe(sweep))
            return 0
        results = run_sweep(sweep, args.backend, progress=not args.no_progress, parallel=args.parallel)
    except CltunnelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    print(f"sweep {sweep.name}: {counts['done']} ran, {counts['skipped']} already done, {counts['failed']} failed")
    for r in failed:
        print(f"FAILED {r.config}/seed{r.seed}: {r.error.strip().splitlines()[-1] if r.error else ''}", file=sys.stderr)
    written = [str(p) for p in written_tables(sweep.directory)]  # summary.md, ...
    print(f"tables: {', '.join(written) or 'none yet'}")
    if (sweep.directory / REPORT_HTML).exists():
        print(f"report: {sweep.directory / REPORT_HTML}")
    outcomes = [(config, o) for config, found in evaluate_sweep(sweep).items() for o in found]
    for config, outcome in outcomes:  # as in the sweep's expectations.txt
        print(f"expect: {outcome.line(config)}")
    return 1 if failed else EXIT_VIOLATED if any(not o.held for _, o in outcomes) else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from cltunnel.training.checkpoints import convert_legacy_checkpoint

    if not args.trust:
        print("error: converting unpickles the file, which runs any code it carries; add --trust only for "
              "checkpoints you made yourself", file=sys.stderr)
        return 2
    for path in args.checkpoints:
        print(f"converted {convert_legacy_checkpoint(path)}")
    return 0


def _cmd_campaign(args: argparse.Namespace) -> int:
    from cltunnel.campaign import campaign

    try:
        command = "cltunnel " + " ".join(shlex.quote(a) for a in args.argv)
        print(campaign(args.plan, args.budget, args.out, dry_run=args.dry_run, command=command))
    except CltunnelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from cltunnel.reproduce import EXIT_DRIFT, MANIFEST, list_references, load_manifest, reproduce

    manifest = Path(args.manifest) if args.manifest else MANIFEST if MANIFEST.exists() else \
        Path(__file__).resolve().parents[1] / MANIFEST
    try:
        if args.list:
            print(list_references(load_manifest(manifest)))
            return 0
        results = reproduce(args.names, manifest, quick=args.quick, keep=Path(args.keep) if args.keep else None,
                            record_results=args.record)
    except CltunnelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return EXIT_DRIFT if any(r.error or r.drifts for r in results) else 0


def _scenario_parser(sub: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    """A command that takes a scenario and the overrides ``run`` and ``check`` share."""
    cmd = sub.add_parser(name, help=help_text)
    cmd.add_argument("scenario", help="scenario YAML file, or a shipped scenario's name (cltunnel list)")
    cmd.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. training.epochs=2")
    cmd.add_argument("--seed", type=int, help="only this seed (overrides 'seeds')")
    cmd.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (overrides 'device')")
    cmd.add_argument("--output-dir", help="where run directories go (overrides 'output_dir')")
    cmd.set_defaults(func=func)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cltunnel", description="Continual-learning layer surgery benchmarks")
    parser.add_argument("--version", action="version", version=f"cltunnel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = _scenario_parser(sub, "run", "train a scenario (resumes after the last finished task)", _cmd_run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true", help="check and show what would run (as `cltunnel check`)")
    _scenario_parser(sub, "check", "validate a scenario and show what would run, without loading data", _cmd_check)
    lst = sub.add_parser("list", help="scenarios, models and strategies")
    lst.add_argument("--scenarios", help="directory of scenario files (default: the shipped ones)")
    lst.set_defaults(func=_cmd_list)
    ana = sub.add_parser("analyze", help="tunnel / swap / substitution / cka analyses of finished runs")
    ana.add_argument("run_dir", help="a run directory (seed<k>) or a scenario directory (all seeds)")
    ana.add_argument("--analyses", help="comma-separated analyses, built-in (tunnel,swap,block_structure, ...: `cltunnel list`) or "
                     "a user's module:function (default: the YAML's, else every built-in)")
    ana.add_argument("--tunnel-start", type=int, help="extractor = layers 1..k (default: from probes)")
    ana.add_argument("--device", default="auto")
    ana.add_argument("--no-progress", action="store_true")
    ana.set_defaults(func=_cmd_analyze)
    swp = sub.add_parser("sweep", help="a base scenario x axes: run what is missing, then the combined tables")
    swp.add_argument("sweep", help="sweep YAML file")
    swp.add_argument("--backend", choices=["local", "ray"], help="overrides the file's backend")
    swp.add_argument("--dry-run", action="store_true", help="list the runs (and which are done) without running")
    swp.add_argument("--parallel", type=int, help="local backend: this many runs at once, each its own process "
                     "(overrides the file's 'parallel')")
    swp.add_argument("--no-progress", action="store_true")
    swp.set_defaults(func=_cmd_sweep)
    tab = sub.add_parser("table", help="re-render the tables of a run, scenario or sweep directory")
    tab.add_argument("run_dir")
    tab.add_argument("--tunnel", action="store_true",
                     help="Table 5.2.1: the tunnel start of every analysed run below run_dir")
    tab.set_defaults(func=_cmd_table)
    rep = sub.add_parser("report", help="(re)build report.html and report.md of a run, scenario or sweep directory")
    rep.add_argument("directory")
    rep.set_defaults(func=_cmd_report)
    cmp = sub.add_parser("campaign", help="run a plan of runs in priority order within a time budget, then pack")
    cmp.add_argument("plan", help="campaign plan YAML (e.g. campaign/paper.yaml)")
    cmp.add_argument("--budget", type=float, required=True, help="seconds; a run that would not finish is not started")
    cmp.add_argument("--out", default="campaign_out", help="where the packed results go (<= 8 files of <= 16 MiB)")
    cmp.add_argument("--dry-run", action="store_true", help="list what would run, with estimated minutes")
    cmp.set_defaults(func=_cmd_campaign)
    rpr = sub.add_parser("reproduce", help="re-run committed references (tables/REFERENCES.yaml) and compare their "
                         "pinned numbers; exit 1 on a drift")
    rpr.add_argument("names", nargs="*", help="references to re-run (default with --quick: every quick form)")
    rpr.add_argument("--list", action="store_true", help="every reference: device, cost, made at, last reproduced")
    rpr.add_argument("--quick", action="store_true", help="the reduced forms CI can afford (a few minutes on 2 cores)")
    rpr.add_argument("--manifest", help="default: tables/REFERENCES.yaml here, else the checkout's")
    rpr.add_argument("--keep", help="make the temporary run directories under this directory (kept)")
    rpr.add_argument("--record", action="store_true", help="write each match's date and commit into the manifest")
    rpr.set_defaults(func=_cmd_reproduce)
    cnv = sub.add_parser("convert", help="rewrite checkpoints of cltunnel < 0.2 (pickled strategy state) as plain data")
    cnv.add_argument("checkpoints", nargs="+", help="task<t>.pt files you made yourself")
    cnv.add_argument("--trust", action="store_true", help="I made these files: unpickling them is safe")
    cnv.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
