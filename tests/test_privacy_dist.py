"""Privacy wired into the runs (docs/privacy.md): private means on real process groups against hand
computations (clipping, the seeded noise at the server or split over the users, a user that sits
out, secure aggregation within its stated resolution, server == all2all), runs that equal the
plain run bit for bit with no noise and a huge clip, epsilon in results.json and TensorBoard, a
resumed private run, and the configuration errors before any work."""
import dataclasses
import shutil

import pytest
import torch

from comigs_dist.config import ConfigError, check_world_size, load_config, privacy_accounting
from comigs_dist.privacy import dp, resolution
from comigs_dist.config import PrivacyConfig
from dist_harness import init_topology, run_on_ranks
from helpers import read_rows, run_and_record, tiny_config

SEED = 42
SHAPES = [(64, 32), (100,)]
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)
NORMS = (0.5, 3.0, 10.0, 0.2)   # each user's update norm: users 1 and 2 are clipped at C = 1
GROUP = "generalists"


# --------------------------------------------------------------------------------------------
# private means by hand (no model): 4 users, 2 per rank
# --------------------------------------------------------------------------------------------

def _reference() -> torch.Tensor:
    """The aggregate every user downloaded last round (float32, flat)."""
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(7))


def _buffer(user: int) -> torch.Tensor:
    """User ``user``'s buffer now: the reference plus an update of norm NORMS[user] (float32)."""
    direction = torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 + user), dtype=torch.float64)
    return (_reference().double() + direction * (NORMS[user] / direction.norm())).float()


def _split(flat: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in SHAPES:
        n = torch.Size(s).numel()
        out.append(flat[offset:offset + n].clone().view(s))
        offset += n
    return out


def _clipped(user: int, clip: float) -> torch.Tensor:
    """The user's update (buffer - reference, float64) scaled by min(1, C / ||update||)."""
    update = _buffer(user).double() - _reference().double()
    norm = torch.linalg.vector_norm(update)
    return update if norm <= clip else update * (clip / norm)


def _mean(topo, priv, mode, *, planned=None, skip=(), count=False, nan_user=None, round_idx=1):
    """Every local user's flat result of one private mean (a fresh buffer per user)."""
    from comigs_dist import dist
    from comigs_dist.privacy.mean import PrivateMean
    private = PrivateMean(priv, noise_multiplier=priv.noise_multiplier, seed=SEED, groups=[GROUP])
    private.start_round(round_idx, planned, {u: {GROUP: _reference()} for u in topo.local_users})
    comm = dist.Comm(topo, mode, "fp32", count=count, privacy=private)
    tensors = {u: _split(torch.full((NUMEL,), float("nan")) if u == nan_user else _buffer(u))
               for u in topo.local_users}
    size = comm.mean(GROUP, tensors, skip=set(skip))
    return {u: torch.cat([t.reshape(-1) for t in ts]) for u, ts in tensors.items()}, comm, size, private


def _plain(topo, mode, *, skip=(), count=False):
    from comigs_dist import dist
    comm = dist.Comm(topo, mode, "fp32", count=count)
    tensors = {u: _split(_buffer(u)) for u in topo.local_users}
    comm.mean(GROUP, tensors, skip=set(skip))
    return {u: torch.cat([t.reshape(-1) for t in ts]) for u, ts in tensors.items()}


def _as_sent(values: torch.Tensor) -> torch.Tensor:
    """A float64 payload rounded to fp32, as it travels."""
    return values.float().double()


def _same_everywhere(results: dict) -> torch.Tensor:
    """Every local user got the same result, and every rank too; returns it."""
    import torch.distributed as tdist
    first = next(iter(results.values()))
    assert all(torch.equal(r, first) for r in results.values())
    everyone = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, first)
    assert all(torch.equal(e, first) for e in everyone)
    return first


