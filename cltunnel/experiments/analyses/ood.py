"""Out-of-distribution probes (thesis E8): the model after task 1 probed per layer on another dataset beside
its own, and rho, how much of the OOD information the tunnel discards (analysis ``ood``: ``ood_probes.csv``/
``.png``, ``ood_rho.txt``)."""
from __future__ import annotations

import pandas as pd
import torch

from cltunnel.config import ConfigError, DataConfig
from cltunnel.data.device import DeviceData
from cltunnel.data.images import load_dataset, rendered_as
from cltunnel.data.scenarios import SplitScenario, Task
from cltunnel.experiments.analyses.loading import LoadedRun, log_profile
from cltunnel.experiments.analyses.registry import register_analysis
from cltunnel.experiments.analyses.tunnel import plot_per_layer, tunnel_profile
from cltunnel.measures.probes import train_probes


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


@register_analysis("ood")
def ood_analysis(run: LoadedRun) -> pd.DataFrame:
    frame, rho = ood_profile(run)
    frame.to_csv(run.run_dir / "ood_probes.csv")
    log_profile(run, "ood_probes", frame[["id_probe_acc", "ood_probe_acc"]])
    start = run.rule_start((frame["id_probe_acc"] / 100).to_dict())
    (run.run_dir / "ood_rho.txt").write_text(f"ood data: {run.options.ood_data}\nrho: {rho:.4f}\n")
    plot_per_layer(frame, {"id_probe_acc": "in-distribution (task 1)",
                           "ood_probe_acc": f"OOD: {run.options.ood_data} (rho {rho:.2f})"},
                   start, run.run_dir / "ood_probes.png", ylabel="linear probe accuracy (%)")
    return frame
