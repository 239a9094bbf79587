"""Communication on real process groups (gloo, 4 processes): server and all2all give bit-identical
means, bytes are counted as delivered payload, sharing groups average only among their members,
and a shape mismatch is refused on every rank before any collective; comm.groups end to end."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist

from comigs_dist import dist
from comigs_dist.config import ConfigError, check_world_size, load_config
from comigs_dist.groups import build_plan
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(512, 1024), (1000,), (3, 7, 11)]  # one buffer of about 525k elements


def _inputs(user: int) -> list[torch.Tensor]:
    """Each user's tensors: magnitudes 2^user * [0.5, 1) with random signs, so that the four
    values of an element span a factor < 2^5 (the exact regime) yet their fp32 sum depends on order."""
    gen = torch.Generator().manual_seed(100 + user)
    out = []
    for shape in SHAPES:
        mag = (0.5 + 0.5 * torch.rand(shape, generator=gen)) * 2.0 ** user
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        out.append((mag * sign).float())
    return out


def _all(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, [t.clone() for t in tensors])
    return out


def _modes_worker(rank, world_size, tmp_path):
    topo = init_topology()
    topo.build_groups({"generalists": range(world_size), "pair": [1, 2]})
    n = world_size

    # premise: these buffers are order-sensitive in fp32 (a ring all_reduce may add in any order)
    inputs = [_inputs(u) for u in range(n)]
    forward = [sum(inputs[u][i] for u in range(n)) for i in range(len(SHAPES))]
    backward = [sum(inputs[u][i] for u in reversed(range(n))) for i in range(len(SHAPES))]
    assert sum(int((f != b).sum()) for f, b in zip(forward, backward)) > 10_000

    for dtype, wire in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results = {}
        for mode in ("server", "all2all"):
            mine = _inputs(rank)
            comm = dist.Comm(topo, mode, dtype)
            comm.mean("generalists", {rank: mine})
            stats = comm.user_stats[rank]
            results[mode] = mine
            # delivered payload, in the wire dtype: S up and S down, or N*S each way; one collective
            payload = sum(torch.Size(s).numel() for s in SHAPES) * wire.itemsize
            copies = 1 if mode == "server" else n
            assert stats.bytes_sent == payload * copies == dist.round_bytes(payload, mode, n)[0]
            assert stats.bytes_received == payload * copies
            assert stats.collectives == 1
            # a sum (FedALT, HetLoRA) moves the same payloads as a mean: counted alike in each mode
            summed = dist.Comm(topo, mode, dtype)
            total = _inputs(rank)
            summed.sum("generalists", {rank: total})
            assert summed.user_stats[rank].bytes_sent == payload * copies
            assert summed.user_stats[rank].bytes_received == payload * copies
            assert torch.equal(total[0], sum(_inputs(u)[0].to(wire).double() for u in range(n)).float())
        # the exact mean of what travelled, whatever the order: round_fp32(float64 sum / N)
        for i in range(len(SHAPES)):
            exact = sum(inputs[u][i].to(wire).double() for u in range(n)) / n
            assert torch.equal(results["server"][i], results["all2all"][i]), (dtype, i)
            assert torch.equal(results["server"][i], exact.float()), (dtype, i)
        everyone = _all(results["server"])
        assert all(torch.equal(everyone[u][i], everyone[0][i]) for u in range(n) for i in range(len(SHAPES)))

    # the plain wire-dtype reduction (comm.exact=false) is what the exact one replaces: report it
    plain, a2a = _inputs(rank), _inputs(rank)
    dist.Comm(topo, "server", "fp32", exact=False).mean("generalists", {rank: plain})
    dist.Comm(topo, "all2all", "fp32", exact=False).mean("generalists", {rank: a2a})
    differ = sum(int((p != a).sum()) for p, a in zip(plain, a2a))
    print(f"rank {rank}: comm.exact=false, server vs all2all: {differ} of {sum(p.numel() for p in plain)} "
          f"elements differ", flush=True)

    # parameters packed into one buffer (what train does) are reduced in that buffer, with the
    # results of a flat copy, bit for bit, and stay views of it (the optimiser keeps its tensors)
    for mode, exact in (("server", True), ("server", False), ("all2all", True)):
        copied, packed = _inputs(rank), [torch.nn.Parameter(t) for t in _inputs(rank)]
        assert dist.pack_flat(packed) and all(torch.equal(p, t) for p, t in zip(packed, _inputs(rank)))
        buffer = dist.packed_buffer(packed)
        assert buffer is not None and buffer.numel() == sum(p.numel() for p in packed)
        assert dist.packed_buffer(copied) is None  # separate tensors: the sync flattens a copy
        comm = dist.Comm(topo, mode, "fp32", exact=exact)
        comm.mean("generalists", {rank: copied})
        comm.mean("generalists", {rank: [p.data for p in packed]})
        assert all(torch.equal(p, c) for p, c in zip(packed, copied)), (mode, exact)
        assert dist.packed_buffer(packed).data_ptr() == buffer.data_ptr()

    # guard.nan=skip's contributor count keeps the modes identical too (user 3 sits out)
    results = {}
    for mode in ("server", "all2all"):
        mine = _inputs(rank)
        dist.Comm(topo, mode, "fp32", count=True).mean("generalists", {rank: mine}, skip={3})
        results[mode] = mine
    for i in range(len(SHAPES)):
        assert torch.equal(results["server"][i], results["all2all"][i])
        assert torch.equal(results["server"][i], (sum(inputs[u][i].double() for u in range(3)) / 3).float())

    # a group of two: its members average between them, the others keep their tensors
    mine = _inputs(rank)
    comm = dist.Comm(topo, "all2all", "fp32")
    comm.mean("pair", {rank: mine})
    for i in range(len(SHAPES)):
        expected = ((inputs[1][i].double() + inputs[2][i].double()) / 2).float() if rank in (1, 2) else inputs[rank][i]
        assert torch.equal(mine[i], expected)
    payload = sum(torch.Size(s).numel() for s in SHAPES) * 4
    assert comm.user_stats[rank].bytes_sent == (2 * payload if rank in (1, 2) else 0)

    # a shape mismatch inside one group: every rank (members of the sound group too) raises the
    # same error naming the group, the user and the parameter, and nothing is sent
    fresh = dataclasses.replace(topo, groups={})
    fresh.build_groups({"generalists": range(n), "cluster": [2, 3]})
    shared = {"generalists": [("attn.lora_A", torch.zeros(4, 8))]}
    if rank in (2, 3):
        shared["cluster"] = [("experts.1.lora_A", torch.zeros(4 if rank == 2 else 2, 8))]
    with pytest.raises(ValueError, match=r"group 'cluster' differ between users.*user 3 holds experts\.1\.lora_A "
                                         r"with shape \(2, 8\) \(torch.float32\) but user 2 holds \(4, 8\)"):
        dist.check_group_shapes(fresh, {rank: shared})


def test_server_and_all2all_are_bit_identical_and_counted_as_delivered_payload(tmp_path):
    """4 ranks, 525k order-sensitive elements: server and all2all give the same fp32 (and bf16-wire)
    mean bit for bit, equal to round(float64 sum / N) on every rank, with or without a user sitting
    out; server counts S each way and all2all 4 S, one collective per mean; a group of two averages
    only its members; a shape mismatch in a subgroup is refused by all four ranks before sending."""
    run_on_ranks(_modes_worker, 4, tmp_path)


# --------------------------------------------------------------------------------------------
# comm.groups on the model
# --------------------------------------------------------------------------------------------

GROUPS = "[{name: global, users: all, experts: [0]}, {name: cluster, users: [0, 1], experts: [1]}]"


def _groups_worker(rank, world_size, tmp_path):
    from comigs_dist.methods import SyncContext
    from comigs_dist.train import analytic_round_bytes, build_rank, expert_step
    cfg = tiny_config(**{"moe.n_experts": 2, "moe.n_generalists": "[2, 2, 1, 1]", "comm.groups": GROUPS})
    check_world_size(cfg, world_size)
    topo = init_topology()
    rank_run = build_rank(cfg, topo)
    r = rank_run.users[0]
    assert topo.members("global") == (0, 1, 2, 3) and topo.members("cluster") == (0, 1)
    assert list(r.shared) == (["cluster", "global"] if rank < 2 else ["global"])
    tags = r.model.report.tags
    where = {n: g for g, params in r.shared.items() for n, _ in params}
    for n, t in tags.items():  # attention and expert 0 global; expert 1 in the cluster (users 0, 1)
        expected = ("global" if t.kind == "attn" or t.expert == 0 else
                    "cluster" if t.expert == 1 and rank < 2 else None)
        assert where.get(n) == expected, (n, rank)

    for mode in ("server", "all2all"):
        expert_step(rank_run, rank_run.users)  # every user's parameters now differ
        before = _all([p.detach().clone() for p in r.model.report.params.values()])
        comm = dist.Comm(topo, mode, "fp32")
        comm.mark_checked(topo.groups)
        r.method.sync(SyncContext(round_idx=1, comm=comm, users=[r]))
        stats = comm.user_stats[rank]
        after = _all([p.detach().clone() for p in r.model.report.params.values()])
        for i, (n, t) in enumerate(tags.items()):
            if t.kind == "attn" or t.expert == 0:
                users = range(4)
            elif t.expert == 1:
                users = [0, 1]
            else:
                users = []
            for u in range(4):
                if u in users:  # the exact mean over the group's members
                    mean = (sum(before[v][i].double() for v in users) / len(users)).float()
                    assert torch.equal(after[u][i], mean), (mode, n, u)
                else:  # outside the group (user 2, 3's specialist expert 1) or local (routers)
                    assert torch.equal(after[u][i], before[u][i]), (mode, n, u)
            if t.expert == 1:
                assert not torch.equal(after[2][i], after[3][i])
        # counted == analytic: S per group (server) or N_group * S per group (all2all); one collective each
        analytic = analytic_round_bytes(r, SimpleNamespace(mode=mode, dtype="fp32"), topo, False)
        assert stats.bytes_sent == analytic["total"]["sent"]
        assert stats.bytes_received == analytic["total"]["received"]
        assert stats.collectives == len(r.shared)
        for g, a in analytic["groups"].items():
            size = sum(p.numel() for _, p in r.shared[g]) * 4
            assert a["analytic_sent_per_round"] == (size if mode == "server" else size * len(topo.members(g)))

    # rank 4 for user 3's LoRAs: shapes differ inside 'global' and inside 'cluster_b'; every rank
    # (users 0 and 1, outside cluster_b, too) refuses before any collective, naming user and parameter
    bad = tiny_config(**{"moe.n_experts": 2, "moe.n_generalists": "[1, 1, 2, 2]", "lora.rank": "[8, 8, 8, 4]",
                         "comm.groups": "[{name: global, users: all, experts: [0]}, "
                                        "{name: cluster_b, users: [2, 3], experts: [1]}]"})
    topo2 = dataclasses.replace(topo, groups={})
    with pytest.raises(ValueError, match=r"group 'cluster_b' differ between users, so they cannot be averaged: "
                                         r"user 3 holds \S*experts\.1\.in_loras\.0\.lora_A with shape \(4, 32\)"):
        build_rank(bad, topo2)


def test_groups_average_only_among_their_members(tmp_path):
    """Overlapping groups on 4 users (global: expert 0 + attention LoRA of all; cluster: expert 1 of
    users 0, 1): after a round in each mode every tensor equals the exact mean over its group's
    members, users 2 and 3 keep their expert 1 (a specialist for them) and every router; counted
    bytes equal the analytic figure group by group, one collective per group; a rank mismatch in
    one group is refused by every user before any collective."""
    run_on_ranks(_groups_worker, 4, tmp_path)


def test_comm_groups_config_errors_name_key_value_and_fix():
    """Bad comm.groups are refused before any process group, each with the key and the fix."""
    base = ["n_users=4", "moe.n_experts=3", "moe.n_generalists=2"]
    cases = [
        ("[{name: global, users: all, experts: [0]}, {name: a, users: [0, 1], experts: [1]}]",
         r"expert 1 of users 2, 3 is a generalist \(from moe.n_generalists with method comigs_1g1s\) but no "
         r"group shares it; add it to the experts of a group holding users 2, 3"),
        ("[{name: g, users: all, experts: [0, 1]}, {name: a, users: [0, 1], experts: [1]}]",
         r"expert 1 of users 0, 1 is shared by 2 groups \(g, a\); a generalist is averaged in one group"),
        ("[{name: g, users: all, experts: [0, 1, 2]}]",
         r"comm.groups\[0\] \(g\).experts lists expert 2, which is not a generalist of users 0, 1, 2, 3"),
        ("[{name: g, users: [0, 1, 2, 7], experts: [0, 1]}]",
         r"comm.groups\[0\] \(g\).users names user\(s\) \[7\], outside the users of the run \(0..3\)"),
        ("[{name: a, users: [0, 1], experts: [0, 1]}, {name: b, users: [2, 3], experts: [0, 1]}]",
         r"attention LoRA of users 0, 1, 2, 3 would be averaged in 0 groups .* mark one group of each user "
         r"with attention: true"),
        ("[{name: g, users: all, experts: [0, 1]}, {name: g, users: [0], experts: []}]",
         r"comm.groups\[1\].name \('g'\) is used by comm.groups\[0\] already"),
        ("[{name: g, user: all}]", r"unknown key 'comm.groups\[0\].user'; did you mean 'users'"),
    ]
    for groups, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + [f"comm.groups={groups}"])
    with pytest.raises(ConfigError, match=r"method 'hetlora' shares its parameters its own way; remove comm.groups"):
        load_config(None, ["method=hetlora", "comm.groups=[{name: g, users: all, experts: [0]}]"])
    # users named by index are checked against the world size once it is known (before any group)
    cfg = load_config(None, ["comm.groups=[{name: g, users: [0, 1, 2], experts: [0]}]"])
    with pytest.raises(ConfigError, match=r"user 3 is in no group"):
        check_world_size(cfg, 4)
    # clusters without a global group: each marks its own attention group; the plan is what it says
    cfg = load_config(None, base + ["comm.groups=[{name: a, users: [0, 1], experts: [0, 1], attention: true}, "
                                    "{name: b, users: [2, 3], experts: [0, 1], attention: true}]"])
    plan = build_plan(cfg.comm.groups, 4, lambda u: 2)
    assert plan.members == {"a": (0, 1), "b": (2, 3)} and plan.attention == {0: "a", 1: "a", 2: "b", 3: "b"}
    assert plan.experts[(3, 1)] == "b" and plan.groups_of(1) == ["a"]
    # no comm.groups: today's single group of every user
    plan = build_plan([], 3, lambda u: 1)
    assert plan.members == {"generalists": (0, 1, 2)} and plan.experts == {(u, 0): "generalists" for u in range(3)}


@pytest.mark.slow
def test_two_clusters_from_a_yaml_end_to_end(tmp_path):
    """configs/two_clusters.yaml under torchrun with 4 processes, in all2all mode: results.json counts
    per group exactly the analytic bytes of the rounds that aggregated (rounds - 1), N_group times the
    payload, and the users of one cluster end with the same cluster generalist up to their last local steps."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "-m", "comigs_dist.main",
           "--config", "configs/two_clusters.yaml", f"out_dir={out}", "comm.mode=all2all", "train.rounds=3",
           "eval.every=0", "log.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [g.name for g in load_config(out / "config.yaml").comm.groups] == ["global", "cluster_a", "cluster_b"]
    for row in results["users"]:
        cluster = "cluster_a" if row["user"] < 2 else "cluster_b"
        groups = row["comm_groups"]
        assert sorted(groups) == sorted(["global", cluster])
        assert groups["global"]["members"] == [0, 1, 2, 3] and groups[cluster]["members"] == (
            [0, 1] if cluster == "cluster_a" else [2, 3])
        for g, n in (("global", 4), (cluster, 2)):
            assert groups[g]["analytic_sent_per_round"] == n * groups[g]["payload_bytes"]
            assert groups[g]["bytes_sent"] == groups[g]["bytes_received"] == 2 * groups[g]["analytic_sent_per_round"]
            assert groups[g]["collectives"] == 2
        assert row["bytes_sent"] == 2 * row["analytic_bytes_per_round"]["sent"] and isinstance(row["bytes_sent"], int)
        # tiny GPT-2, rank 8, 2 layers: expert 1 = (8*32 + 128*8) + (8*128 + 32*8) per layer; global adds
        # expert 0 (as much) and the attention LoRA ((8*32 + 96*8) + (8*32 + 32*8) per layer)
        assert groups[cluster]["shared_params"] == 2 * 2560
        assert groups["global"]["shared_params"] == 2 * 2560 + 2 * 1536
        assert groups[cluster]["payload_bytes"] == 4 * 2 * 2560


