"""Running analyses on one run (:func:`run_analyses`) and their tables over a scenario's seeds
(:func:`aggregate_seeds`), by the registry alone: no analysis is named here."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cltunnel.config import AnalysesConfig
from cltunnel.data.images import ImageData
from cltunnel.experiments.analyses.loading import load_run
from cltunnel.experiments.analyses.registry import ANALYSES, Analysis, built_in_names, resolve, write_result
from cltunnel.reports.captions import write_captions
from cltunnel.store import ANALYSIS_NOTICES, all_seed_dirs


def run_analyses(run_dir: str | Path, names: list[str] | None = None, device: str = "auto",
                 options: AnalysesConfig | None = None, progress: bool = True, data: ImageData | None = None,
                 tunnel_start: str | None = None) -> dict[str, Any]:
    """Run the named analyses (default: the scenario's ``analyses.run``, else every built-in) on one run and
    write what each returns (:func:`~cltunnel.experiments.analyses.registry.write_result`), with the captions
    they declare; ``tunnel_start`` overrides the configured extractor length. Returns name -> what it returned.

    A user's analysis (``module:function``) that raises or returns what cannot be written costs one line
    (printed, and a notice on the page); the other analyses' outputs are kept. A built-in's error propagates."""
    wanted = resolve(names) if names else None  # a typo or a broken module: one line before the run is loaded
    run = load_run(run_dir, device, options, progress, data)
    if tunnel_start is not None:
        run.options = dataclasses.replace(run.options, tunnel_start=tunnel_start)
    wanted = wanted or resolve(run.options.run or built_in_names())
    results: dict[str, Any] = {}
    captions: dict[str, str] = {}
    failed: dict[str, str] = {}
    for entry in wanted:
        try:
            result = entry.function(run)
            files = write_result(run.dir, entry.name, result)
        except Exception as err:
            if entry.built_in:
                raise
            failed[entry.origin] = _failure(entry, err)
            print(f"notice: {failed[entry.origin]}", flush=True)
            continue
        results[entry.name] = result
        captions.update(entry.captions_of(files))
    write_captions(run.dir, captions)
    _record_failures(run.dir, [e.origin for e in wanted], failed)
    return results


def _failure(entry: Analysis, err: Exception) -> str:
    what = "returned what cannot be written" if isinstance(err, TypeError) and "returned" in str(err) else "failed"
    text = (str(err).strip().splitlines() or [""])[0]
    return f"analysis '{entry.origin}' {what}: {type(err).__name__}: {text}; its files were not written"


def _record_failures(run_dir: Path, ran: list[str], failed: dict[str, str]) -> None:
    """The run's failed-analysis lines: those of this call, and earlier ones of analyses not run again."""
    path = Path(run_dir) / ANALYSIS_NOTICES
    kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
            if not any(f"analysis '{origin}' " in line for origin in ran)]
    lines = kept + [f"notice: {line}" for line in failed.values()]
    if lines:
        path.write_text("\n".join(lines) + "\n")
    elif path.exists():
        path.unlink()


def aggregate_seeds(scenario_dir: str | Path, out_dir: str | Path | None = None, provenance: list[str] = ()
                    ) -> list[str]:
    """Each analysis's table over the seeds (its ``seeds``), where the seeds have its files; returns the
    markdown written. The captions of those files go with them (the scenario page)."""
    scenario_dir = Path(scenario_dir)
    out_dir = Path(out_dir) if out_dir else scenario_dir
    runs = all_seed_dirs(scenario_dir)
    written: list[str] = []
    for entry in sorted(ANALYSES.values(), key=lambda a: a.order):
        if entry.seeds is None:
            continue
        md = entry.seeds(scenario_dir, out_dir, runs, list(provenance))
        written += [m for m in (md if isinstance(md, list) else [md]) if m]
    return written
