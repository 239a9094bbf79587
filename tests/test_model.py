"""LoRA, routing, the mixture of LoRA experts and injection: equivalences and hand-computed values."""
import math

import pytest
import torch
from torch import nn

from comigs_dist.model import (AdaptedBase, AdapterSpec, Role, UserModel, build_adapters, forward_users,
                               wrap_user_model)
from comigs_dist.model.lora import AdaptedLinear, LoRAFactors, rs_scale
from comigs_dist.model.moe import AdaptedMLP, MixtureAdapters, TanhGELU
from comigs_dist.model.serving import ServedRows
from comigs_dist.model.routing import (Routing, compute_load_balancing_loss, compute_topk_routing,
                                       importance_weights)
from helpers import tiny_gpt2

SPEC = AdapterSpec(n_experts=2, n_generalists=1, rank=4, alpha=16.0, attn_rank=4, top_k=2, routed=True,
                   load_balancing="generalist")


def _randomise_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_untrained_adapters_leave_logits_unchanged():
    """B = 0 in every injected module: the adapted model's logits equal the base model's."""
    x = torch.randint(0, 128, (2, 16))
    base = tiny_gpt2()
    ref = base(input_ids=x).logits
    for spec in (SPEC, AdapterSpec(3, 1, 4, 16.0, 4, 2, True, "uniform"),
                 AdapterSpec(2, 1, 4, 16.0, 4, 2, False, "none"),
                 AdapterSpec(1, 1, 4, 16.0, 4, 1, True, "uniform")):
        model = wrap_user_model(tiny_gpt2(), spec)
        torch.testing.assert_close(model.logits(x), ref, rtol=0, atol=1e-5)


def test_each_lora_module_with_zero_b_is_the_base_layer():
    """Every wrapped attention projection with B = 0 returns exactly its frozen layer's output."""
    lm = tiny_gpt2()
    originals = {n: m for n, m in lm.named_modules() if n.endswith(("attn.c_attn", "attn.c_proj"))}
    model = wrap_user_model(lm, SPEC)
    x = torch.randn(5, 32)
    wrapped = [m for m in lm.modules() if isinstance(m, AdaptedLinear)]
    assert len(wrapped) == 4 and len(originals) == 4
    with model.base.serving([(model.adapters, 5)]):
        for m in wrapped:
            torch.testing.assert_close(m(x), m.base_layer(x))


def test_adapted_base_outside_a_serving_block_is_an_error():
    """A forward that does not say whose adapters apply fails with a message, not silently."""
    model = wrap_user_model(tiny_gpt2(), SPEC)
    with pytest.raises(RuntimeError, match="outside a serving block"):
        model.lm(input_ids=torch.randint(0, 128, (1, 4)))


def test_lora_scale_and_init():
    """Rank-stabilised scale alpha/sqrt(r); A is U(-1/sqrt(in), 1/sqrt(in)), B is zero."""
    assert rs_scale(16, 8) == pytest.approx(16 / math.sqrt(8))
    lora = LoRAFactors(100, 7, 8, 16.0)
    assert lora.lora_B.abs().sum() == 0
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(100)
    with torch.no_grad():
        lora.lora_B.normal_()
    base_layer = nn.Linear(100, 7)
    layer = AdaptedLinear(base_layer, ServedRows(), 0, "proj")
    x = torch.randn(3, 100)
    expected = base_layer(x) + (16 / math.sqrt(8)) * x @ lora.lora_A.t() @ lora.lora_B.t()
    with layer.rows.serve([(_Holder(attn=lora), 3)]):
        torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(x @ (base_layer.weight + lora.delta_weight()).t() + base_layer.bias, expected,
                               rtol=1e-5, atol=1e-5)


