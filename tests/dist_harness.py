"""Run a test worker on N real processes (gloo on CPU, one thread each), bounded by a timeout.

``run_on_ranks(worker, world_size, tmp_path, *args, timeout_s=...)`` starts ``world_size``
processes; each sets the launcher environment torchrun would set, joins the group through the
project's own ``init_distributed`` and calls ``worker(rank, world_size, tmp_path, *args)``.
Workers are module-level functions that assert inside; a failure in any rank fails the test with
its traceback and ends the other ranks at once. When ``timeout_s`` passes with a rank still
running, every rank still alive is killed and the test fails naming them (a hung collective never
hangs the suite). ``expect_exit={rank: code}`` lets a rank end otherwise than with 0 (a rank that
kills itself on purpose: -9). The group is destroyed in ``finally``.

Ranks start from a fork server that has imported torch, transformers and the simulator once
(``multiprocessing``'s "forkserver": the server never runs a kernel, so its children fork
safely), instead of a fresh interpreter each importing them for seconds; each rank takes the
test's environment as it is when ``run_on_ranks`` is called. ``COMIGS_TEST_START=spawn`` starts
every rank in a fresh interpreter instead.
"""
from __future__ import annotations

import atexit
import os
import time
import traceback

import torch.multiprocessing as mp

from comigs_dist.dist import free_port


class RanksTimedOut(AssertionError):
    """Raised when ranks outlive ``timeout_s``; ``killed`` maps each killed rank to its pid."""

    def __init__(self, message: str, killed: dict[int, int]):
        super().__init__(message)
        self.killed = killed


_PRELOAD = ["torch", "torch.distributed", "transformers", "comigs_dist.train", "dist_harness", "helpers"]


def _start_method() -> str:
    return os.environ.get("COMIGS_TEST_START", "forkserver")


def _context():
    method = _start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts (the first run); ignored after
    return ctx


def _entry(rank: int, worker, world_size: int, port: int, tmp_path, args, errors, env: dict) -> None:
    os.environ.clear()  # the test's environment, not the fork server's (set when it started)
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)
    from comigs_dist import dist
    try:
        worker(rank, world_size, tmp_path, *args)
        _leave_together(world_size)
    except BaseException:
        text = traceback.format_exc()
        print(text, flush=True)
        errors.put((rank, text))
        raise SystemExit(1)
    finally:
        dist.shutdown()
        if _start_method() != "spawn":
            # a forked child leaves through os._exit, which skips atexit: run the handlers (the
            # shared base's cleanup, for one) as a rank's normal exit would
            atexit._run_exitfuncs()


def _leave_together(world_size: int, timeout_s: float = 10.0) -> None:
    """Wait (through the store, not gloo) until every rank's worker has returned, for at most
    ``timeout_s``: a rank that tears gloo down while another still talks to it can abort
    ("terminate called without an active exception"), which main.py avoids the same way. A
    worker whose peers are stuck on purpose (failure tests) waits out the timeout, then leaves."""
    import torch.distributed as tdist
    if not tdist.is_initialized():
        return
    try:
        store = tdist.distributed_c10d._get_default_store()
        store.add("harness/left", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("harness/left", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.02)
    except Exception:  # the store went away with rank 0: everyone is leaving anyway
        pass


def init_topology(timeout_s: float = 60.0, device: str = "cpu", n_users: int | None = None):
    """Inside a worker: join the group like main.py does (``n_users`` spread over the ranks;
    default one per rank)."""
    from comigs_dist import dist
    return dist.init_distributed("gloo", device, timeout_s, threads=1, n_users=n_users)


def _drain(errors) -> dict[int, str]:
    """Tracebacks the ranks sent so far (read while they run: a full pipe would block a rank)."""
    found = {}
    while not errors.empty():
        rank, text = errors.get()
        found.setdefault(rank, text)
    return found


def run_on_ranks(worker, world_size: int, tmp_path, *args, timeout_s: float = 300.0,
                 expect_exit: dict[int, int] | None = None) -> None:
    """Run ``worker`` on ``world_size`` ranks; fail on the first rank that fails, or when
    ``timeout_s`` passes with ranks still running (they are killed first)."""
    expect_exit = expect_exit or {}
    ctx = _context()
    errors = ctx.SimpleQueue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(rank, worker, world_size, port, tmp_path, args, errors, env))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    failed: list[int] = []
    tracebacks: dict[int, str] = {}
    try:
        while True:
            tracebacks.update({r: t for r, t in _drain(errors).items() if r not in tracebacks})
            running = [r for r, p in enumerate(procs) if p.exitcode is None]
            failed = [r for r, p in enumerate(procs) if p.exitcode is not None and p.exitcode != expect_exit.get(r, 0)]
            if failed or not running:
                break
            if time.monotonic() > deadline:
                killed = {r: procs[r].pid for r in running}
                for r in running:
                    procs[r].kill()
                for r in running:
                    procs[r].join(10)
                raise RanksTimedOut(f"rank(s) {', '.join(map(str, running))} (pid(s) "
                                    f"{', '.join(str(procs[r].pid) for r in running)}) still running after "
                                    f"timeout_s={timeout_s:g} s; killed", killed)
            procs[running[0]].join(0.05)
    finally:
        for p in procs:  # the first failure ends the others at once, as mp.spawn did
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(10)
    if failed:
        tracebacks.update({r: t for r, t in _drain(errors).items() if r not in tracebacks})
        parts = [f"rank {r} exited with code {procs[r].exitcode}"
                 + (f" (expected {expect_exit[r]})" if r in expect_exit else "")
                 + (f":\n{tracebacks[r]}" if r in tracebacks else "") for r in failed]
        raise AssertionError("\n".join(parts))
