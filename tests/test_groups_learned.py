"""Learned sharing groups: similarity, eigengap and silhouette against hand values, users built to
form clusters put into them, one group when all are alike, deterministic ties, and the method on
real process groups."""
import numpy as np
import pytest
import torch

from comigs_dist.groups_learned import (compute_average_linkage, compute_cosine_similarity, compute_eigengap_scores,
                                        compute_learned_groups, compute_silhouette)
from dist_harness import run_on_ranks

# two pairs of users: cosine 0.6 inside a pair, 0.2 across (distance 0.4 and 0.8)
PAIRS = np.array([[1.0, 0.6, 0.2, 0.2], [0.6, 1.0, 0.2, 0.2], [0.2, 0.2, 1.0, 0.6], [0.2, 0.2, 0.6, 1.0]])


def _around(centres: list[np.ndarray], members: list[int], noise: float, seed: int = 0) -> np.ndarray:
    """Row u: centre members[u] plus Gaussian noise of the given scale."""
    rng = np.random.default_rng(seed)
    return np.stack([centres[c] + noise * rng.standard_normal(centres[c].shape) for c in members])


def test_cosine_similarity_against_hand_values():
    """Whole vectors: cos of (1,0,1,0), (1,1,0,0), (0,0,0,0) by hand; blocks of 2: the mean of the
    two blocks' cosines; a zero vector is 0 to the others and 1 to itself."""
    v = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = compute_cosine_similarity(v)
    np.testing.assert_allclose(s, [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]], atol=1e-15)
    # blocks [2, 2]: block 1 cos((1,0),(1,1)) = 1/sqrt(2), block 2 cos((1,0),(0,0)) = 0
    sb = compute_cosine_similarity(v, blocks=[2, 2])
    assert sb[0, 1] == pytest.approx((1 / np.sqrt(2) + 0) / 2, abs=1e-15) and sb[0, 2] == 0 and sb[2, 2] == 1
    assert np.array_equal(sb, sb.T)
    with pytest.raises(ValueError, match=r"blocks \[3, 2\] must be positive lengths adding up to .* 4"):
        compute_cosine_similarity(v, blocks=[3, 2])
    with pytest.raises(ValueError, match=r"one length for every user; got lengths \[3, 4\]"):
        compute_cosine_similarity([torch.zeros(4), torch.zeros(3)])


def test_eigengap_and_silhouette_against_hand_values():
    """PAIRS: degrees 2, so the Laplacian's eigenvalues are 1 - eig(W)/2 = 0, 0.4, 0.8, 0.8 (W's
    eigenvalues 2, 1.2, 0.4, 0.4): gaps 0.4, 0.4, 0; the pair split's silhouette is (0.8-0.4)/0.8."""
    gaps = compute_eigengap_scores(PAIRS, max_k=3)
    assert gaps.keys() == {1, 2, 3}
    assert gaps[1] == pytest.approx(0.4) and gaps[2] == pytest.approx(0.4) and gaps[3] == pytest.approx(0, abs=1e-12)
    distance = 1 - PAIRS
    assert compute_silhouette(distance, [[0, 1], [2, 3]]) == pytest.approx(0.5)
    # user 0 alone counts 0; users 1, 2, 3: a = mean(0.8, 0.8) or (0.8 + 0.4)/2 ... by hand:
    # u1: a = mean(d12, d13) = 0.8, b = d10 = 0.4 -> (0.4-0.8)/0.8 = -0.5
    # u2: a = mean(d21, d23) = 0.6, b = 0.8 -> 0.25;  u3: the same as u2
    assert compute_silhouette(distance, [[0], [1, 2, 3]]) == pytest.approx((0 - 0.5 + 0.25 + 0.25) / 4)


