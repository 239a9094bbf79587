"""Pieces shared by the single-LoRA baselines (FFA-LoRA, HetLoRA, FlexLoRA): the rank-matching
rules, the MLP LoRA pairs of a model, and the pure low-rank computations (tail norms, pruning,
zero-padding, aggregation weights, SVD truncation), and ``HeteroRankMethod``, the unregistered
base of the two methods whose users hold one MLP LoRA of a rank of their own.

Parameter matching (paper section 4.3.1 and Table 2's caption): a CoMiGS user with n_i rank-r
experts and top-k routing trains n_i * r rank slots per projection and uses k * r per token. A
baseline with one LoRA per projection matches the *full* count with rank n_i * r (e.g. (4,2,2,2)
experts -> ranks (32,16,16,16)) and the *active* count with rank k * r (16 for every user).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from comigs_dist.methods.base import Method
from comigs_dist.options import opt

if TYPE_CHECKING:
    from comigs_dist.config.users import UserSpec

MATCH_HELP = ("How each user's LoRA rank is chosen (Table 2): 'active' = top_k * lora.rank (the "
              "parameters a token uses in the matching CoMiGS model), 'full' = moe.n_experts * lora.rank "
              "(all its expert parameters), 'none' = lora.rank as given (an int or a per-user list).")
Match = Literal["active", "full", "none"]


def matched_rank(user: UserSpec, match: str) -> int:
    """The LoRA rank of one user (its configured values) under a matching rule (see the module docstring)."""
    r = user.lora_rank
    if match == "none":
        return r
    if match == "full":
        return user.n_experts * r
    if match == "active":
        return user.top_k * r
    raise ValueError(f"method_options.match ({match!r}) must be 'active', 'full' or 'none'")


def match_errors(cfg, match: str) -> list[str]:
    if match != "none" and isinstance(cfg.lora.rank, list):
        return [f"lora.rank is a per-user list ({cfg.lora.rank}) but method_options.match is {match!r}, which "
                f"derives the ranks from moe.n_experts; set method_options.match=none to use the list as given"]
    return []


@dataclass
class LoRAPair:
    """One MLP projection's LoRA of one expert: its factors A (r x in) and B (out x r)."""
    key: tuple             # (layer, module, expert): the same on every user
    A: torch.nn.Parameter
    B: torch.nn.Parameter


def expert_lora_pairs(model) -> list[LoRAPair]:
    """Every MLP expert LoRA of a model, paired by tag, in one fixed order (every user agrees)."""
    found: dict[tuple, dict[str, torch.nn.Parameter]] = {}
    for name, tag in model.report.tags.items():
        if tag.kind == "expert":
            found.setdefault((tag.layer, tag.module, tag.expert), {})[tag.matrix] = model.report.params[name]
    return [LoRAPair(key, m["A"], m["B"]) for key, m in sorted(found.items())]


# --------------------------------------------------------------------------------------------
# pure computations
# --------------------------------------------------------------------------------------------

