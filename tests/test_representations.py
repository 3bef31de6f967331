"""Generative vs discriminative representations (E6) on real MNIST at CPU size."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cltunnel.config import ConfigError, parse_config
from cltunnel.experiments.representations import GaussianLatent, aggregate_representations, representation_model
from cltunnel.runs import run_seed


def test_the_three_models_share_one_body_shape():
    shapes = {}
    for kind in ("D", "AE", "VAE"):
        m = representation_model(kind, (1, 28, 28), 5, bottleneck=8)
        assert m.layer_names == ["fc1", "fc2", "bottleneck", "fc4", "fc5"]
        x = torch.randn(3, 1, 28, 28)
        shapes[kind] = [tuple(v.shape) for v in m.eval().layer_outputs(x).values()]
        assert m(x, 0).shape == ((3, 2) if kind == "D" else (3, 784))
    assert shapes["D"] == shapes["AE"] == shapes["VAE"] == [(3, 512), (3, 256), (3, 8), (3, 256), (3, 512)]


def test_vae_latent_samples_while_training_and_its_kl_is_zero_at_the_prior():
    latent = GaussianLatent(4, 2)
    torch.nn.init.zeros_(latent.stats.weight)
    torch.nn.init.zeros_(latent.stats.bias)  # mu = 0, log-variance = 0: the prior itself
    x = torch.randn(1000, 4)
    sample = latent.train()(x)
    assert float(latent.kl.detach()) == 0.0 and 0.9 < float(sample.detach().std()) < 1.1
    assert torch.equal(latent.eval()(x), torch.zeros(1000, 2))


def test_unknown_model_kind_is_named():
    with pytest.raises(ConfigError, match="representations.models.*GAN"):
        parse_config({"scenario": {"n_tasks": 5}, "representations": {"models": ["D", "GAN"]}})


@pytest.mark.slow
def test_protocols_on_real_mnist(mnist, tmp_path):
    raw = {"name": "rep", "data": {"name": "mnist", "train_per_class": 300, "test_per_class": 100},
           "scenario": {"n_tasks": 5}, "representations": {"epochs": 15, "classifier_epochs": 100},
           "device": "cpu", "output_dir": str(tmp_path)}
    run_dir = run_seed(parse_config(raw), 0, mnist, progress=False)
    for kind in ("D", "AE", "VAE"):
        acc = pd.read_csv(run_dir / f"protocol1_{kind}.csv", index_col=0).to_numpy()
        cka = pd.read_csv(run_dir / f"protocol2_{kind}.csv", index_col=0).to_numpy()
        assert acc.shape == cka.shape == (5, 5) and pd.isna(acc[0, 1])  # classifier j exists from task j on
        assert all(abs(cka[j, j] - 1) < 1e-6 for j in range(5))  # right after its task: the same representations
        assert (acc.diagonal() > 85).all()  # a 2-class MNIST task is easy right after it is learned
        p3 = json.loads((run_dir / f"protocol3_{kind}.json").read_text())
        assert len(p3["per_task"]) == 5 and 10 <= p3["ten_way"] <= 100
        if kind != "D":
            curve = p3["recon_curve"]
            assert len(curve) == 16 and curve[-1][0] < curve[0][0]  # reconstruction of the trained task improves
    md = aggregate_representations(run_dir.parent)
    assert "Table 3.3.1" in md and "76.8" in md and "82.9" in md  # the thesis's values beside ours
    assert (run_dir.parent / "rep_protocols.png").stat().st_size > 1000


@pytest.mark.slow
def test_cifar10_classifiers_report_the_exact_pixel_rows_too(cifar10, tmp_path):
    """Here 9,000 CIFAR-10 test rows were decoded from JPEG: protocol 3 also reports the 1,000 exact rows, and
    those numbers are exactly what a run restricted to them (``test_rows: lossless``) measures."""
    def run(test_rows: str, out: str) -> dict:
        raw = {"name": "rep", "data": {"name": "cifar10", "train_per_class": 100, "test_rows": test_rows},
               "scenario": {"n_tasks": 5}, "representations": {"models": ["D"], "epochs": 1, "classifier_epochs": 3},
               "device": "cpu", "output_dir": str(tmp_path / out)}
        return json.loads((run_seed(parse_config(raw), 0, cifar10, progress=False) / "protocol3_D.json").read_text())

    every, exact_only = run("all", "all"), run("lossless", "lossless")
    assert every["n_exact_rows"] == 1000
    assert every["per_task_exact"] == exact_only["per_task"] and every["ten_way_exact"] == exact_only["ten_way"]
    assert every["per_task"] != every["per_task_exact"]  # a different set of 10,000 rows
    assert "exact pixels" in aggregate_representations(tmp_path / "all" / "rep")
    table = pd.read_csv(tmp_path / "all" / "rep" / "rep_table_3_3_2.csv", header=[0, 1], index_col=0)
    assert table.loc["D", ("mean", "cltunnel, exact rows")] == pytest.approx(every["ten_way_exact"])
    assert table.loc["D", ("mean", "cltunnel")] == pytest.approx(every["ten_way"])
