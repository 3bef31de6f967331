"""EWC whose penalty covers one part of the body: the extractor, the tunnel, or all of it (the controls)."""
from __future__ import annotations

from typing import Any

import torch
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData
from torch import nn

from cltunnel.models.surgery import check_part, parameter_names
from cltunnel.training.fast_data import run_data
from cltunnel.training.tunnel_start import TunnelStart


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
