"""Table 6.3.1 (E8) from a sweep over the softmax temperature: κ and ρ per architecture and T, and the
thesis's reading (higher T: lower κ, higher ρ) checked per architecture rather than assumed."""
from __future__ import annotations

import json

import pytest
import yaml

from cltunnel.experiments.temperature import temperature_frames, temperature_report, trend
from cltunnel.store import CONFIG_FILE, MANIFEST, METRICS_FILE


def fake_sweep(root, values):
    """A finished sweep's files: per (architecture, T) one seed with its κ and ρ as the analyses write them."""
    configs = {}
    for (arch, temp), (kappa, rho) in values.items():
        config = f"{arch}_temperature{temp}"
        run = root / config / "seed0"
        run.mkdir(parents=True)
        (run / CONFIG_FILE).write_text(yaml.safe_dump({"model": {"name": arch}, "training": {"temperature": temp}}))
        (run / METRICS_FILE).write_text(json.dumps({"acc": [[0.5]]}))
        (run / "tunnel_start.txt").write_text(f"rule 'last' (used): 3 (30%)\nkappa (eta 0.99): {kappa}\n")
        (run / "ood_rho.txt").write_text(f"ood data: mnist\nrho: {rho}\n")
        configs[config] = {"labels": {"arch": arch, "training.temperature": temp, "seed": 0}, "seeds": [0]}
    (root / MANIFEST).write_text(yaml.safe_dump({"name": "t", "axes": ["arch", "training.temperature", "seed"],
                                                 "configs": configs}))


def test_kappa_and_rho_per_architecture_and_temperature(tmp_path):
    fake_sweep(tmp_path, {("mlp", 1): (0.8, 0.1), ("mlp", 10): (0.6, 0.2), ("mlp", 100): (0.4, 0.5),
                          ("resnet20", 1): (0.3, 0.4), ("resnet20", 10): (0.5, 0.3), ("resnet20", 100): (0.5, 0.3)})
    mean, _, n = temperature_frames(tmp_path)
    assert n == 1 and list(mean.index) == ["mlp", "resnet20"]
    assert list(mean.columns) == ["κ (T=1)", "κ (T=10)", "κ (T=100)", "ρ (T=1)", "ρ (T=10)", "ρ (T=100)",
                                  "acc % (T=1)", "acc % (T=10)", "acc % (T=100)"]  # the network's own accuracy
    assert mean.loc["mlp", "acc % (T=10)"] == pytest.approx(50.0)
    assert mean.loc["mlp", "κ (T=100)"] == pytest.approx(0.4) and mean.loc["resnet20", "ρ (T=1)"] == pytest.approx(0.4)
    md = temperature_report(tmp_path)
    assert "mlp: κ falls with T" in md and "ρ rises with T" in md  # the thesis's reading holds for mlp
    assert "resnet20: κ rises with T" in md  # and is reported as not holding where it does not
    assert (tmp_path / "table_6_3_1.png").stat().st_size > 1000 and (tmp_path / "table_6_3_1.csv").exists()


def test_trend_reads_the_sign_and_admits_too_little_data():
    import pandas as pd

    assert trend(pd.Series([3.0, 2.0, 1.0], index=["κ (T=1)", "κ (T=10)", "κ (T=100)"])).startswith("falls")
    assert trend(pd.Series([1.0, 1.0], index=["κ (T=1)", "κ (T=10)"])) == "flat"
    assert trend(pd.Series([1.0], index=["κ (T=1)"])) == "too few temperatures"
