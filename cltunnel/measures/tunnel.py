"""The tunnel-start rule, in one place: the first layer whose probe accuracy reaches a share of the
last layer's (thesis §1), κ of chapter 6, and the thesis's "k (share of depth)" notation.
"""
from __future__ import annotations

from cltunnel.config import ConfigError



def check_tunnel_start(k: int, n_layers: int, where: str) -> int:
    """k as a tunnel start of a body of ``n_layers`` layers: 0 (no extractor) to n (no tunnel)."""
    if not 0 <= k <= n_layers:
        raise ConfigError(f"{where}: {k} is not a layer of this network's body (0..{n_layers})")
    return k


def tunnel_start(probe_acc: dict[int, float], threshold: float = 0.95) -> int:
    """First layer whose probe accuracy reaches ``threshold`` × the last layer's (thesis §1)."""
    layers = sorted(probe_acc)
    target = threshold * probe_acc[layers[-1]]
    return next(k for k in layers if probe_acc[k] >= target)


def kappa(probe_acc: dict[int, float], depth: int, eta: float = 0.99) -> float:
    """κ of thesis chapter 6: the first layer whose probe reaches η × the best probe accuracy, over depth
    (lower = the network's useful part is shallower, i.e. a stronger tunnel)."""
    best = max(probe_acc.values())
    return next(k for k in sorted(probe_acc) if probe_acc[k] >= eta * best) / depth


def format_layer(k: int, n: int) -> str:
    """The thesis's "k (share of depth)" notation."""
    return f"{k} ({100 * k / n:.0f}%)"
