"""The one-host fork launcher: same results as torchrun, failures and signals end every rank."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from comigs_dist import checkpoint
from helpers import DEBUG_CONFIG as DEBUG, subprocess_env as _env, without_timing

ROOT = Path(__file__).resolve().parents[1]


def _forkrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "comigs_dist.forkrun", f"--nproc_per_node={nproc}", *args]


def _marked(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a launcher and the ranks it forked)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone, a zombie, or not ours
            continue
    return pids


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_supervise_reports_the_first_failing_rank_and_stops_the_others(tmp_path):
    """Plain Python targets: all succeed -> 0; rank 1 exits 3 while rank 0 sleeps for an hour -> 3,
    naming rank 1, rank 0 stopped by the launcher before its sleep ends (it leaves no mark) and
    reaped; a rank killed by a signal -> 128 + signal; ranks that all refuse to start (exit 2) are
    left to end by themselves."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from comigs_dist import dist, forkrun
        msgs = []
        def ok():
            return 0
        mark = sys.argv[1]
        def rank1_fails():
            if dist.env_rank() == 1:
                return 3
            time.sleep(3600)  # the test's own timeout ends long before: only the launcher can stop it
            open(mark, "w").write("rank 0 slept to the end")
            return 0
        def rank0_killed():
            if dist.env_rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        def env_seen():
            keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            print("ENV", dist.env_rank(), *(dist.env_get(k) for k in keys), flush=True)
            return 0
        assert forkrun.supervise(forkrun.start_ranks(3, ok), msgs.append) == 0 and not msgs, msgs
        pids = forkrun.start_ranks(2, rank1_fails)
        assert forkrun.supervise(pids, msgs.append) == 3
        assert not os.path.exists(mark)
        assert msgs == [f"[forkrun] rank 1 (pid {pids[1]}) exited with code 3; stopping the other 1 rank(s)"], msgs
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
                raise AssertionError(f"pid {pid} was not reaped")
            except ChildProcessError:
                pass
        msgs.clear()
        assert forkrun.supervise(forkrun.start_ranks(2, rank0_killed), msgs.append) == 128 + signal.SIGKILL
        assert "rank 0" in msgs[0] and "was ended by SIGKILL" in msgs[0], msgs
        assert forkrun.supervise(forkrun.start_ranks(2, env_seen), msgs.append) == 0
        # a refusal (exit 2) reaches every rank together: rank 1 still cleaning up for a second is
        # left to finish (its mark), not stopped mid-way with a SIGTERM traceback
        def both_refuse():
            if dist.env_rank() == 1:
                time.sleep(1.0)
                open(mark + ".cleaned", "w").write("rank 1 finished its clean-up")
            return 2
        msgs.clear()
        pids = forkrun.start_ranks(2, both_refuse)
        assert forkrun.supervise(pids, msgs.append) == 2
        assert os.path.exists(mark + ".cleaned"), msgs
        assert msgs == [f"[forkrun] rank 0 (pid {pids[0]}) exited with code 2"], msgs  # nobody left to stop
        print("DONE", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "slept")], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    seen = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("ENV"))
    assert [s[:5] for s in seen] == [["0", "0", "0", "2", "2"], ["1", "1", "1", "2", "2"]], seen
    assert seen[0][5] == "127.0.0.1" and seen[0][6] == seen[1][6] and seen[0][6].isdigit(), seen


