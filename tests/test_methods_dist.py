"""Every method on real process groups (gloo, 2-3 processes, the tiny GPT-2): which parameters
move in each phase, which are equal across users after a round and which differ; the distributed
aggregations (FedAvg mean, HetLoRA, FlexLoRA, PCL) against the pure computations on gathered
values; Centralized against one process training on the union of the users' batches."""
import dataclasses
import math

import pytest
import torch
import torch.distributed as tdist

from comigs_dist.config import check_world_size
from comigs_dist.methods import SyncContext
from comigs_dist.methods.flexlora import compute_flexlora_update
from comigs_dist.methods.lowrank import (compute_hetlora_aggregate, compute_norm_weights, compute_svd_factors,
                                         compute_update_norm, compute_user_factors)
from comigs_dist.model.lora import rs_scale
from comigs_dist.train import build_rank, evaluate_valid, expert_step, router_steps, run
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config, user_of

OFF = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731

EVERYTHING = lambda t: True  # noqa: E731
NOTHING = lambda t: False  # noqa: E731
LORA = lambda t: t.kind in ("attn", "expert")  # noqa: E731
ROUTER = lambda t: t.kind == "router"  # noqa: E731
ATTN = lambda t: t.kind == "attn"  # noqa: E731
ATTN_EXP0 = lambda t: t.kind == "attn" or (t.kind == "expert" and t.expert == 0)  # noqa: E731
B_ONLY = lambda t: t.kind != "router" and t.matrix == "B"  # noqa: E731

# method -> (config overrides, has a router, moves in expert steps, moves in router steps, equal after a round)
CASES = {
    "centralized": ({}, False, LORA, None, EVERYTHING),
    "local": ({}, False, LORA, None, NOTHING),
    "fedavg": ({}, False, LORA, None, LORA),
    "ffa_lora": ({}, False, B_ONLY, None, EVERYTHING),
    "pcl": ({"method_options.mix_after": 0, "method_options.mix_every": 1}, False, LORA, None, None),
    "local_moe": ({}, True, EVERYTHING, None, NOTHING),
    "fedavg_moe": ({}, True, EVERYTHING, None, LORA),
    "pfedmoe": ({}, True, EVERYTHING, None, ATTN_EXP0),
    "local_moe_tr": ({}, True, LORA, ROUTER, NOTHING),
    "fedavg_moe_tr": ({}, True, LORA, ROUTER, LORA),
    "comigs_tr": ({}, True, LORA, ROUTER, ATTN_EXP0),
    "comigs_2s": ({}, True, LORA, ROUTER, ATTN),
    "comigs_2g": ({}, True, LORA, ROUTER, LORA),
    "comigs_1g1s": ({}, True, LORA, ROUTER, ATTN_EXP0),
    "comigs_1gxs": ({"moe.n_experts": "[2, 3]"}, True, LORA, ROUTER, ATTN_EXP0),
    "hetlora": ({"moe.n_experts": "[2, 4]", "method_options.match": "full"}, False, LORA, None, ATTN),
    "flexlora": ({"moe.n_experts": "[1, 3]", "method_options.match": "full"}, False, LORA, None, ATTN),
}


def _fresh(topo):
    """A topology without groups: each method builds its own (all groups here are the world group)."""
    return dataclasses.replace(topo, groups={})


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.report.params.items()}


def _gather(obj):
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def _setup(cfg, topo):
    """The rank (one user here) and that user."""
    rank = build_rank(cfg, topo)
    return rank, rank.users[0]


def _round0(rank):
    """What train.run does before the first local step: the method's sync of round 0."""
    _sync(rank, 0)


def _expert_step(rank):
    expert_step(rank, rank.users)


def _sync(rank, round_idx=1):
    """The method's sync at the start of round ``round_idx`` (1: after the first round)."""
    rank.method.sync(SyncContext(round_idx=round_idx, comm=rank.comm, users=rank.users,
                                 evaluate_valid=lambda u: evaluate_valid(u, OFF).loss))


def _changed(before: dict, after: dict) -> set:
    return {n for n in before if not torch.equal(before[n], after[n])}


