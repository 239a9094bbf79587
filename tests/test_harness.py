"""The multi-process test harness itself: a hung rank is killed and fails the test, failures carry tracebacks."""
import os
import signal
import time

import pytest

from comigs_dist.dist import pid_alive
from dist_harness import RanksTimedOut, init_topology, run_on_ranks


def _hang_worker(rank, world_size, tmp_path):
    init_topology(timeout_s=600)
    import torch.distributed as tdist
    if rank == 1:
        time.sleep(3600)  # never reaches the barrier: rank 0 waits in it (gloo timeout 600 s)
    tdist.barrier()


@pytest.mark.timeout(300)  # without a working timeout_s this test would hang: fail it instead
def test_a_hung_rank_is_killed_when_timeout_s_passes_and_the_test_fails():
    """Rank 1 sleeps, rank 0 waits for it in a barrier: with timeout_s=5 run_on_ranks kills both and
    raises, naming both ranks; their processes are gone afterwards."""
    with pytest.raises(RanksTimedOut,
                       match=r"rank\(s\) 0, 1 \(pid\(s\) .*\) still running after timeout_s=5 s; killed") as info:
        run_on_ranks(_hang_worker, 2, None, timeout_s=5)
    assert sorted(info.value.killed) == [0, 1]
    assert not any(pid_alive(pid) for pid in info.value.killed.values())


def _fail_or_die_worker(rank, world_size, tmp_path, how):
    if rank == 1 and how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and how == "assert":
        assert 1 + 1 == 3, "rank 1 asserts on purpose"


@pytest.mark.timeout(300)
def test_a_failing_rank_fails_the_test_with_its_traceback_and_an_expected_death_passes():
    """An assertion on rank 1 fails run_on_ranks with rank 1's exit code and traceback; a rank that
    kills itself passes only when expect_exit says so."""
    with pytest.raises(AssertionError, match=r"(?s)rank 1 exited with code 1:.*rank 1 asserts on purpose"):
        run_on_ranks(_fail_or_die_worker, 2, None, "assert")
    with pytest.raises(AssertionError, match=r"rank 1 exited with code -9"):
        run_on_ranks(_fail_or_die_worker, 2, None, "kill")
    run_on_ranks(_fail_or_die_worker, 2, None, "kill", expect_exit={1: -signal.SIGKILL})
