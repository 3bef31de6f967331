"""Tunnel-aware CL strategies: act on the split of the body into extractor and tunnel.

The tunnel-effect work finds the tunnel (the deep layers after the probe accuracy saturates) task-agnostic
and forgetting concentrated in the extractor. Three ways to act on that, each an Avalanche plugin (the
mechanism) wrapped in a thin strategy class (so YAML can name it and it composes with other plugins):

* :class:`LayerwiseEWCPlugin` — EWC whose penalty covers only the extractor (or only the tunnel, or all:
  the matched controls), with importances computed on cltunnel's device data path;
* :class:`FreezeLayersPlugin` — the tunnel's parameters and BatchNorm statistics stay as after task 1;
* :class:`LayerReplayPlugin` at the tunnel start — replay stored extractor outputs through the tunnel and
  old heads, instead of replaying images through the whole network (at layer 0: plain experience replay).

Convention, shared with the analyses: with tunnel start ``k`` (the extractor's last layer, 1..n) the extractor
is body layers 1..k and the tunnel is layers k+1..n. ``tunnel_start: auto`` finds k after the first task from linear probes of that
model (the thesis's 95 % rule) and keeps it for the rest of the run. Truncating the network to its
extractor is a model, not a strategy: ``model: {name: vgg19, args: {conv_layers: k}}``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData
from torch import nn

from cltunnel.config import TUNNEL_RULE_NAMES, AnalysesConfig, ConfigError, parse_tunnel_start
from cltunnel.measures.probes import ProbeConfig, layer_ranks, train_probes
from cltunnel.measures.tunnel import check_tunnel_start, describe_rule, tunnel_start
from cltunnel.models.layered import LayeredModel
from cltunnel.training.fast_data import run_data
from cltunnel.models.surgery import check_part, extractor_layers, parameter_names, tunnel_layers

log = logging.getLogger("cltunnel")


class TunnelStart:
    """A fixed tunnel start, or one a named rule (cltunnel.measures.tunnel) reads from the profile of the model
    after the first task: probes with ``probe_epochs`` epochs, ranks of ``rank_samples`` training rows (the
    analyses' defaults), so the analysis of the same run with the same settings finds the same k."""

    def __init__(self, spec: int | str = "auto", threshold: float | None = None, probe_epochs: int = 10,
                 rule: str = "last", rank_samples: int = AnalysesConfig.rank_samples, minimum: int = 1) -> None:
        self.spec = parse_tunnel_start(spec, "strategy.args.tunnel_start")
        if rule not in TUNNEL_RULE_NAMES:
            raise ConfigError(f"strategy.args.tunnel_rule: unknown '{rule}'; valid: {', '.join(TUNNEL_RULE_NAMES)}")
        self.threshold, self.probe_epochs, self.rule, self.rank_samples = threshold, probe_epochs, rule, rank_samples
        self.value: int | None = self.spec if isinstance(self.spec, int) else None
        self.minimum = minimum  # 1 for a tunnel start; 0 where layer 0 means the input (a replay point)

    def resolve(self, strategy: Any) -> int:
        """k for this run; with ``auto``, computed once (call it after the first task has been learned)."""
        if self.value is None:
            self.value = self._from_probes(strategy)
        return check_tunnel_start(self.value, len(strategy.model.body), "strategy.args.tunnel_start", self.minimum)

    def _from_probes(self, strategy: Any) -> int:
        data = run_data(strategy)
        if data is None:
            raise ConfigError("strategy.args.tunnel_start: 'auto' needs cltunnel's data path; give a layer number")
        task = data.scenario.tasks[strategy.experience.current_experience]
        was_training = strategy.model.training
        with torch.enable_grad():  # plugins may call this from inside a no_grad hook
            acc = train_probes(strategy.model, data, task, cfg=ProbeConfig(epochs=self.probe_epochs), progress=False)
        ranks = layer_ranks(strategy.model, data, task, task.train_idx[: self.rank_samples])[0] \
            if self.rule == "rank" else None
        strategy.model.train(was_training)
        k = tunnel_start(acc, self.threshold, self.rule, ranks)
        log.info("tunnel start after task %d by %s: layer %d (probe acc %s)", task.id,
                 describe_rule(self.rule, self.threshold), k, {layer: round(100 * a, 1) for layer, a in acc.items()})
        return k


# --------------------------------------------------------------------------------------------- EWC
class LayerwiseEWCPlugin(EWCPlugin):
    """EWC (Kirkpatrick et al. 2017) whose penalty covers only the chosen part of the body.

    Parameters outside it have no saved value and no importance, which Avalanche's penalty skips ("new
    parameters do not count"), so they move freely. Fisher importances are computed on the device data
    (unaugmented training rows) when cltunnel drives the strategy, else by Avalanche's own loader.
    """

    def __init__(self, ewc_lambda: float, penalise: str = "extractor", tunnel_start: int | str = "auto",
                 mode: str = "separate", decay_factor: float | None = None, **probe: Any) -> None:
        super().__init__(ewc_lambda, mode, decay_factor)
        check_part(penalise)  # at construction, before any task is learned
        self.penalise = penalise
        self.tunnel = TunnelStart(tunnel_start, **probe)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.clock.train_exp_counter
        k = self.tunnel.resolve(strategy) if self.penalise != "all" else 0  # 'all' needs no tunnel start
        keep = parameter_names(strategy.model, self.penalise, k)
        importances = {n: v for n, v in self._importances(strategy).items() if n in keep}
        self.update_importances(importances, t)
        self.saved_params[t] = {n: ParamData(n, p.shape, init_tensor=p.detach().clone(), device=p.device)
                                for n, p in strategy.model.named_parameters() if n in keep}
        if t > 0 and not self.keep_importance_data:
            del self.saved_params[t - 1]

    def _importances(self, strategy: Any) -> dict[str, ParamData]:
        data = run_data(strategy)
        if data is None:
            return self.compute_importances(strategy.model, strategy._criterion, strategy.optimizer,
                                            strategy.experience.dataset, strategy.device, strategy.train_mb_size)
        return fisher_diagonal(strategy.model, strategy._criterion,
                               data.batches(data.scenario.tasks[strategy.experience.current_experience],
                                            "eval_train", strategy.train_mb_size))

    def penalty_terms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each penalised parameter's term of the current penalty (before ``ewc_lambda``): for inspection."""
        terms: dict[str, torch.Tensor] = {}
        for exp, saved in self.saved_params.items():
            for name, p in model.named_parameters():
                if name in saved:
                    term = (self.importances[exp][name].data * (p.detach() - saved[name].data).pow(2)).sum()
                    terms[name] = terms.get(name, 0) + term
        return terms


def fisher_diagonal(model: nn.Module, criterion: nn.Module, batches: Any) -> dict[str, ParamData]:
    """Mean squared gradient per parameter over the batches (the empirical Fisher diagonal, as Avalanche)."""
    was_training = model.training
    model.eval()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, y, t in batches:
        model.zero_grad(set_to_none=True)
        criterion(model(x, int(t[0])), y).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                sums[n] += p.grad.detach().pow(2)
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: ParamData(n, s.shape, init_tensor=s / max(count, 1), device=s.device) for n, s in sums.items()}


