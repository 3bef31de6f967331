"""The OOD tunnel-strength measures (issue #25, item 5): the retained OOD share, its class (Harun et al.,
NeurIPS 2024), the ID-OOD Pearson correlation, and their mean ± std over a scenario's seeds."""
import math

import numpy as np
import pandas as pd
import pytest

from cltunnel.experiments.analyses.driver import aggregate_seeds
from cltunnel.experiments.analyses.ood import ood_seeds_table, ood_strength
from cltunnel.measures.tunnel import (TUNNEL_STRENGTH_CLASSES, describe_strength, id_ood_pearson, ood_retained,
                                      tunnel_strength)


@pytest.mark.parametrize("retained, expected", [(100, "negligible"), (95, "negligible"), (94.99, "weak"),
                                                (90, "weak"), (89.9, "medium"), (80, "medium"),
                                                (79.9, "strong"), (0, "strong")])
def test_strength_class_boundaries(retained, expected):
    assert tunnel_strength(retained) == expected


def test_strength_classes_in_order_and_described():
    assert [name for name, _, _ in TUNNEL_STRENGTH_CLASSES] == ["negligible", "weak", "medium", "strong"]
    assert describe_strength(87.12) == "medium (80-90 % retained; Harun et al. 2024)"
    assert tunnel_strength(math.nan) == "n/a"


def test_retained_is_last_over_best():
    curve = {1: 40.0, 2: 80.0, 3: 60.0}  # best at layer 2, the tunnel loses a quarter of it
    assert ood_retained(curve) == pytest.approx(75.0)
    assert ood_retained({1: 0.2, 2: 0.5}) == pytest.approx(100.0)  # rising to the last layer: all retained
    assert math.isnan(ood_retained({1: 0.0, 2: 0.0}))


def test_pearson_matches_numpy_and_is_nan_on_a_constant_curve():
    rng = np.random.default_rng(0)
    a, b = rng.random(8), rng.random(8)
    ida, ooda = dict(enumerate(a, 1)), dict(enumerate(b, 1))
    assert id_ood_pearson(ida, ooda) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert id_ood_pearson(ida, {k: 2 * v + 1 for k, v in ida.items()}) == pytest.approx(1.0)
    assert math.isnan(id_ood_pearson(ida, {k: 50.0 for k in ida}))
    assert math.isnan(id_ood_pearson({k: 50.0 for k in ida}, ooda))
    with pytest.raises(ValueError):
        id_ood_pearson({1: 1.0, 2: 2.0}, {1: 1.0, 3: 2.0})


def test_ood_strength_of_a_profile_frame():
    frame = pd.DataFrame({"id_probe_acc": [50.0, 70.0, 90.0], "ood_probe_acc": [60.0, 80.0, 64.0]},
                         index=pd.Index([1, 2, 3], name="layer"))
    s = ood_strength(frame, 0.2, "mnist")
    assert s["retained"] == pytest.approx(80.0) and s["strength"] == "medium" and s["rho"] == 0.2
    assert s["pearson"] == pytest.approx(np.corrcoef([50, 70, 90], [60, 80, 64])[0, 1])


def _seed(path, rho, retained, pearson):
    path.mkdir(parents=True)
    pd.DataFrame([{"ood_data": "mnist", "rho": rho, "retained": retained, "pearson": pearson,
                   "strength": tunnel_strength(retained)}]).to_csv(path / "ood_strength.csv", index=False)


def test_seeds_table_mean_and_sample_std(tmp_path):
    scenario = tmp_path / "scen"
    _seed(scenario / "seed0", 0.10, 90.0, 0.5)
    _seed(scenario / "seed1", 0.20, 80.0, 0.9)
    runs = sorted(scenario.glob("seed*"))
    md = ood_seeds_table(scenario, tmp_path, runs, ["provenance line"])
    # mean 85 -> medium; std ddof 1 of (90, 80) = 7.07 (ddof 0 would give 5.00)
    assert "85.00 ± 7.07" in md and "0.15 ± 0.07" in md and "0.70 ± 0.28" in md
    assert "mnist (medium)" in md and "provenance line" in md
    csv = pd.read_csv(tmp_path / "scen_ood_strength.csv", header=[0, 1], index_col=0)
    assert csv[("mean", "OOD retained (%)")].iloc[0] == pytest.approx(85.0)
    assert csv[("std", "OOD retained (%)")].iloc[0] == pytest.approx(np.std([90, 80], ddof=1))
    assert (tmp_path / "scen_ood_strength.md").exists() and (tmp_path / "scen_ood_strength.tex").exists()
    assert ood_seeds_table(scenario, tmp_path, [], []) is None


def test_aggregate_seeds_writes_the_ood_table(tmp_path):
    _seed(tmp_path / "seed0", 0.05, 96.0, 0.8)
    _seed(tmp_path / "seed1", 0.03, 97.0, 0.9)
    written = aggregate_seeds(tmp_path)
    assert any("OOD tunnel strength" in md and "mnist (negligible)" in md for md in written)
    assert (tmp_path / f"{tmp_path.name}_ood_strength.csv").exists()
