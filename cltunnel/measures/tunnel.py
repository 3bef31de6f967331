"""Where the tunnel starts, in one place: the named rules that pick the tunnel start k from a per-layer
profile, the notices that say when a profile makes them unreliable, κ of chapter 6, and the thesis's
"k (share of depth)" notation. Analyses, strategies, tables and figures all read k from here.

The rules. k is the last layer of the extractor, for every rule: the extractor is body layers 1..k and the
tunnel layers k+1..n; each rule picks k as the first layer at which its criterion holds:

* ``last`` — the first layer whose probe accuracy reaches ``threshold`` (0.95) × the **last** layer's: the
  thesis's §1 wording and cltunnel's default. On a profile that declines towards the output it is satisfied
  by the first layer already (k = 1), which is why the notices below exist.
* ``peak`` — the first layer reaching ``threshold`` (0.95) × the **best** layer's probe accuracy: the same
  reading of "where probing stops improving", but immune to a declining tail.
* ``rank`` — the first layer after the numerical-rank peak whose rank is at most ``threshold`` (0.10) × that
  peak: where the representation has collapsed by an order of magnitude. The thesis defines the tunnel by
  this collapse (low-rank representations); 0.10 was set from the committed VGG-19 profiles, where it falls
  at layers 7-9 on every one (GPU width 1 on the (5,5), (3,7), (7,3) splits; CPU width 1/4) and agrees with
  the thesis's VGG-19 tunnel start at layer 8 (Table 5.2.1). It needs no probe, so no probe protocol moves it.
* a fixed k, given as a layer number where a rule is accepted.

Tunnel strength, as later work measures it on out-of-distribution (OOD) probes: the share of the best OOD
probe accuracy the last layer retains (:func:`ood_retained`), its class (:func:`tunnel_strength`, Harun et
al., NeurIPS 2024) and the Pearson correlation of the ID and OOD probe curves (:func:`id_ood_pearson`).
"""
from __future__ import annotations

import math

import numpy as np

from cltunnel.config import TUNNEL_RULE_NAMES, ConfigError

DEFAULT_THRESHOLDS = {"last": 0.95, "peak": 0.95, "rank": 0.10}
assert tuple(DEFAULT_THRESHOLDS) == TUNNEL_RULE_NAMES  # the config validates the names this module defines

# When a profile is called degenerate (``profile_notices``).
TAIL_DROP = 0.02  # the last layer's probe is more than 2 points (of accuracy in [0, 1]) below the best layer's
EARLY_SHARE = 0.10  # a rule's k within the first 10 % of the body's layers (or k = 1)
DISAGREEMENT = 2  # the rules' ks more than two layers apart


def check_tunnel_start(k: int, n_layers: int, where: str, minimum: int = 1) -> int:
    """k, the last layer of the extractor, in a body of ``n_layers`` layers: 1 to n (n: no tunnel). k = 0 (an
    empty extractor) is refused: no rule can give it, and a swap or penalty on no layers means nothing. (A
    replay point is another thing: layer 0 there is the input, so replay passes ``minimum=0``.)"""
    if not minimum <= k <= n_layers:
        raise ConfigError(f"{where}: {k} is not a layer of this network's body (k is the extractor's last "
                          f"layer, {minimum}..{n_layers})")
    return k


def rule_threshold(rule: str, threshold: float | None = None) -> float:
    return DEFAULT_THRESHOLDS[rule] if threshold is None else threshold


def tunnel_start(probe_acc: dict[int, float], threshold: float | None = None, rule: str = "last",
                 ranks: dict[int, float] | None = None) -> int:
    """The tunnel start k that ``rule`` reads from a profile (layer -> probe accuracy in [0, 1]; layer ->
    numerical rank for the ``rank`` rule), at ``threshold`` (default: the rule's)."""
    share = rule_threshold(rule, threshold)
    if rule == "rank":
        if not ranks:
            raise ValueError("the rank rule needs the per-layer numerical ranks")
        layers = sorted(ranks)
        peak = max(layers, key=lambda k: (ranks[k], -k))  # the first layer holding the highest rank
        return next((k for k in layers if k > peak and ranks[k] <= share * ranks[peak]), layers[-1])
    layers = sorted(probe_acc)
    reference = probe_acc[layers[-1]] if rule == "last" else max(probe_acc.values())
    return next(k for k in layers if probe_acc[k] >= share * reference)


def rule_starts(probe_acc: dict[int, float], ranks: dict[int, float] | None = None) -> dict[str, int]:
    """Every rule's k at its default threshold (the rank rule only where ranks are given)."""
    return {rule: tunnel_start(probe_acc, None, rule, ranks) for rule in DEFAULT_THRESHOLDS
            if rule != "rank" or ranks}


def describe_rule(rule: str, threshold: float | None = None) -> str:
    """The rule and threshold in words, for every table and figure that uses its k."""
    share = rule_threshold(rule, threshold)
    return {"last": f"rule 'last': first layer with probe accuracy >= {share:g} x the last layer's",
            "peak": f"rule 'peak': first layer with probe accuracy >= {share:g} x the best layer's",
            "rank": f"rule 'rank': first layer after the rank peak with numerical rank <= {share:g} x the peak"}[rule]


