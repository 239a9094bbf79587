"""FedProx (Li et al. 2020): FedAvg whose local steps are pulled toward the last aggregate.

Each user's expert-phase loss gains (mu / 2) * ||w - w_t||^2 over its shared parameters, w_t
being their values right after the round's sync (the aggregate the user downloaded), which keeps
local models from drifting apart on heterogeneous data. The model, what is shared and the
aggregation are FedAvg's (2x LoRA, uniform mix, every LoRA averaged); ``mu = 0`` is FedAvg bit for
bit. One file: ``sync`` keeps the anchor, ``extra_loss`` adds the term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comigs_dist.options import opt
from comigs_dist.methods.base import register_method
from comigs_dist.methods.fedavg import FedAvg


@dataclass
class FedProxOptions:
    mu: float = opt(0.01, "Weight mu of the proximal term (mu/2) ||w - w_aggregate||^2 on the shared "
                    "parameters (Li et al. 2020 sweep 0.001 to 1); 0 = FedAvg.")


@register_method("fedprox")
class FedProx(FedAvg):
    description = "FedProx: FedAvg (2x LoRA, all LoRA averaged) with a proximal term to the last aggregate"
    paper_row = "not in the paper: a FedAvg variant (Li et al. 2020)"
    Options = FedProxOptions

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        mu = cls(cfg).options.mu
        return [] if mu >= 0 else [f"method_options.mu ({mu}) must be >= 0 (0 = FedAvg)"]

    @torch.no_grad()
    def sync(self, ctx) -> None:
        super().sync(ctx)
        for u in ctx.users:  # the aggregate each user starts the round from: its anchor
            u.method_state = [(p, p.detach().clone()) for params in u.shared.values() for _, p in params]

    def extra_loss(self, user):
        mu = self.options.mu
        if mu == 0 or not user.method_state:
            return None
        return 0.5 * mu * sum((p - anchor).pow(2).sum() for p, anchor in user.method_state)