def _check_method(name, topo0, rank, world_size):
    overrides, has_router, expert_moves, router_moves, equal_after = CASES[name]
    cfg = tiny_config(method=name, **overrides)
    check_world_size(cfg, world_size)
    topo = _fresh(topo0)
    rank_run, r = _setup(cfg, topo)
    tags = r.model.report.tags
    assert any(t.kind == "router" for t in tags.values()) == has_router, name
    _round0(rank_run)

    # expert phase (twice, so that the router sees experts that differ)
    before = _state(r.model)
    for step in range(2):
        _expert_step(rank_run)
        if name == "centralized":  # replicas stay bit-identical: every step used the same mean gradient
            states = _gather(_state(r.model))
            assert all(torch.equal(states[0][n], states[1][n]) for n in states[0]), f"replicas diverged at step {step}"
    moved = _changed(before, _state(r.model))
    assert moved == {n for n, t in tags.items() if expert_moves(t)}, (name, sorted(moved))
    if name == "centralized":  # one all_reduce of every LoRA gradient per step
        lora_bytes = sum(p.numel() for n, p in r.model.report.params.items() if LORA(tags[n])) * 4
        assert rank_run.comm.user_stats[r.user_idx].by_group["data_parallel"]["bytes_sent"] == 2 * lora_bytes

    # router phase
    assert (r.router_opt is not None) == (router_moves is not None), name
    if router_moves is not None:
        before = _state(r.model)
        router_steps(rank_run, r, 0)
        moved = _changed(before, _state(r.model))
        assert moved == {n for n, t in tags.items() if router_moves(t)}, (name, sorted(moved))

    # one aggregation (start of round 1)
    before_all = _gather(_state(r.model))
    sent_before = rank_run.comm.user_stats[r.user_idx].bytes_sent
    _sync(rank_run)
    after_all = _gather(_state(r.model))
    other = 1 - rank
    common = [n for n in after_all[rank]
              if n in after_all[other] and after_all[rank][n].shape == after_all[other][n].shape]
    if name == "pcl":
        vectors = [torch.cat([s[n].reshape(-1) for n in r.model.report.params]) for s in before_all]
        W = r.method_state["trust"]
        assert W.shape == (world_size,) and float(W.sum()) == pytest.approx(1.0)
        mixed = torch.cat([after_all[rank][n].reshape(-1) for n in r.model.report.params])
        torch.testing.assert_close(mixed, sum(float(w) * v for w, v in zip(W, vectors)), rtol=1e-5, atol=1e-6)
        return
    for n in common:
        if equal_after(tags[n]):
            assert torch.equal(after_all[0][n], after_all[1][n]), (name, n)
            mean = (before_all[0][n] + before_all[1][n]) / 2  # hand-computed FedAvg mean
            torch.testing.assert_close(after_all[rank][n], mean, rtol=1e-6, atol=1e-7)
        elif not (name in ("hetlora", "flexlora") and tags[n].kind == "expert"):
            assert not torch.equal(after_all[0][n], after_all[1][n]), (name, n, "should differ between users")
    if equal_after is NOTHING:
        sent_after = rank_run.comm.user_stats[r.user_idx].bytes_sent
        assert sent_after == sent_before, f"{name} must not communicate after the initial sync"
    if name in ("hetlora", "flexlora"):
        # every user holds a truncation of one global LoRA: the smaller rank is a block of the larger
        ranks = _gather(r.model.spec.rank)
        small, big = (0, 1) if ranks[0] < ranks[1] else (1, 0)
        small_rank, big_rank = ranks[small], ranks[big]
        assert small_rank < big_rank
        for n, t in tags.items():
            low, high = after_all[small][n], after_all[big][n]
            if t.kind == "expert" and t.matrix == "A":
                torch.testing.assert_close(low, high[:small_rank])
            elif t.kind == "expert" and name == "hetlora":
                torch.testing.assert_close(low, high[:, :small_rank])
            elif t.kind == "expert":  # FlexLoRA: B = (U S)[:, :r] / s_r, each user with its own scale
                torch.testing.assert_close(low * rs_scale(16.0, small_rank),
                                           high[:, :small_rank] * rs_scale(16.0, big_rank),
                                           rtol=1e-5, atol=1e-6)


