"""The named tunnel-start rules on hand-made profiles, the notices on degenerate ones, the official probe
protocol's pieces, and one k for a strategy and the analysis of the same run."""
from __future__ import annotations

import pytest
import torch

from cltunnel.config import ConfigError, parse_config
from cltunnel.measures.probes import OFFICIAL_PROBES, ProbeConfig, probe_protocol, rank_threshold
from cltunnel.measures.tunnel import describe_rule, profile_notices, rule_starts, tunnel_start

RISING = {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.80, 5: 0.90, 6: 0.95, 7: 0.97, 8: 0.98}
PLATEAU = {1: 0.60, 2: 0.80, 3: 0.90, 4: 0.90, 5: 0.90, 6: 0.90}
DECLINING = {1: 0.60, 2: 0.66, 3: 0.68, 4: 0.64, 5: 0.62, 6: 0.60, 7: 0.58}
FLAT = {k: 0.70 for k in range(1, 7)}
RANKS = {1: 100, 2: 400, 3: 800, 4: 600, 5: 200, 6: 70, 7: 30, 8: 20}


@pytest.mark.parametrize("profile, last, peak", [
    (RISING, 6, 6),  # 0.95 >= 0.95 * 0.98 = 0.931 (and the best is the last)
    (PLATEAU, 3, 3),  # 0.90 >= 0.855
    (DECLINING, 1, 2),  # last: 0.60 >= 0.551 at once; peak: 0.66 >= 0.95 * 0.68 = 0.646
    (FLAT, 1, 1),
])
def test_probe_rules_on_hand_made_profiles(profile, last, peak):
    assert tunnel_start(profile, rule="last") == last
    assert tunnel_start(profile, rule="peak") == peak
    assert tunnel_start(profile, 0.95, "last") == tunnel_start(profile)  # the default rule, as before


def test_rank_rule_is_the_first_layer_after_the_peak_collapsed_by_the_share():
    assert tunnel_start(RISING, rule="rank", ranks=RANKS) == 6  # peak 800 at layer 3; 70 <= 80
    assert tunnel_start(RISING, 0.3, "rank", RANKS) == 5  # 200 <= 240
    assert tunnel_start(RISING, rule="rank", ranks={1: 5, 2: 9, 3: 9, 4: 8}) == 4  # never collapses: the last layer
    assert tunnel_start(RISING, rule="rank", ranks={1: 900, 2: 50, 3: 40}) == 2  # the peak at the first layer
    with pytest.raises(ValueError, match="ranks"):
        tunnel_start(RISING, rule="rank")
    assert rule_starts(RISING, RANKS) == {"last": 6, "peak": 6, "rank": 6}
    assert set(rule_starts(RISING)) == {"last", "peak"}


def test_degenerate_profiles_say_so_in_plain_words():
    assert profile_notices(RISING, rule_starts(RISING, RANKS), 8) == []
    notices = profile_notices(DECLINING, rule_starts(DECLINING), 7)
    assert any("declines towards the output" in n and "10.0 points" in n for n in notices)
    assert any("first layers" in n and "last: k=1" in n for n in notices)
    flat = profile_notices(FLAT, rule_starts(FLAT), 6)
    assert len(flat) == 1 and "first layers" in flat[0]  # flat: early k, but no decline
    apart = profile_notices(RISING, {"last": 6, "peak": 6, "rank": 2}, 8)
    assert any("disagree" in n for n in apart) and any("rank: k=2" in n for n in apart)


def test_rules_and_protocols_are_named_in_the_config():
    cfg = parse_config({"scenario": {"tasks": [5, 5]}, "analyses": {"tunnel_rule": "rank", "probe_protocol": "official"}})
    assert cfg.analyses.tunnel_rule == "rank" and cfg.analyses.tunnel_threshold is None
    with pytest.raises(ConfigError, match="tunnel_rule: unknown 'peek' \\(did you mean 'peak'\\?\\)"):
        parse_config({"scenario": {"tasks": [5, 5]}, "analyses": {"tunnel_rule": "peek"}})
    with pytest.raises(ConfigError, match="probe_protocol"):
        parse_config({"scenario": {"tasks": [5, 5]}, "analyses": {"probe_protocol": "paper"}})
    assert "0.1 x the peak" in describe_rule("rank") and "0.95 x the last" in describe_rule("last")