def _means_worker(rank, world_size, tmp_path):
    topo = init_topology(n_users=4)
    topo.build_groups({GROUP: range(4)})
    assert len(topo.local_users) == 2
    ref = _reference().double()

    # noise 0 and a huge clip: the plain mean bit for bit, with or without a user left out
    off = PrivacyConfig(dp="user", clip=1e30, noise_multiplier=0.0)
    for mode in ("server", "all2all"):
        got, *_ = _mean(topo, off, mode)
        assert all(torch.equal(got[u], p) for u, p in _plain(topo, mode).items()), mode
        got, *_ = _mean(topo, off, mode, planned={0, 1, 2}, skip={3}, count=True)
        assert all(torch.equal(got[u], p) for u, p in _plain(topo, mode, skip={3}, count=True).items()), mode

    # clipping at C = 1: A + sum_i clip(u_i) / 4, each payload rounded to fp32 as it travels
    clip = PrivacyConfig(dp="user", clip=1.0, noise_multiplier=0.0)
    payloads = [_as_sent(ref + _clipped(u, 1.0)) for u in range(4)]
    expected = (sum(payloads) / 4).float()
    for mode in ("server", "all2all"):
        got, _, _, private = _mean(topo, clip, mode)
        assert torch.equal(_same_everywhere(got), expected), mode
        assert {u: [pytest.approx(NORMS[u], rel=1e-5)] for u in topo.local_users} == private.norms
        assert private.released == 1

    # the server's noise: one seeded draw of std z C added to the sum, the same on every rank and mode
    z = 0.7
    server = PrivacyConfig(dp="user", clip=1.0, noise_multiplier=z)
    noise = dp.add_server_noise(torch.zeros(NUMEL, dtype=torch.float64), noise_multiplier=z, clip=1.0, seed=SEED,
                                round_idx=1, group=GROUP)
    assert float(noise.std()) == pytest.approx(z, rel=0.05)
    expected = ((sum(payloads) + noise) / 4).float()
    by_mode = {mode: _same_everywhere(_mean(topo, server, mode)[0]) for mode in ("server", "all2all")}
    assert torch.equal(by_mode["server"], by_mode["all2all"])
    assert torch.equal(by_mode["server"], expected)
    # another round draws other noise
    assert not torch.equal(_same_everywhere(_mean(topo, server, "server", round_idx=2)[0]), expected)

    # noise_at=users: each of the 4 adds its own share of std z C / 2 before sending
    users = dataclasses.replace(server, noise_at="users")
    shares = [dp.add_user_noise(torch.zeros(NUMEL, dtype=torch.float64), noise_multiplier=z, clip=1.0,
                                n_contributing=4, seed=SEED, round_idx=1, group=GROUP, user_idx=u) for u in range(4)]
    assert float(torch.stack(shares).sum(0).std()) == pytest.approx(z, rel=0.05)
    expected = (sum(_as_sent(ref + (_clipped(u, 1.0) + shares[u])) for u in range(4)) / 4).float()
    assert torch.equal(_same_everywhere(_mean(topo, users, "all2all")[0]), expected)

    # a planned contributor that sits out (the guard, its values NaN) sends a zero update, the planned
    # count of 4 divides, and its noise share still reaches the sum
    expected = ((sum(payloads[:3]) + _as_sent(ref)) / 4).float()
    got, comm, size, _ = _mean(topo, clip, "server", skip={3}, count=True, nan_user=3)
    assert torch.equal(_same_everywhere(got), expected)
    assert size == (NUMEL + 1) * 4
    expected = (sum(_as_sent(ref + (_clipped(u, 1.0) if u < 3 else 0) + shares[u]) for u in range(4)) / 4).float()
    assert torch.equal(_same_everywhere(_mean(topo, users, "server", skip={3}, count=True, nan_user=3)[0]), expected)

    # secure aggregation (16 fractional bits, so that the fixed point shows): within the stated
    # resolution of the plain mean over the three users that contribute, whether user 3 is outside
    # the round's contributors or a contributor that sits out with NaN values; int64 travels
    secure = PrivacyConfig(secure_agg=True, frac_bits=16)
    bound = resolution(16, 3) / 3 + 2 ** -20  # the decoded sum's rounding, divided; then fp32's
    plain = _plain(topo, "server", skip={3}, count=True)
    for mode in ("server", "all2all"):
        for planned, nan_user in (({0, 1, 2}, None), (None, 3)):
            got, comm, size, _ = _mean(topo, secure, mode, planned=planned, skip={3}, count=True, nan_user=nan_user)
            result = _same_everywhere(got)
            differ = (result.double() - plain[topo.local_users[0]].double()).abs().max()
            assert 0 < float(differ) <= bound, (mode, planned, float(differ), bound)
            assert size == (NUMEL + 1) * 8
            copies = 1 if mode == "server" else 4
            assert all(comm.user_stats[u].bytes_sent == size * copies for u in topo.local_users)
    # secure aggregation and DP together (noise 0, huge clip): the plain mean within the resolution
    both = PrivacyConfig(dp="user", clip=1e30, noise_multiplier=0.0, secure_agg=True)
    got = _same_everywhere(_mean(topo, both, "server")[0])
    differ = (got.double() - _plain(topo, "server")[topo.local_users[0]].double()).abs().max()
    assert float(differ) <= resolution(32, 4) / 4 + 2 ** -20

    # while privacy is on, nothing else may move a round's values
    _, comm, _, _ = _mean(topo, clip, "server")
    with pytest.raises(ValueError, match=r"group 'generalists' would move users' values through Comm.sum"):
        comm.sum(GROUP, {u: [torch.zeros(3)] for u in topo.local_users})
    with pytest.raises(ValueError, match=r"through Comm.gather in the clear"):
        comm.gather(GROUP, {u: [torch.zeros(3)] for u in topo.local_users})
    with pytest.raises(ValueError, match=r"through Comm.broadcast in the clear"):
        comm.broadcast(GROUP, {u: [torch.zeros(3)] for u in topo.local_users}, start=False)
    with pytest.raises(ValueError, match=r"through Comm.sum_scalars in the clear"):
        comm.sum_scalars(GROUP, {u: [1.0] for u in topo.local_users})
    comm.privacy.groups = frozenset()  # a group the private mean does not cover: its mean would be plain
    with pytest.raises(ValueError, match=r"through Comm.mean in the clear"):
        comm.mean(GROUP, {u: [torch.zeros(3)] for u in topo.local_users})


