"""How soon a failure ends a run: the timing the failure tests assert by events only.

    python benchmarks/failure_latency.py [--quick] [--timeout 120]

Two measurements on this host, each a real launch of configs/debug.yaml:

    peer      3 users under plain processes (the torchrun environment), user 1 SIGKILLed halfway
              through round 2 (COMIGS_FAULT): the time from user 1's death to the later of the two
              survivors' exits, as a share of comm.timeout_s. The survivors notice the closed
              connection (and name user 1) instead of waiting out the collective's timeout.
    forkrun   2 users under comigs_dist.forkrun, user 1 raising in round 1: the time from the
              launcher's report of the failing rank to its exit (it stops and reaps the other rank),
              as a share of comm.timeout_s.

Targets: both well within the timeout, <= 0.5 of it. A loaded machine stretches both (process
teardown competes for the cores); the tests (tests/test_failures.py, tests/test_forkrun.py) check
the same behaviour by exit codes and messages. --quick uses a 60 s timeout.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEBUG = str(C.ROOT / "configs" / "debug.yaml")


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(C.ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def peer_latency(timeout_s: float, workdir: Path) -> float:
    """Seconds from user 1's death to the last survivor's exit."""
    from comigs_dist.dist import free_port
    port = str(free_port())
    procs = []
    for rank in range(3):
        env = _env(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, COMIGS_FAULT="kill,user=1,round=2")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "comigs_dist.main", "--config", DEBUG, "n_users=3", "train.rounds=4",
             f"out_dir={workdir / 'peer'}", f"comm.timeout_s={timeout_s}", "log.progress=false",
             "log.tensorboard=false"], cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True))
    try:
        procs[1].wait(timeout=900)
        died = time.perf_counter()
        ends = []
        for rank in (0, 2):
            _, err = procs[rank].communicate(timeout=timeout_s + 120)
            ends.append(time.perf_counter())
            if procs[rank].returncode != 1 or "is no longer running" not in err:
                raise RuntimeError(f"user {rank} did not stop on user 1's death as expected: {err[-2000:]}")
        if procs[1].returncode != -9:
            raise RuntimeError(f"user 1 ended with {procs[1].returncode}, not SIGKILL")
        return max(ends) - died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def forkrun_latency(timeout_s: float, workdir: Path) -> float:
    """Seconds from the launcher's report of the failing rank to the launcher's exit."""
    proc = subprocess.Popen([sys.executable, "-m", "comigs_dist.forkrun", "--nproc_per_node=2", "--config", DEBUG,
                             "train.rounds=20", f"out_dir={workdir / 'fork'}", f"comm.timeout_s={timeout_s}",
                             "log.progress=false", "log.tensorboard=false"], cwd=workdir,
                            env=_env(COMIGS_FAULT="raise,user=1,round=1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    reported: list[float] = []

    def watch() -> None:
        for line in proc.stderr:
            if line.startswith("[forkrun] rank 1") and not reported:
                reported.append(time.perf_counter())
    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = time.perf_counter()
    reader.join(10)
    if code != 1 or not reported:
        raise RuntimeError(f"forkrun ended with {code} without reporting rank 1")
    return ended - reported[0]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 60 s collective timeout")
    parser.add_argument("--timeout", type=float, default=120.0, help="comm.timeout_s of both launches")
    args = parser.parse_args(argv)
    timeout_s = 60.0 if args.quick else args.timeout
    from comigs_dist import train
    from comigs_dist.config import load_config
    for n in (2, 3):  # the embedded corpus and the tiny model's data, built before any timing
        train.prepare_assets(load_config(DEBUG, [f"n_users={n}"]), n)
    print(f"failure latency: configs/debug.yaml, comm.timeout_s={timeout_s:g}")
    print(C.machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        peer = peer_latency(timeout_s, Path(tmp))
        fork = forkrun_latency(timeout_s, Path(tmp))
    print(f"peer failure: the survivors left {peer:.1f} s after user 1 died")
    print(f"forkrun: the launcher exited {fork:.1f} s after reporting rank 1")
    print(C.target_line("peer_failure_exit_over_comm_timeout", peer / timeout_s, "<=", 0.5))
    print(C.target_line("forkrun_stop_over_comm_timeout", fork / timeout_s, "<=", 0.5))
    return {"peer": peer, "forkrun": fork}


if __name__ == "__main__":
    main()