class LayerwiseEWC(Naive):
    """Fine-tuning plus :class:`LayerwiseEWCPlugin` (default: the extractor alone is penalised)."""

    def __init__(self, *, ewc_lambda: float = 5.0, penalise: str = "extractor", tunnel_start: int | str = "auto",
                 tunnel_threshold: float | None = None, tunnel_rule: str = "last", probe_epochs: int = 10,
                 plugins: list | None = None,
                 **kwargs: Any) -> None:
        plugin = LayerwiseEWCPlugin(ewc_lambda, penalise, tunnel_start, threshold=tunnel_threshold, rule=tunnel_rule,
                                    probe_epochs=probe_epochs)
        super().__init__(plugins=[plugin, *(plugins or [])], **kwargs)


# ------------------------------------------------------------------------------------------ freeze
class FreezeLayersPlugin(SupervisedPlugin):
    """From the second task on, the tunnel's (or the extractor's) weights get no gradient and its BatchNorm
    statistics stay put.

    Frozen parameters have ``grad is None``, so SGD skips them entirely (no momentum, no weight decay): they
    stay bitwise as after task 1.
    """

    def __init__(self, tunnel_start: int | str = "auto", part: str = "tunnel", **probe: Any) -> None:
        super().__init__()
        if part not in ("tunnel", "extractor"):
            raise ConfigError(f"strategy.args.freeze: {part!r} must be tunnel or extractor")
        self.part = part
        self.tunnel = TunnelStart(tunnel_start, **probe)

    def frozen(self, model: LayeredModel, k: int) -> list[nn.Module]:
        return tunnel_layers(model, k) if self.part == "tunnel" else extractor_layers(model, k)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.tunnel.resolve(strategy)  # fixes an automatic start on the first task's model

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience > 0:
            for layer in self.frozen(strategy.model, self.tunnel.resolve(strategy)):
                layer.requires_grad_(False)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience > 0:
            for layer in self.frozen(strategy.model, self.tunnel.resolve(strategy)):
                layer.eval()


class FreezeTunnel(Naive):
    """Fine-tuning with the tunnel frozen after task 1."""

    def __init__(self, *, tunnel_start: int | str = "auto", tunnel_threshold: float | None = None,
                 tunnel_rule: str = "last", probe_epochs: int = 10,
                 plugins: list | None = None, **kwargs: Any) -> None:
        freeze = FreezeLayersPlugin(tunnel_start, "tunnel", threshold=tunnel_threshold, rule=tunnel_rule,
                                    probe_epochs=probe_epochs)
        super().__init__(plugins=[freeze, *(plugins or [])], **kwargs)


