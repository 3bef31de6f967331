"""Analyses run on a finished run directory, one module each, each registering its entry point with
``@register_analysis(name)`` (:mod:`.registry`): the tunnel (:mod:`.tunnel`: probes, rank, the rules' k),
out-of-distribution probes (:mod:`.ood`), the extractor/tunnel swap (:mod:`.swap`: thesis Table 5.4.1, its
rows against k and at each rule's k), layer substitution curves (:mod:`.substitution`: Figures 5.11.x), CKA
(:mod:`.cka`: M1 against M2 per layer, layer-by-layer heatmaps) and how the tunnel develops over epochs
(:mod:`.development`). What they share: the run as loaded (:mod:`.loading`) and the ``swap_meta.txt`` format
(:mod:`.swap_meta`); :mod:`.driver` runs the analyses named in a scenario and combines seeds and runs.

Each writes CSV (+ markdown/LaTeX for tables) and a PNG into the run directory; :func:`aggregate_seeds`
combines the seeds of a scenario as mean ± std. Entry points: ``analyses:`` in a scenario's YAML (run after
training) and ``cltunnel analyze RUN_DIR``. Importing this package imports every module in it, so a new
analysis is one module with ``@register_analysis`` (and its name in ``cltunnel.config.ANALYSIS_NAMES``).
"""
from __future__ import annotations

import importlib
import pkgutil

from cltunnel.experiments.analyses.cka import (cka_m1_m2, cross_cka_matrix, layer_cka_between, layer_cka_matrix,
                                               plot_cka_matrix)
from cltunnel.experiments.analyses.development import layer_parameters, plot_development, tunnel_development
from cltunnel.experiments.analyses.driver import TABLE_5_2_1_RULES, aggregate_seeds, run_analyses, tunnel_table
from cltunnel.experiments.analyses.loading import LoadedRun, cka_inputs, layer_widths, load_run, log_profile
from cltunnel.experiments.analyses.ood import ood_data, ood_profile
from cltunnel.experiments.analyses.registry import ANALYSES, check_registry, register_analysis
from cltunnel.experiments.analyses.substitution import plot_substitution, substitution_curves
from cltunnel.experiments.analyses.swap import (SWAP_ROWS, THESIS_TABLE_5_4_1, _is_table_5_4_1_setup, plot_swap_vs_k,
                                                swap_by_rule, swap_table, swap_vs_k)
from cltunnel.experiments.analyses.swap_meta import SWAP_META, SwapMeta, read_swap_meta, write_swap_meta
from cltunnel.experiments.analyses.tunnel import (plot_per_layer, profile_series, rank_cap_notices,
                                                  resolve_tunnel_start, tunnel_profile, write_tunnel_profile)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
check_registry()

__all__ = [
    "ANALYSES", "SWAP_META", "SWAP_ROWS", "TABLE_5_2_1_RULES", "THESIS_TABLE_5_4_1", "LoadedRun", "SwapMeta",
    "_is_table_5_4_1_setup", "aggregate_seeds", "cka_inputs", "cka_m1_m2", "cross_cka_matrix", "layer_cka_between",
    "layer_cka_matrix", "layer_parameters", "layer_widths", "load_run", "log_profile", "ood_data", "ood_profile",
    "plot_cka_matrix", "plot_development", "plot_per_layer", "plot_substitution", "plot_swap_vs_k", "profile_series",
    "rank_cap_notices", "read_swap_meta", "register_analysis", "resolve_tunnel_start", "run_analyses",
    "substitution_curves", "swap_by_rule", "swap_table", "swap_vs_k", "tunnel_development", "tunnel_profile",
    "tunnel_table", "write_swap_meta", "write_tunnel_profile",
]