def test_average_linkage_against_hand_merges():
    """Distances of four points on a line at 0, 1, 3, 7: the merges are {0,1} (1), then {0,1} with
    2 (mean 2.5 < 4 and 5.5), then everything; k picks the partition along the way."""
    x = np.array([0.0, 1.0, 3.0, 7.0])
    d = np.abs(x[:, None] - x[None, :])
    assert compute_average_linkage(d, 4) == [[0], [1], [2], [3]]
    assert compute_average_linkage(d, 3) == [[0, 1], [2], [3]]
    assert compute_average_linkage(d, 2) == [[0, 1, 2], [3]]
    assert compute_average_linkage(d, 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"number of groups \(5\) must be between 1 and the number of users \(4\)"):
        compute_average_linkage(d, 5)


@pytest.mark.parametrize("rule", ["eigengap", "silhouette"])
def test_users_built_as_two_clusters_land_in_those_two_clusters(rule):
    """Six users around two orthogonal directions, interleaved (0, 2, 4 and 1, 3, 5): both rules
    find the two clusters, labelled by their smallest member; a given k=2 agrees."""
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal(64), rng.standard_normal(64)
    v -= (v @ u) / (u @ u) * u                                           # orthogonal to u
    vectors = torch.tensor(_around([u, v], [0, 1, 0, 1, 0, 1], noise=0.05))
    found = compute_learned_groups(vectors, rule=rule)
    assert found.groups == [[0, 2, 4], [1, 3, 5]] and found.k == 2 and found.rule == rule
    assert found.labels() == [0, 1, 0, 1, 0, 1]
    assert max(found.scores, key=found.scores.get) == 2
    assert compute_learned_groups(vectors, k=2).groups == [[0, 2, 4], [1, 3, 5]]
    # the same users listed in another order: the same clusters, in the new indices
    perm = [5, 0, 3, 1, 4, 2]                                              # new user i is old user perm[i]
    again = compute_learned_groups(vectors[perm], rule=rule)
    assert again.groups == [[0, 2, 3], [1, 4, 5]]                          # old users 5, 3, 1 and 0, 4, 2
    summary = found.summary()
    assert summary["groups"] == [[0, 2, 4], [1, 3, 5]] and summary["rule"] == rule
    assert len(summary["similarity"]) == 6 and summary["similarity"][0][0] == 1.0


def test_three_clusters_of_unequal_size():
    """Users 0-2, 3-4 and 5 around three orthogonal directions: the eigengap picks three groups."""
    basis = np.eye(30)[:3] * 5
    vectors = _around(list(basis), [0, 0, 0, 1, 1, 2], noise=0.3, seed=4)
    found = compute_learned_groups(vectors)
    assert found.groups == [[0, 1, 2], [3, 4], [5]]


def test_one_group_when_every_user_is_alike():
    """Five users around one direction (cosines near 0.99): the eigengap keeps them in one group,
    the largest gap being the first. FedLEASE's silhouette rule cannot say "one group" (its
    candidates start at 2), which is why it is not the default."""
    centre = np.random.default_rng(2).standard_normal(64)
    vectors = _around([centre], [0] * 5, noise=0.05, seed=3)
    assert compute_cosine_similarity(vectors).min() > 0.95
    found = compute_learned_groups(vectors)
    assert found.groups == [[0, 1, 2, 3, 4]] and found.k == 1
    assert found.scores[1] > 0.9 and all(found.scores[1] > s for k, s in found.scores.items() if k > 1)
    assert compute_learned_groups(vectors, rule="silhouette").k >= 2
    # one user, or two under the eigengap rule: one group; a given k splits two users
    assert compute_learned_groups(vectors[:1]).groups == [[0]]
    assert compute_learned_groups(vectors[:2]).groups == [[0, 1]]
    assert compute_learned_groups(vectors[:2], k=2).groups == [[0], [1]]


