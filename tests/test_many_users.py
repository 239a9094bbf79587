"""Many users per rank and partial participation: the same users on 8, 2 and 1 ranks give the same
results; a round's participants are one seeded draw on every rank; users that sit a round out
leave it exactly as they entered; the aggregate is the mean over the participants."""

import pytest
import torch

from comigs_dist.config import ConfigError, check_world_size, load_config
from dist_harness import init_topology, run_on_ranks
from helpers import assert_packed_matches_one_by_one, assert_same_rows, read_rows, run_and_record, tiny_config

N_USERS = 8
# method -> overrides; the heterogeneous methods get users of different sizes
METHODS = {
    "comigs_1g1s": {},
    "comigs_1gxs": {"moe.n_experts": "[2, 3, 2, 3, 2, 3, 2, 3]"},
    "comigs_2s": {},
    "comigs_2g": {},
    "comigs_tr": {},
    "pfedmoe": {},
    "local_moe": {},
    "fedavg_moe": {},
    "local_moe_tr": {},
    "fedavg_moe_tr": {},
    "fedavg": {},
    "hetlora": {"moe.n_experts": "[1, 2, 1, 2, 1, 2, 1, 2]", "method_options.match": "full"},
    "pcl": {"method_options.mix_after": 0, "method_options.mix_every": 1},
}


def _config(name, participation=1.0, **extra):
    return tiny_config(method=name, n_users=N_USERS, **METHODS.get(name, {}), **extra,
                       **{"train.rounds": 3, "train.local_steps": 2, "train.router_every": 2,
                          "train.router_steps": 1, "train.participation": participation,
                          "eval.max_tokens": 256, "data.test_tokens": 512})


def _rows_worker(rank, world_size, tmp_path, names, participation):
    topo = init_topology(n_users=N_USERS)
    assert len(topo.local_users) == N_USERS // world_size
    for name in names:
        cfg = _config(name, participation)
        check_world_size(cfg, world_size)
        tag = f"{name}_{world_size}_{participation}"
        run_and_record(topo, cfg, tmp_path / tag, tmp_path / f"{tag}.json")


def _rows(tmp_path, world_size, names, participation=1.0):
    run_on_ranks(_rows_worker, world_size, tmp_path, names, participation, timeout_s=900)
    return {name: read_rows(tmp_path / f"{name}_{world_size}_{participation}.json") for name in names}


# by default a routed method with a router phase and HetLoRA's per-user ranks (PCL's own mixing runs
# on 4 ranks and 1 in the participation test below); every method of METHODS under `pytest -m extended`
DEFAULT_EQUIVALENCE = ["comigs_1g1s", "hetlora"]


@pytest.mark.slow
@pytest.mark.parametrize("names", [DEFAULT_EQUIVALENCE, pytest.param(sorted(METHODS), marks=pytest.mark.extended)],
                         ids=["two_methods", "every_method"])
def test_eight_users_on_eight_two_and_one_ranks_give_identical_results(tmp_path, names):
    """Every routed method, FedAvg, HetLoRA and PCL (two of them by default): every user's
    results.json row (test perplexity, training curve, routing, bytes) is equal bit for bit whether
    its 8 users run one per rank, four per rank or all on one rank: the float64 mean of comm.exact
    does not depend on where the partial sums are taken."""
    runs = {w: _rows(tmp_path, w, names) for w in (8, 2, 1)}
    for name in names:
        for w in (2, 1):
            for a, b in zip(runs[8][name], runs[w][name]):
                assert a == b, (name, w, a["user"], {k for k in a if a[k] != b.get(k)})


@pytest.mark.slow
def test_partial_participation_gives_identical_results_on_four_ranks_and_on_one(tmp_path):
    """3 of 8 users per round (a seeded draw): the users' rows agree bit for bit between 4 ranks
    and 1; users that never took part end where they started (their test perplexity is the base's)."""
    names = ["comigs_1g1s", "pcl"]
    runs = {w: _rows(tmp_path, w, names, participation=0.375) for w in (4, 1)}
    for name in names:
        for a, b in zip(runs[4][name], runs[1][name]):
            assert a == b, (name, a["user"], {k for k in a if a[k] != b.get(k)})
        taken = [u["rounds_taken"] for u in runs[1][name]]
        assert sum(taken) == 3 * 3 and max(taken) < 3  # 3 rounds of 3 users; nobody every round here
        for u in runs[1][name]:
            assert (u["rounds_taken"] == 0) == (u["test_ppl"] == u["base_test_ppl"]), u["user"]