def test_private_means_match_hand_computations_on_two_ranks_of_two_users(tmp_path):
    """4 users on 2 ranks: noise 0 and a huge clip give the plain mean bit for bit; clipping, the
    server's seeded noise and the users' noise shares give exactly the hand-computed mean (server
    == all2all, every rank alike); a planned user sitting out with NaN sends a zero update;
    secure aggregation is within resolution(frac_bits, n) / n of the plain mean, alone and with
    DP, with 8 bytes an element counted; Comm.sum and Comm.gather are refused."""
    run_on_ranks(_means_worker, 2, tmp_path, timeout_s=300)


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------

def _runs_worker(rank, world_size, tmp_path, n_users, runs):
    topo = init_topology(n_users=n_users)
    for name, overrides in runs:
        cfg = tiny_config(n_users=n_users, out_dir=str(tmp_path / name), **overrides)
        check_world_size(cfg, world_size)
        run_and_record(topo, cfg, tmp_path / name, tmp_path / f"{name}.json")


def _rows(tmp_path, name):
    return read_rows(tmp_path / f"{name}.json")


def test_dp_without_noise_is_the_plain_run_and_epsilon_reaches_the_results(tmp_path):
    """2 ranks, 3 rounds: privacy.dp=user with noise 0 and clip 1e30 ends every user where the
    plain run does, bit for bit (parameters, curves, bytes); a noised run reports epsilon after
    every round equal to dp-accounting's for the rounds released so far, in each user's row, in
    results.json's run-level field and in the federation's TensorBoard events."""
    from comigs_dist.metrics import build_results
    from comigs_dist.privacy.accountant import epsilon
    base = {"train.rounds": 3, "train.local_steps": 2}
    noised = {**base, "privacy.dp": "user", "privacy.noise_multiplier": 1.3, "privacy.clip": 0.05,
              "log.tensorboard": True}
    run_on_ranks(_runs_worker, 2, tmp_path, 2,
                 [("plain", base), ("dp0", {**base, "privacy.dp": "user", "privacy.noise_multiplier": 0.0,
                                            "privacy.clip": 1e30}), ("noised", noised)], timeout_s=600)
    plain, dp0, noisy = (_rows(tmp_path, n) for n in ("plain", "dp0", "noised"))
    for a, b in zip(plain, dp0):
        b = dict(b)
        private = b.pop("privacy")
        assert a == b, {k for k in a if a[k] != b.get(k)}
        assert private["epsilon"] == float("inf")  # no noise (results.json writes null)
        assert private["updates_sent"] == 2 and private["updates_clipped"] == 0
    curves = [[e["epsilon"] for e in u["privacy"]["epsilon_curve"]] for u in noisy]
    expected = [epsilon(1.3, 1.0, r, 1e-5) for r in (0, 1, 2)]  # round 1 releases nothing; rounds 2, 3 one each
    assert curves == [pytest.approx(expected, rel=1e-12)] * 2
    assert expected[1] < expected[2] and noisy[0]["privacy"]["epsilon"] == expected[2]
    assert all(u["privacy"]["updates_clipped"] == 2 for u in noisy)  # clip 0.05: every update is longer
    assert noisy[0]["test_ppl"] != plain[0]["test_ppl"]
    results = build_results(load_config(None, []).to_dict(), noisy, "embedded-in", 1.0)
    assert results["privacy"]["epsilon"] == expected[2] and results["privacy"]["noise_multiplier"] == 1.3
    assert results["privacy"]["accounting"] == {"rounds": 2, "sample_rate": 1.0, "sampling": "poisson",
                                                "n_users": 2, "groups_per_user": 1}
    assert "updates_sent" not in results["privacy"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "noised" / "tb" / "federation"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("federation/privacy_epsilon")]
    assert logged == [(r + 1, pytest.approx(e, rel=1e-6)) for r, e in enumerate(expected)]