def _methods_worker(rank, world_size, tmp_path, names):
    topo0 = init_topology()
    for name in names:
        _check_method(name, topo0, rank, world_size)
    for name in names + ["pretrained"]:  # the same process group: one spawn for both loops
        _run_method(name, topo0, world_size, tmp_path)


@pytest.mark.slow
def test_each_method_moves_and_shares_the_right_parameters_and_runs_end_to_end(tmp_path):
    """For every method on 2 processes: exactly the expected parameters move in the expert phase and
    in the router phase; after a round the shared ones are bit-identical across users and equal to
    the hand-computed mean, the local ones still differ, and local methods send nothing. Then
    train.run completes for all 18 methods: trained ones beat the base, Pretrained is the base."""
    run_on_ranks(_methods_worker, 2, tmp_path, sorted(CASES), timeout_s=600)


# --------------------------------------------------------------------------------------------
# the heterogeneous-rank and trust-graph aggregations on 3 processes, against the pure math
# --------------------------------------------------------------------------------------------

def _train_a_little(rank_run):
    for _ in range(2):
        _expert_step(rank_run)


def _hetlora_check(topo0, rank, world_size, tmp_path):
    cfg = tiny_config(method="hetlora", **{"moe.n_experts": "[1, 2, 4]", "method_options.match": "full",
                                           "method_options.gamma": 0.99})
    check_world_size(cfg, world_size)
    topo = _fresh(topo0)
    rank_run, r = _setup(cfg, topo)
    _round0(rank_run)
    m = r.method_state
    assert m.alloc_rank == [8, 16, 32][rank] and m.max_rank == 32
    # every user starts from the top-left block of one global initialisation
    starts = _gather({p.key: p.A.detach().clone() for p in m.pairs})
    for key, A in starts[rank].items():
        torch.testing.assert_close(A, starts[2][key][: A.shape[0]])
    _train_a_little(rank_run)
    # force pruning of the first pair: its global tail is made larger than any user's
    first = m.pairs[0].key
    A_g, B_g = m.global_[first]
    m.global_[first] = (A_g + 100.0, B_g + 100.0)
    pairs = [(p.key, p.A.detach().clone(), p.B.detach().clone()) for p in m.pairs]
    everyone = _gather(pairs)
    _sync(rank_run)
    assert m.ranks[first] == m.alloc_rank - 1  # floor(0.99 r) = r - 1: one slot dropped
    assert all(m.ranks[p.key] == m.alloc_rank for p in m.pairs[1:])  # global B = 0 elsewhere: no pruning
    p0 = m.pairs[0]
    assert torch.count_nonzero(p0.A[m.ranks[first]:]) == 0 and torch.count_nonzero(p0.B[:, m.ranks[first]:]) == 0
    for i, p in enumerate(m.pairs):
        As, Bs = [], []
        for user_pairs in everyone:
            key, A, B = user_pairs[i]
            r_user = A.shape[0] - (1 if key == first else 0)  # the pruned rank, as every user decides
            As.append(A[:r_user])
            Bs.append(B[:, :r_user])
        w = compute_norm_weights([compute_update_norm(A, B) for A, B in zip(As, Bs)])
        A_g, B_g = compute_hetlora_aggregate(As, Bs, 32, w)
        torch.testing.assert_close(m.global_[p.key][0], A_g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.global_[p.key][1], B_g, rtol=1e-5, atol=1e-6)
        rr = m.ranks[p.key]
        torch.testing.assert_close(p.A[:rr], A_g[:rr], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.B[:, :rr], B_g[:, :rr], rtol=1e-5, atol=1e-6)
    # the rank mask holds through later steps (Adam moments would move the pruned slots)
    _expert_step(rank_run)
    assert torch.count_nonzero(p0.A[m.ranks[first]:]) == 0 and torch.count_nonzero(p0.B[:, m.ranks[first]:]) == 0
    # the pruned ranks and the global LoRA survive a checkpoint (weights_only load)
    from comigs_dist import checkpoint
    checkpoint.save_atomic({"method_state": r.method.state_dict(r)}, tmp_path / f"hetlora_{rank}.pt")
    ranks, global_ = dict(m.ranks), dict(m.global_)
    m.ranks = {k: 0 for k in m.ranks}
    m.global_ = {}
    r.method.load_state_dict(r, checkpoint.load(tmp_path / f"hetlora_{rank}.pt")["method_state"])
    assert m.ranks == ranks
    assert all(torch.equal(m.global_[k][i], global_[k][i]) for k in ranks for i in (0, 1))


