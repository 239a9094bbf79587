"""HetLoRA (Cho et al. 2023): one MLP LoRA per user with a rank of its own, aggregated by
zero-padding and distributed by truncation, with rank self-pruning (paper appendix C.3).

Every user holds one MLP expert of rank r_i (``method_options.match``) and the attention LoRA
(rank ``lora.attn_rank``, averaged with uniform weights as in the reference). Every user keeps a
copy of the global MLP LoRA (rank r_max = max_i r_i), identical on all users; it starts as one
initialisation drawn from the run's seed (B = 0), of which each user takes the top-left block.
At the start of every round (Algorithm 1 order), for every MLP LoRA pair (A: r x in, B: out x r):

1. self-pruning: with the user's current rank r' and K = floor(gamma r'), the tail
   ||A[K:r']||_F ||B[:, K:r']||_F is compared with the same slots of the global model the round
   started from; a smaller tail drops the slots K.. (r' <- K); dropped slots stay zero (re-zeroed
   after every optimiser step);
2. aggregation: omega_i = S_i / sum_j S_j with S_i = ||B_i A_i||_F (the HetLoRA paper; the same
   omega_i for A and B), then A_g = sum_i omega_i pad(A_i), B_g = sum_i omega_i pad(B_i): one
   scalar all_reduce for the norms and one all_reduce of the weighted padded factors;
3. distribution: the user takes A_g[:r'] and B_g[:, :r'] (truncation), zeros beyond r'.

Local training adds lambda_p * sum ||A[K:r']||_F ||B[:, K:r']||_F over every pair (the tail
regulariser that drives the pruning). ``reference_quirks`` reproduces the reference code instead:
A and B weighted by their own norms ||A_i||_F and ||B_i||_F, and the regulariser on the allocated
rank's last slot, which stays put after pruning (baselines.md section 5.9, [DIFF]).
The MLP tensors have different shapes on different users, so they stay out of the standard
``generalists`` group (its shape handshake) and travel in the ``hetero_rank`` group, padded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comigs_dist.methods.base import register_method
from comigs_dist.methods.lowrank import (HeteroRankMethod, RankOptions, compute_norm_weights,
                                         compute_pruned_rank, compute_tail_norm, compute_tail_start, compute_update_norm,
                                         expert_lora_pairs, pad_rank)
from comigs_dist.options import opt
from comigs_dist.seeds import EVERY_USER, derive_seed


@dataclass
class HetLoRAOptions(RankOptions):
    lambda_p: float = opt(5e-3, "Weight of the tail regulariser (paper appendix C.3 sweeps 5e-2, 5e-3, 5e-4).")
    gamma: float = opt(0.99, "Pruning strength gamma: the tail starts at floor(gamma * r) (paper: 0.99).")
    reference_quirks: bool = opt(False, "Reproduce the reference code: per-matrix norm weights and a "
                                 "regulariser fixed on the allocated rank (baselines.md 5.9).")


def global_init(cfg, pairs, rank: int) -> dict:
    """The global LoRA every user starts from: A Kaiming-uniform (U(-1/sqrt(in), 1/sqrt(in)), as a
    fresh LoRA) from the run's common ``global_init`` stream, so every user draws the same; B = 0."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, EVERY_USER, "global_init"))
    out = {}
    for pair in pairs:  # a fixed order, the same on every user
        fan_in = pair.A.shape[1]
        bound = 1.0 / fan_in ** 0.5
        A = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound
        out[pair.key] = (A.to(pair.A.device), torch.zeros(pair.B.shape[0], rank, device=pair.B.device))
    return out


