"""Probe training cost: all layers' probes together (features cached, or recomputed per batch) against one
layer at a time through the network, same model, data, seed and protocol, in one run.

    CLTUNNEL_DATA=../shared/data python benchmarks/probes.py --width 0.125 --train-per-class 500 --epochs 3

Prints seconds per approach, the ratios, and the largest difference in probe accuracy between approaches
(the probes are independent, so joint training should give the same accuracies).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from cltunnel.config import parse_config  # noqa: E402
from cltunnel.data.device import DeviceData, resolve_device  # noqa: E402
from cltunnel.data.images import load_data  # noqa: E402
from cltunnel.data.scenarios import build_scenario  # noqa: E402
from cltunnel.measures.probes import ProbeConfig, train_probes  # noqa: E402
from cltunnel.models.zoo import make_model, model_spec  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg19")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    cfg = parse_config({"name": "probes", "data": {"name": "cifar10", "train_per_class": a.train_per_class,
                                                   "test_per_class": 200},
                        "scenario": {"tasks": [5, 5]}, "model": {"name": a.model, "width": a.width},
                        "device": a.device})
    device = resolve_device(cfg.device)
    scenario = build_scenario(cfg, load_data(cfg))
    model = make_model(model_spec(cfg, scenario), seed=0).to(device).eval()
    data = DeviceData.create(scenario, device, augment=False, channels_last=False)
    task = scenario.tasks[0]
    layers = list(range(1, len(model.body) + 1))
    cached = ProbeConfig(epochs=a.epochs, cache_bytes=1 << 40)
    streamed = ProbeConfig(epochs=a.epochs, cache_bytes=0)
    print(f"device {device}, {a.model} width {a.width}, {len(layers)} layers, {len(task.train_idx)} training "
          f"images, {a.epochs} probe epochs, torch {torch.__version__}")
    t_cached, acc_cached = timed(lambda: train_probes(model, data, task, layers=layers, cfg=cached, progress=False))
    t_joint, acc_joint = timed(lambda: train_probes(model, data, task, layers=layers, cfg=streamed, progress=False))
    t_single, acc_single = timed(lambda: {k: train_probes(model, data, task, layers=[k], cfg=streamed,
                                                          progress=False)[k] for k in layers})
    for name, secs in (("all layers together, features cached", t_cached),
                       ("all layers together, features per batch", t_joint),
                       ("one layer at a time through the network", t_single)):
        print(f"{name:42s} {secs:8.1f}s")
    print(f"speed-up cached vs layer by layer: {t_single / t_cached:.1f}x; per batch vs layer by layer: "
          f"{t_single / t_joint:.1f}x")
    diff = max(max(abs(acc_cached[k] - acc_single[k]), abs(acc_joint[k] - acc_single[k])) for k in layers)
    print(f"largest probe-accuracy difference between approaches: {100 * diff:.2f} points")


if __name__ == "__main__":
    main()
