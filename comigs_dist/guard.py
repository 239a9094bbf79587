"""Non-finite numbers never reach a collective.

Owns the finiteness checks (a step's loss; the gradients of a step before a method averages them
over users, Centralized's data parallelism; every shared tensor before a round's aggregation, one
``isfinite`` over each group's flattened buffer, the parameter named only on failure; the same for
what a method aggregates itself, ``Method.own_aggregated``) and the policy ``guard.nan``: ``stop``
raises ``Stopped`` (a FloatingPointError) naming the user, the round and the parameter, which
``main`` records in the run's ``stopped.json`` (``write_stopped``) so that a stopped run is an
outcome a launcher can read, not only a log line; ``skip`` lets the user sit the round out (it
contributes nothing to the average and takes the others') or drop the optimiser step, counting
each skip. Knows nothing of how the average is computed: it only says whether this user contributes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

STOPPED = "stopped.json"
STOPPED_BEFORE = "stopped.previous.json"  # the record of an earlier attempt, moved aside when another starts


class Stopped(FloatingPointError):
    """guard.nan=stop ended the run: ``user``'s loss, gradient or shared tensor was not finite in
    round ``round`` (1-based). The message says which and what to change."""

    def __init__(self, message: str, user: int, round: int):
        super().__init__(message)
        self.user = user
        self.round = round

    def __reduce__(self):  # picklable with its fields (it may cross a process boundary: submitit)
        return (Stopped, (str(self), self.user, self.round))


class NothingLeft(FloatingPointError):
    """guard.nan=skip set aside every user an average needed (each one's contribution was not
    finite): there is nothing left to average. Raised where the average is formed (``Comm``, PCL's
    mix), which does not know the round; ``train.run`` turns it into ``Stopped`` with the round, so
    the run ends as under guard.nan=stop, with its ``stopped.json``. ``users``: the users that sat
    the average out; the record names the lowest, so every rank that raises writes the same one."""

    def __init__(self, message: str, users):
        super().__init__(message)
        self.users = sorted(users)

    @property
    def user(self) -> int:
        return self.users[0]

    def __reduce__(self):
        return (NothingLeft, (str(self), self.users))


def write_stopped(out_dir: Path, exc: Stopped) -> Path:
    """Record, atomically, that the run in ``out_dir`` was stopped by the guard: reason, user, round
    and message. Written by the rank that raised (two users stopping in the same round write the
    same kind of record; the last rename wins). A later attempt in the same directory moves it to
    ``STOPPED_BEFORE`` when it claims the directory (``retire_stopped``)."""
    from comigs_dist.checkpoint import write_atomic
    record = {"reason": "non-finite", "user": exc.user, "round": exc.round, "message": str(exc),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(out_dir) / STOPPED
    write_atomic(path, lambda f: json.dump(record, f, indent=2), text=True)
    return path


def retire_stopped(out_dir: Path) -> str | None:
    """Rank 0 of a new attempt, holding out_dir's lock: move an earlier attempt's record aside
    (``STOPPED_BEFORE``), so that ``stopped.json`` always describes the latest attempt and a launcher
    never reads a running retry as diverged. Returns the note to print, or None."""
    stop = read_stopped(out_dir)
    if stop is None:
        return None
    os.replace(Path(out_dir) / STOPPED, Path(out_dir) / STOPPED_BEFORE)
    return (f"an earlier attempt in {out_dir} was stopped by the guard (user {stop.get('user')}, round "
            f"{stop.get('round')}: a non-finite value); this attempt may stop the same way unless the config "
            f"changed (its record is kept as {STOPPED_BEFORE})")


def read_stopped(out_dir: Path) -> dict | None:
    """The record ``write_stopped`` left in ``out_dir``, or None (absent or unreadable)."""
    try:
        return json.loads((Path(out_dir) / STOPPED).read_text())
    except (OSError, ValueError):
        return None


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """(name, 'nan' or 'inf') of the first tensor holding a non-finite value, or None."""
    for name, t in named:
        t = t.detach()
        if torch.isnan(t).any():
            return name, "nan"
        if torch.isinf(t).any():
            return name, "inf"
    return None


def nonfinite_shared(shared: dict[str, list]) -> list[tuple[str, str, str]]:
    """(group, parameter, 'nan'|'inf') for each group whose shared tensors are not all finite."""
    bad = []
    for group in sorted(shared):
        params = shared[group]
        if not params:
            continue
        flat = torch.cat([p.detach().reshape(-1) for _, p in params])  # one check per group
        if bool(torch.isfinite(flat).all()):
            continue
        name, kind = first_nonfinite(params)
        bad.append((group, name, kind))
    return bad


def _warn(text: str) -> None:
    print(f"[comigs] {text}", file=sys.stderr, flush=True)


def check_shared(run, round_idx: int, closing: bool = False) -> bool:
    """Before the aggregation that opens round ``round_idx`` (0-based; ``closing``: the method's
    aggregation after the last round, ``round_idx`` = train.rounds): every shared tensor must be
    finite. Returns whether this user contributes to the round (False only under
    guard.nan=skip); raises Stopped under guard.nan=stop."""
    bad = nonfinite_shared(run.shared)
    own = first_nonfinite(run.method.own_aggregated(run))
    if own is not None:
        bad.append(("the method's own aggregation", *own))
    if not bad:
        return True
    user = run.user_idx
    what = "; ".join(f"shared parameter {name} (group {group!r}) holds {kind}" for group, name, kind in bad)
    where = (f"user {user}, after the last round ({round_idx}): {what} before the closing aggregation" if closing
             else f"user {user}, round {round_idx + 1}: {what} before the round's aggregation")
    if run.cfg.guard.nan == "stop":
        raise Stopped(f"{where}; averaging it would poison every user, so the run stops (guard.nan=stop). "
                      f"Lower train.lr, set train.grad_clip or check the data; guard.nan=skip drops this user's "
                      f"contribution for the round instead", user, round_idx if closing else round_idx + 1)
    run.guard_skipped_rounds += 1
    _warn(f"{where}; guard.nan=skip: user {user} contributes nothing this round and takes the others' average "
          f"({run.guard_skipped_rounds} round(s) skipped so far)")
    return False


def check_loss(run, loss: float, expert_phase: bool) -> bool:
    """A step's loss is not finite: raise (stop) or return True to drop the step (skip)."""
    phase = "expert" if expert_phase else "router"
    where = f"user {run.user_idx}: the {phase} loss is {loss} at local iteration {run.step} (round {_round(run)})"
    if run.cfg.guard.nan == "stop":
        raise Stopped(f"{where}; the run stops before it reaches any collective (guard.nan=stop). Lower train.lr, "
                      f"set train.grad_clip or check the data; guard.nan=skip drops such steps",
                      run.user_idx, _round(run))
    run.guard_skipped_steps += 1
    _warn(f"{where}; guard.nan=skip: {_skipped(run, expert_phase)} ({run.guard_skipped_steps} step(s) skipped so far)")
    return True