def test_a_bad_configuration_is_reported_once_before_any_fork(tmp_path):
    """n_users=1 on 2 ranks: exit code 2 and one message naming the constraint; no out_dir;
    a missing --nproc_per_node is refused too."""
    proc = subprocess.run(_forkrun_cmd(2, "--config", DEBUG, "n_users=1", f"out_dir={tmp_path / 'x'}"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("n_users (1) is smaller than the number of ranks (2)") == 1, proc.stderr
    assert "[forkrun]" not in proc.stderr and not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "comigs_dist.forkrun", "--config", DEBUG], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2 and "--nproc_per_node (None) must be given" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_forkrun_gives_the_results_of_torchrun_bit_for_bit(tmp_path):
    """configs/debug.yaml on 2 ranks, once under torchrun and once under forkrun: every metric
    (timing aside) and every trained parameter of every user are equal."""
    common = ["--config", DEBUG, "log.tensorboard=false", "log.progress=false"]
    fork = subprocess.run(_forkrun_cmd(2, *common, f"out_dir={tmp_path / 'fork'}"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=_env())
    assert fork.returncode == 0, fork.stdout[-2000:] + fork.stderr[-3000:]
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "comigs_dist.main", *common, f"out_dir={tmp_path / 'torchrun'}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env=_env())
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    a = json.loads((tmp_path / "fork" / "results.json").read_text())
    b = json.loads((tmp_path / "torchrun" / "results.json").read_text())
    assert a["world_size"] == b["world_size"] == 2
    for ua, ub in zip(a["users"], b["users"], strict=True):
        assert without_timing(ua) == without_timing(ub)
    for user in (0, 1):
        pa = checkpoint.load(checkpoint.user_dir(tmp_path / "fork", user) / "final.pt")["params"]
        pb = checkpoint.load(checkpoint.user_dir(tmp_path / "torchrun", user) / "final.pt")["params"]
        assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.slow
def test_a_failing_rank_ends_the_launch_naming_it_and_leaves_no_process(tmp_path):
    """COMIGS_FAULT=raise,user=1,round=1 in a run of 20 rounds: forkrun exits 1, naming rank 1 and its
    exit code, and stops rank 0 (the run never finishes: no results.json); no process of the launch
    is left."""
    marker = f"COMIGS_TEST_MARK={uuid.uuid4().hex}"
    key, value = marker.split("=")
    proc = subprocess.run(_forkrun_cmd(2, "--config", DEBUG, "train.rounds=20", f"out_dir={tmp_path / 'run'}",
                                       "log.progress=false"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=_env(COMIGS_FAULT="raise,user=1,round=1", **{key: value}))
    assert proc.returncode == 1, proc.stderr[-3000:]
    launcher = [ln for ln in proc.stderr.splitlines() if ln.startswith("[forkrun]")]
    assert len(launcher) == 1 and launcher[0].startswith("[forkrun] rank 1 (pid "), proc.stderr[-3000:]
    assert "exited with code 1" in launcher[0] and "InjectedFault" in proc.stderr
    assert "stopping the other 1 rank(s)" in launcher[0] and not (tmp_path / "run" / "results.json").exists()
    assert _marked(marker) == []


@pytest.mark.slow
def test_sigterm_and_a_killed_launcher_end_every_rank(tmp_path):
    """SIGTERM to the launcher reaches both ranks and it exits 128 + 15; after SIGKILL of the
    launcher, the kernel ends the ranks (PR_SET_PDEATHSIG). Either way no process is left, and
    the ranks, ended by SIGTERM, remove their shared-base directory on the way out."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        marker = f"COMIGS_TEST_MARK={uuid.uuid4().hex}"
        key, value = marker.split("=")
        shm = tmp_path / f"shm_{sig.name}"
        proc = subprocess.Popen(_forkrun_cmd(2, "--config", DEBUG, "train.rounds=500", f"out_dir={tmp_path / sig.name}",
                                             "log.progress=false", "eval.every=0", "model.share_base=true"),
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(COMIGS_SHM_DIR=str(shm), **{key: value}))
        try:
            # the launcher and its two ranks, all running, both ranks past set-up
            assert _wait_for(lambda: len(_marked(marker)) == 3 and len(list(shm.glob("*/run-*/pids/*"))) == 2, 120), \
                (proc.poll(), _marked(marker))
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
            if sig == signal.SIGTERM:
                assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
                assert "[forkrun] received SIGTERM; stopping 2 rank(s)" in err, err[-3000:]
                assert _marked(marker) == []
            else:
                assert proc.returncode == -signal.SIGKILL
                assert _wait_for(lambda: _marked(marker) == [], 30), _marked(marker)
            assert _wait_for(lambda: list(shm.glob("*/run-*")) == [], 10), list(shm.rglob("*"))
        finally:
            if proc.poll() is None:
                proc.kill()
            for pid in _marked(marker):
                os.kill(pid, signal.SIGKILL)
