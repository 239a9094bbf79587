"""Mixture of LoRA experts over one frozen MLP, with the frozen products computed once.

Owns the MoE-of-LoRA MLP. Expert j is the frozen MLP with its own LoRA on every projection:
    E_j(u) = W_out' combine(W_in' u + b_in) + b_out,   W' = W + dW_j
(GPT-2: one input projection c_fc and combine = GELU; Llama: gate and up, combine = silu(g) * u).
Because the routing weights of a token sum to 1 and the output projection is linear,
    sum_j w_j E_j(u) = W_out (sum_j w_j h_j) + b_out + sum_j w_j dW_out_j h_j,
    h_j = combine(W_in u + b_in + dW_in_j u),
so the frozen input products W_in u are computed once per token and the frozen output
projection runs once on the mixed hidden state, whatever the number of experts.
Only the (cheap) LoRA products and the activation run per selected expert; tokens are
dispatched to the experts that selected them, so memory grows with k, not with n_experts.

Knows nothing of which experts are shared: roles are tags handed in at construction.
Shape letters: N tokens, D model width, H hidden width, E experts, K experts per token, r rank.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comigs_dist.model.lora import LoRAFactors, frozen_weight_out_in, in_out_features
from comigs_dist.model.roles import ParamTag, Role
from comigs_dist.model.routing import (Routing, TopKRouter, compute_load_balancing_loss,
                                       compute_routing_stats, uniform_routing)


class ExpertLoRA(nn.Module):
    """One expert: a LoRA on each frozen input projection and one on the output projection."""

    def __init__(self, in_dims: Sequence[tuple[int, int]], out_dim: tuple[int, int], rank: int, alpha: float,
                 in_names: Sequence[str], out_name: str, role: Role, layer: int, expert: int):
        super().__init__()
        def tags(module: str):
            return (ParamTag(role, "expert", layer, module, expert, "A"),
                    ParamTag(role, "expert", layer, module, expert, "B"))
        self.in_loras = nn.ModuleList(LoRAFactors(i, o, rank, alpha, *tags(f"mlp.{n}"))
                                      for (i, o), n in zip(in_dims, in_names))
        self.out_lora = LoRAFactors(*out_dim, rank, alpha, *tags(f"mlp.{out_name}"))
        self.role = role

    def adapter_tags(self):
        for i, lora in enumerate(self.in_loras):
            for name, tag in lora.tags.items():
                yield f"in_loras.{i}.{name}", tag
        for name, tag in self.out_lora.tags.items():
            yield f"out_lora.{name}", tag


class MoELoRAMLP(nn.Module):
    """Replaces a model's MLP: a routed (or uniformly mixed) mixture of LoRA experts.

    base:      the original MLP module; its projections stay frozen and are used in place
    in_names:  attribute names of the input projections on ``base`` (('c_fc',) for GPT-2)
    out_name:  attribute name of the output projection (``'c_proj'`` for GPT-2)
    combine:   maps the list of input-projection outputs to the hidden state (the activation)
    routed:    True: per-token top-k router; False: every token averages all experts (no router)
    """

    def __init__(self, base: nn.Module, in_names: Sequence[str], out_name: str,
                 combine: Callable[[list[torch.Tensor]], torch.Tensor], *, n_experts: int, n_generalists: int,
                 rank: int, alpha: float, top_k: int, routed: bool, load_balancing: str, layer: int):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts ({n_experts}) must be >= 1")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_names = tuple(in_names)
        self.out_name = out_name
        self.combine = combine
        self.n_experts = n_experts
        self.load_balancing = load_balancing
        self.layer = layer
        in_dims = [in_out_features(getattr(base, n)) for n in self.in_names]
        out_dim = in_out_features(getattr(base, out_name))
        self.d_model = in_dims[0][0]
        self.experts = nn.ModuleList(
            ExpertLoRA(in_dims, out_dim, rank, alpha, self.in_names, out_name,
                       Role.GENERALIST if j < n_generalists else Role.SPECIALIST, layer, j)
            for j in range(n_experts))
        self.router = None
        if routed and n_experts > 1:
            self.router = TopKRouter(self.d_model, n_experts, top_k,
                                     ParamTag(Role.ROUTER, "router", layer, "mlp.router", -1, "W"))
        self.shared_frozen = True   # False: the naive k-full-MLP computation (benchmarks, tests)
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_routing: Routing | None = None
        self.keep_routing = False   # set by analysis code to keep the last decision

    # -- bookkeeping ---------------------------------------------------------------------------
    def adapter_tags(self):
        for j, expert in enumerate(self.experts):
            for name, tag in expert.adapter_tags():
                yield f"experts.{j}.{name}", tag
        if self.router is not None:
            yield from (("router." + n, t) for n, t in self.router.adapter_tags())

    def route(self, u: torch.Tensor) -> Routing:
        if self.router is None:
            return uniform_routing(u.shape[0], self.n_experts, u.device)
        return self.router(u)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        u = x.reshape(-1, shape[-1])                                        # (N, D)
        routing = self.route(u)
        self.aux_loss = compute_load_balancing_loss(routing, self.load_balancing)
        self.last_stats = compute_routing_stats(routing)
        if self.keep_routing:
            self.last_routing = Routing(routing.weights.detach(), routing.indices.detach(),
                                        None if routing.probs is None else routing.probs.detach(), routing.n_experts)
        if self.shared_frozen:
            y = self._forward_shared(u, routing)
        else:
            y = self._forward_naive(u, routing)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _dispatch(self, routing: Routing, n_tokens: int):
        """Yield (expert index, token ids or None for all tokens, weights (N_j, 1) or scalar)."""
        if routing.dense:
            for j in range(self.n_experts):
                yield j, None, routing.weights[0, j]
            return
        if routing.indices.shape[1] == self.n_experts:
            # every token uses every expert (e.g. 2 experts, top-2): no gather needed
            full = torch.zeros(n_tokens, self.n_experts, device=routing.weights.device,
                               dtype=routing.weights.dtype).scatter(1, routing.indices, routing.weights)  # (N, E)
            for j in range(self.n_experts):
                yield j, None, full[:, j:j + 1]
            return
        for j in range(self.n_experts):
            tok, slot = (routing.indices == j).nonzero(as_tuple=True)       # (N_j,), (N_j,)
            if tok.numel():
                yield j, tok, routing.weights[tok, slot].unsqueeze(1)        # (N_j, 1)

    def _forward_shared(self, u: torch.Tensor, routing: Routing) -> torch.Tensor:
        frozen_in = [getattr(self.base, n)(u) for n in self.in_names]         # each (N, H): once
        if routing.dense or routing.indices.shape[1] == self.n_experts:
            mix, delta = self._mix_every_token(u, frozen_in, routing)
        else:
            mix, delta = self._mix_dispatched(u, frozen_in, routing)
        out_proj = getattr(self.base, self.out_name)
        return out_proj(mix) + delta.to(mix.dtype)                           # frozen W_out: once

    def _run_expert(self, j: int, frozen_in: list[torch.Tensor], u: torch.Tensor):
        """Expert j's hidden state h_j (N_j, H) and its output-LoRA codes A_out h_j (N_j, r)."""
        expert = self.experts[j]
        h = self.combine([lora.add_to(f, u) for f, lora in zip(frozen_in, expert.in_loras)])
        return h, expert.out_lora.down(h)

    def _mix_every_token(self, u: torch.Tensor, frozen_in: list[torch.Tensor], routing: Routing):
        """Every token uses every expert (no router, or top-k = n_experts): no gather, and the
        mixing is a fused multiply-add per expert. Returns (mix (N, H), delta (N, D))."""
        if routing.dense:
            # constant weights (1/E): plain floats, and none at all for a single expert
            weights = [None] if self.n_experts == 1 else [float(w) for w in routing.weights[0].tolist()]
        else:
            full = torch.zeros(u.shape[0], self.n_experts, device=routing.weights.device,
                               dtype=routing.weights.dtype).scatter(1, routing.indices, routing.weights)  # (N, E)
            weights = [full[:, j:j + 1] for j in range(self.n_experts)]      # each (N, 1)
        mix = delta = None
        for j, w in enumerate(weights):
            h, codes = self._run_expert(j, frozen_in, u)
            if w is None:
                mix = h
            else:
                w = w.to(h.dtype) if torch.is_tensor(w) else w
                # mul then in-place add: addcmul's backward would build two more (N, H) products
                mix = h * w if mix is None else mix.add_(h * w)
                codes = codes * w
            up = self.experts[j].out_lora.up_t(codes.dtype)                 # (r, D)
            delta = codes @ up if delta is None else torch.addmm(delta, codes, up)
        return mix, delta

    def _mix_dispatched(self, u: torch.Tensor, frozen_in: list[torch.Tensor], routing: Routing):
        """Top-k < n_experts: the N*K routing slots are sorted by expert, the frozen products are
        gathered once for all slots, each expert runs on its contiguous block, and its weighted
        output is added in place at its tokens. Returns (mix (N, H), delta (N, D))."""
        n_tokens, k = routing.indices.shape
        slots = routing.indices.reshape(-1)                                   # (N*K,)
        order = torch.argsort(slots, stable=True)                             # slots grouped by expert
        counts = torch.bincount(slots, minlength=self.n_experts).tolist()
        rows = order // k                                                     # token of each slot
        tok = rows.split(counts)
        weights = routing.weights.reshape(-1).index_select(0, order).unsqueeze(1).split(counts)  # (N_j, 1) each
        frozen_rows = [f.index_select(0, rows).split(counts) for f in frozen_in]  # one gather per projection
        u_rows = u.index_select(0, rows).split(counts)
        mix = delta = None
        for j in range(self.n_experts):
            if counts[j] == 0:
                continue
            h, codes = self._run_expert(j, [f[j] for f in frozen_rows], u_rows[j])
            w = weights[j].to(h.dtype)
            if mix is None:
                mix = torch.zeros(n_tokens, h.shape[1], dtype=h.dtype, device=h.device)
                delta = torch.zeros(n_tokens, self.experts[j].out_lora.lora_B.shape[0], dtype=h.dtype, device=h.device)
            # in place: one buffer for all experts, each touching only its own tokens' rows
            mix.index_add_(0, tok[j], h * w)
            delta.index_add_(0, tok[j], (codes * w) @ self.experts[j].out_lora.up_t(codes.dtype))
        return mix, delta

    def _forward_naive(self, u: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every selected expert runs the whole MLP, frozen products included (k full MLPs)."""
        out = None
        out_proj = getattr(self.base, self.out_name)
        for j, tok, w in self._dispatch(routing, u.shape[0]):
            expert = self.experts[j]
            u_j = u if tok is None else u[tok]
            h = self.combine([getattr(self.base, n)(u_j) + lora(u_j) for n, lora in zip(self.in_names, expert.in_loras)])
            y = out_proj(h) + expert.out_lora(h)
            w = w.to(y.dtype) if torch.is_tensor(w) else w
            if out is None:
                out = torch.zeros(u.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
            out = out + w * y if tok is None else out.index_add(0, tok, w * y)
        return out

    # -- reference computation (tests) ------------------------------------------------------------
    @torch.no_grad()
    def expert_output_merged(self, j: int, u: torch.Tensor) -> torch.Tensor:
        """E_j(u) computed from dense merged weights W + g B A (an independent path, for tests)."""
        expert = self.experts[j]
        pre = []
        for name, lora in zip(self.in_names, expert.in_loras):
            layer = getattr(self.base, name)
            pre.append(F.linear(u, frozen_weight_out_in(layer) + lora.delta_weight(), layer.bias))
        h = self.combine(pre)
        out = getattr(self.base, self.out_name)
        return F.linear(h, frozen_weight_out_in(out) + expert.out_lora.delta_weight(), out.bias)
