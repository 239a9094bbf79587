"""The non-finite guard on real process groups: stop names the user, skip averages the others."""
import math

import pytest
import torch
import torch.distributed as tdist

from comigs_dist import dist, guard
from comigs_dist.config import check_world_size
from comigs_dist.model.roles import Role
from comigs_dist.train import build_rank, run, sync
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config


def _gather(tensors: dict) -> list[dict]:
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, {k: v.clone() for k, v in tensors.items()})
    return out


def _by_role(model, role):
    return {n: p.detach().clone() for n, p in model.report.params.items() if model.report.tags[n].role == role}


def _prepare(rank, world_size, timeout_s=30, **overrides):
    cfg = tiny_config(**overrides)
    check_world_size(cfg, world_size)
    topo = init_topology(timeout_s=timeout_s)
    rank_run = build_rank(cfg, topo)
    r = rank_run.users[0]
    with torch.no_grad():  # users hold different generalists: rank-dependent, exactly representable shifts
        for _, p in r.shared["generalists"]:
            p.add_(0.25 * (rank + 1))
    return cfg, topo, rank_run, r


def _aggregate(rank_run, round_idx=2):
    """What train.run does at the start of a round (after the first): the guard, then the sync."""
    sync(rank_run, round_idx)


def _skip_worker(rank, world_size, tmp_path, mode):
    cfg, topo, rank_run, r = _prepare(rank, world_size, **{"comm.mode": mode, "guard.nan": "skip"})
    poisoned = r.shared["generalists"][3][0]
    if rank == 1:
        with torch.no_grad():
            r.shared["generalists"][3][1].view(-1)[5] = math.nan
    before = _gather(_by_role(r.model, Role.GENERALIST))
    specialists = _by_role(r.model, Role.SPECIALIST)

    _aggregate(rank_run)

    after = _gather(_by_role(r.model, Role.GENERALIST))
    for name in before[0]:
        expected = (before[0][name] + before[2][name]) / 2  # user 1 contributes nothing
        for user in range(world_size):  # ... and takes the others' average, like everyone
            assert torch.equal(after[user][name], after[0][name]), (name, user)
        torch.testing.assert_close(after[0][name], expected, rtol=0, atol=1e-6)
        assert torch.isfinite(after[1][name]).all()
    assert not torch.equal(before[1][poisoned], before[1][poisoned])  # it was NaN before
    assert all(torch.equal(v, _by_role(r.model, Role.SPECIALIST)[k]) for k, v in specialists.items())
    assert r.guard_skipped_rounds == (1 if rank == 1 else 0) and r.contributing
    # the contributor count travels in the same collective: one extra fp32 element
    payload = sum(p.numel() for _, p in r.shared["generalists"]) * 4 + 4
    copies = 1 if mode == "server" else world_size  # delivered payload (dist.py)
    assert r.stats.bytes_sent == payload * copies and r.stats.collectives == 1

    # every user of the group sitting out: nothing to average, every user stops with one message
    with torch.no_grad():
        r.shared["generalists"][0][1].view(-1)[0] = math.inf
    with pytest.raises(FloatingPointError, match="every member of group 'generalists' .* sat this round out"):
        _aggregate(rank_run)


@pytest.mark.parametrize("mode", ["server", pytest.param("all2all", marks=pytest.mark.extended)])
def test_skip_leaves_a_poisoned_user_out_of_the_average(tmp_path, mode):
    """guard.nan=skip with a NaN in user 1's generalist: all 3 users end with the mean of users 0 and 2,
    user 1 counts one skipped round, specialists are untouched, the count costs 4 bytes."""
    run_on_ranks(_skip_worker, 3, tmp_path, mode)


def _stop_worker(rank, world_size, tmp_path):
    # a collective timeout longer than the harness's: only user 1 leaving can end the others' wait
    cfg, topo, rank_run, r = _prepare(rank, world_size, timeout_s=900)
    name = r.shared["generalists"][2][0]
    if rank == 1:
        with torch.no_grad():
            r.shared["generalists"][2][1].view(-1)[0] = math.inf
        with pytest.raises(FloatingPointError, match=rf"user 1, round 3: shared parameter {name} \(group "
                                                     rf"'generalists'\) holds inf before the round's aggregation"):
            _aggregate(rank_run)
        dist.report_failure("FloatingPointError: inf in a generalist")  # as main.py does before exiting
        return  # the harness tears the group down: the others' collective fails at once
    with pytest.raises(dist.PeerFailure) as info:
        _aggregate(rank_run)
    text = str(info.value)
    # caused by user 1 leaving, not by the collective's timeout (then every user would still run)
    assert "still running" not in text and "slower than comm.timeout_s" not in text, text
    assert text.startswith(f"user {rank} lost contact") and "all_reduce on group 'generalists'" in text
    # rank 0 hosts the store the note sits in; rank 2 may find the store gone and fall back to the pid
    assert "user 1 failed: FloatingPointError: inf in a generalist" in text or (
        rank == 2 and "user 1 (pid" in text and "is no longer running" in text), text


