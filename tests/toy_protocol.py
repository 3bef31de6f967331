"""A toy protocol, whole in one file (issue 31): what a new experiment of a user's is.

Importing this module registers ``toy:`` as a scenario section (its dataclass and its check) and the protocol it
selects: how a seed runs, how seeds combine, and what the page says under each file it writes. A seed draws
``points`` points on the line y = slope * x + seed and writes them as a CSV and a figure; nothing trains and no
dataset is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cltunnel.config import ConfigError, RunConfig, register_section
from cltunnel.experiments import Protocol, register_protocol
from cltunnel.reports.figures import pyplot, save_figure
from cltunnel.store import save_run_config, seed_dir, seed_dirs

LINE = "toy_line.csv"  # in a seed directory, written last: present = the seed is finished
OUTPUTS = {
    "toy_line.png": "Toy protocol: the points each seed drew on its line.",
    LINE: "Toy protocol: the points as a table (x, y = slope * x + seed).",
}


@dataclass
class ToyConfig:
    """``toy:``: how many points, on which slope."""

    points: int = 5
    slope: float = 2.0

    def validate(self, cfg: RunConfig) -> None:
        if self.points < 2:
            raise ConfigError(f"toy.points: a line needs at least 2 points, got {self.points}")


register_section("toy", ToyConfig, needs_scenario=False)


def run_toy(cfg: RunConfig, seed: int, data: None, progress: bool, **options) -> Path:
    run_dir = seed_dir(cfg, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg, seed)
    x = pd.Series(range(cfg.toy.points), dtype=float)
    line = pd.DataFrame({"x": x, "y": cfg.toy.slope * x + seed})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(line["x"], line["y"], marker="o", label=f"seed {seed}")
    save_figure(fig, ax, run_dir / "toy_line.png")
    line.to_csv(run_dir / LINE, index=False)
    return run_dir


def aggregate_toy(scenario_dir: Path) -> str:
    """The seeds' mean last point, as the line ``cltunnel run`` prints."""
    last = [pd.read_csv(run / LINE)["y"].iloc[-1] for run in seed_dirs(scenario_dir, LINE)]
    return f"toy: {len(last)} seeds, mean last y {sum(last) / len(last):g}"


register_protocol(Protocol("toy", "toy", run_toy, aggregate_toy, LINE, trains_model_section=False, needs_data=False,
                           outputs=OUTPUTS))
