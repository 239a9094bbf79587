"""The Llama family: the same equivalences and invariants as GPT-2, on a small LlamaConfig."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comigs_dist.config import check_world_size
from comigs_dist.model import AdapterSpec, Role, build_base_model, mlp_modules, wrap_user_model
from comigs_dist.model.lora import AdaptedLinear
from comigs_dist.methods import SyncContext
from comigs_dist.train import build_rank, expert_step
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _llama():
    return build_base_model("llama-tiny", vocab_size=96, seq_len=32)


def test_untrained_adapters_leave_llama_logits_unchanged():
    """B = 0 on q, k, v, o and on every expert's gate, up and down: logits equal the base's."""
    x = torch.randint(0, 96, (2, 12))
    ref = _llama()(input_ids=x).logits
    model = wrap_user_model(_llama(), AdapterSpec(3, 1, 4, 16.0, 4, 2, True, "generalist"))
    report = model.report
    assert {t.module for t in report.tags.values() if t.kind == "attn"} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert {t.module for t in report.tags.values() if t.kind == "expert"} == {
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert sum(isinstance(m, AdaptedLinear) for m in model.lm.modules()) == 4 * 2
    torch.testing.assert_close(model.logits(x), ref, rtol=0, atol=1e-5)


def test_llama_mixture_equals_explicit_sum_of_gated_expert_mlps():
    """y = sum_j w_j down_j(silu(gate_j u) * up_j u) with merged weights, frozen products shared."""
    from test_model import _OneUserMLP
    model = wrap_user_model(_llama(), AdapterSpec(4, 1, 4, 16.0, 4, 2, True, "uniform"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.adapters.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if n.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    moe = _OneUserMLP(mlp_modules(model.lm)[0], model.moe[0])
    u = torch.randn(10, moe.d_model, generator=g)
    r = moe.router(u)
    outs = torch.stack([moe.expert_output_merged(j, u) for j in range(4)], 1)
    picked = outs.gather(1, r.indices.unsqueeze(-1).expand(-1, -1, outs.shape[-1]))
    expected = (r.weights.unsqueeze(-1) * picked).sum(1)
    torch.testing.assert_close(moe(u), expected, rtol=1e-5, atol=1e-5)
    moe.shared_frozen = False
    torch.testing.assert_close(moe(u), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_experts,top_k", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2)])
def test_llama_gated_mixture_equals_naive_forward_and_gradients(n_experts, top_k):
    """Llama's two-input gated MLP (silu(gate u) * up u, under plain autograd): computing the frozen
    products once gives the k-full-MLP output, input gradient and every trainable gradient."""
    from test_model import _OneUserMLP, _assert_close_fp32, _fused_and_naive
    model = wrap_user_model(_llama(), AdapterSpec(n_experts, 1, 4, 16.0, 4, top_k, n_experts > 1, "uniform"))
    g = torch.Generator().manual_seed(3)
    moe = _OneUserMLP(mlp_modules(model.lm)[0], model.moe[0])
    with torch.no_grad():
        for n, p in moe.mix.named_parameters():
            if n.endswith("lora_B") or n.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "router" in n else 0.1))
    u = torch.randn(3, 10, moe.d_model, generator=g, requires_grad=True)
    if moe.router is not None:  # every expert must get tokens, else some gradients are not compared
        assert moe.router(u.detach().reshape(-1, moe.d_model)).indices.unique().numel() == n_experts
    ((y0, gu0, gp0), (y1, gu1, gp1)), trainable = _fused_and_naive(moe, u)
    assert len([n for n in trainable if "lora_" in n]) == n_experts * 3 * 2  # gate, up, down: A and B
    _assert_close_fp32(y0, y1, "output")
    _assert_close_fp32(gu0, gu1, "input gradient")
    for n in trainable:
        assert gp0[n].abs().sum() > 0, f"{n}: zero gradient, the comparison would be vacuous"
        _assert_close_fp32(gp0[n], gp1[n], n)


def _llama_round_worker(rank, world_size, tmp_path):
    cfg = tiny_config(**{"model.name": "llama-tiny"})
    check_world_size(cfg, world_size)
    topo = init_topology()
    rank_run = build_rank(cfg, topo)
    r = rank_run.users[0]
    expert_step(rank_run, rank_run.users)
    snap = lambda role: {n: p.detach().clone() for n, p in r.model.report.params.items()
                         if r.model.report.tags[n].role == role}
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, snap(Role.GENERALIST))
    specialists = snap(Role.SPECIALIST)
    r.method.sync(SyncContext(round_idx=1, comm=rank_run.comm, users=rank_run.users))
    after = [None] * world_size
    torch.distributed.all_gather_object(after, snap(Role.GENERALIST))
    for name in after[0]:
        assert torch.equal(after[0][name], after[1][name]), name
        torch.testing.assert_close(after[0][name], (gathered[0][name] + gathered[1][name]) / 2)
    assert any(".attn.q_proj." in n for n in after[0]) and any(".mlp.experts.0." in n for n in after[0])
    assert all(torch.equal(v, snap(Role.SPECIALIST)[k]) for k, v in specialists.items())
    others = [None] * world_size
    torch.distributed.all_gather_object(others, specialists)
    assert any(not torch.equal(others[0][k], others[1][k]) for k in specialists)


def test_llama_generalists_identical_across_ranks_after_a_round(tmp_path):
    """Two Llama users: after the sync, generalists are bit-identical means; specialists stay apart."""
    run_on_ranks(_llama_round_worker, 2, tmp_path)


def test_llama_cli_end_to_end_two_users(tmp_path):
    """configs/debug_llama.yaml on 2 processes writes results.json with finite, improving perplexities."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "comigs_dist.main", "--config", "configs/debug_llama.yaml", f"out_dir={out}", "log.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"]["name"] == "llama-tiny" and results["world_size"] == 2
    for u in results["users"]:
        assert u["test_ppl"] < u["base_test_ppl"] and u["bytes_sent"] > 0


def test_a_config_per_table6_row():
    """configs/llama32_1b holds one file per row of Table 6, each on Llama 3.2 1B with its method."""
    from comigs_dist.config import load_config
    rows = {"pretrained", "centralized", "local", "fedavg", "comigs_2s", "comigs_2g", "comigs_1g1s"}
    files = {p.stem: p for p in (ROOT / "configs" / "llama32_1b").glob("*.yaml")}
    assert set(files) == rows
    for name, path in files.items():
        cfg = load_config(path, ["data.path=embedded"])
        assert cfg.method == name and cfg.model.name == "meta-llama/Llama-3.2-1B"
