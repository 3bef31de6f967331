"""Out-of-distribution probes (thesis E8): the model after task 1 probed per layer on another dataset beside
its own, and rho, how much of the OOD information the tunnel discards (analysis ``ood``: ``ood_probes.csv``/
``.png``, ``ood_rho.txt``); with the tunnel-strength measures of later work, the share of OOD accuracy the last
layer retains, its class (Harun et al., NeurIPS 2024) and the ID-OOD Pearson correlation (``ood_strength.csv``),
and their mean ± std over a scenario's seeds (:func:`ood_seeds_table`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cltunnel.config import ConfigError, DataConfig
from cltunnel.data.device import DeviceData
from cltunnel.data.images import load_dataset, rendered_as
from cltunnel.data.scenarios import SplitScenario, Task
from cltunnel.experiments.analyses.loading import LoadedRun, log_profile
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.experiments.analyses.tunnel import plot_per_layer, tunnel_profile
from cltunnel.measures.probes import train_probes
from cltunnel.measures.tunnel import (TUNNEL_STRENGTH_CLASSES, describe_strength, id_ood_pearson, ood_retained,
                                      tunnel_strength)
from cltunnel.reports.tables import STD_NOTE, aggregate, write_table
from cltunnel.store import OOD_PROBES, OOD_RHO, OOD_STRENGTH

STRENGTH_FILE = OOD_STRENGTH
STRENGTH_MEASURES = {"rho": "rho", "retained": "OOD retained (%)", "pearson": "Pearson ID-OOD"}


def ood_data(run: LoadedRun) -> tuple[DeviceData, Task]:
    """The OOD dataset in the run's input format, ``ood_*_per_class`` rows of its chosen classes, normalised
    like the training data (the backbone's input convention, not the OOD set's own statistics)."""
    o = run.options
    source = run.data.scenario.data
    d = run.data_config or DataConfig()  # with data.download: true, torchvision may fetch it (SVHN, CIFAR-100)
    ood = rendered_as(load_dataset(o.ood_data, d.root, download=d.download, cache_dir=d.cache_dir), source.shape)
    classes = o.ood_classes or list(range(min(10, ood.num_classes)))
    if not set(classes) <= set(range(ood.num_classes)):
        raise ConfigError(f"analyses.ood_classes: {classes} not all in 0..{ood.num_classes - 1} ({o.ood_data})")

    def rows(y: torch.Tensor, per_class: int) -> torch.Tensor:
        return torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in classes]).sort().values

    label_map = torch.full((ood.num_classes,), -1, dtype=torch.long)
    label_map[classes] = torch.arange(len(classes))
    test = rows(ood.y_test, o.ood_test_per_class)
    task = Task(0, classes, rows(ood.y_train, o.ood_train_per_class), test, test, label_map, head=0)
    data = DeviceData.create(SplitScenario(ood, [task], "class", classes), run.data.device, augment=False,
                             channels_last=run.data.channels_last)
    data.normalise = run.data.normalise
    return data, task


def ood_profile(run: LoadedRun) -> tuple[pd.DataFrame, float]:
    """Per layer: probe accuracy on the OOD data beside the in-distribution one; and rho (E8) =
    (best OOD accuracy - last layer's) / best: how much of the OOD information the tunnel discards."""
    data, task = ood_data(run)
    acc = train_probes(run.models[0], data, task, cfg=run.probe_config(), progress=run.progress)
    profile = tunnel_profile(run)
    frame = pd.DataFrame({"name": run.models[0].layer_names, "ood_probe_acc": [100 * a for a in acc.values()],
                          "id_probe_acc": profile["probe_acc"].to_numpy()}, index=pd.Index(list(acc), name="layer"))
    best = frame["ood_probe_acc"].max()
    return frame, float((best - frame["ood_probe_acc"].iloc[-1]) / best)


def ood_strength(frame: pd.DataFrame, rho: float, ood_name: str) -> dict[str, Any]:
    """The tunnel-strength measures of one OOD profile (:func:`ood_profile`'s frame): rho, the retained share
    (%), the ID-OOD Pearson correlation and the retained share's class."""
    ood, ind = frame["ood_probe_acc"].to_dict(), frame["id_probe_acc"].to_dict()
    retained = ood_retained(ood)
    return {"ood_data": ood_name, "rho": rho, "retained": retained, "pearson": id_ood_pearson(ind, ood),
            "strength": tunnel_strength(retained)}


def ood_seeds(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> str | None:
    return ood_seeds_table(scenario_dir, out_dir, runs, provenance)


@analysis("ood", order=70, seeds=ood_seeds, outputs={
    "ood_probes.png": "Out-of-distribution probes per layer beside in-distribution ones (thesis ch. 6, rho).",
    OOD_RHO: ""})
def ood_analysis(run: LoadedRun) -> dict[str, Any]:
    frame, rho = ood_profile(run)
    log_profile(run, "ood_probes", frame[["id_probe_acc", "ood_probe_acc"]])
    start = run.rule_start((frame["id_probe_acc"] / 100).to_dict())
    strength = ood_strength(frame, rho, run.options.ood_data)
    # rho stays the last line: readers split the file at "rho: " (tests, temperature sweeps read it by key)
    rho_text = (f"ood data: {run.options.ood_data}\nood retained (%): {strength['retained']:.2f}\n"
                f"pearson id-ood: {strength['pearson']:.2f}\ntunnel strength: "
                f"{describe_strength(strength['retained'])}\nrho: {rho:.4f}\n")
    figure = plot_per_layer(frame, {"id_probe_acc": "in-distribution (task 1)",
                                    "ood_probe_acc": f"OOD: {run.options.ood_data} (rho {rho:.2f}, "
                                                     f"{strength['retained']:.1f} % retained)"},
                            start, ylabel="linear probe accuracy (%)",
                            title=f"tunnel strength: {strength['strength']} (Harun et al. 2024)")
    return {OOD_PROBES: frame, STRENGTH_FILE: pd.DataFrame([strength]), OOD_RHO: rho_text, "ood_probes.png": figure}


def ood_seeds_table(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> str | None:
    """Mean ± std over the seeds' ``ood_strength.csv`` of rho, the retained share and the ID-OOD Pearson
    correlation, one row per OOD dataset labelled with the class of the mean retained share
    (``<scenario>_ood_strength.*``); None where no seed has one."""
    rows = [pd.read_csv(r / STRENGTH_FILE) for r in runs if (r / STRENGTH_FILE).exists()]
    if not rows:
        return None
    seeds = pd.concat(rows, ignore_index=True)
    means, stds = [], []
    for name, group in seeds.groupby("ood_data", sort=False):
        per_seed = [group.loc[[i], list(STRENGTH_MEASURES)].set_axis([name]) for i in group.index]
        mean, std = aggregate(per_seed)
        label = f"{name} ({tunnel_strength(float(mean['retained'].iloc[0]))})"
        means.append(mean.set_axis([label]))
        stds.append(std.set_axis([label]))
    mean, std = (pd.concat(f).rename(columns=STRENGTH_MEASURES).rename_axis("OOD data (class of the mean)")
                 for f in (means, stds))
    classes = ", ".join(f"{words} {name}" for name, _, words in TUNNEL_STRENGTH_CLASSES)
    notes = [*provenance, "rho = (best OOD probe accuracy - last layer's) / best; retained = 100 x last / best",
             f"tunnel strength of the mean retained share (Harun et al., NeurIPS 2024): {classes}",
             "Pearson: over layers, between the ID and OOD probe-accuracy curves (NaN where a curve is constant)",
             STD_NOTE]
    return write_table(mean, std, len(rows), out_dir / f"{scenario_dir.name}_ood_strength",
                       f"{scenario_dir.name}: OOD tunnel strength over {len(rows)} seeds", notes)
