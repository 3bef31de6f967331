"""Issue 25: the block structure (Nguyen et al. 2021) as an analysis: the CIFAR ResNet family's blocks with
hookable activations (same state dict, same outputs), inner representations in forward order and read at
the moment they exist, deletion of layers, and the analysis end to end on real CIFAR-10 (two seeds: the
cross-seed CKA) with its sweep report. The measures themselves are in test_block_measures.py."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cltunnel.config import parse_config
from cltunnel.measures.blocks import find_block
from cltunnel.measures.similarity import gram_matrix
from cltunnel.models.inner import hooked, inner_representations
from cltunnel.models.surgery import delete_layers, shape_preserving_layers
from cltunnel.models.zoo import build_model


def _functional_block(block, x):
    """The basic block as it was written before its activations became modules (torch.relu, +)."""
    out = torch.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    return torch.relu(out + block.shortcut(x) if block.skip else out)


@pytest.mark.parametrize("skip", [True, False])
def test_blocks_keep_their_state_dict_and_outputs(skip):
    torch.manual_seed(0)
    model = build_model("cifar_resnet", [10], (3, 32, 32), 0.5, depth=14, skip=skip).eval()
    block = model.body.block2_1  # the downsampling block: shortcut conv + BatchNorm when skip
    expected = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                "bn1.num_batches_tracked", "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean",
                "bn2.running_var", "bn2.num_batches_tracked"}
    if skip:
        expected |= {f"shortcut.{n}" for n in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                                "1.num_batches_tracked")}
    assert set(block.state_dict()) == expected
    x = torch.randn(4, 8, 32, 32)  # block2_1 takes stage 1's 16 * 0.5 channels
    with torch.no_grad():
        assert torch.equal(block(x), _functional_block(block, x))


def test_inner_representations_in_forward_order_read_when_they_exist():
    torch.manual_seed(0)
    model = build_model("cifar_resnet", [10], (3, 32, 32), 0.5, depth=8).eval()
    x = torch.randn(8, 3, 32, 32)
    reps = inner_representations(model, x[:2])
    per_block = ["conv1", "bn1", "relu1", "conv2", "bn2", "add", "relu2"]
    assert [r.path for r in reps] == (["stem.0", "stem.1", "stem.2"]
                                       + [f"{b}.{m}" for b in ("block1_1", "block2_1", "block3_1") for m in per_block]
                                       + ["pool.0"])
    assert not any("shortcut" in r.path for r in reps)
    assert [r.layer for r in reps][:4] == [1, 1, 1, 2]
    grams: dict[int, torch.Tensor] = {}
    with torch.no_grad(), hooked(reps, lambda i, out: grams.__setitem__(i, gram_matrix(out))):
        outs = model.layer_outputs(x)
    stem = model.body.stem
    with torch.no_grad():
        bn_out = stem[1](stem[0](x))  # the stem's ReLU is in place: its input is overwritten after the hook
    assert torch.allclose(grams[1], gram_matrix(bn_out))
    assert not torch.allclose(grams[1], grams[2])
    b = model.body.block2_1
    with torch.no_grad():
        h = outs[2]
        added = b.bn2(b.conv2(b.relu1(b.bn1(b.conv1(h))))) + b.shortcut(h)
    assert torch.allclose(grams[3 + 7 + 5], gram_matrix(added))  # block2_1.add
    assert torch.allclose(grams[3 + 7 + 6], gram_matrix(outs[3]))  # block2_1.relu2 = body layer 3
    with torch.no_grad():  # the hooks are gone after the block
        model.layer_outputs(x)
    assert len(grams) == len(reps)


def test_deleting_layers_skips_them_and_refuses_a_shape_change():
    torch.manual_seed(0)
    model = build_model("cifar_resnet", [10], (3, 32, 32), 0.5, depth=14).eval()
    x = torch.randn(4, 3, 32, 32)
    assert shape_preserving_layers(model, x) == {2, 3, 5, 7}  # second block of each stage and the first's
    pruned = delete_layers(model, [3, 5], x)
    with torch.no_grad():
        h = x
        for k, layer in enumerate(model.body, start=1):
            h = h if k in (3, 5) else layer(h)
        assert torch.allclose(pruned(x, 0), model.heads["0"](h))
    assert len(model.body) == 8  # the source is untouched
    with pytest.raises(ValueError, match=r"body layer\(s\) \[4\]"):
        delete_layers(model, [4], x)


TINY = {"name": "block_tiny",  # 300 exact-pixel test rows: one CKA minibatch
        "data": {"name": "cifar10", "train_per_class": 10, "test_rows": "lossless", "test_per_class": 30},
        "scenario": {"tasks": [10]}, "model": {"name": "cifar_resnet", "width": 0.5, "args": {"depth": 8}},
        "training": {"epochs": 2, "batch_size": 64, "lr": 0.05, "augment": False},
        "seeds": [0, 1], "device": "cpu", "analyses": {"run": ["block_structure"], "probe": {"epochs": 2}},
        "logging": {"tensorboard": False, "report": False}}


@pytest.fixture(scope="module")
def tiny_scenario(tmp_path_factory, real_data_dir):
    from cltunnel.runs import run_scenario

    out = tmp_path_factory.mktemp("blocks")
    return run_scenario(parse_config({**TINY, "output_dir": str(out)}), progress=False)


def test_block_structure_analysis_on_real_data(tiny_scenario):
    """Two seeds of a small CIFAR ResNet on real CIFAR-10: every output, the body map equal to the
    cka_layers route, maps symmetric with a unit diagonal, shares in [0, 1], the summary's block the rule's."""
    from cltunnel.experiments.analyses import layer_cka_matrix, load_run

    run_dir = tiny_scenario / "seed0"
    for name in ("block_structure.csv", "block_structure_summary.md", "block_vs_tunnel.png",
                 "block_structure_layers.png", "block_structure_inner.png"):
        assert (run_dir / name).exists(), name
    body = pd.read_csv(run_dir / "block_layers_cka.csv", index_col=0)
    inner = pd.read_csv(run_dir / "block_inner_cka.csv", index_col=0)
    assert inner.shape == (25, 25) and body.shape == (5, 5)
    for matrix in (body, inner, pd.read_csv(run_dir / "block_inner_cka_without_pc.csv", index_col=0)):
        m = matrix.to_numpy()
        assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    cos2 = pd.read_csv(run_dir / "block_inner_pc_cos2.csv", index_col=0).to_numpy()
    assert np.allclose(np.diag(cos2), 1) and (cos2 >= 0).all() and (cos2 <= 1 + 1e-9).all()
    direct = layer_cka_matrix(load_run(run_dir, "cpu", progress=False), 0, 0)
    assert np.allclose(body.to_numpy(), direct.to_numpy(), atol=1e-9)
    # the body layers are among the inner representations (each layer's last one): the two maps agree there
    per_layer = pd.read_csv(run_dir / "block_structure.csv", index_col=0)
    last_of_layer = [inner.index.get_loc(n) for n in ("stem.2", "block1_1.relu2", "block2_1.relu2",
                                                      "block3_1.relu2", "pool.0")]
    assert np.allclose(inner.to_numpy()[np.ix_(last_of_layer, last_of_layer)], body.to_numpy(), atol=1e-9)
    assert per_layer["first_pc_share"].between(0, 1).all()
    summary = pd.read_csv(run_dir / "block_structure_summary.csv").iloc[0]
    block = find_block(body.to_numpy(), 0.9, 3)
    assert summary["block (body layers)"] == (f"{block[0] + 1}-{block[1] + 1}" if block else "none")
    assert list(per_layer["in_block"]) == [block is not None and block[0] <= i <= block[1] for i in range(5)]
    assert 0 <= summary["test acc"] <= 100 and 0 <= summary["train acc"] <= 100


def test_deletion_drops_the_block_after_its_first_layer_and_retrains_a_head(tiny_scenario):
    """The deletion path on a block given by hand (the tiny model need not have one): body layers after the
    block's first, where shapes allow; the own-head accuracy is the pruned model's."""
    from cltunnel.experiments.analyses import load_run
    from cltunnel.experiments.analyses.block_structure import deletion, layers_to_delete
    from cltunnel.training.accuracy import predict_accuracy

    assert layers_to_delete((1, 4), {2, 3, 5, 7}) == [3, 5]  # block = body layers 2..5 (0-based 1..4)
    assert layers_to_delete((0, 0), {1, 2}) == []
    run = load_run(tiny_scenario / "seed0", "cpu", progress=False)
    model = run.model(0)
    result = deletion(run, model, (0, 2))  # stem, block1_1, block2_1: only block1_1 keeps its input's shape
    assert result["deleted layers"] == "2"
    t = run.data.scenario.tasks[0]
    x = next(iter(run.data.batches(t, "test", 2)))[0]
    assert result["test acc, block deleted, own head"] == pytest.approx(
        100 * predict_accuracy(delete_layers(model, [2], x), run.data, t))
    assert 0 <= result["test acc, block deleted, head retrained"] <= 100
    assert deletion(run, model, None)["deleted layers"].startswith("none")


def test_a_module_run_twice_is_refused():
    """torchvision's ResNet blocks call one ReLU twice: one hook slot would hold two representations."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu = torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(self.relu(x)))

    from collections import OrderedDict

    from cltunnel.models.layered import LayeredModel

    model = LayeredModel(OrderedDict(block=Twice()), {"0": torch.nn.Linear(3, 2)})
    with pytest.raises(ValueError, match=r"\['block.relu'\] run more than once"):
        inner_representations(model, torch.randn(2, 3, 4, 4))


