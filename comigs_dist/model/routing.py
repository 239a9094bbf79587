"""Per-token top-k routing, the load-balancing losses and routing statistics.

Owns: the router (a bias-free linear map from the MLP input to one logit per expert), top-k
selection with the softmax of the selected logits as weights, the uniform (Switch) and the
generalist-favoured (paper eq. 5) load-balancing losses, and the per-expert statistics logged
as "expert scores" (mean router probability) and activation shares.
Knows nothing of what the experts compute.

Shape letters: N tokens (B*T flattened), D model width, E experts, K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comigs_dist.model.roles import ParamTag


@dataclass
class Routing:
    """The routing decision for N tokens."""
    weights: torch.Tensor        # (N, K) mixing weights, each row sums to 1
    indices: torch.Tensor        # (N, K) expert indices, or (0, K) meaning "every token, every expert"
    probs: torch.Tensor | None   # (N, E) full router softmax, None without a router
    n_experts: int

    @property
    def dense(self) -> bool:
        """True when every token uses every expert with the same weight row (no router)."""
        return self.indices.shape[0] == 0


def uniform_routing(n_tokens: int, n_experts: int, device, dtype=torch.float32) -> Routing:
    """No router: every token is the plain average of all experts (Local, FedAvg, PCL baselines)."""
    w = torch.full((1, n_experts), 1.0 / n_experts, device=device, dtype=dtype)
    return Routing(weights=w, indices=torch.empty(0, n_experts, dtype=torch.long, device=device),
                   probs=None, n_experts=n_experts)


class TopKRouter(nn.Module):
    """logits = W u (bias-free), top-k, weights = softmax over the k selected logits."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, tag: ParamTag | None = None):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be in 1..n_experts ({n_experts})")
        self.n_experts = n_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)  # GPT-2's init for linear layers
        self.tag = tag

    def forward(self, u: torch.Tensor) -> Routing:
        logits = (u @ self.weight.t().to(u.dtype)).float()        # (N, E)
        return compute_topk_routing(logits, self.top_k)

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[1]}, n_experts={self.n_experts}, top_k={self.top_k}"


def compute_topk_routing(logits: torch.Tensor, top_k: int) -> Routing:
    """Top-k of the logits; the weights are the softmax of the selected logits only (which equals
    the full softmax renormalised over the top k)."""
    probs = F.softmax(logits, dim=-1)                            # (N, E)
    top_vals, top_idx = logits.topk(top_k, dim=-1)               # (N, K)
    weights = F.softmax(top_vals, dim=-1)                        # (N, K)
    return Routing(weights=weights, indices=top_idx, probs=probs, n_experts=logits.shape[-1])


def importance_weights(n_experts: int, kind: str, device=None) -> torch.Tensor:
    """Per-expert factors of the load-balancing loss.

    'uniform': all ones (Switch Transformer, Fedus et al. 2022).
    'generalist': paper eq. 5 as written, 1/((n-1)^2+1) for expert 0 and (n-1)/((n-1)^2+1) for
    each of the n-1 others (no rescaling): the ratio 1 : n-1 asks for a routing share of 0.5 on
    the generalist.
    """
    n = n_experts
    if kind == "uniform" or n == 1:
        return torch.ones(n, device=device)
    if kind == "generalist":
        denom = (n - 1) ** 2 + 1
        w = torch.full((n,), (n - 1) / denom, device=device)
        w[0] = 1 / denom
        return w
    raise ValueError(f"moe.load_balancing ({kind!r}) must be 'none', 'uniform' or 'generalist'")


def compute_expert_shares(routing: Routing) -> torch.Tensor:
    """f_j: the fraction of the N*K routing slots given to expert j (sums to 1). No gradient."""
    e = routing.n_experts
    if routing.dense:
        return torch.full((e,), 1.0 / e, device=routing.weights.device)
    counts = torch.bincount(routing.indices.reshape(-1), minlength=e).float()
    return counts / routing.indices.numel()


def compute_load_balancing_loss(routing: Routing, kind: str) -> torch.Tensor:
    """The load-balancing loss of one MoE layer; P_j is the mean full-softmax probability of expert
    j (gradient to the router), f_j counts routing decisions (no gradient).

    'uniform' (Switch): n * sum_j f_j P_j with f_j the share of the N*K routing slots (sums to 1);
    1 when routing is balanced.
    'generalist' (paper eq. 5 and 6, exactly): sum_j w_j f_j P_j with w from ``importance_weights``
    and f_j = (1/T) sum_x 1{j in the top-k of x}, the fraction of tokens that selected j (sums to k).
    """
    if kind == "none" or routing.probs is None or routing.n_experts == 1:
        return routing.weights.new_zeros(())
    n = routing.n_experts
    f = compute_expert_shares(routing).detach()                  # (E,) slot shares
    p = routing.probs.mean(dim=0)                                # (E,)
    if kind == "uniform":
        return n * (f * p).sum()
    w = importance_weights(n, kind, device=p.device)
    tokens_selecting = f * routing.indices.shape[1]              # slot share * k
    return (w * tokens_selecting * p).sum()


@torch.no_grad()
def compute_routing_stats(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean router probability per expert, share of routing slots per expert), both (E,)."""
    share = compute_expert_shares(routing)
    if routing.probs is None:
        return share.clone(), share
    return routing.probs.mean(dim=0), share
