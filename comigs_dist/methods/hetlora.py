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
                                         compute_pruned_rank, compute_tail_norm, compute_tail_start,
                                         compute_update_norm,
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


@dataclass
class HetLoRAState:
    """What HetLoRA keeps for one user: its MLP LoRA pairs, their allocated and current ranks, the
    largest rank of any user, and the global LoRA (identical on every user)."""
    pairs: list
    alloc_rank: int
    max_rank: int
    ranks: dict
    global_: dict


@register_method("hetlora")
class HetLoRA(HeteroRankMethod):
    description = "HetLoRA: one MLP LoRA of per-user rank, zero-padded norm-weighted average, truncation, self-pruning"
    paper_row = "Table 2: HetLoRA (active / full)"
    Options = HetLoRAOptions

    own_collectives = ("sum",)  # the weighted zero-padded factors, summed over users

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        o = cls(cfg).options
        errors = super().config_errors(cfg)
        if not 0 < o.gamma <= 1:
            errors.append(f"method_options.gamma ({o.gamma}) must be in (0, 1] (paper: 0.99)")
        if o.lambda_p < 0:
            errors.append(f"method_options.lambda_p ({o.lambda_p}) must be >= 0")
        return errors

    def prepare_user(self, user) -> None:
        cfg = self.cfg
        pairs = expert_lora_pairs(user.model)
        alloc = user.model.spec.rank
        max_rank = self.max_matched_rank()
        user.method_state = HetLoRAState(pairs, alloc, max_rank, {p.key: alloc for p in pairs},
                                         global_init(cfg, pairs, max_rank))
        self._distribute(user.method_state)

    # -- local training ------------------------------------------------------------------------
    def extra_loss(self, user):
        o, st = self.options, user.method_state
        if o.lambda_p == 0:
            return None
        terms = []
        for p in st.pairs:
            rank = st.alloc_rank if o.reference_quirks else st.ranks[p.key]
            k = compute_tail_start(rank, o.gamma)
            if k < rank:
                terms.append(compute_tail_norm(p.A, p.B, k, rank))
        return o.lambda_p * torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def after_expert_step(self, user) -> None:
        st = user.method_state
        for p in st.pairs:  # pruned slots stay zero (Adam moments would move them)
            r = st.ranks[p.key]
            if r < st.alloc_rank:
                p.A[r:] = 0
                p.B[:, r:] = 0

    # -- aggregation -----------------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, ctx) -> None:
        super().sync(ctx)  # attention LoRA: one common start, then the uniform mean over users
        if ctx.round_idx == 0:
            return  # the MLP LoRA starts from the global initialisation (prepare_user)
        o = self.options
        # 1. self-pruning against the global model this round started from (a user sitting the
        # round out, guard.nan=skip, has non-finite factors: weight 0, zeros sent)
        for u in ctx.users:
            st = u.method_state
            for p in st.pairs if u.contributing else []:
                A_g, B_g = st.global_[p.key]
                r = st.ranks[p.key]
                st.ranks[p.key] = compute_pruned_rank(p.A[:r], p.B[:, :r], A_g[:r], B_g[:, :r], r, o.gamma)
            self.after_expert_step(u)
        # 2. weights from norms summed over users (one scalar all_reduce)
        norms = {}
        for u in ctx.users:
            pairs = u.method_state.pairs
            if not u.contributing:
                norms[u.user_idx] = [0.0] * (2 * len(pairs))
            elif o.reference_quirks:
                norms[u.user_idx] = [float(torch.linalg.vector_norm(m)) for p in pairs for m in (p.A, p.B)]
            else:
                norms[u.user_idx] = [compute_update_norm(p.A, p.B) for p in pairs for _ in (0, 1)]
        totals = ctx.comm.sum_scalars("hetero_rank", norms)
        n_users = len(ctx.comm.members("hetero_rank"))
        # 3. weighted zero-padded factors, summed over users (one all_reduce)
        buffers = {}
        for u in ctx.users:
            st, mine = u.method_state, norms[u.user_idx]
            weights = [compute_norm_weights([n, t - n])[0] if t > 0 else 1.0 / n_users for n, t in zip(mine, totals)]
            out = []
            for i, p in enumerate(st.pairs):
                a, b = pad_rank(p.A.detach().float(), p.B.detach().float(), st.max_rank)
                if not u.contributing:
                    a, b = torch.zeros_like(a), torch.zeros_like(b)
                out += [weights[2 * i] * a, weights[2 * i + 1] * b]
            buffers[u.user_idx] = out
        ctx.comm.sum("hetero_rank", buffers)
        # 4. truncation to each user's current rank
        for u in ctx.users:
            st, out = u.method_state, buffers[u.user_idx]
            st.global_ = {p.key: (out[2 * i], out[2 * i + 1]) for i, p in enumerate(st.pairs)}
            self._distribute(st)

    def state_dict(self, user) -> dict:
        st = user.method_state
        return {"pairs": [{"key": list(p.key), "rank": st.ranks[p.key], "A": st.global_[p.key][0].cpu(),
                           "B": st.global_[p.key][1].cpu()} for p in st.pairs]}

    def load_state_dict(self, user, state: dict) -> None:
        st = user.method_state
        by_key = {tuple(e["key"]): e for e in state["pairs"]}
        for p in st.pairs:
            e = by_key[p.key]
            st.ranks[p.key] = int(e["rank"])
            st.global_[p.key] = (e["A"].to(p.A.device), e["B"].to(p.B.device))

    @staticmethod
    @torch.no_grad()
    def _distribute(st: HetLoRAState) -> None:
        for p in st.pairs:
            A_g, B_g = st.global_[p.key]
            r = st.ranks[p.key]
            p.A.zero_()
            p.B.zero_()
            p.A[:r] = A_g[:r].to(p.A.dtype)
            p.B[:, :r] = B_g[:, :r].to(p.B.dtype)
