"""cltunnel: continual-learning benchmarks built for layer surgery.

Layers, each importing only those below it (checked by import-linter): ``cli`` > ``sweeps`` > ``runs`` >
``experiments`` (one registered module per protocol, and the analyses) > ``training`` (strategies,
tunnel-aware plugins, checkpoints, the task-sequence loop) > ``measures`` (probes, rank, CKA, the
tunnel-start rule) > ``models`` (the layered model, the zoo, surgery: the cut at layer k) > ``data``
(datasets, scenarios, the device data path) > ``reports`` (tables, figures) > ``store`` (the run-directory
layout) > ``config`` (the YAML sections every run shares, typed; each protocol registers its own) > ``registry`` >
``errors``.
"""
import warnings

# Avalanche imports qpsolvers, which warns at import time when no QP solver is installed; GEM needs one,
# nothing else here does.
warnings.filterwarnings("ignore", message="no QP solver found")

__version__ = "0.2.0"

# The public API (README, "Extending cltunnel"), imported on first use so that ``import cltunnel.config`` stays
# light: what the built-in analyses use themselves.
PUBLIC = {
    "analysis": "cltunnel.experiments.analyses.registry",  # @analysis(name, caption=...): a user's analysis
    "Analysis": "cltunnel.experiments.analyses.registry",
    "LoadedRun": "cltunnel.experiments.analyses.loading",  # what an analysis receives: run.dir, models, tasks, ...
    "load_run": "cltunnel.experiments.analyses.loading",
    "run_analyses": "cltunnel.experiments.analyses.driver",
    "model_from_checkpoint": "cltunnel.training.checkpoints",
    "build_model": "cltunnel.models.zoo",
    "register_model": "cltunnel.models.zoo",
    "LayeredModel": "cltunnel.models.layered",
    "Registry": "cltunnel.registry",
    "register_section": "cltunnel.config",  # a protocol of one's own: its section, then the protocol
    "Protocol": "cltunnel.experiments.registry",
    "register_protocol": "cltunnel.experiments.registry",
}
__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str):
    if name in PUBLIC:
        import importlib

        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'cltunnel' has no attribute '{name}'")