def test_secure_aggregation_run_matches_the_plain_run_with_a_user_sitting_out(tmp_path):
    """4 users on 2 ranks, 3 of them per round (a user sits each round out): secure aggregation
    gives every user the plain run's test perplexity to 1e-6 and twice its bytes (int64 against
    fp32, the contributor count included), as the analytic figure says."""
    base = {"train.rounds": 3, "train.local_steps": 2, "train.users_per_round": 3}
    run_on_ranks(_runs_worker, 2, tmp_path, 4, [("plain", base), ("secure", {**base, "privacy.secure_agg": True})],
                 timeout_s=600)
    plain, secure = _rows(tmp_path, "plain"), _rows(tmp_path, "secure")
    taken = [u["rounds_taken"] for u in plain]
    assert sum(taken) == 3 * 3 and min(taken) < 3  # somebody sat a round out
    for a, b in zip(plain, secure):
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-6)
        assert b["bytes_sent"] == 2 * a["bytes_sent"] and b["bytes_received"] == 2 * a["bytes_received"]
        assert b["analytic_bytes_per_round"]["sent"] == 2 * a["analytic_bytes_per_round"]["sent"]
        assert b["privacy"]["sum_resolution"] == resolution(32, 4)


@pytest.mark.slow
def test_a_private_run_resumes_to_the_uninterrupted_result(tmp_path):
    """DP with noise at the users, clipping and secure aggregation, 4 users of whom 2 take part per
    round: 2 rounds on 2 ranks then a resume to round 3 on 1 rank end where 3 straight rounds end,
    bit for bit, epsilon curve included (the references and the accountant are checkpointed)."""
    settings = {"train.participation": 0.5, "train.local_steps": 2, "checkpoint.every": 1,
                "train.schedule": "constant", "privacy.dp": "user", "privacy.noise_at": "users",
                "privacy.noise_multiplier": 0.8, "privacy.clip": 0.05, "privacy.secure_agg": True}
    run_on_ranks(_runs_worker, 2, tmp_path, 4, [("whole", {**settings, "train.rounds": 3}),
                                                ("cut", {**settings, "train.rounds": 2})], timeout_s=600)
    shutil.copytree(tmp_path / "cut", tmp_path / "resumed")
    run_on_ranks(_runs_worker, 1, tmp_path, 4, [("resumed", {**settings, "train.rounds": 3, "resume": "true"})],
                 timeout_s=600)
    whole, resumed = _rows(tmp_path, "whole"), _rows(tmp_path, "resumed")
    assert len(whole[0]["privacy"]["epsilon_curve"]) == 3 and whole[0]["privacy"]["epsilon"] > 0
    for a, b in zip(whole, resumed):
        assert a == b, (a["user"], {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)})


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["privacy.dp=user", "privacy.clip=-1"], r"privacy.clip \(-1.0\) must be a finite number > 0.*privacy.clip=1.0"),
    (["privacy.dp=user", "privacy.delta=1"], r"privacy.delta \(1.0\) must be in \(0, 1\)"),
    (["privacy.dp=user", "privacy.target_epsilon=0.05"],
     r"privacy.target_epsilon \(0.05\) is unreachable in 19 rounds .* raise privacy.target_epsilon to at least 0.16"),
    (["method=hetlora", "privacy.dp=user"], r"privacy.dp=user cannot run with method 'hetlora': .*Comm.sum"),
    (["method=flexlora", "privacy.secure_agg=true"], r"privacy.secure_agg=true cannot run with method 'flexlora'"),
    (["method=pcl", "privacy.dp=user"], r"method 'pcl': every user gathers every other user's whole model"),
    (["method=centralized", "privacy.dp=user"], r"method 'centralized': its gradients are averaged at every step"),
])
def test_bad_privacy_options_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_target_epsilon_waits_for_the_number_of_users_when_the_sample_needs_it():
    """With partial participation and no n_users, the target is calibrated once the world size
    gives the users (check_world_size): an unreachable one is refused there, a reachable one passes."""
    cfg = load_config(None, ["privacy.dp=user", "privacy.target_epsilon=0.2", "train.participation=0.5"])
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon \(0.2\) is unreachable in 19 rounds at sample "
                                          r"rate 0.5"):
        check_world_size(cfg, 4)
    check_world_size(load_config(None, ["privacy.dp=user", "privacy.target_epsilon=8", "train.participation=0.5"]), 4)


