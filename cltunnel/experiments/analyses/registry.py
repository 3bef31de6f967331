"""The analyses by name: each analysis module registers its entry point with :func:`register_analysis`, the
way protocols register in :mod:`cltunnel.experiments.registry`. The names live once, in
:data:`cltunnel.config.ANALYSIS_NAMES` (validated there without importing the analyses); registering a
name not listed there is refused, and :func:`check_registry` (run when the package is imported) refuses a
listed name without its module and keeps :data:`ANALYSES` in that order, the order ``analyses.run``
defaults to."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from cltunnel.config import ANALYSIS_NAMES

Analysis = Callable[..., Any]  # LoadedRun -> what the analysis computed (it writes its files into the run)
F = TypeVar("F", bound=Analysis)

ANALYSES: dict[str, Analysis] = {}


def register_analysis(name: str) -> Callable[[F], F]:
    """Decorator: ``@register_analysis("swap")`` makes the function the analysis ``swap``."""
    if name not in ANALYSIS_NAMES:
        raise ValueError(f"analysis '{name}' is not in cltunnel.config.ANALYSIS_NAMES ({', '.join(ANALYSIS_NAMES)}); "
                         "add it there")

    def register(function: F) -> F:
        if name in ANALYSES:
            raise ValueError(f"analysis '{name}' is registered twice")
        ANALYSES[name] = function
        return function

    return register


def check_registry() -> None:
    """Every name of ANALYSIS_NAMES registered, and ANALYSES in that order."""
    missing = [name for name in ANALYSIS_NAMES if name not in ANALYSES]
    if missing:
        raise RuntimeError(f"analyses {missing} are in cltunnel.config.ANALYSIS_NAMES but no module registers them")
    for name in ANALYSIS_NAMES:
        ANALYSES[name] = ANALYSES.pop(name)
