"""The CPU-sized real-data scenario behind the accuracy bands (shared by the tests and the calibration script)."""

BAND_SCENARIO = {
    "name": "band",
    "data": {"name": "cifar10", "train_per_class": 1000, "test_per_class": 200},
    "scenario": {"tasks": [5, 5], "mode": "task"},
    "model": {"name": "vgg19", "width": 0.125},
    "training": {"epochs": 6, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "strategy": "naive",
    "seeds": [0],
    # the swap table at a fixed split (the probe rule finds no clear tunnel in a network this small)
    "analyses": {"tunnel_start": "8", "probe": {"epochs": 10}},
    "device": "cpu",
}