def _flexlora_check(topo0, rank, world_size):
    cfg = tiny_config(method="flexlora", **{"moe.n_experts": "[1, 2, 4]", "method_options.match": "full",
                                            "data.train_tokens": "[3000, 4000, 6000]"})
    check_world_size(cfg, world_size)
    topo = _fresh(topo0)
    rank_run, r = _setup(cfg, topo)
    _round0(rank_run)
    _train_a_little(rank_run)
    m = r.method_state
    mine = [(p.A.detach().clone(), p.B.detach().clone()) for p in m.pairs]
    everyone = _gather((len(r.data.train), m.scale, mine))
    total = sum(n for n, _, _ in everyone)
    assert len({n for n, _, _ in everyone}) == 3  # users hold different amounts of data
    _sync(rank_run)
    for i, p in enumerate(m.pairs):
        dW = compute_flexlora_update([n / total * s * f[i][1] for n, s, f in everyone],
                                     [f[i][0] for _, _, f in everyone])
        # the user's update s_i B_i A_i is the best rank-r_i approximation of dW
        US, Vt = compute_svd_factors(dW, m.rank)
        A, B = compute_user_factors(US, Vt, m.rank, m.scale)
        torch.testing.assert_close(m.scale * p.B @ p.A, m.scale * B @ A, rtol=1e-4, atol=1e-6)
        S = torch.linalg.svdvals(dW)
        err = float(torch.linalg.norm(dW - m.scale * p.B @ p.A))
        assert err == pytest.approx(float(S[m.rank:].square().sum().sqrt()), rel=1e-3, abs=1e-6)
    # all three users received one and the same factorisation
    firsts = _gather(m.pairs[0].A.detach().clone())
    torch.testing.assert_close(firsts[0], firsts[2][:8])


def _pcl_check(topo0, rank, world_size):
    cfg = tiny_config(method="pcl", **{"method_options.mix_after": 0, "method_options.mix_every": 2})
    check_world_size(cfg, world_size)
    topo = _fresh(topo0)
    rank_run, r = _setup(cfg, topo)
    starts = _gather(_state(r.model))
    names = list(r.model.report.params)
    assert not torch.equal(starts[0][names[0]], starts[1][names[0]])  # no common initialisation in PCL
    _train_a_little(rank_run)
    snap = _gather(_state(r.model))
    m = r.method
    assert [m.mixes_after(e) for e in range(5)] == [True, False, True, False, True]
    _sync(rank_run, round_idx=2)  # after round 1: no mixing
    assert all(torch.equal(p, snap[rank][n]) for n, p in _state(r.model).items())
    sent = rank_run.comm.user_stats[r.user_idx].bytes_sent
    _sync(rank_run, round_idx=1)  # after round 0: mixing
    numel = sum(p.numel() for p in r.model.report.params.values())
    # the model and the contributor flag (guard.nan=skip), delivered to each of the N members
    assert rank_run.comm.user_stats[r.user_idx].bytes_sent - sent == (numel + 1) * 4 * world_size
    # this user's row of the trust matrix, recomputed independently for every other user's model
    for j in range(world_size):
        with torch.no_grad():
            probe = _state(r.model)
            for n, p in r.model.report.params.items():
                p.copy_(snap[j][n])
            ppl = math.exp(evaluate_valid(r, OFF).loss)
            for n, p in r.model.report.params.items():
                p.copy_(probe[n])
        assert r.method_state["ppl"][j] == pytest.approx(ppl, rel=1e-6)
    W = torch.softmax(-torch.tensor(r.method_state["ppl"], dtype=torch.float64), 0)
    for n, p in r.model.report.params.items():
        torch.testing.assert_close(p.detach(), sum(float(W[j]) * snap[j][n] for j in range(world_size)).float(),
                                   rtol=1e-5, atol=1e-6)


def _aggregation_worker(rank, world_size, tmp_path):
    topo0 = init_topology()
    _hetlora_check(topo0, rank, world_size, tmp_path)
    _flexlora_check(topo0, rank, world_size)
    _pcl_check(topo0, rank, world_size)