def test_topk_routing_against_hand_values():
    """Top-2 of [1, 3, 2] picks experts 1 and 2 with weights softmax([3, 2])."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]])
    r = compute_topk_routing(logits, 2)
    assert r.indices.tolist() == [[1, 2], [2, 0]]
    e = math.exp(1)
    torch.testing.assert_close(r.weights[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    torch.testing.assert_close(r.weights[1], torch.tensor([math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)]))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(2))
    r1 = compute_topk_routing(logits, 1)
    assert r1.indices.tolist() == [[1], [2]] and r1.weights.tolist() == [[1.0], [1.0]]


def test_load_balancing_losses_against_hand_values():
    """Uniform: n * sum_j f_j P_j with f the slot shares; generalist-favoured: eq. 5 with f the
    fraction of tokens choosing j; P the mean full-softmax probabilities."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[0, 1], [1, 2]])
    r = Routing(weights=torch.full((2, 2), 0.5), indices=indices, probs=probs, n_experts=3)
    f = [1 / 4, 2 / 4, 1 / 4]
    p = [0.3, 0.45, 0.25]
    uniform = 3 * sum(fj * pj for fj, pj in zip(f, p))
    assert compute_load_balancing_loss(r, "uniform").item() == pytest.approx(uniform)
    # eq. 5 factors for n = 3: 1/5 and 2/5; tokens choosing each expert: 1/2, 2/2, 1/2
    assert importance_weights(3, "generalist").tolist() == pytest.approx([1 / 5, 2 / 5, 2 / 5])
    favoured = 1 / 5 * 1 / 2 * 0.3 + 2 / 5 * 1 * 0.45 + 2 / 5 * 1 / 2 * 0.25  # = 0.26
    assert compute_load_balancing_loss(r, "generalist").item() == pytest.approx(favoured)
    assert compute_load_balancing_loss(r, "none").item() == 0.0


@pytest.mark.parametrize("n,rows,expected", [
    # n = 2, top-2: both experts chosen by both tokens (f = 1, 1), P = (0.45, 0.55);
    # w = (1/2, 1/2): L = 0.5 * 0.45 + 0.5 * 0.55 = 0.5 (constant in the router, as with Switch)
    (2, [[0.7, 0.3], [0.2, 0.8]], 0.5),
    # n = 4, w = (1/10, 3/10, 3/10, 3/10); top-2 of token 1 = {0, 1}, of token 2 = {0, 3}:
    # f = (1, 1/2, 0, 1/2), P = (0.45, 0.2, 0.175, 0.175)
    # L = 0.1 * 1 * 0.45 + 0.3 * (0.5 * 0.2 + 0 * 0.175 + 0.5 * 0.175) = 0.045 + 0.05625 = 0.10125
    (4, [[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.15, 0.25]], 0.10125),
    # n = 8, w = (1/50, 7/50 x 7); top-2 of token 1 = {0, 1}, of token 2 = {7, 6}:
    # f = (1/2, 1/2, 0, 0, 0, 0, 1/2, 1/2), P = (0.175, 0.125, 0.1, 0.1, 0.1, 0.1, 0.125, 0.175)
    # L = 0.02 * 0.5 * 0.175 + 0.14 * 0.5 * (0.125 + 0.125 + 0.175) = 0.00175 + 0.02975 = 0.0315
    (8, [[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3]], 0.0315),
])
def test_generalist_favoured_load_balancing_is_eq5_as_written(n, rows, expected):
    """Paper eq. 5 and 6 by hand for n = 2, 4, 8 and top-2 routing, through the router's own top-k
    (logits log p give softmax p): no factor n^2 / k (the old scaling gave 1.0, 0.81, 1.008)."""
    logits = torch.tensor(rows, dtype=torch.float64).log()
    r = compute_topk_routing(logits, 2)
    assert compute_load_balancing_loss(r, "generalist").item() == pytest.approx(expected, rel=1e-6)
    denom = (n - 1) ** 2 + 1
    assert importance_weights(n, "generalist").tolist() == pytest.approx([1 / denom] + [(n - 1) / denom] * (n - 1))


