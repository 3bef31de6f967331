"""Analyses run on a finished run directory, one module each, each declaring itself with
``@analysis(name, caption=..., outputs=...)`` (:mod:`.registry`, also ``cltunnel.analysis``): the tunnel
(:mod:`.tunnel`: probes, rank, the rules' k, Table 5.2.1 across runs), out-of-distribution probes
(:mod:`.ood`), the extractor/tunnel swap (:mod:`.swap`: thesis Table 5.4.1, its rows against k and at each
rule's k), layer substitution curves (:mod:`.substitution`: Figures 5.11.x), CKA (:mod:`.cka`: M1 against M2
per layer, layer-by-layer heatmaps), how the tunnel develops over epochs (:mod:`.development`) and block
structure (:mod:`.block_structure`). What they share: the run as loaded (:mod:`.loading`: the
:class:`LoadedRun` a user's analysis receives too) and the ``swap_meta.txt`` format (:mod:`.swap_meta`);
:mod:`.driver` runs the analyses a scenario names and each one's table over seeds, naming none of them.

An analysis returns its files (DataFrames, Figures, text; :func:`.registry.write_result` writes them) and
declares their captions; its ``seeds`` function combines a scenario's seeds as mean ± std. Entry points:
``analyses:`` in a scenario's YAML (run after training; a user's analysis as ``"module:function"``) and
``cltunnel analyze RUN_DIR``. Importing this package imports every module in it, so a new built-in analysis is
one module with ``@analysis``.
"""
from __future__ import annotations

import importlib
import pkgutil

from cltunnel.experiments.analyses.cka import (cka_m1_m2, cross_cka_matrix, layer_cka_between, layer_cka_matrix,
                                               plot_cka_matrix)
from cltunnel.experiments.analyses.development import layer_parameters, plot_development, tunnel_development
from cltunnel.experiments.analyses.driver import aggregate_seeds, run_analyses
from cltunnel.experiments.analyses.loading import LoadedRun, cka_inputs, layer_widths, load_run, log_profile
from cltunnel.experiments.analyses.ood import ood_data, ood_profile
from cltunnel.experiments.analyses.registry import (ANALYSES, Analysis, analysis, built_in_names, check_analyses,
                                                    load_user_analysis, write_result)
from cltunnel.experiments.analyses.substitution import plot_substitution, substitution_curves
from cltunnel.experiments.analyses.swap import (SWAP_ROWS, THESIS_TABLE_5_4_1, _is_table_5_4_1_setup, plot_swap_vs_k,
                                                swap_by_rule, swap_table, swap_vs_k)
from cltunnel.experiments.analyses.swap_meta import SwapMeta, read_swap_meta, write_swap_meta
from cltunnel.experiments.analyses.tunnel import (TABLE_5_2_1_RULES, plot_per_layer, profile_series, rank_cap_notices,
                                                  resolve_tunnel_start, tunnel_profile, tunnel_table,
                                                  write_tunnel_profile)
from cltunnel.store import SWAP_META

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
ANALYSES.sort(key=lambda entry: entry.order)  # the modules import each other: their place, not import order

__all__ = [
    "ANALYSES", "Analysis", "analysis", "built_in_names", "check_analyses", "load_user_analysis", "write_result",
    "SWAP_META", "SWAP_ROWS", "TABLE_5_2_1_RULES", "THESIS_TABLE_5_4_1", "LoadedRun", "SwapMeta",
    "_is_table_5_4_1_setup", "aggregate_seeds", "cka_inputs", "cka_m1_m2", "cross_cka_matrix", "layer_cka_between",
    "layer_cka_matrix", "layer_parameters", "layer_widths", "load_run", "log_profile", "ood_data", "ood_profile",
    "plot_cka_matrix", "plot_development", "plot_per_layer", "plot_substitution", "plot_swap_vs_k", "profile_series",
    "rank_cap_notices", "read_swap_meta", "resolve_tunnel_start", "run_analyses",
    "substitution_curves", "swap_by_rule", "swap_table", "swap_vs_k", "tunnel_development", "tunnel_profile",
    "tunnel_table", "write_swap_meta", "write_tunnel_profile",
]
