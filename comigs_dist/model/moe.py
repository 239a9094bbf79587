"""Mixture of LoRA experts over one frozen MLP, with the frozen products computed once.

Owns one user's mixture for one MLP (``MixtureAdapters``: its experts and router) and the adapted
MLP of a base (``AdaptedMLP``), which serves every user of a forward: the frozen products run
once over all users' rows, each user's router and experts on its own rows. Expert j is the frozen
MLP with its own LoRA on every projection:
    E_j(u) = W_out' combine(W_in' u + b_in) + b_out,   W' = W + dW_j
(GPT-2: one input projection c_fc and combine = GELU; Llama: gate and up, combine = silu(g) * u).
Because the routing weights of a token sum to 1 and the output projection is linear,
    sum_j w_j E_j(u) = W_out (sum_j w_j h_j) + b_out + sum_j w_j dW_out_j h_j,
    h_j = combine(W_in u + b_in + dW_in_j u),
so the frozen input products W_in u are computed once per token and the frozen output
projection runs once on the mixed hidden state, whatever the number of experts.
Only the (cheap) LoRA products and the activation run per selected expert; tokens are
dispatched to the experts that selected them, so memory grows with k, not with n_experts.
With an elementwise activation of one projection (GPT-2's tanh GELU, ``TanhGELU``) the experts
of a layer run in one autograd node whose backward works in place (``_ExpertsMix``); any other
combine (Llama's silu(gate) * up) runs under plain autograd. ``shared_frozen = False`` selects
the naive computation (every selected expert runs the whole frozen MLP), kept for comparison.

Knows nothing of which experts are shared: roles are tags handed in at construction.
Shape letters: N tokens, D model width, H hidden width, E experts, K experts per token, r rank.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comigs_dist.model.lora import LoRAFactors, frozen_weight_out_in, in_out_features
from comigs_dist.model.paired import PairedLoRA
from comigs_dist.model.roles import ParamTag, Role
from comigs_dist.model.routing import (Routing, TopKRouter, compute_load_balancing_loss,
                                       compute_routing_stats, uniform_routing)

if TYPE_CHECKING:
    from comigs_dist.model.serving import ServedRows


class ElementwiseActivation(abc.ABC):
    """A combine of one input projection, h = act(pre[0]), that also knows its derivative, so
    that the mixture can compute all its experts in one autograd node (``_ExpertsMix``)."""

    def __call__(self, pre: list[torch.Tensor]) -> torch.Tensor:
        return self.forward(pre[0])

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """act(x)."""

    @abc.abstractmethod
    def backward(self, grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write grad * act'(x) into ``out`` (which may be ``grad`` itself) and return it."""


