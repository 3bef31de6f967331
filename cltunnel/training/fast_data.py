"""Training on device-resident tensors, driven by Avalanche's SupervisedTemplate.

Avalanche owns the loop (so its plugins, evaluators and strategies work unchanged); cltunnel owns the
data path. :class:`FastDataMixin` replaces the template's DataLoader with :class:`DeviceBatches`, which
indexes uint8 tensors already on the device, augments and normalises whole batches there, and yields
``[x, y, task]`` exactly like an Avalanche loader. It is mixed into any strategy class, a user's too.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from cltunnel.config import TrainingConfig
from cltunnel.data.device import DeviceBatches, DeviceData, task_generator
from cltunnel.training.capture import CapturedStep, CaptureRejected
from cltunnel.training.capture_rules import OPT_IN, capture_blockers, plugin_signature, unproven
from cltunnel.training.overrides import overriding_class


class TemperatureCrossEntropy(nn.Module):
    """Cross-entropy of logits / T (the thesis's chapter 6 knob on tunnel strength); T=1 is plain CE."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float() / self.temperature, target)


@dataclass
class RunContext:
    """What cltunnel hands a strategy when it builds one: the device data it trains on, the seed of its
    per-task RNG streams, and whether to train in bf16 autocast. Plugins read it as ``strategy.run_context``."""

    data: DeviceData
    seed: int = 0
    amp: bool = False
    capture: str = "off"  # off | proven (training.capture: auto on CUDA) | on (the user's explicit request)
    notice: Callable[[str], None] = field(default=lambda line: print(line, flush=True))  # the log and the page


def run_data(strategy: Any) -> DeviceData | None:
    """The device data a strategy was built with, or None for a strategy used outside cltunnel."""
    context = getattr(strategy, "run_context", None)
    return context.data if context is not None else None


class FastDataMixin:
    """Mixed in front of any Avalanche SGD strategy class to feed it from :class:`DeviceData`.

    It replaces *where batches come from* and how fast a step runs, never what the strategy does with them:
    each of its methods stands in for Avalanche's template only; where the strategy class (or a class
    between it and the templates) defines the same method, that method runs (:mod:`~.overrides`). The data
    comes in at construction (``run_context=RunContext(...)``); without it (a strategy used outside cltunnel)
    every method defers to Avalanche.
    """

    def __init__(self, *, run_context: RunContext | None = None, **kwargs: Any) -> None:
        self.run_context = run_context  # keyword-only, as Avalanche asks of strategy constructors
        self._captured_step: CapturedStep | None | bool = None  # decided at the first epoch; False: eager
        super().__init__(**kwargs)  # type: ignore[call-arg]

    def _defers(self, name: str) -> bool:
        """Whether ``name`` is the strategy's own (or cltunnel has no data here): then Avalanche's MRO decides."""
        return self.run_context is None or overriding_class(type(self), name) is not None

    def training_epoch(self, **kwargs: Any) -> None:
        """Avalanche's epoch, with the inside of each iteration as one compiled call where capture applies
        (``capture_rules``: proven, or asked for and nothing found inside the step); an iteration where it
        no longer applies runs Avalanche's own (:meth:`_template_iteration`)."""
        step = self._capture()  # None: Avalanche's epoch (the strategy's own, or the template's); it said why
        if step is None:
            return super().training_epoch(**kwargs)  # type: ignore[misc]
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            if self._captured_step is not False and self._still_captured():
                self.loss, self.mb_output = self._captured_call(step, kwargs)
            else:
                self._template_iteration(**kwargs)
            self._after_training_iteration(**kwargs)

    def _template_iteration(self, **kwargs: Any) -> None:
        """The inside of one iteration exactly as Avalanche's ``SGDUpdate.training_epoch`` runs it (a test holds
        these lines to Avalanche's source): the eager step, every hook and step method in its place."""
        self.optimizer.zero_grad()
        self.loss = self._make_empty_loss()
        self._before_forward(**kwargs)
        self.mb_output = self.forward()
        self._after_forward(**kwargs)
        self.loss += self.criterion()
        self._before_backward(**kwargs)
        self.backward()
        self._after_backward(**kwargs)
        self._before_update(**kwargs)
        self.optimizer_step()
        self._after_update(**kwargs)

    def _reference(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-check's reference: this strategy's own eager iteration on the current batch."""
        self._template_iteration(**kwargs)
        return self.loss.detach(), self.mb_output.detach()

    def _captured_call(self, step: CapturedStep, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled step, or, once it has been rejected (self-check, compile failure), the reference's
        result for this batch and Avalanche's eager iterations from the next one on."""
        try:
            return step(self.mb_x, self.mb_y, self.dataloader.task_label, lambda: self._reference(kwargs))
        except CaptureRejected as rejected:
            self._eager_from_here(rejected.reason)
            return rejected.result

    def _say(self, line: str) -> None:
        """A capture notice, once per run: printed and, in a cltunnel run, shown on the run's page."""
        said = self.__dict__.setdefault("_capture_said", set())
        if line not in said:
            said.add(line)
            self.run_context.notice(line)

    def _eager_from_here(self, why: str) -> None:
        self._say(f"capture: {why}; eager training step from here on")
        self._captured_step = False

    def _capture_allowed(self) -> bool:
        """Capture's rule for this run as it is now (``capture_rules``), said once when it says no: in
        ``proven`` mode every part must be on the proven lists; with ``on``, nothing may be found inside the
        step. Read again whenever the plugins or the attributes they and the strategy hold change."""
        signature = plugin_signature(self)
        if signature == self.__dict__.get("_capture_signature"):
            return True
        self._capture_signature = signature
        if self.run_context.capture == "proven":
            reasons = unproven(self)
            if reasons:
                self._say(f"capture: eager training step, not proven for this run ({'; '.join(reasons)}); {OPT_IN}")
        else:
            reasons = capture_blockers(self)
            if reasons:
                verb = "runs" if len(reasons) == 1 else "run"
                self._say(f"capture: eager training step ({', '.join(reasons)} {verb} inside the step)")
        if reasons:
            self._captured_step = False
        return not reasons

    def _still_captured(self) -> bool:
        """Before each captured iteration: the rule still holds (a plugin added mid-task is seen at once), and
        the batch's rows are all of the loader's task (a strategy or plugin that put rows of another task in
        the batch needs Avalanche's forward, each row to its own head: the step falls back, saying so)."""
        if not self._capture_allowed():
            return False
        if self._one_task_batch():
            return True
        task = self.mb_task_id
        label = self.dataloader.task_label
        if isinstance(task, torch.Tensor) and bool((task != label).any()):
            self._eager_from_here(f"the batch holds rows of another task than the loader's ({label}), which "
                                  "go through their own heads")
            return False
        return True

    def _capture(self) -> CapturedStep | None:
        """The run's captured step, built at the first epoch (again if the strategy replaced its optimizer,
        model or criterion); None where capture is off, the batches are not cltunnel's, or the rule says no."""
        context = self.run_context
        if context is None or context.capture == "off" or not isinstance(self.dataloader, DeviceBatches):
            return None
        if self._captured_step is False or not self._capture_allowed():
            return None
        step = self._captured_step
        if (step is None or step.optimizer is not self.optimizer or step.model is not self.model
                or step.criterion is not self._criterion):
            self._captured_step = CapturedStep(self.model, self._criterion, self.optimizer, self.device, context.amp)
            self._say("capture: training on the captured step (compiled forward, loss, backward and update), "
                      "checked against the eager iteration at each new situation's calls 1, 4, 16, 64 and every "
                      "64th call after; its numbers equal the eager path's within float rounding, not bit for "
                      "bit (README: what \"same numbers\" means)")
        return self._captured_step  # type: ignore[return-value]

    def make_train_dataloader(self, **kwargs) -> None:
        if self._defers("make_train_dataloader"):
            return super().make_train_dataloader(**kwargs)  # type: ignore[misc]
        data = self.run_context.data
        task = data.scenario.tasks[self.experience.current_experience]
        gen = task_generator(data.device, self.run_context.seed, task.id)
        self.dataloader = data.batches(task, "train", self.train_mb_size, gen)

    def make_eval_dataloader(self, **kwargs) -> None:
        if self._defers("make_eval_dataloader"):
            return super().make_eval_dataloader(**kwargs)  # type: ignore[misc]
        data = self.run_context.data
        task = data.scenario.tasks[self.experience.current_experience]
        self.dataloader = data.batches(task, "test", self.eval_mb_size)

    def _one_task_batch(self) -> bool:
        """Whether ``mb_x`` is the batch cltunnel's loader yielded, whose rows are all of its task. A strategy
        that puts rows of other tasks in front of it (DER's buffer in ``_before_forward``) makes a new tensor:
        then Avalanche's forward sends each row through its own task's head."""
        loader = self.dataloader
        return isinstance(loader, DeviceBatches) and loader.last_x is not None and self.mb_x is loader.last_x

    def forward(self):
        """The model on one task's batch (no per-batch unique()/sync), in bf16 autocast while training with
        ``amp``; evaluation is always float32 (one precision for every number cltunnel reports). A strategy's
        own ``forward`` runs instead, inside the same autocast."""
        context = self.run_context
        amp = context is not None and context.amp and self.is_training
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            if not self._defers("forward") and self._one_task_batch():
                out = self.model(self.mb_x, self.dataloader.task_label)
            else:
                out = super().forward()  # type: ignore[misc]
        return out.float()


def with_fast_data(strategy_cls: type) -> type:
    """``strategy_cls`` with the device data path in front of it (once)."""
    if issubclass(strategy_cls, FastDataMixin):
        return strategy_cls
    return type(strategy_cls.__name__, (FastDataMixin, strategy_cls),
                {"__module__": strategy_cls.__module__, "wrapped_strategy": strategy_cls})


def _on_cuda_by_default(setting: str, device: torch.device, on: str = "on") -> bool:
    """The training settings that read ``auto`` (on for CUDA, off elsewhere), ``on`` (or its own word) or ``off``."""
    return setting == on or (setting == "auto" and device.type == "cuda")


def amp_enabled(cfg: TrainingConfig, device: torch.device) -> bool:
    return _on_cuda_by_default(cfg.amp, device, on="bf16")


def capture_mode(cfg: TrainingConfig, device: torch.device) -> str:
    """``on`` (the user asked: capture unless something is found inside the step), ``proven`` (``auto`` on
    CUDA: capture only what the project has proven) or ``off``."""
    if cfg.capture == "on":
        return "on"
    if cfg.lr_schedule == "cosine":  # a new learning rate every epoch: a captured step would compile every epoch
        return "off"
    return "proven" if _on_cuda_by_default(cfg.capture, device) else "off"


def capture_notice(cfg: TrainingConfig, device: torch.device) -> str | None:
    """Why ``auto`` does not capture where it otherwise would (said once by the run), or None."""
    if cfg.capture == "auto" and _on_cuda_by_default("auto", device) and cfg.lr_schedule == "cosine":
        return ("capture: eager training step (training.lr_schedule: cosine sets a new learning rate every epoch, "
                "which the captured step would compile anew each time); training.capture: on captures anyway")
    return None



def channels_last_enabled(cfg: TrainingConfig, device: torch.device) -> bool:
    return _on_cuda_by_default(cfg.channels_last, device)
