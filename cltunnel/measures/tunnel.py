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
"""
from __future__ import annotations

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