# ------------------------------------------------------------------------------------------- replay
class LayerReplayPlugin(SupervisedPlugin):
    """Replay at the output of body layer ``layer``: 0 = images (experience replay), the tunnel start =
    extractor outputs (latent replay, after Pellegrini et al. 2020, without freezing the extractor).

    After each task, ``mem_size`` slots are shared equally among the tasks seen; a task's slots hold random
    training rows (images are re-augmented like the training data when replayed; deeper layers store
    float16 features of the unaugmented rows, computed once). While a later task trains, every step adds
    ``alpha`` × the cross-entropy of a replayed batch passed through the layers above and each row's own
    task head. Stored features do not follow the extractor as it keeps learning: if forgetting sits in the
    extractor (the thesis's finding), feature replay should help little.
    """

    def __init__(self, mem_size: int = 500, layer: int | str = 0, alpha: float = 1.0,
                 batch_size: int | None = None, **probe: Any) -> None:
        super().__init__()
        self.mem_size, self.alpha, self.batch_size = mem_size, alpha, batch_size
        self.tunnel = TunnelStart(layer, minimum=0, **probe)
        self.buffer: dict[int, dict[str, Any]] = {}  # task id -> rows, labels, head (and features for layer > 0)
        self.generator: torch.Generator | None = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        data = run_data(strategy)
        if data is None:
            raise ConfigError("strategy: this replay runs on cltunnel's data path (cltunnel run)")
        with torch.no_grad():
            self._store(strategy, data, self.tunnel.resolve(strategy))

    def _store(self, strategy: Any, data: Any, k: int) -> None:
        task = data.scenario.tasks[strategy.experience.current_experience]
        quota = self.mem_size // (len(self.buffer) + 1)
        self.buffer = {t: {key: v[:quota] if torch.is_tensor(v) else v for key, v in slot.items()}
                       for t, slot in self.buffer.items()}
        gen = torch.Generator(device="cpu").manual_seed(strategy.run_context.seed * 7919 + task.id)
        rows = task.train_idx[torch.randperm(len(task.train_idx), generator=gen)[:quota]].to(data.device)
        slot = {"rows": rows, "labels": data.label_maps[task.id][data.y_train[rows]], "head": task.head}
        if k > 0:
            was_training = strategy.model.training
            strategy.model.eval()
            slot["features"] = torch.cat([strategy.model.features(x, upto=k).half()
                                          for x, _, _ in data.batches(task, "eval_train", 500, rows=rows)])
            strategy.model.train(was_training)
        self.buffer[task.id] = slot

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not self.buffer or strategy.experience.current_experience == 0:
            return
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(strategy.run_context.seed)
        strategy.loss = strategy.loss + self.alpha * self.replay_loss(strategy)

    def replay_loss(self, strategy: Any) -> torch.Tensor:
        """Mean cross-entropy of one batch drawn uniformly from the buffer."""
        model: LayeredModel = strategy.model
        data = strategy.run_context.data
        k = self.tunnel.resolve(strategy)
        slots = list(self.buffer.values())
        sizes = torch.tensor([len(slot["rows"]) for slot in slots])
        n = self.batch_size or strategy.train_mb_size
        pick = torch.randint(int(sizes.sum()), (n,), generator=self.generator)
        owner = torch.bucketize(pick, sizes.cumsum(0), right=True)
        offsets = sizes.cumsum(0) - sizes
        loss = torch.zeros((), device=strategy.device)
        for i, slot in enumerate(slots):
            idx = (pick[owner == i] - offsets[i]).to(data.device)
            if len(idx) == 0:
                continue
            if k == 0:
                h = data.x_train[slot["rows"][idx]]
                h = data.normalise(data.augment(h, strategy.dataloader.generator) if data.augment else h)
            else:
                h = slot["features"][idx].float()
            for layer in tunnel_layers(model, k):
                h = layer(h)
            logits = model.head_for(slot["head"])(h).float()
            loss = loss + nn.functional.cross_entropy(logits, slot["labels"][idx], reduction="sum")
        return loss / n


class Replay(Naive):
    """Experience replay on the device: a class-balanced-by-task buffer of images, one replayed batch per step."""

    def __init__(self, *, mem_size: int = 500, alpha: float = 1.0, plugins: list | None = None, **kwargs: Any) -> None:
        super().__init__(plugins=[LayerReplayPlugin(mem_size, 0, alpha), *(plugins or [])], **kwargs)


class FeatureReplay(Naive):
    """Fine-tuning plus replay of stored extractor outputs through the tunnel and the old tasks' heads;
    ``freeze_extractor: true`` keeps the stored features exact (Pellegrini et al.'s latent replay)."""

    def __init__(self, *, mem_size: int = 500, tunnel_start: int | str = "auto", alpha: float = 1.0,
                 freeze_extractor: bool = False, tunnel_threshold: float | None = None, tunnel_rule: str = "last",
                 probe_epochs: int = 10, plugins: list | None = None, **kwargs: Any) -> None:
        replay = LayerReplayPlugin(mem_size, tunnel_start, alpha, threshold=tunnel_threshold, rule=tunnel_rule,
                                   probe_epochs=probe_epochs)
        own = [replay, FreezeLayersPlugin(tunnel_start, "extractor")] if freeze_extractor else [replay]
        if freeze_extractor:
            own[1].tunnel = replay.tunnel  # one tunnel start for both, found once
        super().__init__(plugins=[*own, *(plugins or [])], **kwargs)
