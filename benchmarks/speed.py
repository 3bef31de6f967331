"""Training throughput: cltunnel's path vs stock Avalanche (DataLoader + per-sample PIL transforms) vs a bare
PyTorch loop over device tensors, same model, split, epochs and seed, measured in one process; with
``--capture`` also the captured step (training.capture: compiled forward+loss+backward+SGD) and a compiled
bare loop; with ``--concurrent N`` also N cltunnel runs at once, each its own process (a sweep's
``parallel: N``), per run and summed.

    CLTUNNEL_DATA=../shared/data python benchmarks/speed.py --model vgg19 --width 0.25 --train-per-class 500
    python benchmarks/speed.py --device cuda --width 1 --train-per-class 5000 --workers 8 --capture --concurrent 4

Prints images/s of each path, the ratios, and the task accuracy each reached (same data, same epochs). The
captured rows time a second pass after a warm-up pass that compiles (its seconds are printed apart).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

warnings.filterwarnings("ignore")

from cltunnel.config import parse_config  # noqa: E402
from cltunnel.data.device import DeviceData, resolve_device, task_generator  # noqa: E402
from cltunnel.data.images import load_data  # noqa: E402
from cltunnel.data.scenarios import avalanche_benchmark, build_scenario  # noqa: E402
from cltunnel.models.zoo import make_model, model_spec  # noqa: E402
from cltunnel.training.accuracy import predict_accuracy  # noqa: E402
from cltunnel.training.capture import CapturedStep  # noqa: E402
from cltunnel.training.fast_data import RunContext, TemperatureCrossEntropy, amp_enabled, channels_last_enabled  # noqa: E402
from cltunnel.training.strategies import build_strategy  # noqa: E402


class PILImages(Dataset):
    """What a stock Avalanche/torchvision user has: HWC uint8 arrays, PIL per sample, torchvision transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        self.x = x.permute(0, 2, 3, 1).numpy()
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), self.targets[i]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_stock_avalanche(cfg, scenario, device, workers: int) -> tuple[float, nn.Module]:
    import torchvision.transforms as T
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    mean, std = scenario.data.channel_stats()
    norm = T.Normalize(mean.tolist(), std.tolist())
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    task = scenario.tasks[0]
    data = scenario.data
    rows = torch.cat([t.train_idx for t in scenario.tasks])
    bm = nc_benchmark(PILImages(data.x_train[rows], data.y_train[rows], train_tf),
                      PILImages(data.x_test, data.y_test, T.Compose([T.ToTensor(), norm])),
                      n_experiences=len(scenario.tasks), task_labels=True, shuffle=False,
                      fixed_class_order=scenario.class_order,
                      per_exp_classes={t.id: t.n_classes for t in scenario.tasks},
                      class_ids_from_zero_in_each_exp=True)
    model = make_model(model_spec(cfg, scenario), seed=0).to(device)
    t = cfg.training
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                                             weight_decay=t.weight_decay),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=t.batch_size, train_epochs=t.epochs,
                     device=device, evaluator=EvaluationPlugin(loggers=[]))
    sync(device)
    start = time.perf_counter()
    strategy.train(bm.train_stream[task.id], num_workers=workers, eval_streams=[])
    sync(device)
    return time.perf_counter() - start, model


def time_cltunnel(cfg, scenario, device, ddata: DeviceData, capture: bool = False) -> tuple[float, nn.Module]:
    """One pass of task 0 through cltunnel's strategy; with ``capture``, a first pass compiles (timed and
    printed apart) and the second is the one measured."""
    model = make_model(model_spec(cfg, scenario), seed=0).to(device)
    if ddata.channels_last:
        model.to(memory_format=torch.channels_last)
    mean, std = scenario.data.channel_stats()
    bm = avalanche_benchmark(scenario, mean, std)
    strategy = build_strategy(cfg.strategy, model, cfg.training, TemperatureCrossEntropy(1.0), device, [],
                              RunContext(ddata, 0, amp_enabled(cfg.training, device), "on" if capture else "off"))
    if capture:
        start = time.perf_counter()
        strategy.train(bm.train_stream[0], eval_streams=[], reset_optimizer_state=True)
        sync(device)
        print(f"(captured step: warm-up pass with compilation {time.perf_counter() - start:.1f}s)")
    sync(device)
    start = time.perf_counter()
    strategy.train(bm.train_stream[0], eval_streams=[], reset_optimizer_state=True)
    sync(device)
    return time.perf_counter() - start, model


def _concurrent_worker(args: tuple) -> float:
    cfg_dict, threads = args
    torch.set_num_threads(threads)
    cfg = parse_config(cfg_dict)
    device = resolve_device(cfg.device)
    scenario = build_scenario(cfg, load_data(cfg))
    ddata = DeviceData.create(scenario, device, True, channels_last_enabled(cfg.training, device))
    time_bare_loop(cfg, scenario, device, ddata, max_batches=5)  # warm-up
    secs, _ = time_cltunnel(cfg, scenario, device, ddata)
    return len(scenario.tasks[0].train_idx) * cfg.training.epochs / secs


