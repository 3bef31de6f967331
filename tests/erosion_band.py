"""The CPU-sized real-data feature-erosion run behind the erosion bands (tests and calibration share it)."""

EROSION_BAND = {
    "name": "erosion_band",
    "data": {"name": "cifar10", "train_per_class": 300, "test_per_class": 100},
    "scenario": {"tasks": [10]},
    "model": {"name": "vgg11", "width": 0.125},
    "training": {"epochs": 1, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "erosion": {"ratio": 1.0, "square": 4, "pretrain_epochs": 5, "erosion_epochs": 3, "eval_every": 10},
    "device": "cpu",
    # Checked by the run itself (cltunnel.expectations), calibrated over seeds 0-4 on this 2-core CPU:
    # squared - clean test accuracy after the squared phase 45.6 22.8 26.1 30.1 34.1 (mean 31.7, std 8.7);
    # clean accuracy lost 1.5 11.4 9.3 7.9 13.6 (mean 8.7, std 4.6); squared - clean before the squares
    # 1.1 0.9 0.4 0.2 0.9 (noise: strictly within 5 points; the accuracies are on 1,000 test images, multiples
    # of 0.1 points, so +-4.95 is exactly "below 5"). Bands: about mean +- 3 std. Training accuracy is read on
    # the images each phase trains on: squared ones in the squared phase, where the model fits them at least
    # as well as it does squared test images (less 5 points).
    "expect": {"erosion[squared after squared] - erosion[clean after squared]": [8.0, 60.0],
               "erosion[clean forgetting]": [-5.0, 25.0],
               "erosion[squared after clean] - erosion[clean after clean]": [-4.95, 4.95],
               "erosion[train after clean]": [0.0, 100.0],
               "erosion[train after squared] - erosion[squared after squared]": [-5.0, 100.0]},
}
