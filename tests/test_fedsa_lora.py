"""FedSA-LoRA on real process groups (gloo, 2 processes, the tiny GPT-2): after a round every A
is bit-identical across users and equal to their mean, every B is the user's own; only the A
matrices travel; the whole run completes through train.run."""
import dataclasses
import math

import pytest
import torch

from comigs_dist import dist, train
from comigs_dist.config import check_world_size
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.report.params.items()}


def _everyone(topo, mine: dict) -> dict:
    return {k: v for part in dist.all_gather_objects(topo, mine) for k, v in part.items()}


def _fedsa_worker(rank, world_size, tmp_path):
    cfg = tiny_config(method="fedsa_lora")
    check_world_size(cfg, world_size)
    topo0 = init_topology()
    run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
    [r] = run.users
    tags = r.model.report.tags
    # one MLP LoRA of rank moe.n_experts * lora.rank, no router; every A shared in one group
    assert r.model.spec.n_experts == 1 and r.model.spec.rank == cfg.moe.n_experts * cfg.lora.rank
    assert not any(t.kind == "router" for t in tags.values())
    a_names = {n for n, t in tags.items() if t.matrix == "A"}
    b_names = {n for n, t in tags.items() if t.matrix == "B"}
    assert a_names and b_names and a_names | b_names == set(tags)
    assert list(r.shared) == ["generalists"] and {n for n, _ in r.shared["generalists"]} == a_names
    assert {t.kind for n, t in tags.items() if n in a_names} == {"attn", "expert"}

    # round 0: every A from user 0's initialisation; B starts at zero everywhere
    train.sync(run, 0)
    start = _everyone(topo0, {rank: _state(r.model)})
    for n in a_names:
        assert torch.equal(start[0][n], start[1][n]), n
    assert all(not start[rank][n].any() for n in b_names)

    # local steps: every A and every B moves (both factors train)
    before = _state(r.model)
    for _ in range(2):
        train.expert_step(run, run.users)
    assert {n for n in before if not torch.equal(before[n], r.model.report.params[n])} == set(tags)

    # the sync at the start of round 1
    pre = _everyone(topo0, {rank: _state(r.model)})
    sent = r.stats.bytes_sent
    train.sync(run, 1)
    post = _everyone(topo0, {rank: _state(r.model)})
    for n in a_names:  # bit-identical on both users, equal to the hand-computed mean
        assert torch.equal(post[0][n], post[1][n]), n
        assert torch.equal(post[rank][n], ((pre[0][n].double() + pre[1][n].double()) / 2).float()), n
    for n in b_names:  # untouched by the sync, and different between the users
        assert torch.equal(post[rank][n], pre[rank][n]), n
        assert not torch.equal(post[0][n], post[1][n]), n
    # bytes: the A matrices once up and once down (server), fp32, nothing else: the analytic figure
    a_bytes = sum(r.model.report.params[n].numel() for n in a_names) * 4
    assert r.stats.bytes_sent - sent == a_bytes
    assert train.analytic_round_bytes(r, cfg.comm, run.topo, run.comm.count)["total"]["sent"] == a_bytes

    # the whole loop: train.run for three rounds of two steps beats the base model
    cfg_run = tiny_config(method="fedsa_lora", **{"train.rounds": 3, "train.local_steps": 2})
    [row] = train.run(cfg_run, dataclasses.replace(topo0, groups={}), tmp_path / "run")
    assert math.isfinite(row["test_ppl"]) and row["test_ppl"] < row["base_test_ppl"]


@pytest.mark.slow  # two spawned processes and a three-round run: ~40 s on a loaded 2-core machine
def test_fedsa_lora_averages_a_and_keeps_b(tmp_path):
    """Two users: after a round every A is bit-identical and equal to the users' mean, every B is
    what the user trained (and differs between users); the sync moves the A matrices only; a
    three-round run completes and improves on the base model."""
    run_on_ranks(_fedsa_worker, 2, tmp_path)
