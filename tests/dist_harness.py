"""Run a test worker on N real processes (gloo on CPU, one thread each).

``run_on_ranks(worker, world_size, tmp_path, *args)`` spawns ``world_size`` processes; each sets
the launcher environment torchrun would set, joins the group through the project's own
``init_distributed`` and calls ``worker(rank, world_size, tmp_path, *args)``. Workers are
module-level functions that assert inside; a failure in any rank fails the test with its
traceback. The group is destroyed in ``finally``.
"""
from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from comigs_dist.dist import free_port


def _entry(rank: int, worker, world_size: int, port: int, tmp_path, args, timeout_s: float) -> None:
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
        traceback.print_exc()
        raise
    finally:
        dist.shutdown()


def _leave_together(world_size: int, timeout_s: float = 10.0) -> None:
    """Wait (through the store, not gloo) until every rank's worker has returned, for at most
    ``timeout_s``: a rank that tears gloo down while another still talks to it can abort
    ("terminate called without an active exception"), which main.py avoids the same way. A
    worker whose peers are stuck on purpose (failure tests) waits out the timeout, then leaves."""
    import time
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


def init_topology(timeout_s: float = 60.0, device: str = "cpu"):
    """Inside a worker: join the group like main.py does."""
    from comigs_dist import dist
    return dist.init_distributed("gloo", device, timeout_s, threads=1)


def run_on_ranks(worker, world_size: int, tmp_path, *args, timeout_s: float = 60.0) -> None:
    mp.spawn(_entry, args=(worker, world_size, free_port(), tmp_path, args, timeout_s),
             nprocs=world_size, join=True)