def _local_worker(rank, world_size, tmp_path):
    from comigs_dist.methods import SyncContext
    from comigs_dist.train import analytic_round_bytes, build_rank, expert_step
    topo0 = init_topology()
    for method, expected in (("local", 0), ("local_moe", 0), ("fedavg", None), ("ffa_lora", "B"),
                             ("comigs_2s_quirks", 0)):
        quirks = method.endswith("_quirks")
        cfg = tiny_config(method=method.removesuffix("_quirks"), **({"method_options.reference_quirks": True}
                                                                    if quirks else {}))
        check_world_size(cfg, world_size)
        rank_run = build_rank(cfg, dataclasses.replace(topo0, groups={}))  # the method's own groups
        r = rank_run.users[0]
        expert_step(rank_run, rank_run.users)
        comm = dist.Comm(rank_run.topo, "server", "fp32")
        comm.mark_checked(rank_run.topo.groups)
        r.method.sync(SyncContext(round_idx=1, comm=comm, users=[r]))
        counted = comm.user_stats[rank].bytes_sent
        analytic = analytic_round_bytes(r, SimpleNamespace(mode="server", dtype="fp32"), rank_run.topo, False)
        assert analytic["total"]["sent"] == counted, (method, analytic, counted)
        lora = sum(p.numel() for params in r.shared.values() for _, p in params) * 4
        if expected == "B":  # FFA-LoRA's frozen A matrices travel at the common start only
            expected = sum(p.numel() for _, p in r.shared["generalists"]) * 4
            assert 0 < expected < lora
        assert counted == (expected if expected is not None else lora)
        assert (expected == 0) == (not r.method.aggregates) or quirks  # 2S's quirk: the method aggregates, but not 2S