def test_the_inner_block_must_span_body_layers():
    """Inner representations alike inside one body layer are not a block; across three layers they are."""
    cka = np.full((6, 6), 0.2) + 0.8 * np.eye(6)
    cka[0:3, 0:3] = 0.95  # three representations of body layer 1
    assert find_block(cka, 0.9, 3, layers=[1, 1, 1, 2, 3, 4]) is None
    assert find_block(cka, 0.9, 3) == (0, 2)
    cka[2:5, 2:5] = 0.95  # representations 2..4 = body layers 1, 2, 3
    assert find_block(cka, 0.9, 3, layers=[1, 1, 1, 2, 3, 4]) == (2, 4)


def test_seeds_table_and_cross_seed_cka(tiny_scenario):
    from cltunnel.experiments.analyses import cross_cka_matrix, load_run

    name = tiny_scenario.name
    table = pd.read_csv(tiny_scenario / f"{name}_block_structure.csv", header=[0, 1], index_col=0)
    seeds = [pd.read_csv(tiny_scenario / f"seed{s}" / "block_structure_summary.csv").iloc[0] for s in (0, 1)]
    assert table.loc["test acc", ("mean", "value")] == pytest.approx((seeds[0]["test acc"] + seeds[1]["test acc"]) / 2)
    assert table.loc["test acc", ("std", "value")] == pytest.approx(
        np.std([seeds[0]["test acc"], seeds[1]["test acc"]], ddof=1))
    cross = pd.read_csv(tiny_scenario / f"{name}_cross_seed_cka.csv", index_col=0)
    a, b = load_run(tiny_scenario / "seed0", "cpu", progress=False), load_run(tiny_scenario / "seed1", "cpu", progress=False)
    assert np.allclose(cross.to_numpy(), cross_cka_matrix(a, a.model(0), b.model(0)).to_numpy(), atol=1e-9)
    assert not np.allclose(cross.to_numpy(), 1)  # two seeds are two models


