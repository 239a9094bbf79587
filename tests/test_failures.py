"""Failures end to end: a killed rank, a torchrun restart that resumes by itself, bad output dirs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comigs_dist import checkpoint, faults
from comigs_dist.config import ConfigError, load_config
from helpers import DEBUG_CONFIG as DEBUG, subprocess_env as _env, without_timing

ROOT = Path(__file__).resolve().parents[1]


def test_bad_fault_specs_and_resume_without_out_dir_are_refused():
    """COMIGS_FAULT must be '<kind>,user=U,round=R'; resume=true needs out_dir."""
    assert faults.parse("kill,user=1,round=2") == faults.Fault("kill", 1, 2, 0)
    assert faults.parse("nan, user=0, round=3, attempt=1") == faults.Fault("nan", 0, 3, 1)
    for bad in ("explode,user=1,round=2", "kill,user=1", "kill,user=1,round=0", "kill,user=x,round=2"):
        with pytest.raises(ValueError, match="COMIGS_FAULT .* must look like"):
            faults.parse(bad)
    with pytest.raises(ConfigError, match="resume=true needs out_dir"):
        load_config(None, ["resume=true"])
    assert load_config(None, ["resume=auto"]).resume == "auto"


def test_fault_phases_parse_and_faults_that_could_never_fire_are_refused():
    """phase=setup|expert|router|sync|checkpoint|eval; setup and eval take no round, nan only the
    sync; a fault in a round without router steps or without a checkpoint is refused up front."""
    assert faults.parse("kill,user=1,phase=setup") == faults.Fault("kill", 1, 0, 0, "setup")
    assert (faults.parse("raise,user=0,round=2,phase=checkpoint,attempt=1")
            == faults.Fault("raise", 0, 2, 1, "checkpoint"))
    assert faults.parse("kill,user=1,round=2").phase == "expert" and faults.parse("nan,user=1,round=2").phase == "sync"
    for bad in ("kill,user=1,round=2,phase=setup", "kill,user=1,phase=eval,round=1", "nan,user=1,round=2,phase=expert",
                "kill,user=1,round=2,phase=lunch", "kill,round=2", "kill,user=1,phase=router"):
        with pytest.raises(ValueError, match="COMIGS_FAULT .* must look like"):
            faults.parse(bad)
    cfg = load_config(None, ["train.rounds=3", "train.local_steps=2", "train.router_every=4", "checkpoint.every=2",
                             "checkpoint.final=false"])
    faults.check(faults.parse("kill,user=1,round=2,phase=router"), cfg)  # step 4 is a router step
    faults.check(faults.parse("kill,user=1,round=2,phase=checkpoint"), cfg)
    for spec, why in (("kill,user=1,round=3,phase=router", "round 3 holds no router step"),
                      ("kill,user=1,round=3,phase=checkpoint", "round 3 writes no checkpoint"),
                      ("kill,user=1,round=4", "round 4 is past train.rounds"),
                      ("raise,user=1,round=1,phase=sync", "the aggregation that opens round 1 is the common")):
        with pytest.raises(ValueError, match=f"would never fire: {why}"):
            faults.check(faults.parse(spec), cfg)


def test_an_unwritable_out_dir_stops_the_run_before_training(tmp_path, capsys):
    """out_dir under a regular file: exit code 2 and a message naming the path, before any training."""
    from comigs_dist.main import main
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["--config", DEBUG, "n_users=1", f"out_dir={blocker / 'run'}", "log.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and f"out_dir {blocker / 'run'} is not writable" in err, err


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_its_name_not_by_the_timeout(tmp_path):
    """3 users; user 1 is SIGKILLed halfway through round 2: users 0 and 2 exit with code 1 and a
    message naming user 1 as no longer running. comm.timeout_s is far longer than the test's own
    bound, so they can only have left because they noticed user 1 was gone; nothing hangs."""
    port = str(29_000 + os.getpid() % 2_000)
    procs = []
    for rank in range(3):
        env = _env(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, COMIGS_FAULT="kill,user=1,round=2")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "comigs_dist.main", "--config", DEBUG, "n_users=3", "train.rounds=4",
             f"out_dir={tmp_path / 'run'}", "comm.timeout_s=3600", "checkpoint.every=1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        procs[1].wait(timeout=600)
        outs = {}
        for rank in (0, 2):
            out, err = procs[rank].communicate(timeout=300)  # a bound, far below comm.timeout_s
            outs[rank] = (procs[rank].returncode, err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -9
    for rank, (code, err) in outs.items():
        assert code == 1, err[-3000:]
        assert f"user {rank} (rank {rank}) failed: PeerFailure: user {rank} lost contact with the other users in " \
               f"round 2" in err, err[-3000:]
        assert "user 1 (pid" in err and "is no longer running" in err, err[-3000:]
        assert "slower than comm.timeout_s" not in err, err[-3000:]
    # round 1 is on disk for every user, ready for resume=true (the survivors also wrote round 2, but
    # user 1 never did, so a resume starts from round 1)
    rounds = [checkpoint.available_rounds(checkpoint.user_dir(tmp_path / "run", u)) for u in range(3)]
    assert rounds[1] == [1] and all(r in ([1], [1, 2]) for r in rounds), rounds


def _torchrun(cwd, *args, restarts: int = 0, rendezvous: str = "standalone", **env) -> subprocess.CompletedProcess:
    from comigs_dist.dist import free_port
    # --standalone gives the job a fresh run id; without it (a fixed master port) the run id is "none"
    where = ["--standalone"] if rendezvous == "standalone" else [f"--master-port={free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "comigs_dist.main", "--config", DEBUG, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=_env(**env))


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["standalone", "master port"])
def test_torchrun_restarts_a_killed_run_and_it_resumes_to_the_same_result(tmp_path, rendezvous):
    """torchrun --max-restarts=1 with resume=auto and no out_dir: user 1 is killed in round 2, torchrun
    restarts both users, they find their checkpoints (out_dir named after torchrun's run id, or, for
    a job without one, the directory the first attempt left in torchrun's agent store) and finish
    with the parameters and metrics of an uninterrupted run."""
    common = ["checkpoint.every=1", "log.tensorboard=false"]
    plain = _torchrun(tmp_path, f"out_dir={tmp_path / 'plain'}", *common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    killed = _torchrun(tmp_path, "resume=auto", *common, restarts=1, rendezvous=rendezvous,
                       COMIGS_FAULT="kill,user=1,round=2")
    assert killed.returncode == 0, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "resuming from round 1" in killed.stdout and "attempt 2" in killed.stdout, killed.stdout[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # one directory: the restart wrote into the first attempt's
    assert run_dir.name.startswith("torchrun-" if rendezvous == "standalone" else "20"), run_dir
    a = json.loads((tmp_path / "plain" / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    for ua, ub in zip(a["users"], b["users"], strict=True):
        assert without_timing(ua) == without_timing(ub)
    for user in (0, 1):
        pa = checkpoint.load(checkpoint.user_dir(tmp_path / "plain", user) / "final.pt")["params"]
        pb = checkpoint.load(checkpoint.user_dir(run_dir, user) / "final.pt")["params"]
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
    manifest = checkpoint.read_manifest(run_dir)
    assert manifest["round"] == 2 and manifest["restart_count"] == 1


# --------------------------------------------------------------------------------------------
# the fault matrix: a user killed in every phase, then resume=true (docs/reliability.md)
# --------------------------------------------------------------------------------------------

# phase -> the round the fault names (None: a phase without rounds)
MATRIX = {"setup": None, "expert": 2, "router": 2, "sync": 2, "checkpoint": 2, "eval": None}
# round checkpoints each user must still hold, intact, after the kill (user 0 may also hold round 2
# when user 1 died writing it)
INTACT = {"setup": [1], "expert": [1], "router": [1], "sync": [1], "checkpoint": [1], "eval": [1, 2, 3]}
MATRIX_SETTINGS = {"train.rounds": 3, "checkpoint.every": 1, "checkpoint.final": True, "eval.every": 1}


def _matrix_run(tmp_path, name, **extra):
    from comigs_dist import train
    from dist_harness import init_topology
    cfg = load_config(None, [f"{k}={v}" for k, v in {**_TINY, **MATRIX_SETTINGS, "out_dir": tmp_path / name,
                                                      **extra}.items()])
    cfg.n_users = 2
    [row] = train.run(cfg, init_topology(), tmp_path / name)
    return row


def _killed_worker(rank, world_size, tmp_path, phase):
    from comigs_dist import dist
    fault = f"kill,user=1,phase={phase}" + (f",round={MATRIX[phase]}" if MATRIX[phase] else "")
    os.environ["COMIGS_FAULT"] = fault
    # the set-up fault hits a resume (of the run the expert fault stopped): its checkpoints must survive it
    extra = {"resume": "true"} if phase == "setup" else {}
    where = {"setup": "setup", "eval": "the final evaluation"}.get(phase, "round 2")
    with pytest.raises(dist.PeerFailure, match=f"lost contact with the other users in {where}, .*user 1 .* is no "
                                               f"longer running"):
        _matrix_run(tmp_path, phase, **extra)  # only user 0 gets here: user 1 is killed
    dist.shutdown()  # leave now: the harness would otherwise wait for user 1 at the exit


def _matrix_resume_worker(rank, world_size, tmp_path):
    row_a = _matrix_run(tmp_path, "uninterrupted")
    base = checkpoint.user_dir(tmp_path / "uninterrupted", rank)
    for phase in MATRIX:
        mine = checkpoint.user_dir(tmp_path / phase, rank)
        rounds = checkpoint.available_rounds(mine)
        assert set(INTACT[phase]) <= set(rounds), (phase, rounds)
        for r in INTACT[phase]:  # intact: the same bits the uninterrupted run wrote for that round
            a, b = (checkpoint.load(d / checkpoint.round_file(r))["params"] for d in (base, mine))
            assert all(torch.equal(a[n], b[n]) for n in a), (phase, r)
        row = _matrix_run(tmp_path, phase, resume="true")
        assert without_timing(row) == without_timing(row_a), phase
        a, b = (checkpoint.load(d / "final.pt")["params"] for d in (base, mine))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), phase
        assert not checkpoint.remove_partial(mine), phase  # a half-written file went at the resume


_TINY = {"model.name": "tiny", "train.local_steps": 3, "train.router_every": 2, "train.router_steps": 2,
         "train.batch_size": 4, "train.seq_len": 32, "eval.max_tokens": 512, "log.tensorboard": False,
         "log.progress": False, "data.train_tokens": 4000, "data.valid_tokens": 2000, "data.test_tokens": 2000}


@pytest.mark.slow
@pytest.mark.extended  # by default: test_checkpoint's resumes and this file's killed-rank tests
def test_a_user_killed_in_any_phase_leaves_its_checkpoints_and_resumes_bit_identical(tmp_path):
    """The fault matrix: 2 users, 3 rounds, a checkpoint every round; user 1 is SIGKILLed during set-up
    (of a resume), the expert steps, the router steps, the sync, a checkpoint write (file written, not
    renamed) and the final evaluation. Each time user 0 stops naming user 1, every checkpoint written
    before the kill is intact (bit-equal to the uninterrupted run's), and resume=true finishes with the
    parameters and results of the uninterrupted run, bit for bit."""
    import shutil
    from dist_harness import run_on_ranks
    for phase in MATRIX:
        if phase == "setup":
            continue
        run_on_ranks(_killed_worker, 2, tmp_path, phase, timeout_s=300, expect_exit={1: -9})
    partial = [f.name for f in checkpoint.user_dir(tmp_path / "checkpoint", 1).iterdir() if f.name.startswith(".")]
    assert len(partial) == 1 and partial[0].startswith(".round_0002.pt."), partial  # killed mid-write
    shutil.copytree(tmp_path / "expert", tmp_path / "setup")
    run_on_ranks(_killed_worker, 2, tmp_path, "setup", timeout_s=300, expect_exit={1: -9})
    run_on_ranks(_matrix_resume_worker, 2, tmp_path, timeout_s=900)