def test_ties_are_broken_by_the_smallest_users_and_the_smaller_k():
    """Four identical users: every distance ties, so average linkage merges in index order and
    k=2 gives [[0, 1, 2], [3]] on every call; equal eigengaps (PAIRS-like ties) choose the smaller k."""
    same = torch.ones(4, 8)
    for _ in range(3):
        assert compute_learned_groups(same, k=2).groups == [[0, 1, 2], [3]]
        assert compute_learned_groups(same, k=3).groups == [[0, 1], [2], [3]]
    assert compute_learned_groups(same).groups == [[0, 1, 2, 3]]
    # vectors whose similarity is exactly PAIRS (Cholesky factor rows): gaps 0.4 and 0.4 tie -> k = 1
    rows = np.linalg.cholesky(PAIRS)
    np.testing.assert_allclose(compute_cosine_similarity(rows), PAIRS, atol=1e-12)
    found = compute_learned_groups(rows)
    assert found.k == 1 and found.scores[1] == pytest.approx(found.scores[2])
    assert compute_learned_groups(rows, k=2).groups == [[0, 1], [2, 3]]


def test_bad_arguments_are_refused_with_the_rule():
    """An unknown rule, k outside 1..users, max_k < 1 and no users each name the value and the rule."""
    v = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"rule \('kmeans'\) must be one of eigengap, silhouette"):
        compute_learned_groups(v, rule="kmeans")
    with pytest.raises(ValueError, match=r"number of groups \(4\) must be between 1 and the number of users \(3\)"):
        compute_learned_groups(v, k=4)
    with pytest.raises(ValueError, match=r"max_k \(0\) must be >= 1"):
        compute_learned_groups(v, max_k=0)
    with pytest.raises(ValueError, match="at least one user"):
        compute_learned_groups(np.zeros((0, 4)))


# --------------------------------------------------------------------------------------------
# CoMiGS with learned groups on real process groups (gloo, 4 users on 2 ranks, the tiny GPT-2)
# --------------------------------------------------------------------------------------------

def _shared(u) -> dict:
    return {n: p.detach().clone() for n, p in u.shared["generalists"]}


def _everyone(topo, mine: dict) -> dict:
    from comigs_dist import dist
    return {k: v for part in dist.all_gather_objects(topo, mine) for k, v in part.items()}


@torch.no_grad()
def _plant(u, clusters):
    """Move the user's generalist experts by its cluster's direction (the same on every rank) plus
    a little noise of its own, and its attention LoRA by noise alone."""
    tags = u.model.report.tags
    for i, (name, p) in enumerate(u.shared["generalists"]):
        own = torch.Generator().manual_seed(1000 * u.user_idx + i)
        if tags[name].kind == "expert":
            direction = torch.Generator().manual_seed(100 * clusters[u.user_idx] + i)
            p.add_(torch.randn(p.shape, generator=direction) * 0.1 + torch.randn(p.shape, generator=own) * 0.01)
        else:
            p.add_(torch.randn(p.shape, generator=own) * 0.1)


