"""FFA-LoRA (Sun et al. 2024): federated LoRA with every A matrix frozen at one random
initialisation shared by all users; only the B matrices train and are averaged (with A fixed and
common, averaging B averages the updates B A exactly). The CoMiGS paper's appendix C.2: "the
LoRA A matrices are fixed at initialization".

Model: one MLP LoRA per user with the rank of all of CoMiGS-1G1S's experts together
(moe.n_experts * lora.rank = 16: the "2x LoRA" parameter match of the baselines without routing,
and the reference's architecture), no router, and the attention LoRA. The A matrices travel once,
in round 0 (group ``frozen_init``), and the B matrices every round (group ``generalists``).
``method_options.reference_quirks=true`` runs what the reference code runs instead: A trainable
and averaged with B, plus the tail-norm regulariser (lambda 0.01, gamma 0.99) on the last rank
slot (baselines.md section 5.7, [DIFF]).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from comigs_dist.methods.base import Method, is_adapter, register_method, share_experts
from comigs_dist.methods.lowrank import compute_tail_norm, compute_tail_start, expert_lora_pairs
from comigs_dist.options import opt

QUIRK_LAMBDA, QUIRK_GAMMA = 0.01, 0.99  # the reference scripts' --is_pruning settings


@dataclass
class FFALoRAOptions:
    reference_quirks: bool = opt(False, "Reproduce the reference code: A trainable and averaged, plus the "
                                 "tail-norm regulariser (lambda_p 0.01, gamma 0.99).")


@register_method("ffa_lora")
class FFALoRA(Method):
    description = "FFA-LoRA: one LoRA of 2x rank, every A frozen at a shared init, only B trained and averaged"
    paper_row = "Table 4 group i: FFA-LoRA"
    Options = FFALoRAOptions
    accepts_comm_groups = False  # A and B travel in groups of their own
    router = "none"

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_experts=1, n_generalists=1, top_k=1, routed=False,
                       rank=spec.n_experts * spec.rank)  # the configured experts' ranks together

    def prepare_user(self, user) -> None:
        user.method_state = expert_lora_pairs(user.model)

    def trains_in(self, phase, tag) -> bool:
        if phase != "expert":
            return False
        if self.options.reference_quirks:
            return is_adapter(tag)
        return is_adapter(tag) and tag.matrix != "A"

    def is_shared(self, tag) -> bool:
        return share_experts(tag)

    def sharing_groups(self, n_users):
        return {"generalists": list(range(n_users)), "frozen_init": list(range(n_users))}

    def group_of(self, tag, user_idx) -> str:
        if tag.matrix == "A" and not self.options.reference_quirks:
            return "frozen_init"  # broadcast once (round 0), never averaged: it never changes
        return "generalists"

    def wire(self, shared: dict[str, int], round_idx: int | None = None) -> dict:
        """The B matrices; the frozen A matrices travel at the common start only (not counted)."""
        return {g: v for g, v in super().wire(shared, round_idx).items() if g != "frozen_init"}

    def extra_loss(self, user):
        if not self.options.reference_quirks:
            return None
        terms = []
        for p in user.method_state:
            rank = p.A.shape[0]
            k = compute_tail_start(rank, QUIRK_GAMMA)
            if k < rank:
                terms.append(compute_tail_norm(p.A, p.B, k, rank))
        return QUIRK_LAMBDA * torch.stack(terms).sum() if terms else None

    def sync(self, ctx) -> None:
        if ctx.round_idx == 0:
            super().sync(ctx)  # one common start: the A matrices (frozen_init) and the B matrices
            return
        ctx.comm.mean("generalists", ctx.tensors("generalists"), skip=ctx.skip)