def test_load_balancing_gradient_reaches_router_only_through_probabilities():
    """P_j carries the gradient, f_j does not (it is a count)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    r = compute_topk_routing(logits, 2)
    loss = compute_load_balancing_loss(r, "uniform")
    loss.backward()
    # f = (1/2, 1/2, 0, 0): dL/dlogits = n * sum_j f_j dP_j/dlogits
    p = torch.softmax(logits.detach(), -1)[0]
    f = torch.tensor([0.5, 0.5, 0.0, 0.0])
    expected = 4 * (p * (f - (f * p).sum()))
    torch.testing.assert_close(logits.grad[0], expected)


class _Holder:
    """Stands in for a user's adapters: one attention LoRA and/or one mixture, whatever the layer."""

    def __init__(self, attn=None, mixture=None):
        self._attn, self._mixture = attn, mixture

    def attn_lora(self, layer, key):
        return self._attn

    def mixture(self, layer):
        return self._mixture


class _OneUserMLP(nn.Module):
    """One user's mixture over an adapted MLP, called like the MLP it replaces (test shorthand)."""

    def __init__(self, adapted: AdaptedMLP, mix: MixtureAdapters):
        super().__init__()
        self.adapted, self.mix = adapted, mix

    @classmethod
    def over_gpt2_mlp(cls, mlp, combine, **kw) -> "_OneUserMLP":
        adapted = AdaptedMLP(mlp, ("c_fc",), "c_proj", combine, ServedRows(), layer=0)
        return cls(adapted, MixtureAdapters(adapted.in_dims, adapted.out_dim, ("c_fc",), "c_proj", layer=0, **kw))

    @property
    def d_model(self):
        return self.adapted.d_model

    def forward(self, u):
        with self.adapted.rows.serve([(_Holder(mixture=self.mix), u.shape[0])]):
            return self.adapted(u)

    @property
    def base(self):
        return self.adapted.base

    @property
    def router(self):
        return self.mix.router

    @property
    def experts(self):
        return self.mix.experts

    @property
    def aux_loss(self):
        return self.mix.aux_loss

    @property
    def shared_frozen(self):
        return self.mix.shared_frozen

    @shared_frozen.setter
    def shared_frozen(self, value):
        self.mix.shared_frozen = value

    def expert_output_merged(self, j, u):
        return self.mix.expert_output_merged(self.adapted, j, u)


def _moe(n_experts: int, top_k: int, routed: bool = True, d: int = 16, h: int = 40, seed: int = 0,
         combine: str = "autograd"):
    """A mixture over a random GPT-2 MLP. combine='autograd': the HF activation as a plain callable
    (the path any combine takes, e.g. Llama's); 'one_node': TanhGELU, whose experts run in one
    autograd node (the path GPT-2 takes)."""
    torch.manual_seed(seed)
    mlp = tiny_gpt2(n_embd=d).transformer.h[0].mlp
    # widen c_fc/c_proj to an arbitrary hidden size to catch shape mix-ups
    from transformers.pytorch_utils import Conv1D
    mlp.c_fc, mlp.c_proj = Conv1D(h, d), Conv1D(d, h)
    for p in mlp.parameters():
        p.data.normal_(0, 0.2)
    act = TanhGELU() if combine == "one_node" else (lambda pre: mlp.act(pre[0]))
    moe = _OneUserMLP.over_gpt2_mlp(mlp, act, n_experts=n_experts, n_generalists=1, rank=4, alpha=16.0, top_k=top_k,
                      routed=routed, load_balancing="uniform")
    _randomise_b(moe, seed)
    if moe.router is not None:
        moe.router.weight.data.normal_(0, 1.0)
    return moe


