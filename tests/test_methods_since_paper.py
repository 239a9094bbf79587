"""FedALT (a mixer per projection and per MLP), FedSA-LoRA, FedDPA and CoMiGS with learned groups
as the run sees them: the same users give the same results whatever their placement on ranks (one
or two users per rank); partial participation (FedALT's rest of world over the users that
uploaded, by hand; whole runs on 2 ranks and 1 agree and undrawn users end as they started); a run
cut and resumed ends where the whole run ends (FedDPA's reference sampler, the learned groups'
warm-up sums and groups)."""
import dataclasses

import pytest
import torch

from dist_harness import init_topology, run_on_ranks
from helpers import assert_packed_matches_one_by_one, assert_same_rows, cut_run, read_rows, run_and_record, \
    tiny_config

N_USERS = 4
SCHEDULE = {"train.rounds": 3, "train.local_steps": 2, "train.router_every": 2, "train.router_steps": 2,
            "eval.every": 1, "eval.max_tokens": 256, "data.test_tokens": 512}
METHODS = {  # tag -> overrides (the tag is the method unless they set one)
    "fedalt": {},
    "fedalt_mlp": {"method": "fedalt", "method_options.mixer": "mlp"},  # FedALT's whole-MLP mixer
    "fedsa_lora": {},
    "feddpa": {},
    "comigs_learned": {"method_options.warmup_rounds": 1, "method_options.k": 2},
}


def _config(name, **extra):
    return tiny_config(**{"method": name, "n_users": N_USERS, **SCHEDULE, **METHODS[name], **extra})


def _rows_worker(rank, world_size, tmp_path, runs):
    """runs: [(tag, method, overrides)]; rank 0 writes every user's row (timing left out) to <tag>.json."""
    topo = init_topology(n_users=N_USERS)
    for tag, name, extra in runs:
        cfg = _config(name, **extra)
        run_and_record(topo, cfg, tmp_path / tag, tmp_path / f"{tag}.json")


def _read(tmp_path, tag):
    return read_rows(tmp_path / f"{tag}.json")


@pytest.mark.slow
def test_two_users_per_rank_give_the_results_of_one_user_per_rank(tmp_path):
    """4 users, one per rank (4 ranks) and two per rank (2 ranks), 3 rounds with an evaluation
    each: every user's results.json row is the same bit for bit for each of the four methods
    (perplexities, curves, bytes, the learned groups)."""
    for world in (4, 2):
        run_on_ranks(_rows_worker, world, tmp_path, [(f"{n}_{world}", n, {}) for n in METHODS], timeout_s=900)
    for name in METHODS:
        assert_same_rows(_read(tmp_path, f"{name}_4"), _read(tmp_path, f"{name}_2"), name)
    assert _read(tmp_path, "comigs_learned_2")[0]["learned_groups"]["groups"] in ([[0, 1], [2, 3]], [[0, 2], [1, 3]],
                                                                                   [[0, 3], [1, 2]], [[0], [1, 2, 3]],
                                                                                   [[0, 1, 2], [3]], [[0, 1, 3], [2]],
                                                                                   [[0, 2, 3], [1]])


PARTIAL = {"train.users_per_round": 2}


@pytest.mark.slow
def test_partial_participation_on_two_ranks_and_one(tmp_path):
    """2 of 4 users per round (a seeded draw): each method's rows agree bit for bit between 2 ranks
    and 1; a user never drawn ends at the base model's perplexity (learned groups: a warm-up of 2
    rounds, which draws every user)."""
    names = ["fedalt", "fedalt_mlp", "fedsa_lora", "feddpa", "comigs_learned"]
    extra = {n: {**PARTIAL, **({"method_options.warmup_rounds": 2} if n == "comigs_learned" else {})} for n in names}
    for world in (2, 1):
        run_on_ranks(_rows_worker, world, tmp_path, [(f"{n}_{world}", n, extra[n]) for n in names], timeout_s=900)
    for name in names:
        one, two = _read(tmp_path, f"{name}_1"), _read(tmp_path, f"{name}_2")
        assert_same_rows(two, one, name)
        assert sum(r["rounds_taken"] for r in one) == 3 * 2
        for r in one:
            assert (r["rounds_taken"] == 0) == (r["test_ppl"] == r["base_test_ppl"]), (name, r["user"])


