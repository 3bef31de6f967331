"""cltunnel: continual-learning benchmarks built for layer surgery.

Layers, each importing only those below it (checked by import-linter): ``cli`` > ``sweeps`` > ``runs`` >
``experiments`` (one registered module per protocol, and the analyses) > ``training`` (strategies,
tunnel-aware plugins, checkpoints, the task-sequence loop) > ``measures`` (probes, rank, CKA, the
tunnel-start rule) > ``models`` (the layered model, the zoo, surgery: the cut at layer k) > ``data``
(datasets, scenarios, the device data path) > ``reports`` (tables, figures) > ``store`` (the run-directory
layout) > ``config`` (every YAML section, typed) > ``errors``.
"""
import warnings

# Avalanche imports qpsolvers, which warns at import time when no QP solver is installed; GEM needs one,
# nothing else here does.
warnings.filterwarnings("ignore", message="no QP solver found")

__version__ = "0.2.0"
