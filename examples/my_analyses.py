"""A user's analyses, in a module of their own (the README's "Extending cltunnel").

Name them in a scenario as ``analyses: {run: [tunnel, "my_analyses:weight_norms"]}`` and run cltunnel from
this directory (the working directory is importable, as for a strategy class). What an analysis returns is
written into the run directory and shown on the run's page under its caption: a DataFrame as
``<name>.csv`` and ``<name>.md``, a Figure as ``<name>.png``, a dict of them as one file per key.
"""
from __future__ import annotations

import pandas as pd

from cltunnel import LoadedRun, analysis
from cltunnel.reports.figures import pyplot


@analysis("weight_norms", caption="Frobenius norm of each body layer's weights after each task, and how far "
                                  "the second task moved it (relative change): where training on a new task "
                                  "rewrote the network.")
def weight_norms(run: LoadedRun) -> dict:
    rows = []
    for k, name in enumerate(run.models[0].layer_names, start=1):
        norms = [float(sum(p.detach().norm() ** 2 for p in m.body[k - 1].parameters()) ** 0.5) for m in run.models]
        moved = [float(sum((a.detach() - b.detach()).norm() ** 2 for a, b in
                           zip(run.models[0].body[k - 1].parameters(), m.body[k - 1].parameters())) ** 0.5)
                 for m in run.models]
        rows.append({"layer": k, "name": name, **{f"norm after task {t + 1}": n for t, n in enumerate(norms)},
                     "relative change": moved[-1] / norms[0]})
    table = pd.DataFrame(rows).set_index("layer")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(table.index, table["relative change"])
    ax.set(xlabel="layer", ylabel="|W_last - W_1| / |W_1|", xticks=table.index, title=run.dir.parent.name)
    return {"table": table, "figure": fig}  # weight_norms_table.csv/.md and weight_norms_figure.png


@analysis("probe_last_model", caption="Linear-probe accuracy (%) per layer of the model after the last task on "
                                      "the first task's data, beside the model after the first task.")
def probe_last_model(run: LoadedRun) -> pd.DataFrame:
    first, last = run.probe(run.model(0), task=0), run.probe(run.model(len(run.models) - 1), task=0)
    return pd.DataFrame({"after task 1": [100 * a for a in first.values()],
                         "after the last task": [100 * a for a in last.values()]},
                        index=pd.Index(list(first), name="layer"))