def compute_tail_norm(A: torch.Tensor, B: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """||A[start:stop, :]||_F * ||B[:, start:stop]||_F: the size of the rank slots start..stop-1
    (HetLoRA's tail, Cho et al. 2023)."""
    return torch.linalg.vector_norm(A[start:stop]) * torch.linalg.vector_norm(B[:, start:stop])


def compute_tail_start(rank: int, gamma: float) -> int:
    """K = floor(gamma * r): the first rank slot of the tail."""
    return int(math.floor(gamma * rank))


def compute_pruned_rank(A: torch.Tensor, B: torch.Tensor, A_g: torch.Tensor, B_g: torch.Tensor,
                        rank: int, gamma: float) -> int:
    """HetLoRA self-pruning: drop the tail slots K..r-1 (K = floor(gamma * r)) when the user's tail
    is smaller than the same slots of the global model it started the round from. Never below 1."""
    k = max(1, compute_tail_start(rank, gamma))
    if k >= rank:
        return rank
    client = compute_tail_norm(A, B, k, rank)
    server = compute_tail_norm(A_g, B_g, k, rank)
    return k if bool(client < server) else rank


def compute_update_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """||B A||_F without forming B A: ||BA||^2 = trace((B^T B)(A A^T)) (two r x r products)."""
    a, b = A.detach().double(), B.detach().double()
    return math.sqrt(max(0.0, float(((b.t() @ b) * (a @ a.t())).sum())))


def compute_norm_weights(norms: list[float]) -> list[float]:
    """omega_i = S_i / sum_j S_j (HetLoRA's sparsity-weighted aggregation); uniform if all are 0."""
    total = sum(norms)
    if total <= 0:
        return [1.0 / len(norms)] * len(norms)
    return [s / total for s in norms]


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A (r x in) to (rank x in) and B (out x r) to (out x rank); B A is unchanged."""
    a = A.new_zeros(rank, A.shape[1])
    b = B.new_zeros(B.shape[0], rank)
    a[: A.shape[0]] = A
    b[:, : B.shape[1]] = B
    return a, b


def compute_hetlora_aggregate(As: list[torch.Tensor], Bs: list[torch.Tensor], rank: int,
                              weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i omega_i * zero-pad(A_i) and sum_i omega_i * zero-pad(B_i): slots held only by
    high-rank users come from those users alone (HetLoRA, no renormalisation)."""
    A_g = B_g = None
    for A, B, w in zip(As, Bs, weights):
        a, b = pad_rank(A.float(), B.float(), rank)
        A_g = w * a if A_g is None else A_g + w * a
        B_g = w * b if B_g is None else B_g + w * b
    return A_g, B_g


def compute_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factorisation of delta (Eckart-Young): (U S)[:, :rank] and V^T[:rank]."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, S.shape[0])
    return U[:, :rank] * S[:rank], Vh[:rank]


def compute_user_factors(US: torch.Tensor, Vt: torch.Tensor, rank: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's LoRA of rank r_i from a truncated SVD, so that scale * B A = (U S V^T) truncated to
    r_i: A = V^T[:r_i], B = (U S)[:, :r_i] / scale (FlexLoRA, Bai et al. 2024)."""
    A = Vt.new_zeros(rank, Vt.shape[1])
    B = US.new_zeros(US.shape[0], rank)
    k = min(rank, Vt.shape[0])
    A[:k] = Vt[:k]
    B[:, :k] = US[:, :k] / scale
    return A, B


@dataclass
class RankOptions:
    """Options every heterogeneous-rank method has."""
    match: Match = opt("active", MATCH_HELP)


class HeteroRankMethod(Method):
    """HetLoRA and FlexLoRA: every user holds one unrouted MLP LoRA whose rank follows
    ``method_options.match``. The attention LoRA is averaged in the standard ``generalists`` group;
    the MLP LoRA has different shapes on different users, so it stays out of that group (and its
    shape handshake) and the subclass moves it itself in the ``hetero_rank`` group."""
    Options = RankOptions
    accepts_comm_groups = False  # the MLP LoRA travels in a group of its own
    refuses_privacy = ("its per-user-rank MLP LoRA is aggregated by the method's own weighted sums and gathers "
                       "(Comm.sum / Comm.gather), outside the shared groups' mean that privacy clips, noises and masks")
    router = "none"

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        return match_errors(cfg, cls(cfg).options.match)

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_experts=1, n_generalists=1, top_k=1, routed=False,
                       rank=matched_rank(self.run_users()[user_idx], self.options.match))

    def max_matched_rank(self) -> int:
        """The largest rank any user holds (the global LoRA's)."""
        return max(matched_rank(u, self.options.match) for u in self.run_users())

    def is_shared(self, tag) -> bool:
        return tag.kind == "attn"

    def sharing_groups(self, n_users):
        return {"generalists": list(range(n_users)), "hetero_rank": list(range(n_users))}

    def own_aggregated(self, user) -> list[tuple[str, torch.Tensor]]:
        # the user's MLP LoRA pairs, found once by the subclass's prepare_user
        return [(f"{'.'.join(map(str, p.key))}.lora_{m}", t) for p in user.method_state.pairs
                for m, t in (("A", p.A), ("B", p.B))]

    # the collectives of the subclass's own aggregation in ``hetero_rank`` ('sum' or 'all2all', each
    # of every pair's factors zero-padded to the largest rank); their scalar sums are not traffic
    own_collectives: ClassVar[tuple[str, ...]] = ()

    def own_sizes(self, model) -> dict[str, int]:
        """Every MLP LoRA pair's factors zero-padded to the largest rank, the payload of each of the
        subclass's collectives."""
        return {"hetero_rank": self.max_matched_rank() * sum(p.A.shape[1] + p.B.shape[0]
                                                             for p in expert_lora_pairs(model))}

    def wire(self, shared: dict[str, int], round_idx: int | None = None) -> dict:
        """The attention LoRA's mean, and from round 1 the factors' collectives of the subclass."""
        padded = shared.get("hetero_rank", 0)
        out = super().wire({g: n for g, n in shared.items() if g != "hetero_rank"}, round_idx)
        if out and padded:
            out["hetero_rank"] = [(padded, None, kind) for kind in self.own_collectives]
        return out