def _learned_worker(rank, world_size, tmp_path):
    import dataclasses
    from comigs_dist import checkpoint, train
    from comigs_dist.config import check_world_size
    from comigs_dist.monitor import Monitor
    from dist_harness import init_topology
    from helpers import tiny_config
    topo0 = init_topology(n_users=4)
    cfg = tiny_config(method="comigs_learned", n_users=4, **{"method_options.warmup_rounds": 1})
    check_world_size(cfg, world_size)
    run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
    tags = run.users[0].model.report.tags
    train.sync(run, 0)
    clusters = {0: 0, 2: 0, 1: 1, 3: 1}  # across the ranks: users 0, 1 live on rank 0, users 2, 3 on rank 1
    for u in run.users:
        _plant(u, clusters)
    pre = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    sent = {u.user_idx: u.stats.bytes_sent for u in run.users}
    train.sync(run, 1)  # the end of the warm-up: gather, cluster, switch, first mean per group
    for u in run.users:
        st = u.method_state
        assert st.groups == [[0, 2], [1, 3]], st.groups
        summary = u.method.results(u)["learned_groups"]
        assert summary["groups"] == [[0, 2], [1, 3]] and summary["rule"] == "eigengap" and summary["after_round"] == 1
        assert max(summary["scores"].values()) == summary["scores"]["2"]
    assert run.topo.members("learned_000") == (0, 2) and run.topo.members("learned_001") == (1, 3)
    post = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    for n, tag in tags.items():
        if n not in pre[0]:
            continue
        for v in range(4):
            members = [w for w in range(4) if clusters[w] == clusters[v]] if tag.kind == "expert" else range(4)
            want = (sum(pre[w][n].double() for w in members) / len(members)).float()
            assert torch.equal(post[v][n], want), (n, v)
    # bytes: the update vectors gathered once (all2all: 4 x) + the attention mean + the group's mean
    for u in run.users:
        feat = sum(p.numel() for n, p in u.shared["generalists"] if tags[n].kind == "expert") * 4
        attn = sum(p.numel() for n, p in u.shared["generalists"] if tags[n].kind == "attn") * 4
        assert u.stats.bytes_sent - sent[u.user_idx] == 4 * feat + attn + feat
        assert u.stats.by_group[f"learned_00{clusters[u.user_idx]}"]["bytes_sent"] == feat
        # the switch round's analytic figure prices the gather too (TensorBoard's analytic curve)
        switch = train.analytic_round_bytes(u, cfg.comm, run.topo, run.comm.count, round_idx=1)["total"]["sent"]
        assert switch == 4 * feat + attn + feat, (switch, feat, attn)

    # the next round: local steps, then each group's mean again (the bytes of one plain round)
    train.local_iterations(run, run.users, 1, Monitor.silent([u.user_idx for u in run.users]))
    pre = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    sent = {u.user_idx: u.stats.bytes_sent for u in run.users}
    train.sync(run, 2)
    post = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    for n, tag in tags.items():
        if n in pre[0] and tag.kind == "expert":
            assert torch.equal(post[0][n], post[2][n]) and torch.equal(post[1][n], post[3][n]), n
            assert not torch.equal(post[0][n], post[1][n]), n
    from types import SimpleNamespace
    for u in run.users:
        total = train.analytic_round_bytes(u, cfg.comm, run.topo, run.comm.count)["total"]["sent"]
        assert u.stats.bytes_sent - sent[u.user_idx] == total
        # all2all after the switch: the attention to all 4 users, the generalists to the group's 2
        feat = sum(p.numel() for n, p in u.shared["generalists"] if tags[n].kind == "expert") * 4
        attn = sum(p.numel() for n, p in u.shared["generalists"] if tags[n].kind == "attn") * 4
        a2a = train.analytic_round_bytes(u, SimpleNamespace(mode="all2all", dtype="fp32"), run.topo, False)
        assert a2a["total"]["sent"] == 4 * attn + 2 * feat
        assert a2a["groups"][f"learned_00{clusters[u.user_idx]}"]["members"] == \
            [v for v in range(4) if clusters[v] == clusters[u.user_idx]]
    # the groups survive a checkpoint (weights_only load)
    u = run.users[0]
    checkpoint.save_atomic({"m": u.method.state_dict(u)}, tmp_path / f"learned_{rank}.pt")
    u.method_state.groups = None
    u.method.load_state_dict(u, checkpoint.load(tmp_path / f"learned_{rank}.pt")["m"])
    assert u.method_state.groups == [[0, 2], [1, 3]]


@pytest.mark.slow
def test_users_built_as_two_clusters_are_put_into_them_and_average_within_them(tmp_path):
    """4 users on 2 ranks whose generalist updates are planted around two directions, {0, 2} and
    {1, 3} (across the ranks): after the warm-up they are put into exactly those groups (eigengap
    picks 2), each group's generalists become bit for bit its members' mean and the attention
    LoRA the mean of all; the switch costs one gather of the updates besides the means; the next
    round costs a plain round's bytes; the groups survive a checkpoint."""
    run_on_ranks(_learned_worker, 2, tmp_path, timeout_s=600)


