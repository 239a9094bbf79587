"""FedSA-LoRA on real process groups (gloo, 2 processes, the tiny GPT-2): after a round every A
is bit-identical across users and equal to their mean, every B is the user's own; only the A
matrices travel; the whole run completes through train.run."""
import dataclasses
import math

import pytest
import torch
import torch.distributed as tdist

from comigs_dist import dist
from comigs_dist.config import check_world_size
from comigs_dist.methods import SyncContext
from comigs_dist.train import CommHandle, optimizer_step, run, setup_user
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config

OFF = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.report.params.items()}


def _gather(obj):
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def _fedsa_worker(rank, world_size, tmp_path):
    cfg = tiny_config(method="fedsa_lora")
    check_world_size(cfg, world_size)
    topo0 = init_topology()
    topo = dataclasses.replace(topo0, groups={}, stats=dist.CommStats(), _checked=set())
    r = setup_user(cfg, topo)
    tags = r.model.report.tags
    # one MLP LoRA of rank moe.n_experts * lora.rank, no router; every A shared in one group
    assert r.model.spec.n_experts == 1 and r.model.spec.rank == cfg.n_experts(rank) * cfg.lora.rank
    assert not any(t.kind == "router" for t in tags.values())
    a_names = {n for n, t in tags.items() if t.matrix == "A"}
    b_names = {n for n, t in tags.items() if t.matrix == "B"}
    assert a_names and b_names and a_names | b_names == set(tags)
    assert list(r.shared) == ["generalists"] and {n for n, _ in r.shared["generalists"]} == a_names
    assert {t.kind for n, t in tags.items() if n in a_names} == {"attn", "expert"}
    comm = CommHandle(topo, "server", "fp32")

    # round 0: every A from user 0's initialisation; B starts at zero everywhere
    for group, params in r.shared.items():
        comm.broadcast(group, [p.data for _, p in params])
    start = _gather(_state(r.model))
    for n in a_names:
        assert torch.equal(start[0][n], start[1][n]), n
    assert all(not start[rank][n].any() for n in b_names)

    # local steps: every A and every B moves (both factors train)
    before = _state(r.model)
    for _ in range(2):
        r.model.set_trainable(r.method.trains_in_expert_phase)
        optimizer_step(r, r.train_sampler, r.expert_opt, OFF, True, comm)
    assert {n for n in before if not torch.equal(before[n], r.model.report.params[n])} == set(tags)

    # the sync at the start of round 1
    pre = _gather(_state(r.model))
    sent = topo.stats.bytes_sent
    r.method.aggregate(SyncContext(shared=r.shared, comm=comm, round_idx=1, user_idx=rank, n_users=world_size,
                                   model=r.model))
    post = _gather(_state(r.model))
    for n in a_names:  # bit-identical on both users, equal to the hand-computed mean
        assert torch.equal(post[0][n], post[1][n]), n
        torch.testing.assert_close(post[rank][n], (pre[0][n] + pre[1][n]) / 2, rtol=1e-6, atol=1e-7)
    for n in b_names:  # untouched by the sync, and different between the users
        assert torch.equal(post[rank][n], pre[rank][n]), n
        assert not torch.equal(post[0][n], post[1][n]), n
    # bytes: the A matrices once up and once down (server), fp32, nothing else
    assert topo.stats.bytes_sent - sent == sum(r.model.report.params[n].numel() for n in a_names) * 4

    # the whole loop: train.run for three rounds of two steps beats the base model
    cfg_run = tiny_config(method="fedsa_lora", **{"train.rounds": 3, "train.local_steps": 2})
    row = run(cfg_run, dataclasses.replace(topo0, groups={}, stats=dist.CommStats(), _checked=set()), tmp_path / "run")
    assert math.isfinite(row["test_ppl"]) and row["test_ppl"] < row["base_test_ppl"]


@pytest.mark.slow  # two spawned processes and a three-round run: ~40 s on a loaded 2-core machine
def test_fedsa_lora_averages_a_and_keeps_b(tmp_path):
    """Two users: after a round every A is bit-identical and equal to the users' mean, every B is
    what the user trained (and differs between users); the sync moves the A matrices only; a
    three-round run completes and improves on the base model."""
    run_on_ranks(_fedsa_worker, 2, tmp_path)
