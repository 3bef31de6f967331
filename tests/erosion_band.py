"""The CPU-sized real-data feature-erosion run behind the erosion bands (tests and calibration share it)."""

EROSION_BAND = {
    "name": "erosion_band",
    "data": {"name": "cifar10", "train_per_class": 300, "test_per_class": 100},
    "scenario": {"tasks": [10]},
    "model": {"name": "vgg11", "width": 0.125},
    "training": {"epochs": 1, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "erosion": {"ratio": 1.0, "square": 4, "pretrain_epochs": 5, "erosion_epochs": 3, "eval_every": 10},
    "device": "cpu",
}