def test_official_probe_protocol_settings_and_rank_tolerance():
    official = probe_protocol("official", {"epochs": 5})
    assert (official.train_share, official.weight_norm, official.max_dims, official.epochs) == (0.8, 1e-3, 10_000, 5)
    assert probe_protocol("thesis") == ProbeConfig() and set(OFFICIAL_PROBES) < set(vars(ProbeConfig()))
    with pytest.raises(ConfigError, match="analyses.probe"):
        probe_protocol("thesis", {"epoch": 3})
    eps = torch.finfo(torch.float32).eps
    assert rank_threshold("official", 512, 1e-3) == pytest.approx(512 * eps)  # matrix_rank's default for 512 x 512
    assert rank_threshold("official", 20_000, 1e-3) == pytest.approx(8000 * eps)  # ranked on 8,000 random dims
    assert rank_threshold("thesis", 512, 1e-3) == 1e-3


def test_official_rank_tolerance_matches_matrix_rank_of_the_covariance():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 6, generator=g) @ torch.randn(6, 64, generator=g)
    features += 1e-4 * torch.randn(400, 64, generator=g)  # small noise: the tolerance decides
    from cltunnel.measures.similarity import numerical_rank
    ours = numerical_rank(features, rank_threshold("official", 64, 1e-3))
    theirs = int(torch.linalg.matrix_rank(torch.cov(features.T.double()), rtol=64 * torch.finfo(torch.float32).eps))
    assert ours == theirs


def test_a_strategy_and_the_analysis_of_its_run_find_the_same_k_by_each_rule(mnist, tmp_path):
    """freeze_tunnel with an 'auto' start picks k after task 1 by the named rule; the analysis of the same
    run (same probe epochs, ranks of as many rows) reads the same k off the model after task 1."""
    from cltunnel.experiments.analyses import profile_series, tunnel_profile, load_run
    from cltunnel.runs import run_seed
    from cltunnel.store import load_metrics
    from cltunnel.training import tunnel_aware
    from test_training import mnist_tiny

    found = {}
    resolve = tunnel_aware.TunnelStart.resolve

    def remember(self, strategy):
        k = resolve(self, strategy)
        found[self.rule] = k
        return k

    tunnel_aware.TunnelStart.resolve = remember
    try:
        for rule in ("last", "peak", "rank"):
            raw = mnist_tiny(tmp_path / rule, scenario={"n_tasks": None, "tasks": [5, 5]}, training={"epochs": 3},
                             model={"args": {"depth": 6}},
                             strategy={"name": "freeze_tunnel", "args": {"tunnel_rule": rule, "probe_epochs": 5}},
                             analyses={"tunnel_rule": rule, "probe": {"epochs": 5}})
            run_dir = run_seed(parse_config(raw), 0, mnist, progress=False)
            assert len(load_metrics(run_dir)["acc"]) == 2
            run = load_run(run_dir, "cpu", progress=False, data=mnist)
            assert run.rule_start(*profile_series(tunnel_profile(run))) == found[rule]
    finally:
        tunnel_aware.TunnelStart.resolve = resolve
    assert set(found) == {"last", "peak", "rank"}


def test_a_rank_at_its_sample_cap_is_named():
    """Issue 24: ranks are taken on analyses.rank_samples rows, which caps them at rows - 1; where a layer's
    rank reaches the cap the profile says so (and which layers)."""
    import pandas as pd

    from cltunnel.experiments.analyses import rank_cap_notices

    profile = pd.DataFrame({"rank": [1999, 1200, 40], "rank_cap": [1999, 1999, 511]}, index=[1, 2, 3])
    notices = rank_cap_notices(profile)
    assert len(notices) == 1 and "layer(s) 1 (cap 1999)" in notices[0] and "raise analyses.rank_samples" in notices[0]
    assert rank_cap_notices(profile.assign(rank=[10, 10, 10])) == []
    # a task with fewer training rows than rank_samples: raising it cannot help, and each layer's own cap is named
    small = pd.DataFrame({"rank": [499, 499, 128], "rank_cap": [499, 499, 128]}, index=[3, 4, 8])
    rows_capped, width_capped = rank_cap_notices(small, rows=500, rank_samples=10_000)
    assert "3 (cap 499), 4 (cap 499);" in rows_capped and "only 500 training rows" in rows_capped
    assert "raise analyses.rank_samples" not in rows_capped
    # the width-capped layer gets its own cause, not the rows' remedy (the review of issue 33: one remedy for all)
    assert "8 (cap 128);" in width_capped and "full rank" in width_capped and "rank_samples" not in width_capped
    # a cap set by the features sampled says so
    from cltunnel.measures.probes import RANK_MAX_FEATURES
    sampled = pd.DataFrame({"rank": [RANK_MAX_FEATURES], "rank_cap": [RANK_MAX_FEATURES]}, index=[2])
    [features] = rank_cap_notices(sampled, rows=20_000, rank_samples=10_000)
    assert "feature sample" in features and "full rank" not in features
