"""Injected faults, to rehearse failures before they happen on a cluster.

Owns one switch, the environment variable ``COMIGS_FAULT="<kind>,user=U,round=R[,attempt=A]"``:

* ``kill``  the user's process sends itself SIGKILL halfway through round R's local steps
  (what the out-of-memory killer or a lost node looks like to the others);
* ``raise`` the user raises a RuntimeError at the same point (a crash with a traceback);
* ``nan``   the user's first shared parameter (and the first tensor its method aggregates itself,
  if any) becomes NaN just before the aggregation that opens round R (R >= 2), where the guard
  (``guard.nan``) must catch it.

Rounds count from 1. A fault fires only on attempt A (default 0: the first attempt, not after a
torchrun restart or a Slurm requeue), so a restarted run resumes past it. Unset, nothing happens.
Knows nothing of training beyond where it is called from.
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass

import torch

from comigs_dist import dist

KINDS = ("kill", "raise", "nan")
ENV = "COMIGS_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    user: int
    round: int
    attempt: int = 0


class InjectedFault(RuntimeError):
    """The failure ``COMIGS_FAULT=raise,...`` asked for."""


def parse(spec: str) -> Fault:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    usage = (f"{ENV} ({spec!r}) must look like '<kind>,user=U,round=R[,attempt=A]' with kind one of "
             f"{', '.join(KINDS)}, e.g. {ENV}=kill,user=1,round=2; unset it to run without faults")
    if not parts or parts[0] not in KINDS:
        raise ValueError(usage)
    fields = {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if key not in ("user", "round", "attempt") or not value.strip().isdigit():
            raise ValueError(usage)
        fields[key] = int(value)
    if "user" not in fields or "round" not in fields or fields["round"] < 1:
        raise ValueError(usage)
    return Fault(parts[0], **fields)


def from_env() -> Fault | None:
    """The fault this process was asked to inject, or None (raises ValueError on a bad spec)."""
    spec = dist.env_get(ENV)
    return parse(spec) if spec else None


def _due(run, round_idx: int, kinds: tuple[str, ...]) -> Fault | None:
    fault = from_env()
    if (fault is None or fault.kind not in kinds or fault.user != run.topo.user_idx
            or fault.round != round_idx + 1 or fault.attempt != dist.restart_count()):
        return None
    return fault


def before_sync(run, round_idx: int) -> None:
    """Called just before the guard and the aggregation that open round ``round_idx`` (0-based)."""
    if _due(run, round_idx, ("nan",)) is None:
        return
    with torch.no_grad():
        for group in sorted(run.shared):
            if run.shared[group]:
                run.shared[group][0][1].view(-1)[0] = math.nan
                break
        own = run.method.own_aggregated(run.model)  # e.g. HetLoRA's MLP LoRA, outside the groups
        if own:
            own[0][1].view(-1)[0] = math.nan


def during_round(run, round_idx: int, local_step: int) -> None:
    """Called after each local step of round ``round_idx``; fires halfway through the round."""
    if local_step != run.cfg.train.local_steps // 2:
        return
    fault = _due(run, round_idx, ("kill", "raise"))
    if fault is None:
        return
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"user {fault.user}: fault injected by {ENV} halfway through round {fault.round}")
