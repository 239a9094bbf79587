"""A failed collective becomes a message naming the user that died or hung, never a silent hang.

Owns ``PeerFailure``, the ``FailureWatch`` a topology carries (every rank's host and pid, the
collective timeout, the phase of the run last named), the cause a failing rank leaves in the
rendezvous store for the others to read, and ``collective(watch, op, group)``, the context every
collective runs in. Knows nothing of what is being communicated.
"""
from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

import torch.distributed as tdist

from comigs_dist.dist.env import env_get, env_rank, pid_alive, restart_count

_FAILURE_PREFIX = "comigs/failed"


@dataclass
class FailureWatch:
    """What a rank knows to explain a failed collective: every rank's (host, pid), gathered when
    the group forms; the collective timeout; where in the run it is (``set_phase``)."""
    timeout_s: float = 300.0
    peers: list[tuple[str, int]] = field(default_factory=list)
    phase: str | None = None

    def set_phase(self, where: str) -> None:
        """Name the place in the run (``round 3``) that a PeerFailure raised from now on reports."""
        self.phase = where


class PeerFailure(RuntimeError):
    """A collective failed because another user's process died, hung or became unreachable.

    The message names this rank, the collective and its group, where in the run it happened
    (the phase last named), what is known of the others (a process on this host that is gone, or
    a cause a failing rank left behind) and how to continue the run."""

    def __init__(self, rank: int, op: str, group: str, diagnosis: str, backend_error: str, where: str | None = None):
        super().__init__(diagnosis)
        self.user, self.op, self.group = rank, op, group
        self.diagnosis, self.backend_error, self.where = diagnosis, backend_error, where

    def __str__(self) -> str:
        where = f" in {self.where}" if self.where else ""
        return (f"user {self.user} lost contact with the other users{where}, during {self.op} on group "
                f"{self.group!r}: {self.diagnosis}. The run stops here; if checkpoints were written "
                f"(checkpoint.every), continue with resume=true and the same out_dir (under torchrun "
                f"--max-restarts or a Slurm requeue, resume=auto does it by itself). "
                f"[backend: {self.backend_error}]")


def _store():
    try:
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    except Exception:  # no group, or a torch without the helper: notes are a courtesy
        return None


def _note_key(rank: int) -> str:
    # restarts reuse torchrun's store: a note from an earlier attempt must not be read again
    return f"{_FAILURE_PREFIX}/{restart_count()}/{rank}"


def report_failure(cause: str) -> None:
    """Leave this rank's cause of failure where the other ranks can read it (the rendezvous
    store), so their messages name it; best effort, silent when the store is gone."""
    store = _store() if tdist.is_initialized() else None
    if store is None:
        return
    try:
        store.set(_note_key(tdist.get_rank()), cause[:2000])
    except Exception:
        pass


def _read_notes(n_ranks: int, skip_store: bool) -> dict[int, str]:
    store = None if skip_store else _store()
    notes: dict[int, str] = {}
    if store is None:
        return notes
    me = tdist.get_rank()
    for rank in range(n_ranks):
        if rank == me:
            continue
        key = _note_key(rank)
        try:
            if store.check([key]):
                notes[rank] = store.get(key).decode(errors="replace")
        except Exception:
            break  # the store itself is gone (its host died): pid checks must do
    return notes


def diagnose(watch: FailureWatch, grace_s: float = 3.0) -> str:
    """What is known of the other ranks after a failed collective."""
    peers = watch.peers
    if not peers or not tdist.is_initialized():
        return "another user's process stopped answering"
    me, host = tdist.get_rank(), socket.gethostname()
    local = [r for r, (h, _) in enumerate(peers) if h == host and r != me]
    remote = [r for r, (h, _) in enumerate(peers) if h != host]
    # the store lives in torchrun's agent, or else in rank 0's process: do not ask a dead host
    agent_store = env_get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    notes = _read_notes(len(peers), skip_store=not agent_store and 0 in local and not pid_alive(peers[0][1]))
    dead: list[int] = []
    deadline = time.monotonic() + grace_s
    while not notes and local:  # a peer that just failed may still be tearing down
        dead = [r for r in local if not pid_alive(peers[r][1])]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not dead:
        dead = [r for r in local if not pid_alive(peers[r][1])]
    parts = [f"user {r} failed: {note}" for r, note in sorted(notes.items())]
    parts += [f"user {r} (pid {peers[r][1]} on {host}) is no longer running: it was killed (a signal or the "
              f"out-of-memory killer) or it crashed; its own output, or the launcher's report of its exit code, "
              f"gives the cause" for r in dead if r not in notes]
    if not parts:
        if remote:
            parts.append(f"users {', '.join(map(str, remote))} run on other hosts and cannot be checked from here; "
                         f"their output names the cause")
        else:
            parts.append(f"every other user on this host is still running, so one of them is stuck or slower than "
                         f"comm.timeout_s ({watch.timeout_s:g} s); raise comm.timeout_s if a round legitimately "
                         f"takes longer")
    return "; ".join(parts)


@contextlib.contextmanager
def collective(watch: FailureWatch | None, op: str, group_name: str):
    """Turn a backend error in a collective (a peer closed its connection, a timeout) into a
    PeerFailure that says which rank is gone, instead of a bare gloo/NCCL message."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's errors are RuntimeErrors
        backend = " ".join(str(exc).split())[:400]
        watch = watch or FailureWatch()
        raise PeerFailure(tdist.get_rank() if tdist.is_initialized() else env_rank(), op, group_name,
                          diagnose(watch), backend, watch.phase) from exc