def test_the_local_baselines_expect_no_traffic_after_the_common_start(tmp_path):
    """Local and Local-MoE share their tensors for the common start only: a round's analytic traffic
    is 0, as counted (it was the tensors' size, so results.json and TensorBoard's analytic curve
    disagreed with the counted 0); FedAvg's is its LoRA's size, as counted; FFA-LoRA's its B
    matrices (its frozen A matrices, sent at the start, were priced every round); CoMiGS-2S with
    reference_quirks 0 (it shares nothing after the start, but was priced every round); analyze overhead
    reports no shared parameters for Local and prices FFA-LoRA's B matrices alone."""
    from comigs_dist.analyze.overhead import compute_overhead
    run_on_ranks(_local_worker, 2, tmp_path)
    assert compute_overhead(load_config(None, ["method=local", "model.name=tiny"]), 2).users[0][1].shared_params == 0
    assert compute_overhead(load_config(None, ["method=fedavg", "model.name=tiny"]), 2).users[0][1].shared_params > 0
    ffa = compute_overhead(load_config(None, ["method=ffa_lora", "model.name=tiny"]), 2)
    (_, rep), = ffa.users
    assert set(rep.wire) == {"generalists"} and 0 < rep.wire["generalists"][0] < rep.shared_params


def _centralized_worker(rank, world_size, tmp_path):
    from comigs_dist import train
    cfg = tiny_config(method="centralized", **{"comm.mode": "all2all", "comm.dtype": "bf16"})
    check_world_size(cfg, world_size)
    [row] = train.run(cfg, dataclasses.replace(init_topology(), groups={}), tmp_path / "run")
    # tiny GPT-2 (2 layers, width 32), rank 8: attention LoRA c_attn 8x32 + 96x8 and c_proj 8x32 +
    # 32x8; each of the two experts c_fc 8x32 + 128x8 and c_proj 8x128 + 32x8; per layer
    numel = 2 * ((8 * 32 + 96 * 8) + (8 * 32 + 32 * 8) + 2 * ((8 * 32 + 128 * 8) + (8 * 128 + 32 * 8)))
    step = numel * 4  # fp32, server-style: one buffer up and the mean down, whatever comm.* says
    assert row["analytic_bytes_per_round"] == {"sent": 3 * step, "received": 3 * step}, row["analytic_bytes_per_round"]
    # both rounds (round 0 included: only its common start is uncounted) are 3 gradient means
    assert row["bytes_sent"] == row["bytes_received"] == 2 * 3 * step, (row["bytes_sent"], step)
    assert row["comm_groups"]["data_parallel"]["collectives"] == 2 * 3


