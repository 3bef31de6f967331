"""Protocols: what a scenario runs, one registered module each (timm's ``@register_model`` pattern).

A protocol owns one config section (``erosion:``, ``representations:``, ``synthetic:``, ``narrow_resnet:``)
and is selected by it; a scenario with none of them is a task sequence. A protocol is one module of
:mod:`cltunnel.experiments` (or a user's, imported before the scenario is parsed) that holds all of it: its
section's dataclass and checks, registered with :func:`cltunnel.config.register_section`; how it runs a seed,
combines seeds and reports a sweep; and its outputs' captions for the page, registered together with
:func:`register_protocol`. So :mod:`cltunnel.config`, :mod:`cltunnel.runs`, the CLI, sweeps and the page look a
protocol up instead of branching on sections or on files found on disk.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cltunnel.config import PROTOCOL_SECTIONS, ConfigError, RunConfig
from cltunnel.registry import Registry
from cltunnel.reports.captions import declare_written

TASK_SEQUENCE = "task_sequence"


@dataclass(frozen=True)
class Protocol:
    """How one kind of scenario runs a seed, combines its seeds, and reports across a sweep."""

    name: str
    section: str | None  # the RunConfig section that selects it; None: the default (a task sequence)
    run_seed: Callable[..., Path]  # (cfg, seed, data, progress, **options) -> the seed's run directory
    aggregate: Callable[[Path], str]  # scenario directory -> its tables over seeds (markdown; "" if none)
    finished: str  # glob, in a seed directory, of the file written last: present = that seed is finished
    summary: Callable[[Path, RunConfig], str] | None = None  # what `cltunnel run` prints; default: aggregate
    sweep_report: Callable[[Path, dict[str, Any]], str] | None = None  # (sweep dir, manifest) -> markdown
    trains_model_section: bool = True  # trains cfg.model with cfg.strategy (checked before any work)
    needs_data: bool = True  # reads cfg.data (False: its data are drawn from the seed; no dataset is loaded)
    outputs: Mapping[str, str] = field(default_factory=dict)  # file name or glob -> its caption on the page
    place: int = 50  # where those captions go among the files runs and protocols write (the page's order)
    epochs: Callable[[RunConfig], int] | None = None  # cfg -> passes over the training data (campaign's estimate)

    def epochs_over_data(self, cfg: RunConfig) -> int:
        """How many times a seed trains on every training image (the campaign's time estimate); by default
        ``training.epochs``."""
        return self.epochs(cfg) if self.epochs else cfg.training.epochs

    def summarise(self, scenario_dir: Path, cfg: RunConfig) -> str:
        return self.summary(scenario_dir, cfg) if self.summary else self.aggregate(scenario_dir)

    def report_sweep(self, sweep_dir: Path, manifest: dict[str, Any]) -> str:
        if self.sweep_report is not None:
            return self.sweep_report(sweep_dir, manifest)
        return "\n".join(self.aggregate(sweep_dir / config) for config in manifest["configs"])


PROTOCOLS: Registry[Protocol] = Registry("protocol", ConfigError)


def register_protocol(protocol: Protocol) -> Protocol:
    """Make ``protocol`` the one its section selects, and declare its outputs' captions to the page."""
    if protocol.section is not None and protocol.section not in PROTOCOL_SECTIONS:
        raise ValueError(f"protocol {protocol.name}: section '{protocol.section}' is not registered "
                         f"({', '.join(PROTOCOL_SECTIONS)}); register its dataclass first with "
                         "cltunnel.config.register_section")
    declare_written(protocol.outputs, protocol.place)  # shown before every analysis's files
    return PROTOCOLS.register(protocol.name, protocol)


@dataclass(frozen=True)
class SweepReport:
    """A report across a task-sequence sweep's configurations that applies to some sweeps only (a depth axis,
    a temperature axis, runs with block structure): registered by its module, run in ``order``."""

    applies: Callable[[Path, dict[str, Any]], bool]  # (sweep dir, manifest) -> whether this sweep has it
    report: Callable[[Path, dict[str, Any]], str]  # (sweep dir, manifest) -> markdown (it writes its files)
    order: int = 100


SWEEP_REPORTS: Registry[SweepReport] = Registry("sweep report")


def sweep_reports(sweep_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The markdown of every registered sweep report that applies to this sweep, in their order."""
    reports = sorted(SWEEP_REPORTS.values(), key=lambda r: r.order)
    return [r.report(sweep_dir, manifest) for r in reports if r.applies(sweep_dir, manifest)]


def _select(sections: set[str]) -> Protocol:
    if len(sections) > 1:
        raise ConfigError(f"a scenario runs one protocol; it sets {', '.join(sorted(sections))}: keep one")
    if not sections:
        return PROTOCOLS[TASK_SEQUENCE]
    section = sections.pop()
    found = next((p for p in PROTOCOLS.values() if p.section == section), None)
    if found is None:
        raise ConfigError(f"{section}: a registered section that no protocol runs (register_protocol names it "
                          "as its section)")
    return found


def protocol_for(cfg: RunConfig) -> Protocol:
    """The protocol a scenario runs: the one whose section is set, else the task sequence."""
    return _select(set(cfg.protocol_sections))


def protocol_for_saved(raw: dict[str, Any]) -> Protocol:
    """The protocol of a saved run's ``config.yaml`` (plain YAML data, no objects rebuilt)."""
    return _select({s for s in PROTOCOL_SECTIONS if raw.get(s) is not None})