def test_the_participants_are_a_seeded_draw_of_the_configured_size():
    """Round r's participants: users_per_round of them, the same for the same (seed, round),
    different across rounds and seeds, every user at full participation."""
    from comigs_dist.train import participants
    cfg = load_config(None, ["n_users=100", "train.participation=0.1"])
    draws = [participants(cfg, 100, r) for r in range(20)]
    assert all(len(d) == 10 and all(0 <= u < 100 for u in d) for d in draws)
    assert draws == [participants(cfg, 100, r) for r in range(20)]
    assert len(set(draws)) == 20
    other = load_config(None, ["n_users=100", "train.participation=0.1", "seed=45"])
    assert [participants(other, 100, r) for r in range(20)] != draws
    counted = load_config(None, ["n_users=100", "train.users_per_round=7"])
    assert len(participants(counted, 100, 3)) == 7
    assert participants(load_config(None, ["n_users=5"]), 5, 0) == frozenset(range(5))
    # every user takes part about as often: 20 rounds of 10 cover most of the 100
    assert len(set().union(*draws)) > 80


@pytest.mark.parametrize("overrides, message", [
    (["train.participation=0"], r"train.participation \(0.0\) must be in \(0, 1\]"),
    (["train.participation=1.5"], r"train.participation \(1.5\) must be in \(0, 1\]"),
    (["n_users=4", "train.users_per_round=5"], r"train.users_per_round \(5\) must be <= n_users \(4\)"),
    (["method=centralized", "train.participation=0.5"], r"method 'centralized' cannot run with partial participation"),
])
def test_bad_participation_is_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_more_ranks_than_users_is_refused_with_the_way_out():
    cfg = load_config(None, ["n_users=2"])
    with pytest.raises(ConfigError, match=r"n_users \(2\) is smaller than the number of ranks \(4\).*"
                                          r"--nproc_per_node=2"):
        check_world_size(cfg, 4)
    check_world_size(load_config(None, ["n_users=9"]), 4)  # uneven spreads are fine


def _state(u) -> dict:
    return {n: p.detach().clone() for n, p in u.model.report.params.items()}


def _moments(u) -> list:
    return [v.clone() for st in u.expert_opt.state_dict()["state"].values() for v in st.values() if torch.is_tensor(v)]


def _participation_worker(rank, world_size, tmp_path):
    """4 users on 2 ranks, 2 take part per round."""
    from comigs_dist import dist, train
    from comigs_dist.monitor import Monitor
    topo = init_topology(n_users=4)
    cfg = tiny_config(method="fedavg", n_users=4, **{"train.users_per_round": 2, "train.local_steps": 2})
    check_world_size(cfg, world_size)
    run = train.build_rank(cfg, topo)
    draws = dist.all_gather_objects(topo, [sorted(train.participants(cfg, 4, r)) for r in range(6)])
    assert all(d == draws[0] for d in draws), "every rank draws the same participants"
    silent = Monitor.silent([u.user_idx for u in run.users])
    train.run_round(run, 0)
    for round_idx in range(1, 4):
        now, before = train.participants(cfg, 4, round_idx), train.participants(cfg, 4, round_idx - 1)
        held = {u.user_idx: (_state(u), u.step, u.train_sampler.generator.get_state().clone(),
                             _moments(u))
                for u in run.users}
        # the aggregate by hand: the mean over last round's participants of what they uploaded
        uploads = {u.user_idx: [p.detach().clone() for _, p in u.shared["generalists"]] for u in run.users}
        everyone = {k: v for part in dist.all_gather_objects(topo, uploads) for k, v in part.items()}
        mean = [(sum(everyone[u][i].double() for u in sorted(before)) / len(before)).float()
                for i in range(len(everyone[0]))]
        active = train.sync(run, round_idx)
        assert sorted(u.user_idx for u in active) == sorted(set(now) & {u.user_idx for u in run.users})
        for u in active:  # downloaded the mean over the participants of the round before
            for (name, p), m in zip(u.shared["generalists"], mean):
                torch.testing.assert_close(p.detach(), m, rtol=0, atol=0, msg=name)
        train.local_iterations(run, active, round_idx, silent)
        for u in run.users:
            params, step, gen, moments = held[u.user_idx]
            if u.user_idx in now:
                assert u.step == step + 2
                continue
            assert u.step == step, "a user that sits out takes no step"
            assert all(torch.equal(params[n], p) for n, p in _state(u).items()), "its tensors are untouched"
            assert torch.equal(u.train_sampler.generator.get_state(), gen), "its sampler did not move"
            after = _moments(u)
            assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(moments, after)), \
                "its AdamW moments are untouched"
    rows = {u.user_idx: u.rounds_taken for u in run.users}
    taken = {k: v for part in dist.all_gather_objects(topo, rows) for k, v in part.items()}
    assert sum(taken.values()) == 2 * 4  # 4 rounds of 2 participants