@pytest.mark.parametrize("combine", ["one_node", "autograd"])
@pytest.mark.parametrize("n_experts,top_k", [(1, 1), (2, 1), (2, 2), (3, 2), (8, 1), (8, 2)])
def test_mixture_equals_explicit_sum_of_full_expert_mlps(n_experts, top_k, combine):
    """y = sum over the selected experts of w_j E_j(u), E_j a full MLP with merged weights."""
    moe = _moe(n_experts, top_k, combine=combine)
    u = torch.randn(2, 7, 16)
    y = moe(u).reshape(-1, 16)
    flat = u.reshape(-1, 16)
    if moe.router is None:
        expected = moe.expert_output_merged(0, flat)
    else:
        r = moe.router(flat)
        outs = torch.stack([moe.expert_output_merged(j, flat) for j in range(n_experts)], 1)  # (N, E, D)
        picked = outs.gather(1, r.indices.unsqueeze(-1).expand(-1, -1, 16))                    # (N, K, D)
        expected = (r.weights.unsqueeze(-1) * picked).sum(1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rel: float = 1e-5) -> None:
    """Equal to float32 rounding, measured against the largest entry: the two paths add over
    tokens, hidden units and experts in different orders, and the router's gradient is a small
    difference of large dot products, so an entry near zero can differ by ~1e-6 of the largest."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale + 1e-7,
                               msg=lambda m: f"{name}: {m}")


def _fused_and_naive(moe: _OneUserMLP, u: torch.Tensor):
    """Output, input gradient and every trainable parameter's gradient, for both computations."""
    trainable = [n for n, p in moe.mix.named_parameters() if p.requires_grad]
    results = []
    for shared in (True, False):
        moe.shared_frozen = shared
        moe.zero_grad(set_to_none=True)
        u.grad = None
        y = moe(u)
        (y.square().sum() + moe.aux_loss).backward()
        params = dict(moe.mix.named_parameters())
        missing = [n for n in trainable if params[n].grad is None]
        assert not missing, f"shared_frozen={shared}: no gradient for {missing}"
        results.append((y.detach(), u.grad.clone(), {n: params[n].grad.clone() for n in trainable}))
    return results, trainable


# top-1 and top-2 with 1, 2 and 8 experts; with one expert top_k = min(2, n) = 1, so (1, 2) does
# not exist (a single expert has no router: every token uses it with weight 1)
@pytest.mark.parametrize("combine", ["one_node", "autograd"])
@pytest.mark.parametrize("n_experts,top_k", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2)])
def test_shared_frozen_compute_equals_naive_forward_and_gradients(n_experts, top_k, combine):
    """Computing the frozen products once gives the k-full-MLP result: output, the input's
    gradient and the gradient of every trainable parameter (experts, router), to float32 rounding."""
    moe = _moe(n_experts, top_k, combine=combine)
    u = torch.randn(4, 16, 16, requires_grad=True)
    if moe.router is not None:  # every expert must get tokens, else some gradients are not compared
        chosen = moe.router(u.detach().reshape(-1, 16)).indices.unique()
        assert chosen.numel() == n_experts, f"experts {chosen.tolist()} of {n_experts} selected; change the seed"
    ((y0, gu0, gp0), (y1, gu1, gp1)), trainable = _fused_and_naive(moe, u)
    expected = {f"experts.{j}.{part}" for j in range(n_experts)
                for part in ("in_loras.0.lora_A", "in_loras.0.lora_B", "out_lora.lora_A", "out_lora.lora_B")}
    assert expected | ({"router.weight"} if n_experts > 1 else set()) == set(trainable)
    _assert_close_fp32(y0, y1, "output")
    _assert_close_fp32(gu0, gu1, "input gradient")
    for n in trainable:
        assert gp0[n].abs().sum() > 0, f"{n}: zero gradient, the comparison would be vacuous"
        _assert_close_fp32(gp0[n], gp1[n], n)