def test_centralizeds_analytic_bytes_are_its_gradient_means(tmp_path):
    """Centralized averages the fp32 gradients of its LoRAs after every expert step (data
    parallelism, server-style whatever comm.mode and comm.dtype say) and syncs nothing after the
    common start; its analytic figure was one mean of the LoRAs per round in comm.mode and
    comm.dtype. Now a round's figure is train.local_steps gradient means, as counted in results.json
    (all2all, bf16 set and ignored), and analyze overhead prices the same, in every round."""
    from comigs_dist.analyze.overhead import bytes_per_round, compute_overhead, format_overhead
    run_on_ranks(_centralized_worker, 2, tmp_path)
    o = compute_overhead(load_config(None, ["method=centralized", "model.name=tiny", "train.rounds=5",
                                            "train.local_steps=3"]), 2)
    (_, rep), = o.users
    step = rep.shared_params * 4
    for mode in ("server", "all2all"):
        for dtype in ("bf16", "fp32"):
            assert bytes_per_round(rep, dtype, mode, o.groups) == (3 * step, 3 * step), (mode, dtype)
    assert o.aggregations == 5
    text = format_overhead(o)
    assert "averages the gradients after each of its 3 expert steps per round" in text and "own collectives" not in text


def test_the_overhead_report_adds_the_contributor_count_wherever_it_travels():
    """A mean carries one contributor-count element under guard.nan=skip, comm.weights=tokens and
    partial participation (train.counts_contributors); analyze overhead added it under
    guard.nan=skip only."""
    from comigs_dist.analyze.overhead import bytes_per_round, compute_overhead
    for extra, count in (([], False), (["guard.nan=skip"], True), (["comm.weights=tokens"], True),
                         (["train.users_per_round=2"], True)):
        o = compute_overhead(load_config(None, ["method=fedavg", "model.name=tiny", *extra]), 4)
        (_, rep), = o.users
        assert o.count == count, extra
        assert bytes_per_round(rep, "fp32", "server", o.groups, o.count) == ((rep.shared_params + count) * 4,) * 2


