"""cltunnel: continual-learning benchmarks built for layer surgery.

Modules, one concept each: data, scenarios, models, training, strategies, checkpoints, runs, tables, cli.
"""
import warnings

# Avalanche imports qpsolvers, which warns at import time when no QP solver is installed; GEM needs one,
# nothing else here does.
warnings.filterwarnings("ignore", message="no QP solver found")

__version__ = "0.1.0"
