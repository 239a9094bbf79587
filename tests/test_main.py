"""The command line end to end: torchrun with 2 processes on configs/debug.yaml."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT.parent / "shared" / "tools" / "check-results.py"


def _torchrun(nproc: int, *args: str, cwd=ROOT, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "comigs_dist.main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_end_to_end_with_two_processes(tmp_path):
    """configs/debug.yaml on 2 ranks: a table, results.json following the contract, TensorBoard per user."""
    out = tmp_path / "run"
    proc = _torchrun(2, "--config", "configs/debug.yaml", f"out_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mean" in proc.stdout and str(out / "results.json") in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "comigs_1g1s" and results["world_size"] == 2 and results["rounds"] == 2
    assert [u["user"] for u in results["users"]] == [0, 1]
    for u in results["users"]:
        assert u["bytes_sent"] > 0 and u["tokens_per_second"] > 0 and u["test_ppl"] < u["base_test_ppl"]
    assert results["config"]["model"]["name"] == "tiny"
    if CHECK.exists():
        check = subprocess.run([sys.executable, str(CHECK), str(out / "results.json")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    for user in (0, 1):
        assert list((out / "tb" / f"user_{user:02d}").glob("events.out.tfevents.*")), f"no event file for user {user}"
        assert (out / "checkpoints" / f"user_{user:02d}" / "final.pt").is_file()
    assert (out / "config.yaml").is_file()


def test_cli_refuses_fewer_users_than_ranks_and_spreads_more(tmp_path):
    """n_users=1 on 2 ranks: a clear message and a non-zero exit, before any group forms;
    n_users=3 on 2 ranks: a run of 3 users (2 on rank 0, 1 on rank 1)."""
    proc = _torchrun(2, "--config", "configs/debug.yaml", "n_users=1", f"out_dir={tmp_path}/x", timeout=120)
    assert proc.returncode != 0
    assert "n_users (1) is smaller than the number of ranks (2)" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = _torchrun(2, "--config", "configs/debug.yaml", "n_users=3", "train.rounds=1", f"out_dir={tmp_path}/y",
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "y" / "results.json").read_text())
    assert [u["user"] for u in results["users"]] == [0, 1, 2] and results["n_users"] == 3


# --------------------------------------------------------------------------------------------
# the output directory: never another run's, one live run at a time, unique default names
# --------------------------------------------------------------------------------------------

DEBUG = str(ROOT / "configs" / "debug.yaml")
SMALL = ["--config", DEBUG, "n_users=1", "train.rounds=1", "train.local_steps=2", "eval.max_tokens=256",
         "log.progress=false"]


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_overwritten_and_a_refusal_writes_nothing(tmp_path, capsys):
    """A finished run (checkpoint.every=0: results.json, final.pt, config.yaml, TensorBoard) and a
    second run pointed at its out_dir: with resume=false and with resume=auto it exits 2 naming the
    directory, what it holds and the way out (another out_dir: with no round checkpoint there is
    nothing to continue), and not one byte or timestamp there changes."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    assert main([*SMALL, f"out_dir={out}"]) == 0
    before = _snapshot(out)
    assert {"results.json", "config.yaml", "checkpoints/user_00/final.pt"} <= set(before)
    for resume in ("false", "auto"):
        capsys.readouterr()
        assert main([*SMALL, f"out_dir={out}", f"resume={resume}", "train.lr=1e-3"]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out}" in err and "results.json (a finished run)" in err, err
        assert "final checkpoints of users [0]" in err and "config.yaml" in err, err
        assert "another out_dir" in err and "Nothing was written" in err, err
        # no round checkpoint: resume=true is not offered as a way out (it once was, then taken back)
        assert "cannot be continued" in err and "resume=true" not in err, err
        assert _snapshot(out) == before


