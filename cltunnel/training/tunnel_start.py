"""The tunnel start a tunnel-aware plugin acts at: a fixed layer, or one a rule reads from linear probes of the
model after the first task, found once per run and shared by the plugins of one strategy."""
from __future__ import annotations

import logging
from typing import Any

import torch

from cltunnel.config import TUNNEL_RULE_NAMES, AnalysesConfig, ConfigError, parse_tunnel_start
from cltunnel.measures.probes import ProbeConfig, layer_ranks, train_probes
from cltunnel.measures.tunnel import check_tunnel_start, describe_rule, tunnel_start
from cltunnel.training.fast_data import run_data

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