def test_the_accountant_sees_the_sample_and_the_groups_of_the_run():
    """Every user: Poisson at rate 1 over train.rounds - 1 releases; 3 of 12 per round: a fixed-size
    sample of 3 out of 12; a user in two comm.groups sends two groups a round."""
    assert privacy_accounting(load_config(None, ["n_users=4"]), 4) == {
        "rounds": 19, "sample_rate": 1.0, "sampling": "poisson", "n_users": 4, "groups_per_user": 1}
    fixed = privacy_accounting(load_config(None, ["n_users=12", "train.users_per_round=3", "train.rounds=5"]), 12)
    assert fixed == {"rounds": 4, "sample_rate": 0.25, "sampling": "fixed", "n_users": 12, "groups_per_user": 1}
    two = load_config(None, ["n_users=4", "moe.n_experts=3", "moe.n_generalists=2",
                             "comm.groups=[{name: everyone, users: all, experts: [0]}, "
                             "{name: pair, users: [0, 1], experts: [1]}, {name: other, users: [2, 3], experts: [1]}]"])
    assert privacy_accounting(two, 4)["groups_per_user"] == 2


def test_groups_that_reveal_the_draw_get_no_sampling_discount():
    """Two of four users a round: one group of everyone keeps the fixed-size sampling discount;
    two clusters do not (each release carries its cluster's planned count, and an undrawn cluster
    re-hands its last release), so the run is accounted as every user in every round, and says why.
    Full participation with clusters is Poisson at rate 1 either way."""
    from comigs_dist.config import sampling_discount_withheld
    clusters = ("[{name: a, users: [0, 1], experts: [0], attention: true}, "
                "{name: b, users: [2, 3], experts: [0], attention: true}]")
    everyone = "[{name: all_of_them, users: all, experts: [0], attention: true}]"
    drawn = ["n_users=4", "train.users_per_round=2", "train.rounds=5"]
    plain = privacy_accounting(load_config(None, drawn), 4)
    assert (plain["sampling"], plain["sample_rate"]) == ("fixed", 0.5)
    one = load_config(None, [*drawn, f"comm.groups={everyone}"])
    assert privacy_accounting(one, 4) == plain and sampling_discount_withheld(one, 4) is None
    two = load_config(None, [*drawn, f"comm.groups={clusters}"])
    assert privacy_accounting(two, 4) == {"rounds": 4, "sample_rate": 1.0, "sampling": "poisson", "n_users": 4,
                                          "groups_per_user": 1}
    assert "comm.groups 'a', 'b' hold only some of the users" in sampling_discount_withheld(two, 4)
    full = load_config(None, ["n_users=4", f"comm.groups={clusters}"])
    assert sampling_discount_withheld(full, 4) is None and privacy_accounting(full, 4)["sampling"] == "poisson"