@register_method("hetlora")
class HetLoRA(HeteroRankMethod):
    description = "HetLoRA: one MLP LoRA of per-user rank, zero-padded norm-weighted average, truncation, self-pruning"
    paper_row = "Table 2: HetLoRA (active / full)"
    Options = HetLoRAOptions

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        o = cls(cfg).options
        errors = super().config_errors(cfg)
        if not 0 < o.gamma <= 1:
            errors.append(f"method_options.gamma ({o.gamma}) must be in (0, 1] (paper: 0.99)")
        if o.lambda_p < 0:
            errors.append(f"method_options.lambda_p ({o.lambda_p}) must be >= 0")
        return errors

    def prepare_model(self, model, user_idx) -> None:
        cfg = self.cfg
        self.pairs = expert_lora_pairs(model)
        self.alloc_rank = model.spec.rank
        self.max_rank = self.max_matched_rank()
        self.ranks = {p.key: self.alloc_rank for p in self.pairs}
        self.global_ = global_init(cfg, self.pairs, self.max_rank)
        self._distribute()

    # -- local training ------------------------------------------------------------------------
    def extra_loss(self, model):
        o = self.options
        if o.lambda_p == 0:
            return None
        terms = []
        for p in self.pairs:
            rank = self.alloc_rank if o.reference_quirks else self.ranks[p.key]
            k = compute_tail_start(rank, o.gamma)
            if k < rank:
                terms.append(compute_tail_norm(p.A, p.B, k, rank))
        return o.lambda_p * torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def after_expert_step(self, model) -> None:
        for p in self.pairs:  # pruned slots stay zero (Adam moments would move them)
            r = self.ranks[p.key]
            if r < self.alloc_rank:
                p.A[r:] = 0
                p.B[:, r:] = 0

    # -- aggregation -----------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, ctx) -> None:
        super().aggregate(ctx)  # attention LoRA: uniform mean over users
        o = self.options
        sends = ctx.comm.contributing  # False: non-finite factors (guard.nan=skip), weight 0, zeros sent
        # 1. self-pruning against the global model this round started from
        for p in self.pairs if sends else []:
            A_g, B_g = self.global_[p.key]
            r = self.ranks[p.key]
            new = compute_pruned_rank(p.A[:r], p.B[:, :r], A_g[:r], B_g[:, :r], r, o.gamma)
            self.ranks[p.key] = new
        self.after_expert_step(ctx.model)
        # 2. weights from norms summed over users (one scalar all_reduce)
        if not sends:
            norms = [0.0] * (2 * len(self.pairs))
        elif o.reference_quirks:
            norms = [float(torch.linalg.vector_norm(m)) for p in self.pairs for m in (p.A, p.B)]
        else:
            norms = [compute_update_norm(p.A, p.B) for p in self.pairs for _ in (0, 1)]
        totals = ctx.comm.sum_scalars("hetero_rank", norms)
        weights = [compute_norm_weights([n, t - n])[0] if t > 0 else 1.0 / ctx.n_users
                   for n, t in zip(norms, totals)]
        # 3. weighted zero-padded factors, summed over users (one all_reduce)
        buffers = []
        for i, p in enumerate(self.pairs):
            a, b = pad_rank(p.A.detach().float(), p.B.detach().float(), self.max_rank)
            if not sends:
                a, b = torch.zeros_like(a), torch.zeros_like(b)
            buffers += [weights[2 * i] * a, weights[2 * i + 1] * b]
        ctx.comm.sum("hetero_rank", buffers)
        self.global_ = {p.key: (buffers[2 * i], buffers[2 * i + 1]) for i, p in enumerate(self.pairs)}
        # 4. truncation to each user's current rank
        self._distribute()

    def state_dict(self) -> dict:
        return {"pairs": [{"key": list(p.key), "rank": self.ranks[p.key], "A": self.global_[p.key][0].cpu(),
                           "B": self.global_[p.key][1].cpu()} for p in self.pairs]}

    def load_state_dict(self, state: dict) -> None:
        by_key = {tuple(e["key"]): e for e in state["pairs"]}
        for p in self.pairs:
            e = by_key[p.key]
            self.ranks[p.key] = int(e["rank"])
            self.global_[p.key] = (e["A"].to(p.A.device), e["B"].to(p.B.device))

    @torch.no_grad()
    def _distribute(self) -> None:
        for p in self.pairs:
            A_g, B_g = self.global_[p.key]
            r = self.ranks[p.key]
            p.A.zero_()
            p.B.zero_()
            p.A[:r] = A_g[:r].to(p.A.dtype)
            p.B[:, :r] = B_g[:, :r].to(p.B.dtype)

