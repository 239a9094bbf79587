"""PairedLoRA and TokenMixer (FedALT's and FedDPA's adapter): hand-computed mixtures, the base left
unchanged by an untrained pair, and the pair inside the adapted GPT-2's attention and MLP."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comigs_dist.model import AdapterSpec, Role, wrap_user_model
from comigs_dist.model.inject import collect_tags
from comigs_dist.model.paired import PairedLoRA, TokenMixer
from helpers import tiny_gpt2

ONE_LORA = AdapterSpec(n_experts=1, n_generalists=1, rank=4, alpha=16.0, attn_rank=4, top_k=1, routed=False,
                       load_balancing="none")


def _random_b(pair: PairedLoRA, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in (pair.first, pair.second):
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.1)


def _pair(mixer=False, weights=(0.5, 0.5), seed=0, d_in=6, d_out=5):
    torch.manual_seed(seed)
    pair = PairedLoRA(d_in, d_out, 3, 16.0, kind="attn", layer=0, module="attn.c_attn", mixer=mixer, weights=weights)
    _random_b(pair, seed + 1)
    return pair


def _by_hand(pair: PairedLoRA, x: torch.Tensor, w0, w1) -> torch.Tensor:
    """w0 * g B0 A0 x + w1 * g B1 A1 x from the dense updates."""
    d0, d1 = pair.delta_weights()
    return w0 * (x @ d0.t()) + w1 * (x @ d1.t())


def test_pair_is_the_weighted_sum_of_its_two_loras():
    """Fixed weights, a mixer (softmax of W x per token) and per-sequence weights all give
    w0 g B0 A0 x + w1 g B1 A1 x; add_to adds the same to a base."""
    x = torch.randn(2, 4, 6)
    fixed = _pair(weights=(0.3, 0.7))
    torch.testing.assert_close(fixed(x), _by_hand(fixed, x, 0.3, 0.7))

    mixed = _pair(mixer=True, seed=3)
    w = torch.softmax(x @ mixed.mixer.weight.t(), dim=-1)                 # (2, 4, 2) by hand
    torch.testing.assert_close(mixed(x), _by_hand(mixed, x, w[..., :1], w[..., 1:]))
    assert torch.allclose(w.sum(-1), torch.ones(2, 4))

    rows = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    mixed.set_row_weights(rows)                                           # rows win over the mixer
    torch.testing.assert_close(mixed(x), _by_hand(mixed, x, rows[:, None, :1], rows[:, None, 1:]))
    flat = x.reshape(8, 6)                                                # tokens of both sequences, flattened
    base = torch.randn(8, 5)
    torch.testing.assert_close(mixed.add_to(base, flat), base + mixed(x).reshape(8, 5))
    mixed.set_row_weights(None)
    torch.testing.assert_close(mixed(x), _by_hand(mixed, x, w[..., :1], w[..., 1:]))


def test_a_fixed_weight_of_zero_drops_that_lora():
    """Weights (1, 0): the codes and B^T hold the first LoRA only (rank r, not 2r); (0, 0) adds nothing."""
    pair = _pair(weights=(1.0, 0.0))
    x = torch.randn(7, 6)
    assert pair.down(x).shape == (7, 3) and pair.up_t(torch.float32).shape == (3, 5)
    torch.testing.assert_close(pair(x), x @ pair.first.delta_weight().t())
    pair.set_weights(0.0, 1.0)
    torch.testing.assert_close(pair(x), x @ pair.second.delta_weight().t())
    pair.set_weights(0.0, 0.0)
    assert torch.equal(pair(x), torch.zeros(7, 5))
    base = torch.randn(7, 5)
    assert torch.equal(pair.add_to(base, x), base)


def test_row_weights_must_fit_the_batch():
    """Weights for 3 sequences refuse a forward of 2 sequences, or of 8 tokens (not a multiple of 3)."""
    pair = _pair()
    with pytest.raises(ValueError, match=r"shape \(sequences, 2\)"):
        pair.set_row_weights(torch.ones(3))
    pair.set_row_weights(torch.ones(3, 2) / 2)
    with pytest.raises(ValueError, match="set for 3 sequences but the forward has 2"):
        pair(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="8 tokens, not a multiple"):
        pair(torch.randn(8, 6))


def test_mixer_is_a_dense_softmax_and_every_parameter_is_tagged():
    """The mixer gives both LoRAs a weight on every token; injection's tag collection finds the
    collective LoRA (generalist), the user's own (specialist) and the mixer (router)."""
    mixer = TokenMixer(6, 2)
    p = mixer.probabilities(torch.randn(10, 6))
    assert p.shape == (10, 2) and torch.all(p > 0) and torch.allclose(p.sum(-1), torch.ones(10))
    holder = nn.Module()
    holder.pair = PairedLoRA(6, 5, 3, 16.0, kind="expert", layer=2, module="mlp.c_fc", expert=0, mixer=True)
    report = collect_tags(holder, "gpt2")
    roles = {n: (t.role, t.kind, t.layer, t.expert, t.matrix) for n, t in report.tags.items()}
    assert roles == {"pair.first.lora_A": (Role.GENERALIST, "expert", 2, 0, "A"),
                     "pair.first.lora_B": (Role.GENERALIST, "expert", 2, 0, "B"),
                     "pair.second.lora_A": (Role.SPECIALIST, "expert", 2, 0, "A"),
                     "pair.second.lora_B": (Role.SPECIALIST, "expert", 2, 0, "B"),
                     "pair.mixer.weight": (Role.ROUTER, "router", 2, 0, "W")}