def _pcl_worker(rank, world_size, tmp_path):
    from comigs_dist.methods import SyncContext
    from comigs_dist.train import analytic_round_bytes, build_rank, evaluate_valid, expert_step
    cfg = tiny_config(method="pcl", **{"method_options.mix_after": 0, "method_options.mix_every": 2})
    check_world_size(cfg, world_size)
    rank_run = build_rank(cfg, init_topology())
    r = rank_run.users[0]
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    per_round = []
    for round_idx in (1, 2, 3):  # mixes after rounds 0 and 2: at the syncs of rounds 1 and 3, not 2
        expert_step(rank_run, rank_run.users)
        comm = dist.Comm(rank_run.topo, "server", "fp32")
        comm.mark_checked(rank_run.topo.groups)
        r.method.sync(SyncContext(round_idx=round_idx, comm=comm, users=[r],
                                  evaluate_valid=lambda u: evaluate_valid(u, off).loss))
        mode = SimpleNamespace(mode="server", dtype="fp32")
        analytic = analytic_round_bytes(r, mode, rank_run.topo, False, round_idx=round_idx)["total"]
        per_round.append((comm.user_stats[rank].bytes_sent, analytic["sent"], comm.user_stats[rank].bytes_received,
                          analytic["received"]))
    model = (sum(p.numel() for params in r.shared.values() for _, p in params) + 1) * 4  # and the flag
    assert per_round == [(2 * model,) * 4, (0, 0, 0, 0), (2 * model,) * 4], (per_round, model)
    # results.json's figure: a mixing round, the gather's N payloads each way whatever comm.mode says
    assert analytic_round_bytes(r, mode, rank_run.topo, False)["total"] == {"sent": 2 * model, "received": 2 * model}