def test_stop_names_the_user_round_and_parameter_and_the_others_say_who(tmp_path):
    """guard.nan=stop with an inf in user 1's generalist: user 1 raises before the collective, naming
    round and parameter; users 0 and 2 do not hang: their PeerFailure names user 1 and its cause."""
    run_on_ranks(_stop_worker, 3, tmp_path)


METHOD_OVERRIDES = {
    "comigs_1g1s": {},
    # methods with an aggregation of their own: PCL mixes whole models (here after every round),
    # HetLoRA and FlexLoRA aggregate MLP LoRAs of per-user ranks outside the shared groups
    "pcl": {"method_options.mix_after": 0, "method_options.mix_every": 1},
    "hetlora": {},
    "flexlora": {},
    # the methods since the paper: FedALT's individual LoRA travels outside the groups (a user that
    # sits out with a non-finite one restarts it from its RoW); FedDPA's global adapter, FedSA-LoRA's
    # A matrices and the learned groups' generalists (the fault hits the switch round) are shared
    "fedalt": {},
    "fedalt_mlp": {"method": "fedalt", "method_options.mixer": "mlp"},  # FedALT's whole-MLP mixer
    "feddpa": {"train.router_every": 3, "train.router_steps": 2},
    "fedsa_lora": {},
    "comigs_learned": {"method_options.warmup_rounds": 2},
}


def _run_skip_worker(rank, world_size, tmp_path, method):
    import os
    os.environ["COMIGS_FAULT"] = "nan,user=1,round=2"
    cfg = tiny_config(**{"guard.nan": "skip", "train.rounds": 3, "method": method, **METHOD_OVERRIDES[method]})
    check_world_size(cfg, world_size)
    (row,) = run(cfg, init_topology(), tmp_path / "run")
    rows = [None] * world_size
    tdist.all_gather_object(rows, row)
    assert [u["guard_skipped_rounds"] for u in rows] == [0, 1]
    assert all(math.isfinite(u["test_ppl"]) and u["test_ppl"] < u["base_test_ppl"] for u in rows), rows


# by default the plain mixture, a method with an aggregation of its own and one with two phases;
# the rest under `pytest -m extended`
DEFAULT_GUARD_METHODS = ("comigs_1g1s", "pcl", "feddpa")


@pytest.mark.parametrize("method", [m if m in DEFAULT_GUARD_METHODS else pytest.param(m, marks=pytest.mark.extended)
                                    for m in METHOD_OVERRIDES])
def test_a_nan_injected_in_a_run_is_skipped_and_counted(tmp_path, method):
    """COMIGS_FAULT=nan in a whole run under guard.nan=skip (user 1's first shared tensor and, for a
    method that aggregates tensors itself, the first of those): the run finishes with finite
    perplexities for every user and user 1's row of results.json counts one skipped round."""
    run_on_ranks(_run_skip_worker, 2, tmp_path, method)


def _own_stop_worker(rank, world_size, tmp_path):
    cfg, topo, rank_run, r = _prepare(rank, world_size, method="hetlora")
    if rank == 1:
        with torch.no_grad():  # only in the MLP LoRA, which HetLoRA aggregates outside the groups
            r.method.own_aggregated(r)[0][1].view(-1)[0] = math.nan
    if rank == 1:
        with pytest.raises(FloatingPointError, match=r"user 1, round 3: .*method's own aggregation.* holds nan"):
            _aggregate(rank_run)
        dist.report_failure("FloatingPointError: nan in the MLP LoRA")
    else:
        with pytest.raises(dist.PeerFailure):
            _aggregate(rank_run)


def test_stop_covers_what_a_method_aggregates_itself(tmp_path):
    """guard.nan=stop also checks HetLoRA's MLP LoRA (outside the shared groups): user 1 stops
    naming it, before it reaches any collective; the others learn that user 1 is gone."""
    run_on_ranks(_own_stop_worker, 2, tmp_path)


class _Run:
    """The few attributes guard.check_loss reads."""
    def __init__(self, mode):
        self.cfg = tiny_config(**{"guard.nan": mode})
        self.user_idx = 3
        self.step, self.guard_skipped_steps = 14, 0


def test_a_non_finite_loss_stops_or_drops_the_step():
    """stop: FloatingPointError naming user, phase, iteration and round; skip: the step is dropped and counted."""
    with pytest.raises(FloatingPointError, match=r"user 3: the expert loss is nan at local iteration 14 \(round 5\)"):
        guard.check_loss(_Run("stop"), math.nan, True)
    run_ = _Run("skip")
    assert guard.check_loss(run_, math.inf, False) and run_.guard_skipped_steps == 1



