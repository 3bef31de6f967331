"""Per-task checkpoints: body layer by layer, every head, optimizer, resolved config and metrics.

Layers are stored by name (``layers[name] = layer.state_dict()``) so that surgery can pick layer k of one
checkpoint and layer k+1 of another without knowing the architecture. Files are written to a temporary
name and renamed, so a run killed mid-write leaves the previous checkpoint intact.

Checkpoints are data, not code: every value in them is a tensor or a plain value (strategy and plugin state
through :mod:`cltunnel.training.plain_state`), and every file cltunnel reads is loaded with ``weights_only=True``
(:func:`safe_load`), so a shared run directory cannot execute anything on the machine that analyses it.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cltunnel.config import RunConfig, parse_config
from cltunnel.errors import CheckpointError
from cltunnel.models.layered import LayeredModel
from cltunnel.models.zoo import build_model
from cltunnel.store import atomic_save, checkpoint_path, epoch_checkpoint_path, finished_tasks, partial_checkpoint_path
from cltunnel.training.plain_state import decode, encode, restore_object


class CheckpointMismatch(CheckpointError):
    """A run directory holds checkpoints made with a different configuration."""


class UnsafeCheckpoint(CheckpointError):
    """A file that holds pickled objects: loading it could run code, so it is refused."""


class DamagedCheckpoint(CheckpointError):
    """A truncated or unreadable file (a copy cut short, a full disk)."""


def model_state(model: LayeredModel) -> dict[str, Any]:
    return {
        "layer_names": model.layer_names,
        "layers": {name: _cpu(layer.state_dict()) for name, layer in model.body.named_children()},
        "heads": {key: _cpu(head.state_dict()) for key, head in model.heads.items()},
    }


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_model_state(model: LayeredModel, state: dict[str, Any]) -> LayeredModel:
    if state["layer_names"] != model.layer_names:
        raise CheckpointMismatch(f"checkpoint layers {state['layer_names']} != model layers {model.layer_names}")
    for name, layer in model.body.named_children():
        layer.load_state_dict(state["layers"][name])
    for key, head in model.heads.items():
        head.load_state_dict(state["heads"][key])
    return model


def save_task_checkpoint(run_dir: Path, task: int, model: LayeredModel, optimizer: torch.optim.Optimizer | None,
                         cfg: RunConfig, seed: int, metrics: dict[str, Any], model_spec: dict[str, Any],
                         strategy: Any = None) -> Path:
    path = checkpoint_path(run_dir, task)
    atomic_save({"task": task, "seed": seed, "fingerprint": cfg.fingerprint(), "config": cfg.to_dict(),
                 "model_spec": model_spec, "metrics": metrics,
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "strategy": strategy_state(strategy) if strategy is not None else None,
                 **model_state(model)}, path)
    return path


# Plugins whose state belongs to this process (loggers, progress bars, schedules rebuilt every task).
TRANSIENT_PLUGINS = ("EvaluationPlugin", "ProgressPlugin", "EpochCheckpointPlugin", "LRSchedulerPlugin",
                     "MidTaskResumePlugin")


# Avalanche plugins whose memory is a dataset object with loaders and iterators (no plain-data form): not
# stored, but drawn again on resume exactly as the first time (training.loop.rebuild_memories).
MEMORY_REBUILT = ("ReplayPlugin", "AGEMPlugin")


def _stored(plugin: Any) -> bool:
    """A plugin whose state goes into checkpoints: not a transient one (by name, or one that says
    ``transient = True``: its state belongs to this process) and not one whose memory has no plain form."""
    name = type(plugin).__name__
    return not getattr(plugin, "transient", False) and name not in TRANSIENT_PLUGINS and name not in MEMORY_REBUILT


def strategy_state(strategy: Any) -> dict[str, Any]:
    """What a strategy learned besides the weights (EWC importances, replay buffers, distillation targets,
    the clock), as plain data, so that resuming after task t continues the same strategy, not a fresh one."""
    plugins = [(type(p).__name__, encode(dict(p.__dict__), f"strategy plugin {type(p).__name__}"))
               for p in strategy.plugins if _stored(p)]
    return {"plugins": plugins, "clock": encode(dict(strategy.clock.__dict__), "strategy clock")}


def load_strategy_state(strategy: Any, state: dict[str, Any] | None) -> None:
    """Put :func:`strategy_state` back into a freshly built strategy of the same configuration."""
    if state is None:
        return
    ours = [p for p in strategy.plugins if _stored(p)]
    if [type(p).__name__ for p in ours] != [name for name, _ in state["plugins"]]:
        raise CheckpointMismatch(f"the checkpoint's strategy plugins {[n for n, _ in state['plugins']]} differ from "
                                 f"this strategy's {[type(p).__name__ for p in ours]}")
    for plugin, (name, saved) in zip(ours, state["plugins"]):
        restore_object(plugin, {"__object__": name, "state": saved}, strategy.model, f"strategy plugin {name}")
    strategy.clock.__dict__.update(decode(state["clock"], None, None))


def save_epoch_checkpoint(run_dir: Path, task: int, epoch: int, model: LayeredModel, model_spec: dict[str, Any]
                          ) -> Path:
    """The model in the middle of a task (every N epochs), for rank-over-training and weight-change plots."""
    path = epoch_checkpoint_path(run_dir, task, epoch)
    atomic_save({"task": task, "epoch": epoch, "model_spec": model_spec, **model_state(model)}, path)
    return path


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain values; a file that is damaged, not a torch file, or
    carries pickled objects (which would run code) is refused with its name."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(
            f"{path}: refused, it holds pickled Python objects, which could run code ({_first_line(err)}). "
            "cltunnel's checkpoints hold tensors and plain values only. If it is a checkpoint you made yourself "
            f"with cltunnel < 0.2, convert it: cltunnel convert {path} --trust") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise DamagedCheckpoint(f"{path}: damaged or not a torch checkpoint ({_first_line(err)}); "
                              "delete it to redo the work it held") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    state = safe_load(path)
    if not isinstance(state, dict) or "layers" not in state or "model_spec" not in state:
        raise CheckpointError(f"{path}: not a cltunnel checkpoint (no layers / model_spec)")
    return state


def convert_legacy_checkpoint(path: str | Path) -> Path:
    """Rewrite a checkpoint of cltunnel < 0.2 (strategy state pickled) as plain data. This one call unpickles
    the file, so run it only on files you made yourself (the CLI asks for ``--trust``)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    strategy = state.pop("strategy", None)
    state = encode(state, str(path))
    if strategy is not None:
        state["strategy"] = {"plugins": [(name, encode(saved, f"strategy plugin {name}"))
                                         for name, saved in strategy["plugins"]],
                             "clock": encode(strategy["clock"], "strategy clock")}
    atomic_save(state, path)
    safe_load(path)  # proves the rewritten file loads without unpickling objects
    return path


