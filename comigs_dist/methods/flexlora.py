"""FlexLoRA (Bai et al. 2024): one MLP LoRA per user with a rank of its own; the server rebuilds
every user's full update, averages them with data-size weights and hands each user the best
approximation of its own rank (SVD).

Every user holds one MLP expert of rank r_i (``method_options.match``) and the attention LoRA
(averaged with uniform weights, as in the reference). At the start of every round (Algorithm 1
order), for every MLP LoRA pair:

    dW = sum_i (n_i / sum_j n_j) s_i B_i A_i     (n_i: the user's training tokens, s_i its LoRA scale)
    dW = U S V^T;   A_i = V^T[:r_i],  B_i = (U S)[:, :r_i] / s_i   (so s_i B_i A_i = dW truncated to r_i)

This follows the paper and the official code, with the model's own scale s_i = alpha / sqrt(r_i)
(the reference uses alpha / r_i, keeps only the last user's update and truncates a r_max SVD with
the r_max scale: baselines.md section 5.10 (a)-(c), not reproduced).
Communication: the users exchange their LoRA factors, zero-padded to r_max and pre-multiplied by
n_i / sum n and s_i (one all_gather; what FlexLoRA's clients upload), and every user could then
form dW = [w_1 s_1 B_1 ...] [A_1; ...]. The SVDs are spread over the users (pair p on member
p mod N) and their rank-r_max factors summed into one buffer (one all_reduce, zeros elsewhere),
so every user receives bit-identical factors without anyone running all the SVDs. The MLP tensors
have different shapes on different users, so they stay out of the ``generalists`` group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comigs_dist.dist import unflatten_into
from comigs_dist.methods.base import register_method
from comigs_dist.methods.lowrank import (HeteroRankMethod, RankOptions, compute_svd_factors,
                                         compute_user_factors, expert_lora_pairs, pad_rank)
from comigs_dist.model.lora import rs_scale


@dataclass
class FlexLoRAOptions(RankOptions):
    pass


def compute_flexlora_update(Bs_scaled: list[torch.Tensor], As: list[torch.Tensor]) -> torch.Tensor:
    """dW = sum_i Bw_i A_i, where Bw_i = (n_i / sum n) s_i B_i (each user's own weight and scale)."""
    delta = None
    for b, a in zip(Bs_scaled, As):
        term = b.float() @ a.float()
        delta = term if delta is None else delta + term
    return delta


@dataclass
class FlexLoRAState:
    """What FlexLoRA keeps for one user: its MLP LoRA pairs, its rank and scale, and the largest
    rank of any user."""
    pairs: list
    rank: int
    scale: float
    max_rank: int


@register_method("flexlora")
class FlexLoRA(HeteroRankMethod):
    description = "FlexLoRA: one MLP LoRA of per-user rank, data-size weighted full updates, SVD back to each rank"
    paper_row = "Table 2: FlexLoRA (active / full)"
    Options = FlexLoRAOptions

    own_collectives = ("all2all", "sum")  # every user's padded factors gathered; the SVD factors summed

    def prepare_user(self, user) -> None:
        cfg, model = self.cfg, user.model
        pairs = expert_lora_pairs(model)
        rank = model.spec.rank
        max_rank = self.max_matched_rank()
        user.method_state = FlexLoRAState(pairs, rank, rs_scale(model.spec.alpha, rank), max_rank)
        # every user starts from the same LoRA: the top-left block of one global initialisation
        from comigs_dist.methods.hetlora import global_init
        start = global_init(cfg, pairs, max_rank)
        with torch.no_grad():
            for p in pairs:
                p.A.copy_(start[p.key][0][:rank])
                p.B.zero_()

    @torch.no_grad()
    def sync(self, ctx) -> None:
        super().sync(ctx)  # attention LoRA: one common start, then the uniform mean over users
        if ctx.round_idx == 0:
            return  # the MLP LoRA starts from the global initialisation (prepare_user)
        comm = ctx.comm
        # a user sitting the round out (guard.nan=skip) weighs 0 and sends zeros
        n_mine = {u.user_idx: [float(u.n_train_tokens) if u.contributing else 0.0] for u in ctx.users}
        (total,) = comm.sum_scalars("hetero_rank", n_mine)
        # each user's factors, scaled and zero-padded to r_max, gathered by everyone
        mine = {}
        for u in ctx.users:
            st = u.method_state
            weight = n_mine[u.user_idx][0] / total
            out = []
            for p in st.pairs:
                a, b = pad_rank(p.A.detach().float(), p.B.detach().float(), st.max_rank)
                if not u.contributing:
                    a, b = torch.zeros_like(a), torch.zeros_like(b)
                out += [weight * st.scale * b, a]
            mine[u.user_idx] = out
        gathered = comm.gather("hetero_rank", mine)
        members = comm.members("hetero_rank")
        template = next(iter(mine.values()))
        theirs = []
        for flat in gathered:
            parts = [torch.empty_like(t) for t in template]
            unflatten_into(flat, parts)
            theirs.append(parts)
        # SVD of pair i on member i mod N (every user of a rank computes its members' share); the
        # factors reach everyone through one sum
        factors = {}
        for u in ctx.users:
            st = u.method_state
            me = members.index(u.user_idx)
            out = []
            for i, p in enumerate(st.pairs):
                US = torch.zeros(p.B.shape[0], st.max_rank, device=p.B.device)
                Vt = torch.zeros(st.max_rank, p.A.shape[1], device=p.A.device)
                if i % len(members) == me:
                    delta = compute_flexlora_update([t[2 * i] for t in theirs], [t[2 * i + 1] for t in theirs])
                    us, vt = compute_svd_factors(delta, st.max_rank)
                    US[:, : us.shape[1]] = us
                    Vt[: vt.shape[0]] = vt
                out += [US, Vt]
            factors[u.user_idx] = out
        comm.sum("hetero_rank", factors)
        for u in ctx.users:
            st, out = u.method_state, factors[u.user_idx]
            for i, p in enumerate(st.pairs):
                A, B = compute_user_factors(out[2 * i], out[2 * i + 1], st.rank, st.scale)
                p.A.copy_(A)
                p.B.copy_(B)
