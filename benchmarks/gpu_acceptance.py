"""The GPU acceptance check: run this first on any GPU, one call, under 3 minutes (issue 23, item 4).

The captured training step (``training.capture: auto`` turns it on for CUDA) and the device data path have
been exercised on CPUs only; this script tells, on the device itself, whether they may be trusted there.
It prints one verdict line per check (``PASS`` / ``FAIL`` / ``SKIP``, and why), then the speed rows:

1. **captured vs eager**: VGG-19 width 1 (BatchNorm), bf16 autocast, channels_last, real CIFAR-10 batches
   (augmented on the device): the captured step's self-check (cltunnel.training.capture) at the first step,
   after an lr milestone and across a task switch to a second head, plus forced checks at later steps; the
   largest differences are printed, so the bf16 tolerance can be calibrated from a measurement.
2. **strategies keep their behaviour** with capture on, on the device: a user ``_before_backward`` that
   zeroes the loss stays at chance; a user ``forward``, Avalanche's DER and ER-ACE and a metric hooked
   inside the step are named and give the numbers of the eager path; naive fine-tuning is captured and
   passes its self-checks.
3. **speed**: ``benchmarks/speed.py --capture`` rows (cltunnel eager, captured, bare loops, ratios).

    CLTUNNEL_DATA=$HOME/stage/data python3 benchmarks/gpu_acceptance.py            # on the GPU
    python benchmarks/gpu_acceptance.py --device cpu --quick --skip-speed          # its CPU smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # user_strategies: the test's user classes

from cltunnel.config import parse_config  # noqa: E402
from cltunnel.data.device import DeviceData, resolve_device, task_generator  # noqa: E402
from cltunnel.data.images import load_data  # noqa: E402
from cltunnel.data.scenarios import build_scenario  # noqa: E402
from cltunnel.models.zoo import make_model, model_spec  # noqa: E402
from cltunnel.runs import run_seed  # noqa: E402
from cltunnel.store import load_metrics  # noqa: E402
from cltunnel.training.capture import CapturedStep, CaptureRejected  # noqa: E402
from cltunnel.training.fast_data import TemperatureCrossEntropy  # noqa: E402

VERDICTS: list[str] = []


def verdict(name: str, ok: bool | None, detail: str) -> None:
    line = f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {name}: {detail}"
    VERDICTS.append(line)
    print(line, flush=True)


def captured_vs_eager(device: torch.device, quick: bool, amp: bool) -> None:
    """The self-check in each situation a task sequence meets, on the scenario's model and data."""
    model_name, width, per_class, steps = ("vgg11", 0.125, 100, 6) if quick else ("vgg19", 1.0, 1000, 20)
    cfg = parse_config({"name": "accept", "data": {"name": "cifar10", "train_per_class": per_class,
                                                   "test_per_class": 10}, "scenario": {"tasks": [5, 5]},
                        "model": {"name": model_name, "width": width}, "device": str(device),
                        "training": {"lr": 0.05, "momentum": 0.9, "batch_size": 128}})
    scenario = build_scenario(cfg, load_data(cfg))
    channels_last = device.type == "cuda"
    ddata = DeviceData.create(scenario, device, True, channels_last)
    model = make_model(model_spec(cfg, scenario), 0).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
    lines: list[str] = []
    step = CapturedStep(model, TemperatureCrossEntropy(1.0), opt, device, amp, log=lines.append)
    began = time.perf_counter()
    try:
        for task, lr in ((0, 0.05), (0, 0.005), (1, 0.05)):
            if task == 1:
                opt.state.clear()  # what Avalanche's reset does at a new experience
            for group in opt.param_groups:
                group["lr"] = lr
            batches = ddata.batches(scenario.tasks[task], "train", 128, task_generator(device, 0, task))
            for i, (x, y, _) in enumerate(batches):
                if i >= steps:
                    break
                if i in (steps // 2, steps - 1):  # forced checks at later steps of the same situation
                    step._checked(x, y, task, False, lambda: step.eager(x, y, task))
                else:
                    step(x, y, task)
    except CaptureRejected as rejected:
        verdict(f"captured vs eager ({'bf16' if amp else 'fp32'})", False, rejected.reason)
        return
    t = step.tolerance
    verdict(f"captured vs eager ({'bf16' if amp else 'fp32'}, {model_name} w{width}, channels_last "
            f"{channels_last})", True, f"{len(step.checks)} self-checks, largest difference "
            f"{max(step.differences):.2e} of a step's change, {max(step.checks):.2g} of the bound (scale "
            f"{t.scale:g}, direction {t.direction:g}, one tensor {t.tensor:g}); {time.perf_counter() - began:.0f} s "
            "with compilation")


def strategy_runs(device: torch.device, out: Path, quick: bool = False) -> None:
    """Each user class / Avalanche strategy with capture off and on: numbers and what the run printed (with
    ``quick``, the CPU smoke test: 120 images a class, where the device check trains on 300)."""
    from test_training import mnist_tiny
    data = None

    def run(case: int, strategy: dict, capture: str, evaluation: dict | None = None) -> tuple[list, str]:
        nonlocal data
        raw = mnist_tiny(out / f"case{case}-{capture}",
                         data={"train_per_class": 120 if quick else 300, "test_per_class": 100},
                         scenario={"n_tasks": None, "tasks": [5, 5]}, training={"epochs": 2, "capture": capture},
                         strategy=strategy)
        raw["device"] = str(device)
        if evaluation:
            raw["evaluation"] = evaluation
        cfg = parse_config(raw)
        data = data or load_data(cfg)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            run_dir = run_seed(cfg, 0, data, False)
        return load_metrics(run_dir)["acc"], printed.getvalue()

    def close(a: list, b: list) -> bool:  # cuDNN may pick other kernels: the same numbers within a point
        return all(abs(x - y) <= 0.01 for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    cases: list[tuple[str, dict, dict | None, Callable[[list, list, str], tuple[bool, str]]]] = [
        ("user _before_backward zeroes the loss", {"class": "user_strategies:LoudBackward"}, None,
         lambda off, on, p: (close(off, on) and max(map(max, on)) < 0.35 and "LoudBackward._before_backward" in p,
                             f"accuracy {on} (chance 0.2), named: {'LoudBackward._before_backward' in p}")),
        ("user forward", {"class": "user_strategies:NegatedForward"}, None,
         lambda off, on, p: (close(off, on) and "NegatedForward.forward" in p, f"off {off} / on {on}")),
        ("Avalanche DER", {"class": "avalanche.training:DER", "args": {"mem_size": 200}}, None,
         lambda off, on, p: (close(off, on) and "DER.training_epoch" in p, f"off {off} / on {on}")),
        ("Avalanche ER-ACE", {"class": "avalanche.training:ER_ACE", "args": {"mem_size": 200}}, None,
         lambda off, on, p: (close(off, on) and "ER_ACE.training_epoch" in p, f"off {off} / on {on}")),
        ("metric hooked inside the step", {"name": "naive"},
         {"metrics": ["accuracy", "user_strategies:mean_logit_metric"], "loggers": []},
         lambda off, on, p: (close(off, on) and "MeanLogitMetric.after_forward" in p, f"off {off} / on {on}")),
        # issue 30: user code that detection missed keeps its capture-off numbers under capture: on
        ("duck-typed plugin, instance-attribute hook", {"class": "user_strategies:DuckTypedPlugin"}, None,
         lambda off, on, p: (close(off, on) and "_DuckZeroLoss.before_backward (instance attribute)" in p,
                             f"off {off} / on {on}")),
        ("plugin added at task 2", {"class": "user_strategies:PluginAtTask2"}, None,
         lambda off, on, p: (close(off, on) and "_ZeroLossPlugin.before_backward" in p, f"off {off} / on {on}")),
        ("rows of task 0 prepended", {"class": "user_strategies:PrependOldRows"}, None,
         lambda off, on, p: (close(off, on) and "rows of another task" in p, f"off {off} / on {on}")),
        ("fresh Adam per task", {"class": "user_strategies:FreshAdam"}, None,
         lambda off, on, p: (close(off, on) and "self-check failed" not in p and "self-check passed at head 1" in p,
                             f"off {off} / on {on}")),
        ("naive is captured and checked", {"name": "naive"}, None,
         lambda off, on, p: ("self-check passed" in p and "self-check failed" not in p and "eager training" not in p
                             and abs(on[1][1] - off[1][1]) < 0.05,
                             f"off {off} / on {on}; " + "; ".join(l for l in p.splitlines() if "capture" in l)[:400])),
    ]
    for case, (name, strategy, evaluation, judge) in enumerate(cases):
        try:
            off, _ = run(case, strategy, "off", evaluation)
            on, printed = run(case, strategy, "on", evaluation)
            ok, detail = judge(off, on, printed)
            verdict(f"strategy: {name}", ok, detail)
        except Exception as err:  # noqa: BLE001 - one verdict per check, the others still run
            verdict(f"strategy: {name}", False, f"{type(err).__name__}: {err}")


def speed(device: torch.device) -> None:
    command = [sys.executable, str(Path(__file__).with_name("speed.py")), "--device", str(device), "--width", "1",
               "--train-per-class", "5000", "--capture", "--skip-stock"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as err:
        print((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""))
        verdict("speed rows", False, f"timed out after 150 s: {' '.join(command[1:])}")
        return
    print(result.stdout + result.stderr[-2000:], flush=True)
    verdict("speed rows", result.returncode == 0, " ".join(command[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a small model and few steps (the CPU smoke test)")
    p.add_argument("--skip-speed", action="store_true")
    a = p.parse_args(argv)
    VERDICTS.clear()
    device = resolve_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    for amp in ((True, False) if device.type == "cuda" else (False,)):
        try:
            captured_vs_eager(device, a.quick, amp)
        except Exception as err:  # noqa: BLE001
            verdict(f"captured vs eager ({'bf16' if amp else 'fp32'})", False, f"{type(err).__name__}: {err}")
    with tempfile.TemporaryDirectory() as tmp:
        strategy_runs(device, Path(tmp), a.quick)
    if a.skip_speed:
        verdict("speed rows", None, "--skip-speed")
    else:
        speed(device)
    print("\n".join(["", "verdicts:", *VERDICTS]), flush=True)
    return 0 if all(not v.startswith("FAIL") for v in VERDICTS) else 1


if __name__ == "__main__":
    sys.exit(main())