def latest_checkpoint(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The last finished task's checkpoint, refused when it was made from another configuration."""
    state = None
    for task in reversed(finished_tasks(run_dir)):
        path = checkpoint_path(run_dir, task)
        try:
            state = load_checkpoint(path)
            break
        except DamagedCheckpoint as err:
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            print(f"warning: {err}; moved it to {aside.name} and resuming from the task before it "
                  f"(task {task + 1} is trained again)", flush=True)
    if state is None:
        return None
    if state["fingerprint"] != cfg.fingerprint():
        diffs = _config_diff(state["config"], cfg.to_dict())
        raise CheckpointMismatch(
            f"{run_dir} holds checkpoints from a different configuration ({'; '.join(diffs[:5])}). "
            "Use another output_dir, or delete that directory to start over.")
    return state


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("seeds", "device", "output_dir", "analyses", "name"):
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def model_from_checkpoint(path_or_state: str | Path | dict[str, Any]) -> LayeredModel:
    """Rebuild the trained model from a checkpoint alone (architecture, heads and weights)."""
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state)
    spec = state["model_spec"]
    model = build_model(spec["name"], spec["head_sizes"], tuple(spec["in_shape"]), spec["width"], **spec["args"])
    return load_model_state(model, state)


def config_from_checkpoint(state: dict[str, Any]) -> RunConfig:
    return parse_config(state["config"])


def save_partial_task(run_dir: Path, task: int, epochs_done: int, model: LayeredModel, strategy: Any,
                      cfg: RunConfig, extra: dict[str, Any] | None = None) -> Path:
    """Everything needed to continue task ``task`` after ``epochs_done`` epochs as if never stopped: weights,
    optimizer (momentum), strategy and plugin state with the clock, the batch-order generator and torch's
    global RNG; ``extra`` is the caller's own plain state (an erosion phase's test curve so far)."""
    loader = getattr(strategy, "dataloader", None)
    generator = getattr(loader, "generator", None)
    path = partial_checkpoint_path(run_dir, task)
    atomic_save({"task": task, "epochs_done": epochs_done, "fingerprint": cfg.fingerprint(),
                 "optimizer": strategy.optimizer.state_dict(), "strategy": strategy_state(strategy),
                 "data_generator": generator.get_state() if generator is not None else None,
                 "torch_rng": torch.get_rng_state(), "extra": encode(extra or {}, "extra"), **model_state(model)}, path)
    return path


def load_partial_task(run_dir: Path, task: int, cfg: RunConfig) -> dict[str, Any] | None:
    """The resumable state inside ``task``, if one was saved by this configuration; a damaged one is moved
    aside (the task restarts from its beginning, and says so)."""
    path = partial_checkpoint_path(run_dir, task)
    if not path.exists():
        return None
    try:
        state = safe_load(path)
    except DamagedCheckpoint as err:
        os.replace(path, path.with_name(path.name + ".damaged"))
        print(f"warning: {err}; task {task + 1} restarts from its beginning", flush=True)
        return None
    if state.get("fingerprint") != cfg.fingerprint():
        raise CheckpointMismatch(f"{path} was saved by a different configuration; delete it to restart the task")
    return state