@pytest.mark.parametrize("combine", ["one_node", "autograd"])
@pytest.mark.parametrize("n_experts,top_k", [(2, 2), (8, 2), (8, 1)])
def test_frozen_projections_run_once_per_token_whatever_the_experts(n_experts, top_k, combine):
    """The fused mixture calls the frozen c_fc and c_proj once each, on exactly the N tokens; the
    naive computation calls them once per selected expert on that expert's tokens (N k rows)."""
    moe = _moe(n_experts, top_k, combine=combine)
    rows = {"c_fc": [], "c_proj": []}
    hooks = [getattr(moe.base, name).register_forward_hook(
        lambda mod, args, out, name=name: rows[name].append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        for name in rows]
    u = torch.randn(4, 16, 16, requires_grad=True)
    try:
        moe.shared_frozen = True
        moe(u).sum().backward()
        assert rows == {"c_fc": [64], "c_proj": [64]}, rows
        rows["c_fc"].clear(), rows["c_proj"].clear()
        moe.shared_frozen = False
        moe(u).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    assert sum(rows["c_fc"]) == sum(rows["c_proj"]) == 64 * top_k and len(rows["c_fc"]) > 1, rows


@pytest.mark.parametrize("combine", ["one_node", "autograd"])
@pytest.mark.parametrize("n_experts", [2, 8])
def test_shared_frozen_compute_equals_naive_without_router(n_experts, combine):
    """The uniform mixture (no router: Local, FedAvg) takes the same fused path: same output and gradients."""
    moe = _moe(n_experts, n_experts, routed=False, combine=combine)
    u = torch.randn(3, 5, 16, requires_grad=True)
    ((y0, gu0, gp0), (y1, gu1, gp1)), trainable = _fused_and_naive(moe, u)
    assert len(trainable) == 4 * n_experts
    _assert_close_fp32(y0, y1, "output")
    _assert_close_fp32(gu0, gu1, "input gradient")
    for n in trainable:
        _assert_close_fp32(gp0[n], gp1[n], n)


@pytest.mark.parametrize("n_experts,top_k", [(2, 2), (8, 2)])
def test_router_phase_gradients_equal_naive_with_experts_frozen(n_experts, top_k):
    """Experts frozen, router training (eq. 3): the one-node mixture gives the router and the input
    the naive computation's gradients, and the frozen experts none."""
    moe = _moe(n_experts, top_k, combine="one_node")
    for name, p in moe.mix.named_parameters():
        p.requires_grad_(name == "router.weight")
    u = torch.randn(4, 16, 16, requires_grad=True)
    ((y0, gu0, gp0), (y1, gu1, gp1)), trainable = _fused_and_naive(moe, u)
    assert trainable == ["router.weight"]
    assert all(p.grad is None for n, p in moe.mix.named_parameters() if n != "router.weight")
    _assert_close_fp32(gu0, gu1, "input gradient")
    _assert_close_fp32(gp0["router.weight"], gp1["router.weight"], "router.weight")


@pytest.mark.parametrize("n_experts,top_k", [(2, 2), (8, 2)])
def test_one_node_mixture_under_bf16_autocast_matches_naive(n_experts, top_k):
    """Under bf16 autocast (the CUDA default, here on CPU) the one-node mixture computes in bf16,
    returns fp32 gradients for fp32 parameters, and agrees with the naive path to bf16 rounding."""
    moe = _moe(n_experts, top_k, combine="one_node")
    u = torch.randn(2, 8, 16, requires_grad=True)
    outs = []
    for shared in (True, False):
        moe.shared_frozen = shared
        moe.zero_grad(set_to_none=True)
        u.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(u)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        grads = {n: p.grad for n, p in moe.mix.named_parameters() if p.requires_grad}
        assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
        outs.append((y.float().detach(), grads))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y0, y1, rtol=0.05, atol=0.05 * y1.abs().max().item())
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0.1, atol=0.05 * g1[n].abs().max().item(), msg=n)