def test_sweep_report_lays_the_maps_out(tiny_scenario, tmp_path):
    """A sweep of two configurations (copies of the tiny runs) gets the summary table and the grids."""
    from cltunnel.experiments.block_sweep import block_sweep_report, has_blocks

    manifest = {"name": "tiny_sweep", "axes": ["model.width", "seed"], "configs": {}}
    for width, seed in (("w0.5", 0), ("w1", 1)):
        shutil.copytree(tiny_scenario / f"seed{seed}", tmp_path / width / "seed0")
        manifest["configs"][width] = {"labels": {"model.width": width}, "seeds": [0]}
    assert has_blocks(tmp_path, manifest)
    md = block_sweep_report(tmp_path, manifest)
    table = pd.read_csv(tmp_path / "block_structure.csv", index_col=0)
    assert list(table.index) == ["w0.5", "w1"] and "CKA in block" in table.columns
    assert (tmp_path / "block_structure_grid.png").exists() and (tmp_path / "block_structure_grid_without_pc.png").exists()
    assert "tiny_sweep" in md


def _numpy_share(features: list[torch.Tensor]) -> float:
    """First-PC share of the concatenated, centred features by numpy's SVD."""
    a = torch.cat([f.flatten(1).double() for f in features], 1).numpy()
    s = np.linalg.svd(a - a.mean(0), compute_uv=False)
    return float(s[0] ** 2 / (s ** 2).sum())