def test_users_that_sit_a_round_out_leave_it_as_they_entered(tmp_path):
    """4 users on 2 ranks, 2 per round: a non-participant's parameters, optimiser moments, step
    counters and sampler are exactly as before the round; the draw is the same on every rank."""
    run_on_ranks(_participation_worker, 2, tmp_path, timeout_s=300)


# a constant lr: the cut run's schedule would otherwise end at its own round 2
RESUME_SETTINGS = {"n_users": 4, "train.participation": 0.5, "train.local_steps": 2, "checkpoint.every": 1,
                   "train.schedule": "constant"}


def _resume_rows(rank, world_size, tmp_path, what, settings=RESUME_SETTINGS):
    """what: [(name, rounds, resume)]; each run's rows to <name>.json."""
    topo = init_topology(n_users=4)
    for name, rounds, resume in what:
        cfg = tiny_config(**settings, **{"train.rounds": rounds, "resume": resume, "out_dir": str(tmp_path / name)})
        check_world_size(cfg, world_size)
        run_and_record(topo, cfg, tmp_path / name, tmp_path / f"{name}.json")


@pytest.mark.slow
def test_a_run_checkpointed_on_two_ranks_resumes_on_one_or_four_with_identical_results(tmp_path):
    """4 users, half taking part each round: 2 rounds on 2 ranks, then a resume to round 3 on 1
    rank and on 4 ranks ends where 3 uninterrupted rounds on 2 ranks end, every user bit for bit."""
    import shutil
    run_on_ranks(_resume_rows, 2, tmp_path, [("whole", 3, "false"), ("cut", 2, "false")], timeout_s=600)
    shutil.copytree(tmp_path / "cut", tmp_path / "on1")
    shutil.copytree(tmp_path / "cut", tmp_path / "on4")
    run_on_ranks(_resume_rows, 1, tmp_path, [("on1", 3, "true")], timeout_s=600)
    run_on_ranks(_resume_rows, 4, tmp_path, [("on4", 3, "true")], timeout_s=600)
    whole = read_rows(tmp_path / "whole.json")
    for name in ("on1", "on4"):
        assert_same_rows(whole, read_rows(tmp_path / f"{name}.json"), name)


def _packed_worker(rank, world_size, tmp_path, overrides):
    topo = init_topology(n_users=4)
    steps = assert_packed_matches_one_by_one(
        topo, lambda pack: tiny_config(n_users=4, **overrides, **{"train.pack_users": pack, "train.local_steps": 3,
                                                                   "train.micro_batch_size": 2}))
    assert steps == 6


@pytest.mark.parametrize("overrides", [
    {"method": "comigs_1g1s"},
    {"method": "comigs_1gxs", "moe.n_experts": "[2, 3, 4, 2]", "moe.top_k": 1},
    {"method": "fedavg"},
])
def test_packed_users_train_like_users_run_one_by_one(tmp_path, overrides):
    """4 users on one rank, 2 rounds: train.pack_users=on (one packed forward and backward per
    micro-batch) gives every user the losses and the final parameters of pack_users=off to float32
    rounding, top-1 and top-2, with users of different numbers of experts."""
    run_on_ranks(_packed_worker, 1, tmp_path, overrides, timeout_s=300)