# methods that aggregate their own way (their own sync or a closing aggregation after the last round)
OWN_WAY = {"comigs_2s_quirks": {"method": "comigs_2s", "method_options.reference_quirks": True},
           "fedprox": {"method": "fedprox"}, "ffa_lora": {"method": "ffa_lora"}, "local": {"method": "local"},
           "feddpa": {"method": "feddpa", "train.router_every": 2, "train.router_steps": 1},
           "feddpa_f": {"method": "feddpa", "method_options.variant": "F", "train.router_steps": 0}}


def test_every_method_refuses_privacy_before_any_work_or_runs_with_it(tmp_path):
    """privacy.dp=user: a method whose traffic privacy cannot cover is refused by the configuration
    check, naming the method and why (FedALT's sum of whole LoRAs, the learned groups' gather, PCL,
    Centralized, HetLoRA, FlexLoRA); they used to fail at round 2, after training had started. Every
    other method with an aggregation of its own runs 3 rounds of 2 users on one rank, and its final
    epsilon is dp-accounting's for the releases planned: train.rounds - 1, plus one for FedDPA's
    aggregation after the last round (both variants)."""
    from comigs_dist.methods import known_methods, method_class
    from comigs_dist.privacy.accountant import epsilon
    private = {"privacy.dp": "user", "privacy.noise_multiplier": 1.3, "privacy.clip": 0.05}
    refused = sorted(m for m in known_methods() if method_class(m).refuses_privacy)
    assert {"fedalt", "comigs_learned", "pcl", "centralized", "hetlora", "flexlora"} <= set(refused), refused
    for m in refused:
        with pytest.raises(ConfigError, match=rf"privacy.dp=user cannot run with method '{m}': "):
            tiny_config(method=m, **private)
    runs = [(name, {"train.rounds": 3, "train.local_steps": 2, **private, **o}) for name, o in OWN_WAY.items()]
    run_on_ranks(_runs_worker, 1, tmp_path, 2, runs, timeout_s=600)
    for name, overrides in runs:
        cfg = tiny_config(n_users=2, **overrides)
        planned = privacy_accounting(cfg, 2)["rounds"]
        assert planned == (3 if name.startswith("feddpa") else 2), (name, planned)
        rows = _rows(tmp_path, name)
        released = 0 if name in ("local", "comigs_2s_quirks") else planned  # these share nothing after round 0
        assert [r["privacy"]["epsilon"] for r in rows] == [pytest.approx(epsilon(1.3, 1.0, released, 1e-5))] * 2, name