def test_issue33_outputs_whole_set_and_pooled_shares_equal_numpy(tiny_scenario):
    """The new outputs exist; the per-layer and the pooled first-PC shares (last two stages of a ResNet-8:
    block2_1 and block3_1) are numpy's SVD over every test row, not a per-minibatch estimate."""
    from cltunnel.experiments.analyses import load_run
    from cltunnel.experiments.analyses.block_structure import last_stages

    run_dir = tiny_scenario / "seed0"
    for name in ("block_deletion_curve.csv", "block_deletion_curve.png", "block_relu_sparsity.csv",
                 "block_relu_sparsity.png", "block_residual_probes.csv", "block_residual_probes.png"):
        assert (run_dir / name).exists(), name
    run = load_run(run_dir, "cpu", progress=False)
    model = run.model(0).eval()
    t = run.data.scenario.tasks[0]
    x = torch.cat([b[0] for b in run.data.batches(t, "test", 100)])
    assert last_stages(model, x[:2], 2) == {3, 4} and last_stages(model, x[:2], 9) == {1, 2, 3, 4}
    with torch.no_grad():
        outs = model.layer_outputs(x)
    summary = pd.read_csv(run_dir / "block_structure_summary.csv").iloc[0]
    assert summary["pooled first-PC share, last stages (body layers)"] == pytest.approx(
        _numpy_share([outs[3], outs[4]]), abs=1e-6)
    shares = pd.read_csv(run_dir / "block_layers_first_pc_share.csv", index_col=0)
    assert list(shares["pooled"]) == [False, False, True, True, False]
    assert np.allclose(shares["first_pc_share"], [_numpy_share([outs[k]]) for k in range(1, 6)], atol=1e-6)
    upper = pd.read_csv(run_dir / "block_layers_cka.csv", index_col=0).to_numpy()[2:, 2:]
    assert summary["upper-half CKA (body layers)"] == pytest.approx(upper[~np.eye(3, dtype=bool)].mean())
    sparsity = pd.read_csv(run_dir / "block_relu_sparsity.csv", index_col=0)
    assert list(sparsity.index) == ["stem.2"] + [f"block{s}_1.relu{r}" for s in (1, 2, 3) for r in (1, 2)]
    assert sparsity[["zero_share", "dead_unit_share", "always_active_unit_share"]].stack().between(0, 1).all()
    assert (sparsity["dead_unit_share"] <= sparsity["zero_share"] + 1e-12).all()
    with torch.no_grad():
        assert sparsity.loc["block1_1.relu2", "zero_share"] == pytest.approx((outs[2] == 0).double().mean().item())


def test_deleting_an_identity_block_keeps_accuracy_and_its_branch_probes_at_chance(tiny_scenario):
    """A block whose residual branch is zero (bn2's scale and shift 0) is the identity on its post-ReLU input:
    deleting it leaves the accuracy as it is, and a probe on its branch (all zeros) predicts one class of ten
    (30 test rows each: 10 %). The curve's stage-wise deletion is the pruned model's accuracy."""
    from cltunnel.experiments.analyses import load_run
    from cltunnel.experiments.analyses.block_structure import deletion_curve, residual_probes
    from cltunnel.training.accuracy import predict_accuracy

    run = load_run(tiny_scenario / "seed0", "cpu", progress=False)
    model = run.model(0)
    with torch.no_grad():
        model.body.block1_1.bn2.weight.zero_()
        model.body.block1_1.bn2.bias.zero_()
    t = run.data.scenario.tasks[0]
    x = next(iter(run.data.batches(t, "test", 2)))[0]
    full = 100 * predict_accuracy(model, run.data, t)
    curve = deletion_curve(run, model, (1, 1)).set_index("layer")
    assert list(curve.index) == [2]  # ResNet-8: block1_1 is the only block keeping its input's shape
    assert curve.loc[2, "test acc, block deleted"] == pytest.approx(full)
    assert curve.loc[2, "in_block"]
    reps = inner_representations(model, x)
    probes = residual_probes(run, model, reps, None).set_index("block")
    assert list(probes.index) == ["block1_1", "block2_1", "block3_1"]
    assert (probes["before add"] == [f"{b}.bn2" for b in probes.index]).all()
    assert probes.loc["block1_1", "probe acc before add"] == pytest.approx(10.0)
    assert probes["probe acc after add"].between(0, 100).all()



def test_deletion_curve_deletes_backwards_within_each_stage(tiny_scenario):
    """ResNet-20: the blocks that keep their shape come in three runs (one per stage); the paper's curve at a
    block deletes it and every block after it in its stage, nothing in the other stages."""
    from cltunnel.experiments.analyses import load_run
    from cltunnel.experiments.analyses.block_structure import deletable_runs, deletion_curve
    from cltunnel.training.accuracy import predict_accuracy

    run = load_run(tiny_scenario / "seed0", "cpu", progress=False)
    torch.manual_seed(0)
    deep = build_model("cifar_resnet", [10], (3, 32, 32), 0.5, depth=20).eval()
    t = run.data.scenario.tasks[0]
    x = next(iter(run.data.batches(t, "test", 2)))[0]
    assert deletable_runs(shape_preserving_layers(deep, x)) == [[2, 3, 4], [6, 7], [9, 10]]
    curve = deletion_curve(run, deep, None).set_index("layer")
    assert list(curve["stage run"]) == ["2-4"] * 3 + ["6-7"] * 2 + ["9-10"] * 2
    assert curve.loc[3, "test acc, block to end of stage deleted"] == pytest.approx(
        100 * predict_accuracy(delete_layers(deep, [3, 4], x), run.data, t))
    assert curve.loc[6, "test acc, block deleted"] == pytest.approx(
        100 * predict_accuracy(delete_layers(deep, [6], x), run.data, t))
    last = curve.loc[[4, 7, 10]]
    assert (last["test acc, block deleted"] == last["test acc, block to end of stage deleted"]).all()
    assert not curve["in_block"].any()