def test_rerunning_a_finished_run_does_nothing_shortening_it_is_refused_and_extending_it_keeps_its_results(
        tmp_path, capsys):
    """A finished 2-round run (with and without round checkpoints) run again with the same config:
    exit 0, "nothing to do", not a byte or timestamp changed (a requeue after the end, a repeated
    command). With train.rounds=1: exit 2, nothing written. With train.rounds=3 (round checkpoints):
    the run continues from round 2 and the 2-round results are kept as results.round_2.json."""
    from comigs_dist.main import main
    finished = {}
    for every in (1, 0):
        out = tmp_path / f"every{every}"
        args = [*SMALL, "train.rounds=2", f"checkpoint.every={every}", f"out_dir={out}", "resume=auto"]
        assert main(args) == 0
        finished[every] = (out / "results.json").read_bytes()
        before = _snapshot(out)
        capsys.readouterr()
        assert main(args) == 0
        said = capsys.readouterr().out
        assert f"out_dir {out} holds this run, finished (2 rounds, mean test ppl" in said, said
        assert "nothing to do" in said and "Raise train.rounds" in said, said
        assert _snapshot(out) == before
        assert main([*args, "train.rounds=1"]) == 2
        err = capsys.readouterr().err
        assert "finished after 2 rounds, and train.rounds=1 would shorten it" in err and "Nothing was written" in err
        assert _snapshot(out) == before
    out = tmp_path / "every1"
    # log.progress=false (SMALL) drops the bars, not the run's messages (it once dropped both)
    assert main([*SMALL, "train.rounds=3", "checkpoint.every=1", f"out_dir={out}", "resume=auto"]) == 0
    said = "".join(capsys.readouterr())
    assert "resuming from round 2" in said and f"kept as {out / 'results.round_2.json'}" in said, said
    assert (out / "results.round_2.json").read_bytes() == finished[1]
    assert json.loads((out / "results.json").read_text())["rounds"] == 3


