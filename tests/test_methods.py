"""Every method of the paper: registry, options, parameter matching, and the aggregation math
against hand-computed values (pure functions; the distributed versions are in test_methods_dist.py)."""
import math

import pytest
import torch

from comigs_dist.config import ConfigError, load_config, resolve_users
from comigs_dist.methods import get_method, known_methods, method_class
from comigs_dist.methods.flexlora import compute_flexlora_update
from comigs_dist.methods.lowrank import (compute_hetlora_aggregate, compute_norm_weights, compute_pruned_rank,
                                         compute_svd_factors, compute_tail_norm, compute_update_norm,
                                         compute_user_factors, matched_rank, pad_rank)
from comigs_dist.methods.pcl import compute_mix, compute_trust_weights
from comigs_dist.model import adapter_spec_for

PAPER_METHODS = {"pretrained", "centralized", "local", "fedavg", "ffa_lora", "pcl", "local_moe", "fedavg_moe",
                 "pfedmoe", "local_moe_tr", "fedavg_moe_tr", "comigs_tr", "comigs_2s", "comigs_2g", "comigs_1g1s",
                 "comigs_1gxs", "hetlora", "flexlora"}


def test_every_paper_method_is_registered_with_a_description():
    """method=<name> selects each of the 18 methods of Tables 1, 2, 4 and 5."""
    assert PAPER_METHODS <= set(known_methods())
    for name in PAPER_METHODS:
        cls = method_class(name)
        assert cls.name == name and cls.description and cls.paper_row
        assert cls.router in ("none", "joint", "alternating_valid", "alternating_train")


@pytest.mark.parametrize("name,router", [
    ("local", "none"), ("fedavg", "none"), ("pcl", "none"), ("centralized", "none"), ("ffa_lora", "none"),
    ("local_moe", "joint"), ("fedavg_moe", "joint"), ("pfedmoe", "joint"),
    ("local_moe_tr", "alternating_train"), ("fedavg_moe_tr", "alternating_train"), ("comigs_tr", "alternating_train"),
    ("comigs_2s", "alternating_valid"), ("comigs_2g", "alternating_valid"), ("comigs_1g1s", "alternating_valid"),
])
def test_router_mode_follows_table4_groups(name, router):
    """Group i: no router; ii: joint on training loss; iii: alternating on training batches; iv: on
    validation; the router's mode is one value from which the rest follows."""
    m = get_method(name)
    assert m.router == router
    assert m.routed == (router != "none")
    assert m.router_split == {"alternating_valid": "valid", "alternating_train": "train"}.get(router)


def test_method_options_are_typed_checked_and_resolved():
    """method_options.<key> is checked against the method's own options; the resolved config lists all."""
    cfg = load_config(None, ["method=hetlora", "method_options.lambda_p=5e-2", "method_options.match=full"])
    assert cfg.method_options == {"match": "full", "lambda_p": 0.05, "gamma": 0.99, "reference_quirks": False}
    m = get_method("hetlora", cfg)
    assert m.options.lambda_p == 0.05 and m.options.match == "full"
    with pytest.raises(ConfigError, match=r"unknown key 'method_options.lamda_p'; did you mean 'lambda_p'.*hetlora"):
        load_config(None, ["method=hetlora", "method_options.lamda_p=1"])
    with pytest.raises(ConfigError, match=r"method_options.match \('half'\) must be one of 'active', 'full', 'none'"):
        load_config(None, ["method=flexlora", "method_options.match=half"])
    with pytest.raises(ConfigError, match=r"method 'fedavg' takes no options"):
        load_config(None, ["method=fedavg", "method_options.match=full"])
    with pytest.raises(ConfigError, match=r"method_options.gamma \(1.5\) must be in \(0, 1\]"):
        load_config(None, ["method=hetlora", "method_options.gamma=1.5"])
    with pytest.raises(ConfigError, match=r"method_options.mix_every \(0\) must be >= 1"):
        load_config(None, ["method=pcl", "method_options.mix_every=0"])
    with pytest.raises(ConfigError, match=r"lora.rank is a per-user list .* set method_options.match=none"):
        load_config(None, ["method=hetlora", "lora.rank=[16, 32]"])
    with pytest.raises(ConfigError, match=r"moe.n_experts \(2\) must be a per-user list for comigs_1gxs"):
        load_config(None, ["method=comigs_1gxs"])
    with pytest.raises(ConfigError, match=r"moe.n_experts \(\[2, 4\]\) must be the same for every user .*centralized"):
        load_config(None, ["method=centralized", "moe.n_experts=[2, 4]"])
    # switching methods drops nothing silently: options of another method are an error, not ignored
    with pytest.raises(ConfigError, match=r"unknown key 'method_options.lambda_p'.*flexlora"):
        load_config(None, ["method=flexlora", "method_options.lambda_p=0.1"])