def time_concurrent(cfg, n: int) -> list[float]:
    """images/s of each of ``n`` cltunnel runs trained at once, each its own process (spawned, as a sweep's
    local backend does); on CPU the cores are split between them."""
    import multiprocessing

    threads = max(1, torch.get_num_threads() // n) if resolve_device(cfg.device).type == "cpu" else 1
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        return pool.map(_concurrent_worker, [(cfg.to_dict(), threads)] * n)


def time_bare_loop(cfg, scenario, device, ddata: DeviceData, max_batches: int | None = None, compiled: bool = False
                   ) -> tuple[float, nn.Module]:
    """A plain loop over the device batches; ``compiled``: the same with the model+loss and the optimizer
    step compiled (CapturedStep), timed on a second pass after a compiling one."""
    model = make_model(model_spec(cfg, scenario), seed=0).to(device)
    if ddata.channels_last:
        model.to(memory_format=torch.channels_last)
    t = cfg.training
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                          foreach=True if compiled else None)
    task = scenario.tasks[0]
    amp = amp_enabled(t, device)
    captured = CapturedStep(model, TemperatureCrossEntropy(1.0), opt, device, amp) if compiled else None
    model.train()

    def one_pass(seed: int) -> None:
        gen = task_generator(device, seed, 0)
        for _ in range(t.epochs):
            for i, (x, y, _t) in enumerate(ddata.batches(task, "train", t.batch_size, gen)):
                if max_batches is not None and i >= max_batches:
                    break
                if captured is not None:
                    captured(x, y, task.head)
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = nn.functional.cross_entropy(model(x, task.head).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    if compiled:
        start = time.perf_counter()
        one_pass(1)
        sync(device)
        print(f"(compiled bare loop: warm-up pass with compilation {time.perf_counter() - start:.1f}s)")
    sync(device)
    start = time.perf_counter()
    one_pass(0)
    sync(device)
    return time.perf_counter() - start, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg19")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for stock Avalanche")
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--capture", action="store_true", help="also the captured step and a compiled bare loop")
    p.add_argument("--concurrent", type=int, default=0, help="also N cltunnel runs at once, one process each")
    a = p.parse_args()
    cfg = parse_config({"name": "speed", "data": {"name": "cifar10", "train_per_class": a.train_per_class},
                        "scenario": {"tasks": [5, 5]}, "model": {"name": a.model, "width": a.width},
                        "training": {"epochs": a.epochs, "lr": 0.05}, "device": a.device})
    device = resolve_device(cfg.device)
    scenario = build_scenario(cfg, load_data(cfg))
    n_images = len(scenario.tasks[0].train_idx) * a.epochs
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()} "
          f"{'' if device.type == 'cuda' else 'threads'}), {a.model} width {a.width}, {n_images} images "
          f"({a.epochs} epoch(s) of task 0, batch {cfg.training.batch_size}), torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True
    ddata = DeviceData.create(scenario, device, True, channels_last_enabled(cfg.training, device))
    time_bare_loop(cfg, scenario, device, ddata, max_batches=10)  # warm-up: kernels, allocator, autotuning
    rows = []
    secs, model = time_cltunnel(cfg, scenario, device, ddata)
    rows.append(("cltunnel (Avalanche loop, device data)", secs, model))
    secs, model = time_bare_loop(cfg, scenario, device, ddata)
    rows.append(("bare PyTorch loop, device tensors", secs, model))
    if not a.skip_stock:
        secs, model = time_stock_avalanche(cfg, scenario, device, a.workers)
        rows.append((f"stock Avalanche Naive, DataLoader+PIL ({a.workers} workers)", secs, model))
    if a.capture:
        secs, model = time_cltunnel(cfg, scenario, device, ddata, capture=True)
        rows.append(("cltunnel, captured step (training.capture: on)", secs, model))
        secs, model = time_bare_loop(cfg, scenario, device, ddata, compiled=True)
        rows.append(("bare loop, compiled (model+loss, optimizer step)", secs, model))
    task = scenario.tasks[0]
    for name, secs, model in rows:
        acc = predict_accuracy(model, ddata, task)
        print(f"{name:55s} {n_images / secs:9.0f} img/s  {secs:7.1f}s  task-0 acc {100 * acc:.1f}%")
    ips = {name: n_images / secs for name, secs, _ in rows}
    names = [r[0] for r in rows]
    print(f"ratio cltunnel / bare loop: {ips[names[0]] / ips[names[1]]:.3f}")
    stock = next((n for n in names if n.startswith("stock")), None)
    if stock:
        print(f"ratio cltunnel / stock Avalanche: {ips[names[0]] / ips[stock]:.2f}")
        print(f"ratio bare loop / stock Avalanche: {ips[names[1]] / ips[stock]:.2f}")
    if a.capture:
        captured, compiled = names[-2], names[-1]
        print(f"ratio captured / eager cltunnel: {ips[captured] / ips[names[0]]:.3f}")
        print(f"ratio captured / compiled bare loop: {ips[captured] / ips[compiled]:.3f}")
        if stock:
            print(f"ratio captured / stock Avalanche: {ips[captured] / ips[stock]:.2f}")
    if a.concurrent:
        per_run = time_concurrent(cfg, a.concurrent)
        print(f"{a.concurrent} concurrent cltunnel runs (one process each): per run "
              + ", ".join(f"{v:.0f}" for v in per_run) + f" img/s; summed {sum(per_run):.0f} img/s")
        print(f"ratio {a.concurrent} concurrent (summed) / one cltunnel run: {sum(per_run) / ips[names[0]]:.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