def profile_notices(probe_acc: dict[int, float], starts: dict[str, int], depth: int) -> list[str]:
    """Plain-language warnings when the profile makes a tunnel start unreliable: a probe curve that declines
    towards the output, a rule that puts k at the first layers, rules that disagree."""
    notices = []
    layers = sorted(probe_acc)
    best_layer = max(layers, key=lambda k: probe_acc[k])
    drop = probe_acc[best_layer] - probe_acc[layers[-1]]
    if drop > TAIL_DROP:
        notices.append(f"the last layer's probe accuracy ({100 * probe_acc[layers[-1]]:.1f}%) is {100 * drop:.1f} "
                       f"points below the best layer's (layer {best_layer}, {100 * probe_acc[best_layer]:.1f}%): the "
                       "profile declines towards the output, so the 'last' rule is satisfied early; an undertrained "
                       "network often looks like this")
    early = {rule: k for rule, k in starts.items() if k <= max(1, EARLY_SHARE * depth)}
    if early:
        notices.append("the tunnel would start at the first layers ("
                       + ", ".join(f"{rule}: k={k}" for rule, k in early.items()) + f" of {depth}): the swap "
                       "table at that k compares almost whole networks, not extractors")
    if starts and max(starts.values()) - min(starts.values()) > DISAGREEMENT:
        notices.append("the rules disagree by more than two layers (" + ", ".join(f"{r}: k={k}" for r, k in starts.items())
                       + "): read the swap table against the swap-vs-k curves, not at one k")
    return notices


def kappa(probe_acc: dict[int, float], depth: int, eta: float = 0.99) -> float:
    """κ of thesis chapter 6: the first layer whose probe reaches η × the best probe accuracy, over depth
    (lower = the network's useful part is shallower, i.e. a stronger tunnel)."""
    return tunnel_start(probe_acc, eta, "peak") / depth


def format_layer(k: int, n: int) -> str:
    """The thesis's "k (share of depth)" notation."""
    return f"{k} ({100 * k / n:.0f}%)"


# Harun et al., "What variables affect out-of-distribution generalization in pretrained models?", NeurIPS
# 2024: the tunnel's strength by the share (%) of the best layer's OOD probe accuracy the last layer retains.
# Each class: (name, lowest retained share in it, the range in words); the first class whose bound is met wins.
TUNNEL_STRENGTH_CLASSES = (("negligible", 95.0, ">= 95 %"), ("weak", 90.0, "90-95 %"), ("medium", 80.0, "80-90 %"),
                           ("strong", -math.inf, "< 80 %"))
STRENGTH_SOURCE = "Harun et al. 2024"


def ood_retained(ood_acc: dict[int, float]) -> float:
    """100 x the last layer's OOD probe accuracy / the best layer's (layer -> accuracy, any scale): how much of
    the OOD information the network still has at its output, the tunnel's strength in Harun et al. (NeurIPS
    2024); 100 - 100 rho. NaN when no layer beats 0 (no share of nothing)."""
    layers = sorted(ood_acc)
    best = max(ood_acc.values())
    return 100 * ood_acc[layers[-1]] / best if best > 0 else math.nan


def id_ood_pearson(id_acc: dict[int, float], ood_acc: dict[int, float]) -> float:
    """The Pearson correlation over layers of the ID and OOD probe curves: near 1 when OOD accuracy rises and
    falls with the in-distribution one (no tunnel-specific loss), low or negative when the tunnel discards
    OOD information the ID task keeps. NaN when either curve is constant (or has fewer than two layers):
    the correlation is undefined there (0/0), and NaN says so instead of numpy's warning."""
    if sorted(id_acc) != sorted(ood_acc):
        raise ValueError(f"ID and OOD probes on different layers: {sorted(id_acc)} vs {sorted(ood_acc)}")
    layers = sorted(id_acc)
    a = np.array([id_acc[k] for k in layers], dtype=float)
    b = np.array([ood_acc[k] for k in layers], dtype=float)
    if len(layers) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def tunnel_strength(retained: float) -> str:
    """The tunnel-strength class of a retained OOD share (%): >= 95 negligible, 90-95 weak, 80-90 medium, < 80
    strong (:data:`TUNNEL_STRENGTH_CLASSES`; Harun et al., NeurIPS 2024, "What variables affect
    out-of-distribution generalization in pretrained models?"). "n/a" for NaN (no OOD accuracy to share)."""
    if math.isnan(retained):
        return "n/a"
    return next(name for name, lowest, _ in TUNNEL_STRENGTH_CLASSES if retained >= lowest)


def describe_strength(retained: float) -> str:
    """The class with its range and source, e.g. "medium (80-90 % retained; Harun et al. 2024)"."""
    name = tunnel_strength(retained)
    span = next((words for n, _, words in TUNNEL_STRENGTH_CLASSES if n == name), None)
    return f"{name} ({span} retained; {STRENGTH_SOURCE})" if span else name