def test_parameter_matching_follows_table2_caption():
    """(4,2,2,2) rank-8 experts: 'full' gives ranks (32,16,16,16), 'active' (top-2) gives 16 each."""
    users = resolve_users(load_config(None, ["moe.n_experts=[4, 2, 2, 2]"]), 4)
    assert [matched_rank(u, "full") for u in users] == [32, 16, 16, 16]
    assert [matched_rank(u, "active") for u in users] == [16, 16, 16, 16]
    assert [matched_rank(u, "none") for u in resolve_users(load_config(None, ["lora.rank=[8, 16]"]), 2)] == [8, 16]
    for name, match in (("hetlora", "full"), ("flexlora", "active")):
        c = load_config(None, [f"method={name}", "moe.n_experts=[4, 2, 2, 2]", f"method_options.match={match}"])
        users = resolve_users(c, 4)
        m = get_method(name, c, users)
        specs = [m.adapter_spec(c, u, adapter_spec_for(c, users[u], m.routed)) for u in range(4)]
        assert all(s.n_experts == 1 and not s.routed for s in specs)
        assert [s.rank for s in specs] == ([32, 16, 16, 16] if match == "full" else [16] * 4)
        assert m.max_matched_rank() == (32 if match == "full" else 16)
    # baselines without routing: two uniformly mixed rank-8 experts, or one LoRA of rank 16 (FFA-LoRA)
    c = load_config(None, ["method=ffa_lora"])
    spec = get_method("ffa_lora", c).adapter_spec(c, 0, adapter_spec_for(c, resolve_users(c, 1)[0], False))
    assert (spec.n_experts, spec.rank) == (1, 16)
    c = load_config(None, ["method=fedavg"])
    spec = get_method("fedavg", c).adapter_spec(c, 0, adapter_spec_for(c, resolve_users(c, 1)[0], False))
    assert (spec.n_experts, spec.rank, spec.n_generalists) == (2, 8, 2)


def test_parameter_counts_match_the_reference_model():
    """On GPT-2 shapes, 2 experts x r8 (FedAvg) and 1 LoRA x r16 (FFA-LoRA) train the same MLP
    parameter count, and one r8 expert has baselines.md's 737,280 parameters."""
    d, h, L = 768, 3072, 12
    expert_r8 = L * 8 * ((d + h) + (h + d))
    assert expert_r8 == 737_280
    assert 2 * expert_r8 == L * 16 * 2 * (d + h)


def test_hetlora_weights_are_frobenius_norms_of_the_updates():
    """omega_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F, one weight for A and B, zero-padded sum (hand-computed)."""
    A1, B1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # B1 A1 = [[3,0],[0,0]]
    A2, B2 = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0], [2.0]])                         # B2 A2 = [[0,0],[0,4]]
    norms = [compute_update_norm(A1, B1), compute_update_norm(A2, B2)]
    assert norms == pytest.approx([3.0, 4.0])
    w = compute_norm_weights(norms)
    assert w == pytest.approx([3 / 7, 4 / 7])
    A_g, B_g = compute_hetlora_aggregate([A1, A2], [B1, B2], 2, w)
    torch.testing.assert_close(A_g, torch.tensor([[3 / 7, 8 / 7], [0.0, 0.0]]))
    torch.testing.assert_close(B_g, torch.tensor([[9 / 7, 0.0], [8 / 7, 0.0]]))
    assert compute_norm_weights([0.0, 0.0]) == [0.5, 0.5]
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 7, generator=g), torch.randn(6, 5, generator=g)
    assert compute_update_norm(A, B) == pytest.approx(float(torch.linalg.norm(B @ A)), rel=1e-6)