def _paired_gpt2(mixer: bool):
    """The tiny GPT-2 with a PairedLoRA in every attention slot and on both projections of its one
    MLP expert, as FedALT (mixer) or FedDPA (fixed weights) would build it."""
    model = wrap_user_model(tiny_gpt2(), ONE_LORA, seed=5)
    for layer, block in enumerate(model.adapters.blocks):
        for key, lora in list(block.attn.items()):
            r, d_in = lora.lora_A.shape
            block.attn[key] = PairedLoRA(d_in, lora.lora_B.shape[0], r, 16.0, kind="attn", layer=layer,
                                         module=f"attn.{key}", mixer=mixer)
        expert = block.mlp.experts[0]
        for i, lora in enumerate(expert.in_loras):
            expert.in_loras[i] = PairedLoRA(lora.lora_A.shape[1], lora.lora_B.shape[0], 4, 16.0, kind="expert",
                                            layer=layer, module="mlp.c_fc", expert=0, mixer=mixer)
        out = expert.out_lora
        expert.out_lora = PairedLoRA(out.lora_A.shape[1], out.lora_B.shape[0], 4, 16.0, kind="expert", layer=layer,
                                     module="mlp.c_proj", expert=0, mixer=mixer)
    return model


def _use_autograd_path(model) -> None:
    """Route the MLP through the mixture's plain-autograd path (the one Llama takes), which reads
    the experts' LoRAs through down / up_t / add_to only."""
    for mlp in model.base.lm.modules():
        if type(mlp).__name__ == "AdaptedMLP":
            mlp.combine = lambda pre: F.gelu(pre[0], approximate="tanh")


@pytest.mark.parametrize("mixer", [True, False])
def test_untrained_pairs_leave_the_base_unchanged_and_trained_ones_do_not(mixer):
    """B = 0 in both LoRAs of every pair: the logits are the base model's whatever the mixer says
    (FedALT at round 0: the rest-of-world LoRA is still empty); a non-zero B changes them."""
    x = torch.randint(0, 128, (2, 16))
    ref = tiny_gpt2()(input_ids=x).logits
    model = _paired_gpt2(mixer)
    for mixture in model.moe:
        mixture.shared_frozen = False  # the naive path: each expert's LoRAs called as modules
    torch.testing.assert_close(model.logits(x), ref, rtol=0, atol=1e-5)
    _use_autograd_path(model)
    for mixture in model.moe:
        mixture.shared_frozen = True
    torch.testing.assert_close(model.logits(x), ref, rtol=0, atol=1e-5)
    _random_b(model.adapters.blocks[1].attn["c_attn"], seed=9)
    assert (model.logits(x) - ref).abs().max() > 1e-3


def test_pairs_in_the_mlp_give_the_same_logits_and_gradients_on_both_paths():
    """Trained pairs (random B) in attention and MLP: the naive MLP path (every expert a whole MLP)
    and the mixture's autograd path agree on logits and on the gradients of every pair parameter."""
    x = torch.randint(0, 128, (2, 16))
    results = []
    for naive in (True, False):
        torch.manual_seed(0)
        model = _paired_gpt2(mixer=True)
        for i, m in enumerate(model.modules()):
            if isinstance(m, PairedLoRA):
                _random_b(m, seed=100 + i)
        if naive:
            for mixture in model.moe:
                mixture.shared_frozen = False
        else:
            _use_autograd_path(model)
        logits = model.logits(x)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.adapters.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and any(".mixer." in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("paired", ["mixer", "fixed"])
def test_injection_builds_pairs_and_the_fused_mlp_path_equals_the_naive_one(paired):
    """AdapterSpec.paired: injection puts a pair on every attention target and MLP projection (a mixer
    on each with 'mixer'); with trained pairs (random B) the mixture's default path (GPT-2's
    activation, which takes the plain-autograd route for pairs) gives the naive path's logits."""
    import dataclasses
    spec = dataclasses.replace(ONE_LORA, paired=paired)
    model = wrap_user_model(tiny_gpt2(), spec, seed=5)
    pairs = [m for m in model.adapters.modules() if isinstance(m, PairedLoRA)]
    assert len(pairs) == 2 * (2 + 2)  # 2 layers x (c_attn, c_proj of attention; c_fc, c_proj of the MLP)
    assert all((p.mixer is not None) == (paired == "mixer") for p in pairs)
    roles = [t.role for t in model.report.tags.values()]
    assert roles.count(Role.GENERALIST) == roles.count(Role.SPECIALIST) == 2 * len(pairs)
    assert roles.count(Role.ROUTER) == (len(pairs) if paired == "mixer" else 0)
    for i, p in enumerate(pairs):
        _random_b(p, seed=200 + i)
    x = torch.randint(0, 128, (2, 16))
    fused = model.logits(x)
    for mixture in model.moe:
        mixture.shared_frozen = False
    torch.testing.assert_close(model.logits(x), fused, rtol=1e-5, atol=1e-5)