def _round(run) -> int:
    """The round (1-based) whose steps the user takes: set by train.local_iterations (a user that
    sits rounds out has taken fewer steps than the rounds imply, and router steps follow the
    round's last expert step); from the step count where nothing set it."""
    return getattr(run, "round", 0) or run.step // run.cfg.train.local_steps + 1


def _skipped(run, expert_phase: bool) -> str:
    method = getattr(run, "method", None)
    if expert_phase and method is not None and method.reduces_gradients:
        return (f"user {run.user_idx} contributes nothing to this step's gradient average and steps with the "
                f"other users' average")
    return "the step is dropped"


def check_gradients(run, params: list) -> bool:
    """Before gradients reach a collective (``Method.reduce_gradients``): every gradient must be
    finite, also when the loss was (an overflow in the backward). Returns True when this user
    sits the average out (guard.nan=skip: it contributes nothing and steps with the others' mean);
    raises Stopped under guard.nan=stop, before the collective."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.cat([g.detach().reshape(-1) for g in grads])).all()):
        return False
    names = {id(p): n for n, p in run.model.report.params.items()}
    name, kind = first_nonfinite((names.get(id(p), "?"), p.grad) for p in params if p.grad is not None)
    where = (f"user {run.user_idx}: the gradient of {name} holds {kind} at local iteration {run.step} "
             f"(round {_round(run)}) before it is averaged with the other users' gradients")
    if run.cfg.guard.nan == "stop":
        raise Stopped(f"{where}; averaging it would poison every user's model, so the run stops "
                      f"(guard.nan=stop). Lower train.lr, set train.grad_clip or check the data; "
                      f"guard.nan=skip drops such steps", run.user_idx, _round(run))
    run.guard_skipped_steps += 1
    _warn(f"{where}; guard.nan=skip: {_skipped(run, True)} ({run.guard_skipped_steps} step(s) skipped so far)")
    return True