def test_hetlora_self_pruning_compares_tails_with_the_global_model():
    """K = floor(0.99 r) drops exactly the last slot when the user's tail is smaller than the global's."""
    A = torch.ones(4, 3)
    B = torch.ones(2, 4)
    assert float(compute_tail_norm(A, B, 3, 4)) == pytest.approx(math.sqrt(3) * math.sqrt(2))
    small_B = B.clone()
    small_B[:, 3] = 0.1
    assert compute_pruned_rank(A, small_B, A, B, 4, 0.99) == 3   # 0.1 * ... < 1 * ...: prune
    assert compute_pruned_rank(A, B, A, small_B, 4, 0.99) == 4   # larger than the global: keep
    assert compute_pruned_rank(A, small_B, A, B, 4, 1.0) == 4    # gamma = 1: no tail
    assert compute_pruned_rank(A[:1], small_B[:, :1] * 0, A[:1], B[:, :1], 1, 0.99) == 1  # never below 1
    a, b = pad_rank(A[:2], B[:, :2], 4)
    assert a.shape == (4, 3) and b.shape == (2, 4) and torch.equal(b @ a, B[:, :2] @ A[:2])


def test_flexlora_svd_recovers_a_known_low_rank_matrix():
    """A rank-3 matrix with singular values (5, 3, 1): exact at rank >= 3; the rank-2 error is 1 (Eckart-Young)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 3, generator=g, dtype=torch.float64))
    M = (U * torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)) @ V.t()
    M = M.float()
    for rank, error in ((3, 0.0), (4, 0.0), (2, 1.0), (1, math.sqrt(10.0))):
        US, Vt = compute_svd_factors(M, rank)
        scale = 16 / math.sqrt(rank)
        A, B = compute_user_factors(US, Vt, rank, scale)
        assert A.shape == (rank, 9) and B.shape == (12, rank)
        assert float(torch.linalg.norm(M - scale * B @ A)) == pytest.approx(error, abs=1e-5)


def test_flexlora_update_is_the_data_size_weighted_sum_of_scaled_products():
    """dW = sum_i (n_i / sum n) s_i B_i A_i with each user's own rank and scale (hand-computed)."""
    A1, B1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])           # r = 1, s = 16
    A2, B2 = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])               # r = 2, s = 16 / sqrt(2)
    n1, n2 = 1000, 3000
    s1, s2 = 16.0, 16 / math.sqrt(2)
    dW = compute_flexlora_update([n1 / 4000 * s1 * B1, n2 / 4000 * s2 * B2], [A1, A2])
    expected = 0.25 * 16 * torch.tensor([[2.0, 0.0], [0.0, 0.0]]) + 0.75 * s2 * torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(dW, expected)


def test_pcl_trust_weights_on_a_known_validation_matrix():
    """W_ij = exp(-ppl_ij) / sum_k exp(-ppl_ik) row by row, and theta_i <- sum_j W_ij theta_j."""
    ppl = torch.tensor([[10.0, 11.0, 15.0], [20.0, 20.0, 20.0], [12.0, 40.0, 12.0]])
    W = torch.stack([compute_trust_weights(row) for row in ppl])
    e = math.exp
    z0 = 1 + e(-1) + e(-5)
    expected = torch.tensor([[1 / z0, e(-1) / z0, e(-5) / z0], [1 / 3] * 3,
                             [1 / (2 + e(-28)), e(-28) / (2 + e(-28)), 1 / (2 + e(-28))]], dtype=torch.float64)
    torch.testing.assert_close(W, expected)
    thetas = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])]
    torch.testing.assert_close(compute_mix(W[1], thetas), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(compute_mix(W[0], thetas),
                               torch.tensor([1 / z0 + 2 * e(-5) / z0, e(-1) / z0 + 2 * e(-5) / z0]))


def test_help_lists_every_method_option():
    """--help shows method_options.<key>=<default> under each method that has options."""
    from comigs_dist.main import _help_text
    text = _help_text()
    for key in ("[hetlora] method_options.lambda_p=0.005", "[hetlora] method_options.match=active",
                "[flexlora] method_options.match=active", "[pcl] method_options.mix_after=4",
                "[ffa_lora] method_options.reference_quirks=false",
                "[comigs_2s] method_options.reference_quirks=false"):
        assert key in text
