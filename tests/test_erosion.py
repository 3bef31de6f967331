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
from bands import bands_hold
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


# The bands of tests/erosion_band.py's run (VGG-11 width 1/8, 300 images/class, 5 clean + 3 squared epochs,
# all training images squared) are its expect: section, checked by the mechanism a user's scenario gets
# (cltunnel.expectations); their calibration is noted there.
@pytest.mark.slow
def test_erosion_band_squared_accuracy_overtakes_clean(cifar10, tmp_path):
    from cltunnel.expectations import check_expect

    cfg = parse_config({**EROSION_BAND, "output_dir": str(tmp_path)})
    assert len(check_expect(cfg)) == 5
    run_dir = run_seed(cfg, 0, cifar10, progress=False)
    s = json.loads((run_dir / "erosion_summary.json").read_text())
    outcomes = bands_hold(cfg)
    assert outcomes[0].values[0] == pytest.approx(s["squared after squared"] - s["clean after squared"])
    for name in ("erosion_curve.csv", "erosion_curve.png", "erosion_summary.md"):
        assert (run_dir / name).stat().st_size > 0


@pytest.mark.slow
def test_erosion_ratio_sweep_writes_the_ratio_table(mnist, tmp_path):
    import yaml

    from cltunnel.sweeps import evaluate_sweep, load_sweep, run_sweep

    base = {"data": {"name": "mnist", "train_per_class": 100, "test_per_class": 50}, "scenario": {"tasks": [10]},
            "model": {"name": "mlp", "width": 0.25, "args": {"depth": 3}},
            "training": {"epochs": 1, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "augment": False},
            "erosion": {"square": 6, "pretrain_epochs": 3, "erosion_epochs": 6}, "device": "cpu"}
    path = tmp_path / "ratio.yaml"
    # each ratio's band in its named variant, checked by the sweep: with squares the squared images are read
    # more than 5 points better than clean ones; without, less than 5 (no squares, no shortcut). Accuracies
    # here are on 500 test images, multiples of 0.2 points: [5.1, 100] is exactly "> 5", [-4.9, 4.9] "< 5".
    shortcut = "erosion[squared after squared] - erosion[clean after squared]"
    ratios = {"ratio0.0": {"erosion.ratio": 0.0, "expect": {shortcut: [-4.9, 4.9]}},
              "ratio1.0": {"erosion.ratio": 1.0, "expect": {shortcut: [5.1, 100.0]}}}
    path.write_text(yaml.safe_dump({"name": "ratio", "base": base, "axes": {"erosion.ratio": ratios},
                                    "output_dir": str(tmp_path / "out")}, sort_keys=False))
    sweep = load_sweep(path)
    results = run_sweep(sweep, progress=False)
    assert [r.status for r in results] == ["done", "done"]
    bands = evaluate_sweep(sweep)
    assert [o.held for found in bands.values() for o in found] == [True, True], bands
    table = __import__("pandas").read_csv(tmp_path / "out" / "ratio" / "erosion_ratio.csv", header=[0, 1], index_col=0)
    assert list(table.index) == [0.0, 1.0]
    squared, clean = table[("mean", "squared after squared")], table[("mean", "clean after squared")]
    assert bands["ratio1.0"][0].values[0] == pytest.approx(squared[1.0] - clean[1.0])  # the table's numbers
    assert (tmp_path / "out" / "ratio" / "erosion_ratio.png").stat().st_size > 1000