def test_a_stop_records_the_round_the_user_is_in_not_one_derived_from_its_steps():
    """A user that sat rounds out (train.participation < 1) has taken fewer steps than the rounds
    imply, and router steps follow a round's last expert step: the round is the one
    train.local_iterations set (here 9, where 14 steps of 3 would say 5). Stopped keeps user and
    round through pickling (it may cross a process boundary)."""
    import pickle
    run_ = _Run("stop")
    run_.round = 9
    with pytest.raises(guard.Stopped, match=r"local iteration 14 \(round 9\)") as caught:
        guard.check_loss(run_, math.nan, False)
    assert (caught.value.user, caught.value.round) == (3, 9)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (type(again), str(again), again.user, again.round) == (guard.Stopped, str(caught.value), 3, 9)


def _gradient_worker(rank, world_size, tmp_path, mode):
    from comigs_dist.train import expert_step
    cfg, topo, rank_run, r = _prepare(rank, world_size, timeout_s=900, method="centralized", **{"guard.nan": mode})
    sync(rank_run, 0)  # one model: every replica starts from user 0's
    r.model.set_trainable(lambda tag: r.method.trains_in("expert", tag))
    name, param = next((n, p) for n, p in r.model.report.params.items() if n.endswith("lora_B") and p.requires_grad)
    if rank == 1:  # an overflow in the backward only: the loss stays finite
        param.register_hook(lambda g: torch.full_like(g, math.inf))
    before = {n: p.detach().clone() for n, p in r.model.report.params.items()}
    step = lambda: expert_step(rank_run, rank_run.users)[0]
    if mode == "stop":
        if rank == 1:
            with pytest.raises(FloatingPointError, match=rf"user 1: the gradient of {name} holds inf at local "
                                                         rf"iteration 0 \(round 1\) before it is averaged"):
                step()
            dist.report_failure("FloatingPointError: inf in a gradient")
            dist.shutdown()  # leave at once: the other user waits in the all_reduce
            return
        with pytest.raises(dist.PeerFailure, match="user 1 failed: FloatingPointError: inf in a gradient"):
            step()
        return
    loss, _, _ = step()
    assert math.isfinite(loss)
    after = _gather({n: p.detach() for n, p in r.model.report.params.items()})
    assert r.guard_skipped_steps == (1 if rank == 1 else 0)
    for n in after[0]:  # both replicas took the step of user 0's gradient alone: still one model, finite
        assert torch.isfinite(after[0][n]).all() and torch.equal(after[0][n], after[1][n]), n
    assert any(not torch.equal(after[0][n], before[n]) for n in before if r.model.report.params[n].requires_grad)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_gradients_are_checked_before_the_data_parallel_average(tmp_path, mode):
    """Centralized, a finite loss but an inf gradient on user 1: stop raises on user 1 before the
    all_reduce, naming the parameter, and user 0 learns why; skip leaves user 1's gradient out, both
    replicas step with user 0's and stay equal and finite (no NaN ever reaches the average)."""
    run_on_ranks(_gradient_worker, 2, tmp_path, mode)



def _nothing_left_worker(rank, world_size, tmp_path, method):
    """Every user's shared parameters turn NaN after round 1's steps under guard.nan=skip: every
    rank ends in Stopped, and each names the same user (the group's lowest) and round 2."""
    from comigs_dist import train
    cfg = tiny_config(**{"guard.nan": "skip", "train.rounds": 3, "method": method, **METHOD_OVERRIDES[method]})
    check_world_size(cfg, world_size)
    steps = train.local_iterations

    def poisoned(rank_run, active, round_idx, monitor):
        steps(rank_run, active, round_idx, monitor)
        with torch.no_grad():
            for u in active:
                for tensors in u.shared.values():
                    tensors[0][1].fill_(math.nan)
                for _, t in u.method.own_aggregated(u)[:1]:
                    t.fill_(math.nan)
    train.local_iterations = poisoned
    with pytest.raises(guard.Stopped) as stop:
        run(cfg, init_topology(), tmp_path / "run")
    seen = [None] * world_size
    tdist.all_gather_object(seen, (stop.value.user, stop.value.round))
    assert seen == [(0, 2)] * world_size, seen


@pytest.mark.parametrize("method", ["comigs_1g1s", "pcl"])
def test_nothing_left_to_average_names_the_same_user_on_every_rank(tmp_path, method):
    """The record a skip run left with nobody to average writes (stopped.json) is the same on
    every rank: it named each rank's own first user before, so the last rank to write won."""
    run_on_ranks(_nothing_left_worker, 2, tmp_path, method)