def _hetero_rank_worker(rank, world_size, tmp_path):
    from comigs_dist.methods import SyncContext
    from comigs_dist.train import analytic_round_bytes, build_rank, expert_step
    topo0 = init_topology()
    for method in ("hetlora", "flexlora"):
        for mode in ("server", "all2all"):
            cfg = tiny_config(method=method, **{"lora.rank": [4, 8], "method_options.match": "none"})
            check_world_size(cfg, world_size)
            rank_run = build_rank(cfg, dataclasses.replace(topo0, groups={}))
            r = rank_run.users[0]
            expert_step(rank_run, rank_run.users)
            comm = dist.Comm(rank_run.topo, mode, "fp32")
            comm.mark_checked(rank_run.topo.groups)
            r.method.sync(SyncContext(round_idx=1, comm=comm, users=[r]))
            stats = comm.user_stats[rank]
            analytic = analytic_round_bytes(r, SimpleNamespace(mode=mode, dtype="fp32"), rank_run.topo, False)
            assert (analytic["total"]["sent"], analytic["total"]["received"]) == (stats.bytes_sent,
                                                                                  stats.bytes_received), \
                (method, mode, analytic, stats)
            # the factors, zero-padded to rank 8 on both users (user 0's own rank is 4): 2 layers x
            # (c_fc: A 8x32 + B 128x8, c_proj: A 8x128 + B 32x8), once per collective
            padded = analytic["groups"]["hetero_rank"]["shared_params"]
            assert padded == (1 if method == "hetlora" else 2) * 2 * (8 * 32 + 128 * 8 + 8 * 128 + 32 * 8), padded