def _partial_worker(rank, world_size, tmp_path):
    import dataclasses
    from comigs_dist import train
    from comigs_dist.config import check_world_size
    from dist_harness import init_topology
    from helpers import tiny_config
    topo0 = init_topology(n_users=4)
    cfg = tiny_config(method="comigs_learned", n_users=4, **{"method_options.warmup_rounds": 2, "train.rounds": 4,
                                                             "train.users_per_round": 2})
    check_world_size(cfg, world_size)
    draws = [sorted(train.participants(cfg, 4, r)) for r in range(4)]
    assert draws == [[0, 2], [1, 3], [1, 3], [0, 3]], draws  # the premise of every step below
    run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
    tags = run.users[0].model.report.tags
    features = [n for n, _ in run.users[0].shared["generalists"] if tags[n].kind == "expert"]
    clusters = {0: 0, 2: 0, 1: 1, 3: 1}
    train.sync(run, 0)
    for u in run.users:  # round 0: users 0 and 2 take part ("train": planted updates)
        if u.user_idx in draws[0]:
            _plant(u, clusters)
    planted = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    train.sync(run, 1)  # 0 and 2 upload, 1 and 3 download their mean; 0 and 2 keep their values
    first_mean = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    for n in features:
        want = ((planted[0][n].double() + planted[2][n].double()) / 2).float()
        assert torch.equal(first_mean[1][n], want) and torch.equal(first_mean[3][n], want), n
        assert torch.equal(first_mean[0][n], planted[0][n]), n
    for u in run.users:  # round 1: users 1 and 3 take part
        if u.user_idx in draws[1]:
            _plant(u, clusters)
    pre = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    # the switch (round 2): 0 and 2 trained in round 0 only and never downloaded since, 1 and 3 in
    # round 1: every update counts, and the planted clusters come out
    sent = {u.user_idx: u.stats.bytes_sent for u in run.users}
    train.sync(run, 2)
    feat = sum(p.numel() for n, p in run.users[0].shared["generalists"] if tags[n].kind == "expert") * 4
    attn = sum(p.numel() for n, p in run.users[0].shared["generalists"] if tags[n].kind == "attn") * 4
    for u in run.users:
        assert u.method_state.groups == [[0, 2], [1, 3]], u.method_state.groups
        # every user sends its update in the gather (4 payloads, all2all), which 0 and 2, sitting
        # the round out, were counted nothing for; 1 and 3 upload to both means too, each with its
        # contributor count (fp32)
        means = (attn + 4) + (feat + 4) if u.user_idx in draws[1] else 0
        assert u.stats.bytes_sent - sent[u.user_idx] == 4 * feat + means, (u.user_idx, sent, feat, attn)
    post = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    for n in features:
        want = ((pre[1][n].double() + pre[3][n].double()) / 2).float()
        assert torch.equal(post[1][n], want) and torch.equal(post[3][n], want), n  # group {1, 3}: its mean
        assert torch.equal(post[0][n], pre[0][n]) and torch.equal(post[2][n], pre[2][n]), n  # sat it out
    # round 3: user 0 takes part, and no member of its group uploaded (neither trained in round 2):
    # its group's first aggregate is the generalists' latest global one, formed in round 1
    train.sync(run, 3)
    last = _everyone(topo0, {u.user_idx: _shared(u) for u in run.users})
    for n in features:
        assert torch.equal(last[0][n], first_mean[1][n]), n
        assert torch.equal(last[2][n], pre[2][n]), n


@pytest.mark.slow
def test_learned_groups_under_partial_participation(tmp_path):
    """4 users on 2 ranks, 2 per round ({0, 2}, {1, 3}, {1, 3}, {0, 3}), warm-up of 2 rounds, updates
    planted around {0, 2} and {1, 3}: every user's update counts at the switch, whether it trained in
    the round before or earlier and never downloaded since, and the planted groups are found; a
    group's mean is over its members that uploaded, the others keep their values; a group none of
    whose members uploaded hands out the latest global aggregate of the generalists."""
    run_on_ranks(_partial_worker, 2, tmp_path, timeout_s=600)