@pytest.mark.slow
def test_hetlora_flexlora_and_pcl_aggregations_match_the_pure_math(tmp_path):
    """3 users with ranks (8, 16, 32) and unequal data: HetLoRA's pruned, norm-weighted, zero-padded
    average and truncation; FlexLoRA's data-size weighted SVD (each user holds the best approximation
    of its rank); PCL's trust row and mix: all equal to the pure computations on gathered values."""
    run_on_ranks(_aggregation_worker, 3, tmp_path, timeout_s=600)


# --------------------------------------------------------------------------------------------
# Centralized == one model on the union of the users' batches
# --------------------------------------------------------------------------------------------

def _centralized_worker(rank, world_size, tmp_path):
    from comigs_dist.data import BatchSampler, load_user_data
    from comigs_dist.model import build_user_model
    from comigs_dist.seeds import derive_seed
    from comigs_dist.train import build_optimizer, cosine_schedule, resolve_dataset
    cfg = tiny_config(method="centralized", **{"train.batch_size": 4, "train.micro_batch_size": 2})
    check_world_size(cfg, world_size)
    topo = init_topology()
    rank_run, r = _setup(cfg, topo)
    _round0(rank_run)
    n_steps = 3
    for _ in range(n_steps):
        _expert_step(rank_run)
    if rank != 0:
        return
    # one process, one model from user 0's initialisation (what round 0 broadcast), the same
    # batches every user drew, concatenated: a batch of N * B sequences per step
    t = cfg.train
    ref = build_user_model(cfg, user_of(cfg, 0), r.data.vocab_size, False, r.model.spec)
    params = [p for _, p in ref.report.select(lambda tag: True)]
    opt = build_optimizer(params, t.lr, t, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(t.rounds * t.local_steps, t.min_lr_ratio))
    data_dir = resolve_dataset(cfg, world_size)
    samplers = [BatchSampler(load_user_data(data_dir, u, t.seq_len).train, t.seq_len,
                             derive_seed(cfg.seed, u, "train_batches")) for u in range(world_size)]
    for _ in range(n_steps):
        xs, ys = [], []
        for s in samplers:  # each user draws its two micro-batches of 2, in order
            for _ in range(2):
                x, y = s.sample(2)
                xs.append(x)
                ys.append(y)
        out = ref(torch.cat(xs), torch.cat(ys))
        out.ce.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    # AdamW divides by the root of the second moment: where a gradient is near zero, its rounding
    # (the replicas sum two halves, the reference one batch) moves the step by a fraction of lr
    # (5e-3); 1% of lr bounds it, far below what a wrong average would do (whole steps of lr)
    tol = 0.01 * t.lr
    worst = 0.0
    for n, p in ref.report.params.items():
        torch.testing.assert_close(r.model.report.params[n].detach(), p.detach(), rtol=1e-4, atol=tol)
        worst = max(worst, float((r.model.report.params[n] - p).abs().max()))
    assert worst < tol


@pytest.mark.slow
def test_centralized_equals_one_process_on_the_union_of_the_data(tmp_path):
    """2 replicas with batch 4 (2 micro-batches) each, gradients averaged every step == one model
    trained on the 8 sequences of both users per step, within floating-point tolerance."""
    run_on_ranks(_centralized_worker, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# every method end to end through train.run
# --------------------------------------------------------------------------------------------

def _run_method(name, topo0, world_size, tmp_path):
    overrides = dict(CASES[name][0]) if name in CASES else {}
    cfg = tiny_config(method=name, **overrides, **{"train.rounds": 3, "train.local_steps": 2})
    check_world_size(cfg, world_size)
    [row] = run(cfg, _fresh(topo0), tmp_path / name)
    assert math.isfinite(row["test_ppl"])
    if name == "pretrained":
        assert row["test_ppl"] == row["base_test_ppl"] and row["bytes_sent"] == 0 and row["local_steps"] == 0
    else:
        assert math.isfinite(row["final_train_loss"]) and row["local_steps"] == 6
        assert row["test_ppl"] < row["base_test_ppl"], (name, row["test_ppl"], row["base_test_ppl"])