def _resolution_worker(rank, world_size, tmp_path):
    """6 users on 3 ranks: users 0, 1 (cluster a) on rank 0, cluster b (2 to 5) on ranks 1 and 2."""
    from comigs_dist import dist, train
    clusters = ("[{name: a, users: [0, 1], experts: [0], attention: true}, "
                "{name: b, users: [2, 3, 4, 5], experts: [0], attention: true}]")
    cfg = tiny_config(n_users=6, **{"privacy.secure_agg": True, "comm.groups": clusters})
    check_world_size(cfg, world_size)
    topo = init_topology(n_users=6)
    if rank == 0:  # the placement the test is about
        assert topo.local_users == [0, 1], topo.local_users
    run = train.build_rank(cfg, topo)
    reports = dist.all_gather_objects(topo, run.privacy["sum_resolution"])
    assert reports == [resolution(32, 4)] * world_size, reports


def test_secure_aggregations_reported_resolution_is_the_runs_largest_group_on_every_rank(tmp_path):
    """The sum resolution results.json reports (taken from user 0's rank) bounds the largest group
    of the run: a rank holding only a 2-user cluster reported 2 x 2^-33 for a run whose other
    cluster sums 4 users."""
    run_on_ranks(_resolution_worker, 3, tmp_path)


def test_dp_refuses_a_wire_dtype_that_rounds_after_the_clip():
    """comm.dtype=bf16 rounds the payload after the clip, which can move a user's contribution by
    more than privacy.clip: refused with the reason and the fix; secure aggregation, alone or with
    DP, is fine (its fixed-point shares are made from the float64 payload)."""
    with pytest.raises(ConfigError, match=r"privacy.dp=user cannot run with comm.dtype=bf16: .* set comm.dtype=fp32"):
        load_config(None, ["privacy.dp=user", "comm.dtype=bf16"])
    assert load_config(None, ["privacy.secure_agg=true", "comm.dtype=bf16"]).comm.dtype == "bf16"
    # with secure aggregation the shares are made from the unrounded float64 payload: accepted
    assert load_config(None, ["privacy.dp=user", "privacy.secure_agg=true", "comm.dtype=bf16"]).comm.dtype == "bf16"


def test_an_unreachable_target_says_when_groups_withhold_the_sampling_discount():
    """A target epsilon (0.1) that only the sampling discount reaches (4 of 40 users a round): with
    two clusters of 20 the error says the discount is withheld and why; without them it is reached."""
    clusters = (f"[{{name: a, users: {list(range(20))}, experts: [0], attention: true}}, "
                f"{{name: b, users: {list(range(20, 40))}, experts: [0], attention: true}}]")
    drawn = ["n_users=40", "train.users_per_round=4", "train.rounds=20", "privacy.dp=user",
             "privacy.target_epsilon=0.1"]
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon \(0.1\) is unreachable .*\(no sampling "
                                          r"discount: comm.groups 'a', 'b' hold only some of the users"):
        load_config(None, [*drawn, f"comm.groups={clusters}"])
    assert load_config(None, drawn).privacy.target_epsilon == 0.1


def test_a_method_releasing_more_often_than_planned_stops_the_run(tmp_path, monkeypatch, capsys):
    """The noise is calibrated to the releases privacy plans (train.rounds - 1, plus a closing
    aggregation); a method that released more than that would exceed the promised epsilon without
    a word. Planned as 1 release, a 3-round FedAvg run stops at its second, naming both counts."""
    from comigs_dist import train
    from comigs_dist.main import main
    real = train.privacy_accounting
    monkeypatch.setattr(train, "privacy_accounting", lambda cfg, n: {**real(cfg, n), "rounds": 1})
    args = ["--config", "configs/debug.yaml", "method=fedavg", "n_users=1", "train.rounds=3", "train.local_steps=1",
            "eval.max_tokens=256", "log.progress=false", "privacy.dp=user", "privacy.noise_multiplier=1.0",
            f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(RuntimeError, match="released a noised aggregate 2 times by round 3, more than the 1 "
                                           "releases privacy planned"):
        main(args)
    assert "user 0 (rank 0) failed: RuntimeError: method 'fedavg' released" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()
