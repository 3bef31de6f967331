"""Feature erosion: the squares transform exactly, and the erosion effect on real CIFAR-10 at CPU size."""
from __future__ import annotations

import json

import pytest
import torch

from cltunnel.config import ConfigError, parse_config
from cltunnel.experiments.erosion import Squares, add_squares, square_colours, squared_rows
from cltunnel.runs import run_seed
from cltunnel.data.device import DeviceData
from cltunnel.data.scenarios import build_scenario
from erosion_band import EROSION_BAND


@pytest.fixture(scope="module")
def small(cifar10):
    import dataclasses

    return dataclasses.replace(cifar10, x_train=cifar10.x_train[:2000], y_train=cifar10.y_train[:2000],
                               x_test=cifar10.x_test[:500], y_test=cifar10.y_test[:500],
                               test_lossless=cifar10.test_lossless[:500], _stats=None)


def corner(x: torch.Tensor, size: int = 4) -> torch.Tensor:
    return x[:, :, :size, :size]


def test_square_colour_is_a_function_of_the_label_and_only_the_chosen_share_carries_it(small):
    squares = Squares(small, ratio=0.3, size=4, seed=7)
    assert len(squares.rows) == round(0.3 * 2000) and torch.equal(squares.rows, squared_rows(2000, 0.3, 7))
    idx = torch.arange(2000)
    out = squares(small.x_train.clone(), idx)
    colours = square_colours(10)
    flagged = squares.flag
    expected = colours[small.y_train[flagged]][:, :, None, None].expand(-1, -1, 4, 4)
    assert torch.equal(corner(out[flagged]), expected)  # the colour is exactly the class's
    assert torch.equal(out[~flagged], small.x_train[~flagged])  # the others are untouched, bitwise
    assert torch.equal(out[flagged][:, :, 4:], small.x_train[flagged][:, :, 4:])  # only the square changes
    assert len({tuple(c.tolist()) for c in colours}) == 10  # ten distinct colours


def test_test_images_are_all_squared_and_the_clean_data_is_untouched(small):
    before = small.x_test.clone()
    squared = Squares(small, ratio=0.5).test_images(small)
    assert torch.equal(small.x_test, before)  # clean test images untouched
    assert torch.equal(corner(squared.x_test), square_colours(10)[small.y_test][:, :, None, None].expand(-1, -1, 4, 4))
    assert torch.equal(squared.x_train, small.x_train) and squared.channel_stats()[0].equal(small.channel_stats()[0])


def test_square_is_stamped_after_augmentation_so_it_stays_in_its_corner(small):
    cfg = parse_config({"scenario": {"tasks": [10]}, "device": "cpu", "erosion": {"ratio": 1.0}})
    data = DeviceData.create(build_scenario(cfg, small), torch.device("cpu"), augment=True, channels_last=False)
    data.overlay = Squares(small, ratio=1.0, corner="bottom_right")
    gen = torch.Generator().manual_seed(0)
    x, y, _ = next(iter(data.batches(data.scenario.tasks[0], "train", 256, gen)))
    colour = data.normalise(square_colours(10)[y][:, :, None, None].expand(-1, -1, 4, 4).contiguous())
    assert torch.allclose(x[:, :, -4:, -4:], colour)  # whatever the random crop and flip


def test_single_channel_images_get_a_grey_square():
    x = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    out = add_squares(x, torch.tensor([0, 1]), torch.tensor([1]), 3, "top_right", square_colours(10))
    assert out[0].sum() == 0 and (out[1, 0, :3, -3:] == square_colours(10)[1].float().mean().round()).all()


def test_erosion_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="erosion.ratio"):
        parse_config({"scenario": {"tasks": [10]}, "erosion": {"ratio": 1.5}})
    with pytest.raises(ConfigError, match="erosion: runs on one task"):
        parse_config({"scenario": {"tasks": [5, 5]}, "erosion": {}})


# Calibrated with the run in tests/erosion_band.py (VGG-11 width 1/8, 300 images/class, 5 clean + 3 squared
# epochs, all training images squared), seeds 0-4 on this CPU:
# squared - clean test accuracy after the squared phase 45.6 22.8 26.1 30.1 34.1 (mean 31.7, std 8.7);
# clean accuracy lost 1.5 11.4 9.3 7.9 13.6 (mean 8.7, std 4.6); squared - clean before the squares
# 1.1 0.9 0.4 0.2 0.9. Bands: about mean ± 3 std.
EROSION_BANDS = {"squared_minus_clean": (8.0, 60.0), "clean_drop": (-5.0, 25.0)}


@pytest.mark.slow
def test_erosion_band_squared_accuracy_overtakes_clean(cifar10, tmp_path):
    run_dir = run_seed(parse_config({**EROSION_BAND, "output_dir": str(tmp_path)}), 0, cifar10, progress=False)
    s = json.loads((run_dir / "erosion_summary.json").read_text())
    low, high = EROSION_BANDS["squared_minus_clean"]
    assert low <= s["squared after squared"] - s["clean after squared"] <= high
    assert abs(s["squared after clean"] - s["clean after clean"]) < 5  # before the squares, they are noise
    low, high = EROSION_BANDS["clean_drop"]
    assert low <= s["clean forgetting"] <= high
    # training accuracy is read on the images each phase trains on: squared ones in the squared phase, where
    # the model fits them at least as well as it does squared test images
    assert 0 <= s["train after clean"] <= 100 and s["train after squared"] >= s["squared after squared"] - 5
    for name in ("erosion_curve.csv", "erosion_curve.png", "erosion_summary.md"):
        assert (run_dir / name).stat().st_size > 0


@pytest.mark.slow
def test_erosion_ratio_sweep_writes_the_ratio_table(mnist, tmp_path):
    import yaml

    from cltunnel.sweeps import load_sweep, run_sweep

    base = {"data": {"name": "mnist", "train_per_class": 100, "test_per_class": 50}, "scenario": {"tasks": [10]},
            "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
            "training": {"epochs": 1, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "augment": False},
            "erosion": {"square": 6, "pretrain_epochs": 3, "erosion_epochs": 6}, "device": "cpu"}
    path = tmp_path / "ratio.yaml"
    path.write_text(yaml.safe_dump({"name": "ratio", "base": base, "axes": {"erosion.ratio": [0.0, 1.0]},
                                    "output_dir": str(tmp_path / "out")}, sort_keys=False))
    results = run_sweep(load_sweep(path), progress=False)
    assert [r.status for r in results] == ["done", "done"]
    table = __import__("pandas").read_csv(tmp_path / "out" / "ratio" / "erosion_ratio.csv", header=[0, 1], index_col=0)
    squared = table[("mean", "squared after squared")]
    clean = table[("mean", "clean after squared")]
    assert list(table.index) == [0.0, 1.0]
    assert squared[1.0] - clean[1.0] > 5 > abs(squared[0.0] - clean[0.0])  # no squares, no shortcut
    assert (tmp_path / "out" / "ratio" / "erosion_ratio.png").stat().st_size > 1000
