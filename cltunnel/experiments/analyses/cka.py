"""Linear CKA per layer: between the same layer of M1 and M2 on every task's test rows (analysis ``cka``:
``cka_m1_m2.csv``), between every pair of one model's layers (analysis ``cka_layers``: the thesis's heatmaps,
``cka_layers_model<i>.csv``/``.png``), and between every layer of two models (:func:`cross_cka_matrix`, for
the erosion protocol). Minibatch unbiased HSIC over :func:`~cltunnel.experiments.analyses.loading.cka_inputs`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cltunnel.experiments.analyses.loading import LoadedRun, cka_inputs
from cltunnel.experiments.analyses.registry import analysis
from cltunnel.measures.similarity import CKAMatrix
from cltunnel.models.layered import LayeredModel
from cltunnel.reports.figures import pyplot, write_figure
from cltunnel.reports.tables import aggregate, write_table
from cltunnel.store import CKA_M1_M2


@torch.no_grad()
def layer_cka_between(run: LoadedRun, a: LayeredModel, b: LayeredModel, task: int, batch_size: int = 500
                      ) -> dict[int, float]:
    """CKA between the same layer of two models on a task's test rows (minibatch unbiased HSIC, streamed)."""
    return run.cka(a, b, task, batch_size)


@torch.no_grad()
def layer_cka_matrix(run: LoadedRun, model_index: int = 0, task: int = 0, batch_size: int = 500) -> pd.DataFrame:
    """CKA between every pair of body layers of one model on a task's test rows (the thesis's heatmaps)."""
    model = run.models[model_index]
    acc = CKAMatrix()
    for x in cka_inputs(run, task, batch_size):
        outs = model.layer_outputs(x)
        acc.add([outs[k] for k in sorted(outs)])
    names = [f"{k} {n}" for k, n in enumerate(model.layer_names, start=1)]
    return pd.DataFrame(acc.matrix().numpy(), index=names, columns=names)


@torch.no_grad()
def cross_cka_matrix(run: LoadedRun, a: LayeredModel, b: LayeredModel, task: int = 0, batch_size: int = 500
                     ) -> pd.DataFrame:
    """CKA between every layer of ``a`` (rows) and every layer of ``b`` (columns) on a task's test rows."""
    acc = CKAMatrix()
    for x in cka_inputs(run, task, batch_size):
        outs = [a.layer_outputs(x), b.layer_outputs(x)]
        acc.add([o[k] for o in outs for k in sorted(o)])
    n = len(a.body)
    full = acc.matrix().numpy()  # both models' layers together; the off-diagonal block is a vs b
    names = [f"{k} {name}" for k, name in enumerate(a.layer_names, start=1)]
    return pd.DataFrame(full[:n, n:], index=names, columns=names)


def plot_cka_matrix(matrix: pd.DataFrame, path: Path, title: str) -> None:
    write_figure(cka_matrix_figure(matrix, title), path)


def cka_matrix_figure(matrix: pd.DataFrame, title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
    ticks = range(len(matrix))
    ax.set_xticks(ticks, [str(k + 1) for k in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(k + 1) for k in ticks], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="linear CKA")
    return fig


def cka_m1_m2(run: LoadedRun) -> pd.DataFrame:
    m1, m2 = run.models[0], run.models[-1]
    cols = {f"task {t + 1} data": layer_cka_between(run, m1, m2, t) for t in range(len(run.data.scenario.tasks))}
    df = pd.DataFrame(cols)
    df.insert(0, "name", m1.layer_names)
    df.index.name = "layer"
    return df


def cka_seeds_table(scenario_dir: Path, out_dir: Path, runs: list[Path], provenance: list[str]) -> str | None:
    """Mean ± std over the seeds' ``cka_m1_m2.csv`` (``<scenario>_cka_m1_m2.*``); None where no seed has one."""
    ckas = [pd.read_csv(r / CKA_M1_M2, index_col=0) for r in runs if (r / CKA_M1_M2).exists()]
    if not ckas:
        return None
    names = ckas[0]["name"]
    mean, std = aggregate([c.drop(columns="name") for c in ckas])
    mean.index = [f"{i} {n}" for i, n in zip(mean.index, names)]
    std.index = mean.index
    return write_table(mean, std, len(ckas), out_dir / f"{scenario_dir.name}_cka_m1_m2",
                       f"{scenario_dir.name}: CKA between M1 and M2 per layer", list(provenance))


@analysis("cka", order=40, seeds=cka_seeds_table, outputs={
    "*" + CKA_M1_M2: "Linear CKA of each layer between the models after task 1 and task 2, on each task's data."})
def cka_analysis(run: LoadedRun) -> dict[str, Any]:
    return {CKA_M1_M2: cka_m1_m2(run)}


@analysis("cka_layers", order=50, outputs={
    "*cka_layers_model*.png": "Layer-by-layer linear CKA matrix of one model (thesis §5.6)."})
def cka_layers_analysis(run: LoadedRun) -> dict[str, Any]:
    """The layer x layer CKA matrix of each task's model on task 1's test rows (``cka_layers_model<i>.*``)."""
    files: dict[str, Any] = {}
    for i in range(len(run.models)):
        matrix = layer_cka_matrix(run, model_index=i, task=0)
        files[f"cka_layers_model{i + 1}.csv"] = matrix
        files[f"cka_layers_model{i + 1}.png"] = cka_matrix_figure(matrix, f"M{i + 1}, task-1 test data")
    return files