def _empty_group_worker(rank, world_size, tmp_path, private=None):
    """Two groups {0, 1} and {2, 3}; one user per round: a round after one in which no member of
    a group took part gives that group's participant the group's latest aggregate again. Plain
    (``private`` None): the aggregate by hand. Private (``private``: privacy.* overrides; the noised
    release cannot be redone by hand): the server's memory changes with each release, stays when
    nobody uploaded, and every downloading member gets exactly it (with one participant a round,
    the member that downloads a re-handed aggregate never saw its release). Under DP the
    accountant counts every one of the 7 private rounds on both ranks, a re-handing one too."""
    from comigs_dist import dist, train
    from comigs_dist.monitor import Monitor
    topo = init_topology(n_users=4)
    groups = ("[{name: left, users: [0, 1], experts: [0], attention: true}, "
              "{name: right, users: [2, 3], experts: [0], attention: true}]")
    cfg = tiny_config(method="comigs_1g1s", n_users=4, **{"train.users_per_round": 1, "train.local_steps": 1,
                                                          "train.rounds": 8, "comm.groups": groups, **(private or {})})
    check_world_size(cfg, world_size)
    run = train.build_rank(cfg, topo)
    silent = Monitor.silent([u.user_idx for u in run.users])
    latest, server, checked = None, None, 0
    for round_idx in range(cfg.train.rounds):  # the rounds privacy plans for (a release beyond them stops the run)
        before = train.participants(cfg, 4, round_idx - 1) if round_idx else frozenset()
        held = {u.user_idx: [p.detach().clone() for _, p in u.shared["right"]]
                for u in run.users if "right" in u.shared}
        held = {k: v for part in dist.all_gather_objects(topo, held) for k, v in part.items()}
        if round_idx == 0:
            latest = held[2]  # the common start: the group's first member's initialisation
        elif before & {2, 3} and private is None:  # the mean of what the group's users of the round before uploaded
            ups = sorted(before & {2, 3})
            latest = [(sum(held[u][i].double() for u in ups) / len(ups)).float() for i in range(len(held[2]))]
        active = train.sync(run, round_idx)
        mine = {u.user_idx: [p.detach().clone() for _, p in u.shared["right"]] for u in active if "right" in u.shared}
        after = {k: v for part in dist.all_gather_objects(topo, mine) for k, v in part.items()}
        if private is not None and round_idx > 0:
            # what the group's server holds (float64) after the round's sync; a member downloads it
            held_now = {g: t.clone() for g, t in run.comm.latest_aggregates(["right"]).items()}
            memory = next(m["right"] for m in dist.all_gather_objects(topo, held_now) if m)
            if before & {2, 3}:  # a fresh private release: the server's memory changes
                assert server is None or not torch.equal(memory, server), round_idx
            else:  # nobody uploaded: the memory stays, and a participant gets it again
                assert torch.equal(memory, server), round_idx
            server, latest = memory, None
        for user, values in after.items():
            if latest is None:  # private: the flat float64 memory, rounded once to float32
                assert torch.equal(torch.cat([v.flatten() for v in values]), server.float()), (round_idx, user)
            else:
                assert all(torch.equal(a, b) for a, b in zip(values, latest)), (round_idx, user, sorted(before))
            checked += round_idx > 0 and not (before & {2, 3})
        train.local_iterations(run, active, round_idx, silent)
    if run.accountant is not None:  # every private round counts, on every rank alike (rank 0 holds only
        counted = [None] * world_size  # group left's users, rank 1 only right's)
        torch.distributed.all_gather_object(counted, run.accountant.rounds)
        assert counted == [7] * world_size, counted
    torch.save(checked, tmp_path / f"checked_{rank}.pt")


@pytest.mark.parametrize("private", [None, {"privacy.secure_agg": True},
                                     {"privacy.dp": "user", "privacy.noise_multiplier": 0.5}],
                         ids=["plain", "secure_agg", "dp"])