def test_hetlora_and_flexloras_analytic_bytes_include_their_own_collectives(tmp_path):
    """HetLoRA sums every user's norm-weighted factors, zero-padded to the largest rank; FlexLoRA
    gathers them and sums the SVD factors back. Their analytic bytes were the attention LoRA's
    mean alone; now they equal what a round counts, in both modes, on users of ranks 4 and 8.
    analyze overhead prices the same collectives (it priced the attention LoRA's mean alone)."""
    from comigs_dist.analyze.overhead import bytes_per_round, compute_overhead, format_overhead
    run_on_ranks(_hetero_rank_worker, 2, tmp_path)
    padded = 2 * (8 * 32 + 128 * 8 + 8 * 128 + 32 * 8)  # as in the worker: every pair at rank 8
    for method, own in (("hetlora", {"server": padded, "all2all": 2 * padded}),
                        ("flexlora", {"server": 2 * padded + padded, "all2all": 2 * padded + 2 * padded})):
        o = compute_overhead(load_config(None, [f"method={method}", "model.name=tiny", "lora.rank=[4,8]",
                                                "method_options.match=none"]), 2)
        for _, rep in o.users:  # users of rank 4 and 8 alike: both send the padded factors
            attn = rep.shared_params
            assert bytes_per_round(rep, "fp32", "server", o.groups) == ((attn + own["server"]) * 4,) * 2, method
            assert bytes_per_round(rep, "fp32", "all2all", o.groups) == ((2 * attn + own["all2all"]) * 4,) * 2, method
        assert f"own collectives in hetero_rank: a {'sum' if method == 'hetlora' else 'gather and a sum'} of " \
               f"{padded:,} elements" in format_overhead(o)


def test_pcls_analytic_bytes_follow_its_gathers_round_by_round(tmp_path):
    """PCL gathers every user's model (N payloads each way in any comm.mode) every mix_every-th
    round: its analytic bytes were a server mean's (one payload) in every round. Now each round's
    analytic figure equals the bytes counted in it: N payloads in a mixing round, 0 otherwise."""
    run_on_ranks(_pcl_worker, 2, tmp_path)


def test_the_overhead_report_prices_pcls_gather_and_counts_its_mixing_rounds(capsys):
    """analyze overhead priced PCL's round as a mean of its shared tensors in every round (a
    quarter of a 4-user gather). Now a mixing round is the gather's N payloads of the model and its
    flag each way in both modes, and the report counts the rounds that mix: with mix_after=3 and
    mix_every=2 over 10 rounds, the syncs after the 0-based rounds 3, 5 and 7 (after round 9
    the run has ended)."""
    from comigs_dist.analyze.overhead import bytes_per_round, compute_overhead, format_overhead
    from comigs_dist.config import load_config
    cfg = load_config(None, ["method=pcl", "model.name=tiny", "train.rounds=10", "method_options.mix_after=3",
                             "method_options.mix_every=2"])
    o = compute_overhead(cfg, 4)
    (_, rep), = o.users
    model = (rep.shared_params + 1) * 4
    for mode in ("server", "all2all"):
        assert bytes_per_round(rep, "fp32", mode, o.groups) == (4 * model, 4 * model)
    assert o.aggregations == 3 and o.rounds == 10
    text = format_overhead(o)
    assert "pcl aggregates 3 times over train.rounds=10" in text and "whatever comm.mode says" in text, text
    fedavg = compute_overhead(load_config(None, ["method=fedavg", "model.name=tiny", "train.rounds=10"]), 4)
    assert fedavg.aggregations == 9 and "aggregates 9 times" not in format_overhead(fedavg)
    (_, rep), = fedavg.users
    assert bytes_per_round(rep, "fp32", "server", fedavg.groups) == (rep.shared_params * 4,) * 2