def test_gpt2_mixture_uses_one_kernel_gelu_equal_to_the_model_activation():
    """GPT-2's written-out tanh GELU is replaced by torch's one-kernel version: same values to rounding."""
    from comigs_dist.model.inject import _gpt2_combine
    mlp = tiny_gpt2().transformer.h[0].mlp
    assert type(mlp.act).__name__ == "NewGELUActivation"
    x = torch.randn(64, 128) * 4
    combine = _gpt2_combine(mlp)
    assert isinstance(combine, TanhGELU)
    torch.testing.assert_close(combine([x]), mlp.act(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine([x]), torch.nn.functional.gelu(x, approximate="tanh"), rtol=0, atol=0)


def test_one_expert_mixture_equals_single_lora():
    """A mixture with one expert is the frozen MLP with one LoRA on each projection."""
    moe = _moe(1, 1)
    assert moe.router is None
    e = moe.experts[0]
    u = torch.randn(6, 16)
    h = moe.base.act(moe.base.c_fc(u) + e.in_loras[0](u))
    expected = moe.base.c_proj(h) + e.out_lora(h)
    torch.testing.assert_close(moe(u), expected)


def test_uniform_mixture_without_router_averages_all_experts():
    """No router (Local/FedAvg baselines): y = mean_j E_j(u)."""
    moe = _moe(2, 2, routed=False)
    assert moe.router is None
    u = torch.randn(4, 16)
    expected = 0.5 * (moe.expert_output_merged(0, u) + moe.expert_output_merged(1, u))
    torch.testing.assert_close(moe(u), expected, rtol=1e-5, atol=1e-5)


def test_injection_tags_every_trainable_parameter_with_its_role():
    """Expert 0 and attention LoRA are generalists, expert 1 a specialist, routers routers; nothing else trains."""
    model = wrap_user_model(tiny_gpt2(), SPEC)
    report = model.report
    trainable = {n for n, p in model.adapters.named_parameters() if p.requires_grad}
    assert trainable == set(report.tags)
    assert not any(p.requires_grad for p in model.lm.parameters())  # the base is frozen
    roles = {}
    for name, tag in report.tags.items():
        roles.setdefault(tag.role, set()).add((tag.kind, tag.expert))
    assert roles[Role.GENERALIST] == {("attn", -1), ("expert", 0)}
    assert roles[Role.SPECIALIST] == {("expert", 1)}
    assert roles[Role.ROUTER] == {("router", -1)}
    # counts by hand: 2 layers; attn c_attn (32->96) and c_proj (32->32) with r=4;
    # per expert c_fc (32->128) and c_proj (128->32) with r=4; router 32 x 2 per layer
    attn = 2 * (4 * (32 + 96) + 4 * (32 + 32))
    expert = 2 * (4 * (32 + 128) + 4 * (128 + 32))
    router = 2 * 32 * 2
    assert report.counts_by_role() == {"generalist": attn + expert, "specialist": expert, "router": router}


def test_gpt2_124m_trainable_counts_match_the_reference():
    """On GPT-2 124M's shapes, E=2 r=8 gives the reference's 1,935,360 trainable parameters
    (attention 442,368, one expert 737,280, routers 18,432; baselines.md section 1.2)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    report = wrap_user_model(model, AdapterSpec(2, 1, 8, 16.0, 8, 2, True, "uniform")).report
    assert report.count() == 1_935_360
    assert report.count(lambda t: t.kind == "attn") == 442_368
    assert report.count(lambda t: t.kind == "expert" and t.expert == 0) == 737_280
    assert report.count(lambda t: t.kind == "router") == 18_432


def test_injection_fails_clearly_on_an_unknown_family():
    """A model that is neither GPT-2 nor Llama is refused with the list of supported families."""
    with pytest.raises(ValueError, match="not supported; supported: gpt2, llama"):
        wrap_user_model(nn.Linear(2, 2), SPEC)


def test_user_model_returns_cross_entropy_and_load_balancing():
    """UserModel.forward gives the mean token cross-entropy and the layer-mean LB loss."""
    um = wrap_user_model(tiny_gpt2(), AdapterSpec(3, 1, 4, 16.0, 4, 2, True, "uniform"))
    x = torch.randint(0, 128, (2, 16))
    y = torch.randint(0, 128, (2, 16))
    out = um(x, y)
    logits = um.logits(x)
    torch.testing.assert_close(out.ce, torch.nn.functional.cross_entropy(logits.reshape(-1, 128), y.reshape(-1)))
    per_layer = torch.stack([m.aux_loss for m in um.moe])
    torch.testing.assert_close(out.lb, per_layer.mean())
    assert out.lb.item() >= 1.0 - 1e-6  # the uniform loss is minimal (1) at perfect balance


def test_bf16_frozen_base_keeps_adapters_fp32_and_matches_under_autocast():
    """model.dtype=bf16: frozen weights stored in bf16, adapters fp32; under bf16 autocast the
    logits stay close to the fp32 model's."""
    model = tiny_gpt2()
    um = wrap_user_model(model, SPEC)
    report = um.report
    _randomise_b(um)
    x = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = um.logits(x).float()
    um.cast_frozen_(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in report.params.values())
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].mlp.base.c_fc.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = um.logits(x).float()
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def _users_on_one_base(base: AdaptedBase, n_users: int, top_k: int) -> list:
    """Users of different shapes on one base (experts 2, 3, 4, 1, uniform mixture; ranks 4, 2, 8),
    their B and router weights random so that every adapter matters."""
    models = []
    for u in range(n_users):
        n_experts = [2, 3, 4, 1, 2][u % 5]
        routed = u % 5 != 4
        spec = AdapterSpec(n_experts, 1, [4, 2, 8][u % 3], 16.0, 4, min(top_k, n_experts), routed, "generalist")
        model = UserModel(base, build_adapters(base.layout, spec, seed=u))
        g = torch.Generator().manual_seed(100 + u)
        with torch.no_grad():
            for name, p in model.adapters.named_parameters():
                if name.endswith(("lora_B", "router.weight")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        models.append(model)
    return models


def _loss_and_grads(models, outs):
    (sum(o.ce + 0.01 * o.lb for o in outs)).backward()
    result = []
    for m, o in zip(models, outs):
        # an expert no token chose (top-1) has no gradient; the attention LoRA and expert 0 always do
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in m.report.params.items()}
        assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n, t in m.report.tags.items()
                   if t.kind == "attn" or t.expert == 0), "a zero gradient would make the comparison vacuous"
        result.append((o.ce.detach(), o.lb.detach(), grads))
        for p in m.report.params.values():
            p.grad = None
    return result


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_users", [1, 3, 8])
def test_packed_users_equal_each_user_alone(n_users, top_k, family):
    """Several users' batches in one forward through one base (packed) give each user the loss,
    load-balancing loss and gradients of its own forward, to float32 rounding, whatever the
    users' experts, ranks and routing."""
    if family == "gpt2":
        lm = tiny_gpt2()
    else:
        from comigs_dist.model import build_base_model
        lm = build_base_model("llama-tiny", 128, 16)
    base = AdaptedBase(lm)
    models = _users_on_one_base(base, n_users, top_k)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, 128, (1 + u % 3, 16), generator=g) for u in range(n_users)]
    ys = [torch.randint(0, 128, x.shape, generator=g) for x in xs]
    alone = _loss_and_grads(models, [m(x, y) for m, x, y in zip(models, xs, ys)])
    packed = _loss_and_grads(models, forward_users(models, xs, ys))
    for u, ((ce0, lb0, g0), (ce1, lb1, g1)) in enumerate(zip(alone, packed)):
        torch.testing.assert_close(ce1, ce0, rtol=1e-5, atol=1e-6, msg=lambda m: f"user {u} ce: {m}")
        torch.testing.assert_close(lb1, lb0, rtol=1e-5, atol=1e-6, msg=lambda m: f"user {u} lb: {m}")
        for name in g0:
            assert (g0[name] is None) == (g1[name] is None), f"user {u} {name}: gradient in one path only"
            if g0[name] is not None:  # the frozen products of all rows in one product: rounding
                # differs from the one-user product and grows a little through the layers
                _assert_close_fp32(g1[name], g0[name], f"user {u} {name}", rel=5e-5)


def test_one_user_of_a_shared_base_does_not_see_the_others():
    """A user's logits on a base that also serves other users equal its logits on a base of its own."""
    lm = tiny_gpt2()
    shared = AdaptedBase(lm)
    models = _users_on_one_base(shared, 3, 2)
    own = AdaptedBase(tiny_gpt2())
    alone = UserModel(own, build_adapters(own.layout, models[1].spec, seed=0))
    alone.adapters.load_state_dict(models[1].adapters.state_dict())
    x = torch.randint(0, 128, (2, 16))
    packed = shared.logits_for([m.adapters for m in models], [x, x, x])
    torch.testing.assert_close(packed[2:4], alone.logits(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[0:2], packed[2:4])  # the users do differ