def test_a_group_without_uploads_downloads_its_latest_aggregate_again(tmp_path, private):
    """comm.groups {0, 1} and {2, 3}, one participant per round: when no member of a group took
    part in the round before, the group's participant downloads the group's latest aggregate
    again (no 'non-finite' stop), exactly; under privacy.secure_agg and privacy.dp=user too (the
    latest released aggregate: handing it out again is post-processing and costs no privacy)."""
    run_on_ranks(_empty_group_worker, 2, tmp_path, private, timeout_s=300)
    assert torch.load(tmp_path / "checked_0.pt") >= 1, "the draw never made the case happen; change the seed"


GROUP_RESUME_SETTINGS = {
    "method": "comigs_1g1s", "n_users": 4, "train.users_per_round": 1, "train.local_steps": 1,
    "checkpoint.every": 1, "train.schedule": "constant",
    "comm.groups": ("[{name: left, users: [0, 1], experts: [0], attention: true}, "
                    "{name: right, users: [2, 3], experts: [0], attention: true}]")}


def test_a_resume_hands_out_a_groups_latest_aggregate_as_the_whole_run_does(tmp_path):
    """Groups {0, 1} and {2, 3}, one participant per round, so that every round one group had no
    upload in the round before and its participant gets the group's latest aggregate again: cut
    after round 3 and resumed to round 6, the run ends where 6 uninterrupted rounds end, every
    user bit for bit (the aggregate a server holds travels in the round checkpoints)."""
    import shutil
    run_on_ranks(_resume_rows, 2, tmp_path, [("whole", 6, "false"), ("cut", 3, "false")], GROUP_RESUME_SETTINGS,
                 timeout_s=600)
    shutil.copytree(tmp_path / "cut", tmp_path / "resumed")
    run_on_ranks(_resume_rows, 2, tmp_path, [("resumed", 6, "true")], GROUP_RESUME_SETTINGS, timeout_s=600)
    whole, resumed = read_rows(tmp_path / "whole.json"), read_rows(tmp_path / "resumed.json")
    assert [u["rounds_taken"] for u in whole] == [u["rounds_taken"] for u in resumed]
    assert_same_rows(whole, resumed, "resumed")


def _weights_worker(rank, world_size, tmp_path):
    """comm.weights=tokens, 4 users with 2000, 3000, 5000, 6000 training tokens on 2 ranks, 3 per
    round: the aggregate is the token-weighted mean of round 0's 3 participants (by hand)."""
    from comigs_dist import dist, train
    topo = init_topology(n_users=4)
    cfg = tiny_config(method="fedavg", n_users=4, **{"comm.weights": "tokens", "train.users_per_round": 3,
                                                     "data.train_tokens": "[2000, 3000, 5000, 6000]"})
    check_world_size(cfg, world_size)
    run = train.build_rank(cfg, topo)
    train.run_round(run, 0)
    before = train.participants(cfg, 4, 0)
    tokens = dist.all_gather_objects(topo, {u.user_idx: u.n_train_tokens for u in run.users})
    tokens = {k: v for part in tokens for k, v in part.items()}
    assert len(set(tokens.values())) == 4
    ups = {u.user_idx: [p.detach().clone() for _, p in u.shared["generalists"]] for u in run.users}
    ups = {k: v for part in dist.all_gather_objects(topo, ups) for k, v in part.items()}
    total = sum(tokens[u] for u in before)
    mean = [(sum(ups[u][i].double() * tokens[u] for u in sorted(before)) / total).float()
            for i in range(len(ups[0]))]
    uniform = [(sum(ups[u][i].double() for u in sorted(before)) / len(before)).float() for i in range(len(ups[0]))]
    active = train.sync(run, 1)
    for u in active:
        for (name, p), m, flat in zip(u.shared["generalists"], mean, uniform):
            torch.testing.assert_close(p.detach(), m, rtol=1e-6, atol=1e-7, msg=name)
        assert any(not torch.allclose(p.detach(), f) for (_, p), f in zip(u.shared["generalists"], uniform))


def test_token_weighted_means_over_the_participants(tmp_path):
    """comm.weights=tokens: the aggregate is the mean of last round's participants weighted by their
    training tokens (hand-computed), not the uniform one."""
    run_on_ranks(_weights_worker, 2, tmp_path, timeout_s=300)