def _fedalt_partial_worker(rank, world_size, tmp_path, tag):
    """4 users on 2 ranks, 2 per round: each participant's RoW after the sync, by hand."""
    from comigs_dist import dist, train
    from comigs_dist.monitor import Monitor
    topo = init_topology(n_users=N_USERS)
    cfg = _config(tag, **PARTIAL)
    run = train.build_rank(cfg, dataclasses.replace(topo, groups={}))
    train.run_round(run, 0)
    checked = 0
    for round_idx in range(1, 4):
        uploaded = train.participants(cfg, N_USERS, round_idx - 1)
        now = train.participants(cfg, N_USERS, round_idx)
        mine = {u.user_idx: [ind.detach().clone() for _, _, ind in u.method_state] for u in run.users}
        rows = {u.user_idx: [row.detach().clone() for _, row, _ in u.method_state] for u in run.users}
        ind = {k: v for part in dist.all_gather_objects(topo, mine) for k, v in part.items()}
        active = train.sync(run, round_idx)
        for u in run.users:
            for i, (_, row, _) in enumerate(u.method_state):
                if u.user_idx not in now:  # sits this round out: untouched
                    assert torch.equal(row.detach(), rows[u.user_idx][i])
                    continue
                others = [v for v in sorted(uploaded) if v != u.user_idx]
                want = (sum(ind[v][i].double() for v in others) / len(others)).float()
                assert torch.equal(row.detach(), want), (round_idx, u.user_idx, i)
                checked += 1
        train.local_iterations(run, active, round_idx, Monitor.silent([u.user_idx for u in run.users]))
    assert checked > 0


@pytest.mark.parametrize("tag", ["fedalt", "fedalt_mlp"])
def test_fedalt_rest_of_world_under_partial_participation(tmp_path, tag):
    """2 of 4 users per round on 2 ranks, a mixer per projection or per MLP: a participant's RoW is
    the mean of the other users that uploaded (took part in the round before), bit for bit, whether
    or not it uploaded itself; users that sit the round out keep theirs."""
    run_on_ranks(_fedalt_partial_worker, 2, tmp_path, tag, timeout_s=300)


def _resume_worker(rank, world_size, tmp_path, plans):
    topo = init_topology(n_users=N_USERS)
    for tag, name, rounds, resume in plans:
        extra = {"train.rounds": rounds, "resume": resume, "out_dir": str(tmp_path / tag), "checkpoint.every": 1,
                 "train.schedule": "constant"}
        if name == "comigs_learned":
            extra["method_options.warmup_rounds"] = 2
        if tag.startswith("partial"):  # 3 groups: one at least holds neither user 1 nor 3, round 3's uploaders
            extra.update(PARTIAL, **{"method_options.k": 3})
        cfg = _config(name, **extra)
        run_and_record(topo, cfg, tmp_path / tag, tmp_path / f"{tag}.json")


@pytest.mark.slow
def test_a_cut_run_resumes_to_the_whole_runs_results(tmp_path):
    """4 users on 2 ranks, 4 rounds checkpointed every round: FedDPA, FedALT and FedSA-LoRA resumed
    from round 2,
    CoMiGS with learned groups (warm-up 2) from round 2 (warm-up sums in the checkpoint) and from
    round 3 (groups in the checkpoint, process groups rebuilt), each to round 4, end bit for bit
    where the uninterrupted run ends; so do learned groups under partial participation (2 of 4)
    resumed from round 3, whose last round hands one group, none of whose members took part in
    round 3, the aggregate it started from (the group's latest aggregate in the checkpoint)."""
    wholes = [("feddpa", "feddpa"), ("fedalt", "fedalt"), ("fedsa", "fedsa_lora"), ("learned", "comigs_learned"),
              ("partial_learned", "comigs_learned")]
    run_on_ranks(_resume_worker, 2, tmp_path, [(tag, name, 4, "false") for tag, name in wholes], timeout_s=900)
    resumed = [("feddpa", "feddpa", 2), ("fedalt", "fedalt", 2), ("fedsa", "fedsa_lora", 2),
               ("learned", "comigs_learned", 2),
               ("learned", "comigs_learned", 3), ("partial_learned", "comigs_learned", 3)]
    for tag, _, keep in resumed:
        cut_run(tmp_path / tag, tmp_path / f"{tag}_from{keep}", keep)
    run_on_ranks(_resume_worker, 2, tmp_path, [(f"{tag}_from{keep}", name, 4, "true") for tag, name, keep in resumed],
                 timeout_s=900)
    for tag, _, keep in resumed:
        assert_same_rows(_read(tmp_path, tag), _read(tmp_path, f"{tag}_from{keep}"), f"{tag} from round {keep}")
    learned = _read(tmp_path, "learned")[0]["learned_groups"]
    assert learned["after_round"] == 2 and len(learned["groups"]) == 2


def _packed_worker(rank, world_size, tmp_path, name):
    topo = init_topology(n_users=N_USERS)
    steps = assert_packed_matches_one_by_one(
        topo, lambda pack: _config(name, **{"train.pack_users": pack, "train.micro_batch_size": 2}))
    assert steps == 4


@pytest.mark.parametrize("name", ["fedalt", "fedalt_mlp", "feddpa"])
def test_paired_adapters_train_packed_like_one_by_one(tmp_path, name):
    """4 users on one rank, 2 rounds: train.pack_users=on (one packed forward of every user's batch
    through the shared base, pairs on the projections, FedALT's MLP mixture with its router) gives
    each user the losses and parameters of pack_users=off to float32 rounding (FedDPA: its phase
    weights set per user)."""
    run_on_ranks(_packed_worker, 1, tmp_path, name, timeout_s=300)