def test_a_resume_with_another_number_of_users_is_refused_naming_both(tmp_path, capsys):
    """A 1-user run checkpointed, then resumed with n_users=2 (on one rank): refused naming both
    numbers and the manifest (it blamed missing files: the new user holds no round), nothing written."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    assert main([*SMALL, "train.rounds=2", "checkpoint.every=1", f"out_dir={out}"]) == 0
    (out / "results.json").unlink()  # as if it had stopped after its last round checkpoint
    before = _snapshot(out)
    assert main([*SMALL, "train.rounds=2", "checkpoint.every=1", f"out_dir={out}", "resume=auto", "n_users=2"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of a run of 1 users" in err and "this run has 2" in err, err
    assert "Resume with n_users=1" in err and "disagree" not in err, err
    assert _snapshot(out) == before


def test_a_live_run_holds_its_out_dir_and_a_second_one_is_refused_naming_it(tmp_path, capsys):
    """While a run holds out_dir's lock (pid and host recorded), another run there exits 2 naming the
    holder's pid and host, and leaves the directory as it was."""
    import socket
    from comigs_dist.checkpoint import OutDirLock
    from comigs_dist.main import main
    out = tmp_path / "run"
    out.mkdir()
    lock = OutDirLock(out)
    assert lock.acquire() == []
    try:
        before = _snapshot(out)
        assert main([*SMALL, f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out} is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in err, err
        assert _snapshot(out) == before
    finally:
        lock.release()
    assert list(out.iterdir()) == []


def test_default_out_dirs_are_unique_within_one_second_and_differ_by_what_changes_results(tmp_path, monkeypatch):
    """Runs started in the same second get distinct directories, claimed by an atomic mkdir (-2, -3);
    the name carries a digest of the options that change results, so a sweep's runs differ in it
    and a logging option does not; under a job with resume=auto the name is the job's, stable."""
    from comigs_dist.config import load_config
    from comigs_dist.main import default_out_dir
    monkeypatch.chdir(tmp_path)
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    stamp = "20250101-120000"
    a, made = default_out_dir(load_config(None, ["seed=1"]), stamp)
    b, _ = default_out_dir(load_config(None, ["seed=1"]), stamp)
    c, _ = default_out_dir(load_config(None, ["seed=1", "train.lr=1e-3"]), stamp)
    d, _ = default_out_dir(load_config(None, ["seed=1", "log.every=5"]), stamp)
    assert made and a.is_dir() and b.is_dir() and c.is_dir()
    assert a.name.startswith(f"{stamp}_comigs_1g1s_s1_") and b.name == a.name + "-2" and d.name == a.name + "-3"
    assert c.name.rsplit("_", 1)[1] != a.name.rsplit("_", 1)[1]
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert (default_out_dir(load_config(None, ["seed=1", "resume=auto"]))
            == (Path("runs/slurm-77_comigs_1g1s_s1"), False))


def test_a_run_the_guard_stops_records_why_and_a_retry_moves_the_record_aside(tmp_path, capsys, monkeypatch):
    """guard.nan=stop with a NaN injected into user 0's generalist before round 2: exit code 1, no
    results.json, and stopped.json naming the user, the round and the non-finite value (what
    launch.reproduce reads as "diverged"). A retry from the round-1 checkpoint without the fault says
    that an earlier attempt stopped, moves the record aside (stopped.previous.json: stopped.json
    describes the latest attempt only, so a launcher never reads a running retry as diverged) and
    finishes."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    args = [*SMALL, "train.rounds=2", "checkpoint.every=1", "guard.nan=stop", f"out_dir={out}"]
    monkeypatch.setenv("COMIGS_FAULT", "nan,user=0,round=2")
    assert main(args) == 1
    err = capsys.readouterr().err
    stop = json.loads((out / "stopped.json").read_text())
    assert (stop["reason"], stop["user"], stop["round"]) == ("non-finite", 0, 2), stop
    assert "user 0, round 2: shared parameter" in stop["message"] and "holds nan" in stop["message"], stop
    assert f"recorded in {out / 'stopped.json'}" in err, err
    assert not (out / "results.json").exists()
    monkeypatch.delenv("COMIGS_FAULT")
    # a retry that is refused (another learning rate than the checkpoint's) leaves the record in place
    assert main([*args, "resume=true", "train.lr=1e-3"]) == 2
    assert "train.lr" in capsys.readouterr().err and json.loads((out / "stopped.json").read_text()) == stop
    assert not (out / "stopped.previous.json").exists()
    assert main([*args, "resume=true", "log.progress=true"]) == 0  # notes print with the progress lines
    said = "".join(capsys.readouterr())
    assert "an earlier attempt in" in said and "was stopped by the guard (user 0, round 2" in said, said
    assert "rounds 2-2: 1/1 (100%)" in said, said  # the resumed bar names the rounds it counts
    assert (out / "results.json").is_file() and not (out / "stopped.json").exists()
    assert json.loads((out / "stopped.previous.json").read_text()) == stop


def test_a_skip_run_left_without_users_to_average_stops_with_a_record(tmp_path, capsys, monkeypatch):
    """guard.nan=skip with one user whose generalist turns NaN before round 2: the only member of
    the group sits the round out, nothing is left to average, and the run ends as under stop: exit
    code 1, stopped.json naming user 0 and round 2 (what launch.reproduce reads as "diverged"), no
    results.json."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    monkeypatch.setenv("COMIGS_FAULT", "nan,user=0,round=2")
    assert main([*SMALL, "train.rounds=2", "guard.nan=skip", f"out_dir={out}"]) == 1
    err = capsys.readouterr().err
    stop = json.loads((out / "stopped.json").read_text())
    assert (stop["reason"], stop["user"], stop["round"]) == ("non-finite", 0, 2), stop
    assert "sat this round out" in stop["message"] and "nothing left to average" in stop["message"], stop
    assert "guard.nan=skip: user 0 contributes nothing this round" in err, err
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_closing_aggregation_left_without_users_stops_with_a_record(tmp_path, capsys, monkeypatch, policy):
    """The same after the last round: FedDPA's closing average of the global adapters, its one
    user's global adapter made NaN just before it, has nobody to average (guard.nan=skip) or must
    not average it (stop); the run stops with stopped.json naming user 0 and the last round (2),
    the message saying it is the aggregation after the last round, not with a bare error."""
    import torch
    from comigs_dist.main import main
    from comigs_dist.methods.feddpa import FedDPA
    closing = FedDPA.after_training

    def poisoned(self, ctx):
        with torch.no_grad():
            for u in ctx.users:
                next(iter(u.shared.values()))[0][1].fill_(float("nan"))
        closing(self, ctx)
    monkeypatch.setattr(FedDPA, "after_training", poisoned)
    out = tmp_path / "run"
    args = [*SMALL, "method=feddpa", "train.router_every=2", "train.router_steps=1", "train.rounds=2",
            f"guard.nan={policy}", f"out_dir={out}"]
    assert main(args) == 1
    stop = json.loads((out / "stopped.json").read_text())
    assert (stop["user"], stop["round"]) == (0, 2), stop
    expected = "nothing left to average" if policy == "skip" else "after the last round (2): shared parameter"
    assert expected in stop["message"], stop
    assert not (out / "results.json").exists()


def test_a_private_run_hands_a_group_nobody_was_drawn_for_its_latest_release(tmp_path, capsys):
    """privacy.dp=user with one user drawn a round and two clusters: in a round after which no
    member of a cluster took part, the cluster's participant downloads its latest released
    aggregate and the run finishes (it once stopped with an error, and before that with a
    stopped.json blaming guard.nan=skip)."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    assert main(["--config", str(ROOT / "configs" / "two_clusters.yaml"), "train.users_per_round=1",
                 "train.rounds=4", "train.local_steps=1", "privacy.dp=user", "eval.max_tokens=256",
                 "log.progress=false", f"out_dir={out}"]) == 0
    assert not (out / "stopped.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert sum(u["rounds_taken"] for u in results["users"]) == 4  # one user a round
    # every private round counts (3: round 1 moves the start), whether a cluster released or answered again
    from comigs_dist.privacy.accountant import epsilon
    planned = {k: v for k, v in results["privacy"]["accounting"].items() if k != "rounds"}
    assert results["privacy"]["accounting"]["rounds"] == 3
    # the clusters reveal how many of each were drawn: no sampling discount, and results.json says why
    assert (results["privacy"]["accounting"]["sampling"], results["privacy"]["accounting"]["sample_rate"]) == \
        ("poisson", 1.0)
    assert "hold only some of the users" in results["privacy"]["no_sampling_discount"]
    assert results["privacy"]["neighbours"].startswith("add or remove one user")
    assert [u["privacy"]["epsilon"] for u in results["users"]] == [epsilon(1.0, rounds=3, delta=1e-5, **planned)] * 4


def test_a_method_that_aggregates_after_training_must_say_so(tmp_path, monkeypatch):
    """A method whose after_training aggregates while aggregates_after_training says False would
    make privacy's accountant miss a release: the aggregation refuses, naming the method."""
    from comigs_dist.main import main
    from comigs_dist.methods.feddpa import FedDPA
    monkeypatch.setattr(FedDPA, "aggregates_after_training", False)
    with pytest.raises(RuntimeError, match=r"method 'feddpa' aggregates after the last round, but its "
                                           r"aggregates_after_training says it does not"):
        main([*SMALL, "method=feddpa", "train.router_every=2", "train.router_steps=1", f"out_dir={tmp_path / 'run'}"])


def test_the_closing_aggregation_is_logged_like_a_round(tmp_path, capsys):
    """FedDPA-F (3 fine-tune steps), 2 users, privacy.dp=user: the aggregation after the last round
    is a release and traffic like a round's. Each user's last comm/bytes_sent in TensorBoard equals
    its results.json bytes_sent (it missed the closing sync), and is written before the fine-tune
    steps (a logger that needs increasing steps, W&B, dropped it when it came after them); the
    federation's epsilon curve has train.rounds points, the last one results.json's epsilon; the
    log says the closing aggregation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from comigs_dist.main import main
    out = tmp_path / "run"
    assert main([*SMALL, "n_users=2", "method=feddpa", "method_options.variant=F", "method_options.finetune_steps=3",
                 "train.router_every=2", "train.router_steps=1", "train.rounds=2", "privacy.dp=user",
                 "privacy.noise_multiplier=1.0", "log.progress=true", f"out_dir={out}"]) == 0
    said = "".join(capsys.readouterr())
    results = json.loads((out / "results.json").read_text())

    def scalars(path, tag):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]
    for u in results["users"]:
        user_dir = out / "tb" / f"user_{u['user']:02d}"
        logged = scalars(user_dir, "comm/bytes_sent")
        assert len(logged) == 3 and logged[-1][1] == u["bytes_sent"] > logged[-2][1], (u["user"], logged)
        order = [(e.step, v.tag) for f in sorted(user_dir.glob("events.*")) for e in EventFileLoader(str(f)).Load()
                 for v in e.summary.value if v.tag in ("comm/bytes_sent", "after_training/loss")]
        assert [t for _, t in order] == ["comm/bytes_sent"] * 3 + ["after_training/loss"] * 3, order
        assert [s for s, _ in order] == sorted(s for s, _ in order), order
    epsilon = scalars(out / "tb" / "federation", "federation/privacy_epsilon")
    assert [s for s, _ in epsilon] == [1, 2, 3] and epsilon[-1][1] == pytest.approx(results["privacy"]["epsilon"])
    assert epsilon[-1][1] > epsilon[-2][1] > 0
    assert f"feddpa's closing aggregation, epsilon {results['privacy']['epsilon']:.4g}" in said, said


def test_a_calibrated_private_run_cannot_resume_to_more_rounds(tmp_path, capsys):
    """privacy.target_epsilon fixes the noise to the planned releases: resuming with more rounds
    is refused before any round (exit 2), naming the noise multipliers and the plan."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    args = [*SMALL, "n_users=2", "privacy.dp=user", "privacy.target_epsilon=8", "checkpoint.every=1",
            f"out_dir={out}"]
    assert main([*args, "train.rounds=2"]) == 0
    capsys.readouterr()
    assert main([*args, "train.rounds=3", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "the privacy accountant was saved for another mechanism: noise_multiplier" in err, err
    assert "calibrates the noise multiplier to the planned releases" in err, err


def test_per_user_lists_alone_set_the_number_of_users(tmp_path):
    """moe.n_experts=[3,2] without n_users (the form docs/configuration.md shows): the run has 2
    users, with 3 and 2 experts. It stopped with 'the run has None users' before."""
    from comigs_dist.main import main
    out = tmp_path / "run"
    assert main(["--config", DEBUG, "n_users=null", "moe.n_experts=[3,2]", "train.rounds=1", "train.local_steps=1",
                 "eval.max_tokens=256", "log.progress=false", f"out_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_users"] == 2 and [u["n_experts"] for u in results["users"]] == [3, 2]


def test_resume_into_a_directory_with_no_run_is_refused_before_it_is_created(tmp_path, capsys):
    """resume=true with an out_dir that does not exist (a typo, most likely) or holds nothing of a
    run: exit 2 naming the directory and the fixes; a missing directory is not created."""
    from comigs_dist.main import main
    missing = tmp_path / "runs" / "typo"
    assert main([*SMALL, f"out_dir={missing}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert f"resume=true, but out_dir {missing} does not exist, so there is no run to continue" in err, err
    assert "resume=false" in err and "resume=auto" in err and not (tmp_path / "runs").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*SMALL, f"out_dir={empty}", "resume=true"]) == 2
    assert f"out_dir {empty} holds nothing of a run" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def _scalars(tb: Path) -> dict:
    """Every scalar of every writer under ``tb`` as TensorBoard reads it (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for d in sorted(p for p in tb.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        out[d.name] = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert any(out.values()), out
    return out


@pytest.mark.parametrize("method", ["comigs_1g1s", "feddpa_f", "learned_groups"])
def test_a_run_stopped_after_final_pt_writes_its_results_without_training_again(tmp_path, capsys, monkeypatch,
                                                                                method):
    """A run killed after every user wrote final.pt but before results.json (checkpoint.every=0:
    no round checkpoint) once started over from round 0. Now the rerun restores final.pt, trains
    nothing, evaluates nothing, runs no closing stage (FedDPA-F's fine-tune would otherwise run
    twice) and writes the results the uninterrupted run wrote, its TensorBoard events kept. Learned
    groups (two groups of one user each, on one rank): their process groups, which only a sync
    built, are rebuilt after the restore (a resume that syncs no more crashed naming them)."""
    from comigs_dist import train
    from comigs_dist.main import main
    from helpers import without_timing
    extra = {"feddpa_f": ["method=feddpa", "method_options.variant=F", "train.router_every=2", "train.router_steps=2"],
             "learned_groups": ["method=comigs_learned", "n_users=2", "method_options.k=2",
                                "method_options.warmup_rounds=1"]}.get(method, [])
    out = tmp_path / "run"
    args = [*SMALL, *extra, "train.rounds=2", "checkpoint.every=0", f"out_dir={out}", "resume=auto"]
    assert main(args) == 0
    whole = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # as if killed between final.pt and results.json
    logged = _scalars(out / "tb")

    def must_not(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} ran again")
        return fail
    monkeypatch.setattr(train, "run_round", must_not("a round"))
    monkeypatch.setattr(train, "evaluate_test", must_not("an evaluation"))
    monkeypatch.setattr(train, "after_training", must_not("the closing stage"))
    capsys.readouterr()
    assert main(args) == 0
    said = "".join(capsys.readouterr())
    assert "resuming from every user's final.pt" in said and "without training or evaluating again" in said, said
    assert "starts over" not in said, said  # the out_dir check once said so on the line before
    again = json.loads((out / "results.json").read_text())
    assert [without_timing(u) for u in again["users"]] == [without_timing(u) for u in whole["users"]]
    assert again["mean_test_ppl"] == whole["mean_test_ppl"] and again["rounds"] == 2
    if method == "feddpa_f":
        assert again["users"][0]["feddpa_finetune"]["steps"] > 0
    if method == "learned_groups":
        assert {g for u in again["users"] for g in u["comm_groups"]} >= {"learned_000", "learned_001"}, again["users"]
    assert _scalars(out / "tb") == logged  # nothing the first attempt logged was purged, nothing logged twice


def test_final_pt_of_a_run_extended_past_it_is_not_resumed_from(tmp_path, capsys, monkeypatch):
    """A 2-round run stopped after final.pt, then extended to 3 rounds and stopped again before its
    final evaluation (round 3 checkpointed): a rerun with train.rounds=2 must not write the 2-round
    results from the old final.pt (whose TensorBoard has the longer run's events past it), but be
    refused as any shortening is; the manifest forgot final.pt when round 3 was checkpointed."""
    from comigs_dist import checkpoint, train
    from comigs_dist.main import main
    out = tmp_path / "run"
    args = [*SMALL, "checkpoint.every=1", f"out_dir={out}", "resume=auto"]
    assert main([*args, "train.rounds=2"]) == 0
    (out / "results.json").unlink()
    assert checkpoint.read_manifest(out)["final_round"] == 2

    def stop(u):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.faults, "at_final_eval", stop)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "train.rounds=3"])
    monkeypatch.undo()
    manifest = checkpoint.read_manifest(out)
    assert manifest["round"] == 3 and "final_round" not in manifest, manifest
    capsys.readouterr()
    assert main([*args, "train.rounds=2"]) == 2
    err = capsys.readouterr().err
    assert "checkpointed after round 3" in err and "train.rounds=2 would end it" in err, err
    assert not (out / "results.json").exists()
    # without round checkpoints the longer run starts over: final.pt is forgotten at its start
    out = tmp_path / "every0"
    args = [*SMALL, "checkpoint.every=0", f"out_dir={out}", "resume=auto"]
    assert main([*args, "train.rounds=2"]) == 0
    (out / "results.json").unlink()
    monkeypatch.setattr(train.faults, "at_final_eval", stop)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "train.rounds=3"])
    monkeypatch.undo()
    assert "final_round" not in checkpoint.read_manifest(out)


def test_learned_groups_resumed_from_their_last_round_reach_their_results(tmp_path, monkeypatch):
    """Learned groups (two) stopped at the final evaluation after their last round checkpoint: the
    resume has no round left to sync in, and the results named process groups only a sync built
    (it crashed on every retry); now the restore rebuilds them."""
    from comigs_dist import train
    from comigs_dist.main import main
    out = tmp_path / "run"
    args = [*SMALL, "method=comigs_learned", "n_users=2", "method_options.k=2", "method_options.warmup_rounds=1",
            "train.rounds=2", "checkpoint.every=1", "checkpoint.final=false", f"out_dir={out}", "resume=auto"]

    def stop(u):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.faults, "at_final_eval", stop)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert main(args) == 0
    users = json.loads((out / "results.json").read_text())["users"]
    assert [sorted(g for g in u["comm_groups"] if g.startswith("learned")) for u in users] == [["learned_000"],
                                                                                               ["learned_001"]]