class TanhGELU(ElementwiseActivation):
    """GPT-2's activation (gelu_new, the tanh approximation of GELU) in one kernel each way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    def backward(self, grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=out)


class _ExpertsMix(torch.autograd.Function):
    """For each block of rows (an expert and the rows routed to it):
        h_j = act(f_j + z_j Bt_j)       the expert's hidden state, z_j = A_in_j u (LoRA codes)
        mix += w_j h_j                  at the block's tokens (or every token)
        c_j = h_j A_out_j^T             the codes of the expert's output LoRA
    and returns (mix (N, H), c_1, c_2, ...). The same expressions under autograd allocate a fresh
    (N, H) tensor for every intermediate and every gradient; here the backward of an expert works
    in one buffer, in place (weighting, the output-LoRA term, the activation's derivative), which
    on a CPU stays in cache: the second expert of CoMiGS-1G1S costs about a quarter less
    (benchmarks/step_cost.py). Computes in f's dtype (bf16 under autocast)."""

    @staticmethod
    def forward(ctx, act: ElementwiseActivation, n_tokens: int, layout: list, f: torch.Tensor, *tensors):
        dt = f.dtype
        mix, codes, saved = None, [], []
        i = 0
        for rows, tok, kind in layout:
            z, up, a_out = tensors[i:i + 3]
            w = tensors[i + 3].to(dt) if kind == "tensor" else kind    # tensor, float or None
            i += 4 if kind == "tensor" else 3
            pre = torch.addmm(f if rows is None else f[rows], z.to(dt), up.to(dt))  # (N_j, H)
            h = act.forward(pre)
            if tok is not None:
                if mix is None:
                    mix = torch.zeros(n_tokens, h.shape[1], dtype=dt, device=h.device)
                mix.index_add_(0, tok, h if w is None else h * w)
            elif w is None:
                mix = h                                                # the only expert, weight 1
            elif mix is None:
                mix = h * w
            elif torch.is_tensor(w):
                mix.addcmul_(h, w)
            else:
                mix.add_(h, alpha=w)
            codes.append(F.linear(h, a_out.to(dt)))                    # (N_j, r)
            saved += [pre, h]
        ctx.act, ctx.layout, ctx.f_shape = act, layout, f.shape
        ctx.save_for_backward(*saved, *tensors)
        return (mix, *codes)

    @staticmethod
    def backward(ctx, g_mix: torch.Tensor, *g_codes):
        layout = ctx.layout
        saved = ctx.saved_tensors
        acts, tensors = saved[:2 * len(layout)], saved[2 * len(layout):]
        need = ctx.needs_input_grad[4:]
        dt = acts[0].dtype
        g_f = None
        if layout[0][0] is not None:  # blocks of gathered rows: each writes its own rows of g_f
            g_f = torch.empty(ctx.f_shape, dtype=dt, device=acts[0].device)
        grads, i = [], 0
        for b, (rows, tok, kind) in enumerate(layout):
            pre, h = acts[2 * b:2 * b + 2]
            z, up, a_out = tensors[i:i + 3]
            w = tensors[i + 3].to(dt) if kind == "tensor" else kind
            need_w = kind == "tensor" and need[i + 3]
            g_w = None
            if tok is None:             # g_mix is shared by every block: work in a buffer of our own
                if need_w:
                    g_h = g_mix * h
                    g_w = g_h.sum(1, keepdim=True)                     # d loss / d w_j = <g_mix, h_j>
                    g_h = torch.mul(g_mix, w, out=g_h)                 # the same buffer: w_j g_mix
                elif w is None:
                    g_h = g_mix.clone()
                else:
                    g_h = g_mix * w
            else:                       # gathered rows are ours already
                g_h = g_mix.index_select(0, tok)                       # (N_j, H)
                if need_w:
                    g_w = torch.linalg.vecdot(g_h, h, dim=1).unsqueeze(1)
                if w is not None:
                    g_h.mul_(w)
            g_c = g_codes[b]
            g_a = None
            if g_c is not None:
                g_c = g_c.to(dt)
                g_h.addmm_(g_c, a_out.to(dt))                          # + the output-LoRA term, in place
                if need[i + 2]:
                    g_a = g_c.t().mm(h).to(a_out.dtype)                # (r, H)
            g_pre = ctx.act.backward(g_h, pre, g_h if rows is None else g_f[rows])
            g_z = g_pre.mm(up.to(dt).t()).to(z.dtype) if need[i] else None        # (N_j, r)
            g_up = z.to(dt).t().mm(g_pre).to(up.dtype) if need[i + 1] else None   # (r, H)
            if rows is None:
                g_f = g_pre if g_f is None else g_f.add_(g_pre)
            grads += [g_z, g_up, g_a]
            if kind == "tensor":
                grads.append(None if g_w is None else g_w.to(tensors[i + 3].dtype))
            i += 4 if kind == "tensor" else 3
        return (None, None, None, g_f if ctx.needs_input_grad[3] else None, *grads)


class ExpertLoRA(nn.Module):
    """One expert: a LoRA on each frozen input projection and one on the output projection."""

    def __init__(self, in_dims: Sequence[tuple[int, int]], out_dim: tuple[int, int], rank: int, alpha: float,
                 in_names: Sequence[str], out_name: str, role: Role, layer: int, expert: int, paired: str = "none"):
        super().__init__()
        def tags(module: str):
            return (ParamTag(role, "expert", layer, module, expert, "A"),
                    ParamTag(role, "expert", layer, module, expert, "B"))

        def lora(n_in: int, n_out: int, module: str):
            if paired == "none":
                return LoRAFactors(n_in, n_out, rank, alpha, *tags(module))
            return PairedLoRA(n_in, n_out, rank, alpha, kind="expert", layer=layer, module=module, expert=expert,
                              mixer=paired == "mixer")
        self.in_loras = nn.ModuleList(lora(i, o, f"mlp.{n}") for (i, o), n in zip(in_dims, in_names))
        self.out_lora = lora(*out_dim, f"mlp.{out_name}")
        self.role = role

    @property
    def plain(self) -> bool:
        """Plain ``LoRAFactors`` on every projection (the one-node path reads their factors)."""
        return all(type(lora) is LoRAFactors for lora in (*self.in_loras, self.out_lora))


class MixtureAdapters(nn.Module):
    """One user's mixture for one MLP: its LoRA experts and (routed, several experts) its router.

    Holds what the user's last forward through this layer left behind: the load-balancing loss
    (``aux_loss``), the routing statistics (``last_stats``) and, when ``keep_routing`` is set by
    analysis code, the routing decision itself. ``shared_frozen = False`` selects the naive
    computation for this user (benchmarks, tests). The frozen MLP is the ``AdaptedMLP`` of the
    base, handed to every computation: the same base serves every user of a rank.
    """

    def __init__(self, in_dims: Sequence[tuple[int, int]], out_dim: tuple[int, int], in_names: Sequence[str],
                 out_name: str, *, n_experts: int, n_generalists: int, rank: int, alpha: float, top_k: int,
                 routed: bool, load_balancing: str, layer: int, paired: str = "none"):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts ({n_experts}) must be >= 1")
        self.n_experts = n_experts
        self.load_balancing = load_balancing
        self.layer = layer
        self.d_model = in_dims[0][0]
        self.experts = nn.ModuleList(
            ExpertLoRA(in_dims, out_dim, rank, alpha, in_names, out_name,
                       Role.GENERALIST if j < n_generalists else Role.SPECIALIST, layer, j, paired)
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

    # -- routing -------------------------------------------------------------------------------
    def route(self, u: torch.Tensor) -> Routing:
        """The routing of N tokens (N, D); records the LB loss and the statistics of this forward."""
        if self.router is None:
            routing = uniform_routing(u.shape[0], self.n_experts, u.device)
        else:
            routing = self.router(u)
        self.aux_loss = compute_load_balancing_loss(routing, self.load_balancing)
        self.last_stats = compute_routing_stats(routing)
        if self.keep_routing:
            self.last_routing = Routing(routing.weights.detach(), routing.indices.detach(),
                                        None if routing.probs is None else routing.probs.detach(), routing.n_experts)
        return routing

    # -- the two computations --------------------------------------------------------------------
    def fused(self, mlp: "AdaptedMLP", u: torch.Tensor, frozen_in: list[torch.Tensor], routing: Routing):
        """(mix (N, H), delta (N, D)): the routed mixture of hidden states and the output LoRAs'
        contribution, given the routing (``route``) and the frozen input products of these tokens;
        the caller applies the frozen output projection once to the mix (of every user's rows) and
        adds delta."""
        rows_in, u_rows, blocks = self._plan(u, frozen_in, routing)
        if isinstance(mlp.combine, ElementwiseActivation) and len(frozen_in) == 1 and \
                all(self.experts[j].plain for j, *_ in blocks):
            mix, codes = self._experts_one_node(mlp.combine, rows_in[0], u_rows, blocks, u.shape[0])
        else:
            mix, codes = self._experts_autograd(mlp.combine, rows_in, u_rows, blocks, u.shape[0])
        delta = None
        for (j, _, tok, w), c in zip(blocks, codes):
            if w is not None:
                c = c * (w.to(c.dtype) if torch.is_tensor(w) else w)
            d = c @ self.experts[j].out_lora.up_t(c.dtype)                   # (N_j, D)
            if tok is not None:
                if delta is None:
                    delta = torch.zeros(u.shape[0], d.shape[1], dtype=d.dtype, device=d.device)
                delta.index_add_(0, tok, d)
            else:
                delta = d if delta is None else delta.add_(d)
        return mix, delta

    def naive(self, mlp: "AdaptedMLP", u: torch.Tensor) -> torch.Tensor:
        """Every selected expert runs the whole MLP, frozen products included (k full MLPs)."""
        routing = self.route(u)
        out = None
        out_proj = getattr(mlp.base, mlp.out_name)
        for j, tok, w in self._dispatch(routing, u.shape[0]):
            expert = self.experts[j]
            u_j = u if tok is None else u[tok]
            h = mlp.combine([getattr(mlp.base, n)(u_j) + lora(u_j) for n, lora in zip(mlp.in_names, expert.in_loras)])
            y = out_proj(h) + expert.out_lora(h)
            w = w.to(y.dtype) if torch.is_tensor(w) else w
            if out is None:
                out = torch.zeros(u.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
            out = out + w * y if tok is None else out.index_add(0, tok, w * y)
        return out

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

    def _plan(self, u: torch.Tensor, frozen_in: list[torch.Tensor], routing: Routing):
        """Which rows each expert runs on. Returns (frozen products per row, u per row, blocks),
        a block being (expert, rows: slice or None for all, tokens: ids or None for all rows =
        all tokens, weight: None (the only expert), a float, or an (N_j, 1) tensor)."""
        if routing.dense:
            # no router: constant weights 1/E (plain floats), none at all for a single expert
            weights = [None] if self.n_experts == 1 else [float(w) for w in routing.weights[0].tolist()]
            return frozen_in, u, [(j, None, None, w) for j, w in enumerate(weights)]
        n_tokens, k = routing.indices.shape
        if k == self.n_experts:
            # every token uses every expert (2 experts, top-2): no gather
            full = torch.zeros(n_tokens, self.n_experts, device=routing.weights.device,
                               dtype=routing.weights.dtype).scatter(1, routing.indices, routing.weights)  # (N, E)
            # contiguous (N, 1) columns: a strided column makes every (N, H) product ~3x slower on CPU
            weights = list(full.t().contiguous().unsqueeze(-1))
            return frozen_in, u, [(j, None, None, w) for j, w in enumerate(weights)]
        # top-k < n_experts: sort the N*K routing slots by expert and gather the frozen products
        # once for all slots; each expert then runs on a contiguous block of rows
        slots = routing.indices.reshape(-1)                                   # (N*K,)
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.n_experts).tolist()
        tok = order // k                                                      # token of each slot
        weights = routing.weights.reshape(-1).index_select(0, order).unsqueeze(1)  # (N*K, 1)
        blocks, start = [], 0
        for j, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                blocks.append((j, rows, tok[rows], weights[rows]))
            start += count
        return [f.index_select(0, tok) for f in frozen_in], u.index_select(0, tok), blocks

    def _experts_autograd(self, combine, rows_in: list[torch.Tensor], u_rows: torch.Tensor, blocks, n_tokens: int):
        """Any combine (e.g. Llama's silu(gate) * up): plain autograd. Returns (mix, codes per block)."""
        mix, codes = None, []
        for j, rows, tok, w in blocks:
            expert = self.experts[j]
            u_j = u_rows if rows is None else u_rows[rows]
            h = combine([lora.add_to(f if rows is None else f[rows], u_j)
                         for f, lora in zip(rows_in, expert.in_loras)])       # (N_j, H)
            codes.append(expert.out_lora.down(h))                            # (N_j, r)
            if w is not None:
                h = h * (w.to(h.dtype) if torch.is_tensor(w) else w)
            if tok is not None:
                if mix is None:
                    mix = torch.zeros(n_tokens, h.shape[1], dtype=h.dtype, device=h.device)
                mix.index_add_(0, tok, h)  # in place: each expert touches only its tokens' rows
            else:
                # mul then in-place add: addcmul's backward would build two more (N, H) products
                mix = h if mix is None else mix.add_(h)
        return mix, codes

    def _experts_one_node(self, act: ElementwiseActivation, f: torch.Tensor, u_rows: torch.Tensor, blocks,
                          n_tokens: int):
        """An elementwise activation of one input projection (GPT-2): the experts' hidden states,
        their mixture and their output-LoRA codes in one autograd node (``_ExpertsMix``)."""
        layout, tensors = [], []
        for j, rows, tok, w in blocks:
            expert = self.experts[j]
            lora_in = expert.in_loras[0]
            u_j = u_rows if rows is None else u_rows[rows]
            tensors += [lora_in.down(u_j), lora_in.up_t(f.dtype), expert.out_lora.lora_A]
            if torch.is_tensor(w):
                tensors.append(w)
            layout.append((rows, tok, "tensor" if torch.is_tensor(w) else w))
        mix, *codes = _ExpertsMix.apply(act, n_tokens, layout, f, *tensors)
        return mix, codes

    # -- reference computation (tests) ------------------------------------------------------------
    @torch.no_grad()
    def expert_output_merged(self, mlp: "AdaptedMLP", j: int, u: torch.Tensor) -> torch.Tensor:
        """E_j(u) computed from dense merged weights W + g B A (an independent path, for tests)."""
        expert = self.experts[j]
        pre = []
        for name, lora in zip(mlp.in_names, expert.in_loras):
            layer = getattr(mlp.base, name)
            pre.append(F.linear(u, frozen_weight_out_in(layer) + lora.delta_weight(), layer.bias))
        h = mlp.combine(pre)
        out = getattr(mlp.base, mlp.out_name)
        return F.linear(h, frozen_weight_out_in(out) + expert.out_lora.delta_weight(), out.bias)


class AdaptedMLP(nn.Module):
    """Replaces a model's MLP: every served user's mixture of LoRA experts over one frozen MLP.

    The frozen input products run once over the rows of every user in the batch, each user's
    router and experts on its own rows, and the frozen output projection once over all rows.

    base:      the original MLP module; its projections stay frozen and are used in place
    in_names:  attribute names of the input projections on ``base`` (('c_fc',) for GPT-2)
    out_name:  attribute name of the output projection (``'c_proj'`` for GPT-2)
    combine:   maps the list of input-projection outputs to the hidden state (the activation)
    rows:      the users served by the forward in progress (shared by the base's adapted modules)
    """

    def __init__(self, base: nn.Module, in_names: Sequence[str], out_name: str,
                 combine: Callable[[list[torch.Tensor]], torch.Tensor], rows: "ServedRows", layer: int):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_names = tuple(in_names)
        self.out_name = out_name
        self.combine = combine
        self.rows = rows
        self.layer = layer
        self.in_dims = [in_out_features(getattr(base, n)) for n in self.in_names]
        self.out_dim = in_out_features(getattr(base, out_name))
        self.d_model = self.in_dims[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        u = x.reshape(-1, shape[-1])                                        # (N, D)
        factor = u.shape[0] // shape[0]                                     # tokens per batch row
        segments = [s.scaled(factor) for s in self.rows.current()]
        mixtures = [s.adapters.mixture(self.layer) for s in segments]
        if len(segments) == 1:
            y = self._one_user(mixtures[0], u)
        else:
            # split, not slicing: the backward of a split concatenates the pieces' gradients once,
            # where each slice's backward would write its gradient into a zero tensor of all rows
            sizes = [s.stop - s.start for s in segments]
            u_parts = u.split(sizes)
            if not all(m.shared_frozen for m in mixtures):
                y = torch.cat([self._one_user(m, u_s) for m, u_s in zip(mixtures, u_parts)])
            else:
                # routing first: each user's autograd graph is that of its own forward
                routings = [m.route(u_s) for m, u_s in zip(mixtures, u_parts)]
                frozen_in = [getattr(self.base, n)(u).split(sizes) for n in self.in_names]  # once for every user
                parts = [m.fused(self, u_s, [f[i] for f in frozen_in], r)
                         for i, (m, u_s, r) in enumerate(zip(mixtures, u_parts, routings))]
                mix = torch.cat([p[0] for p in parts])
                delta = torch.cat([p[1].to(mix.dtype) for p in parts])
                y = getattr(self.base, self.out_name)(mix) + delta.to(mix.dtype)  # frozen W_out: once
        return y.reshape(*shape[:-1], y.shape[-1])

    def _one_user(self, mixture: MixtureAdapters, u: torch.Tensor) -> torch.Tensor:
        if not mixture.shared_frozen:
            return mixture.naive(self, u)
        routing = mixture.route(u)  # first: routing, then the frozen products (a fixed gradient order)
        mix, delta = mixture.fused(self, u, [getattr(self.base, n)(u) for n in self.in_names], routing)
        return getattr(self.base, self.out_name)(mix) + delta.to(mix.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, in={self.in_names}, out={self.out_name!r}"