def test_learned_groups_refuse_a_warm_up_that_leaves_a_user_undrawn():
    """2 of 4 users per round: a 1-round warm-up draws users 0 and 2 only; the error names the
    others and the shortest warm-up that draws everyone, before any work (n_users given, or known
    from the world size)."""
    from comigs_dist.config import ConfigError, check_world_size, load_config
    args = ["method=comigs_learned", "train.rounds=4", "train.users_per_round=2", "method_options.warmup_rounds=1"]
    message = r"user\(s\) 1, 3 take part in none of the warm-up's rounds.*set method_options.warmup_rounds=2"
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*args, "n_users=4"])
    cfg = load_config(None, args)
    with pytest.raises(ConfigError, match=message):
        check_world_size(cfg, 4)
    check_world_size(load_config(None, [*args[:-1], "method_options.warmup_rounds=2"]), 4)


def _one_group_worker(rank, world_size, tmp_path):
    import dataclasses
    import json
    from comigs_dist import dist, train
    from dist_harness import init_topology
    from helpers import tiny_config, tiny_lora_numel, without_timing
    topo = init_topology(n_users=4)
    rows = {}
    for name, extra in (("comigs_1g1s", {}), ("comigs_learned", {"method_options.warmup_rounds": 1,
                                                                  "method_options.k": 1})):
        cfg = tiny_config(method=name, n_users=4, **extra, **{"train.rounds": 3, "eval.every": 1})
        mine = train.run(cfg, dataclasses.replace(topo, groups={}), tmp_path / name)
        rows[name] = sorted((r for part in dist.all_gather_objects(topo, mine) for r in part), key=lambda r: r["user"])
    money = {"bytes_sent", "bytes_received", "comm_groups", "learned_groups"}
    for a, b in zip(rows["comigs_1g1s"], rows["comigs_learned"]):
        a, b = without_timing(a), without_timing(b)
        assert {k: v for k, v in a.items() if k not in money} == {k: v for k, v in b.items() if k not in money}
        assert b["learned_groups"]["groups"] == [[0, 1, 2, 3]]
        # the one gather of the switch is all that is added: all2all, 4 members x the generalist
        # experts' LoRAs in fp32
        generalist_numel = tiny_lora_numel(attn_rank=0)
        assert b["bytes_sent"] - a["bytes_sent"] == 4 * generalist_numel * 4
        assert b["bytes_received"] - a["bytes_received"] == 4 * generalist_numel * 4
    if rank == 0:
        (tmp_path / "rows.json").write_text(json.dumps(rows["comigs_learned"]))


@pytest.mark.slow
def test_one_learned_group_is_plain_comigs_bit_for_bit(tmp_path):
    """k=1 after a one-round warm-up, 4 users on 2 ranks, 3 rounds: every user's test perplexity
    (each round), training curve, routing and final loss equal CoMiGS-1G1S's bit for bit."""
    run_on_ranks(_one_group_worker, 2, tmp_path, timeout_s=600)


@pytest.mark.parametrize("overrides, message", [
    (["method_options.warmup_rounds=4", "train.rounds=4"],
     r"method_options.warmup_rounds \(4\) must be >= 1 and below train.rounds \(4\)"),
    (["method_options.warmup_rounds=0"], r"method_options.warmup_rounds \(0\) must be >= 1"),
    (["n_users=4", "method_options.k=5"], r"method_options.k \(5\) must be <= n_users \(4\)"),
    (["method_options.rule=kmeans"], r"rule"),
    (["comm.groups=[{name: a, users: all, experts: [0]}]"], r"comm.groups is set, but method 'comigs_learned'"),
])
def test_learned_groups_refuse_bad_settings_before_any_work(overrides, message):
    from comigs_dist.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=comigs_learned", "train.rounds=20", *overrides])
