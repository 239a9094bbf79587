"""Injected faults, to rehearse failures before they happen on a cluster.

Owns one switch, the environment variable
``COMIGS_FAULT="<kind>,user=U[,round=R][,phase=P][,attempt=A]"``. The kinds:

* ``kill``  the user's process sends itself SIGKILL (what the out-of-memory killer or a lost node
  looks like to the others);
* ``raise`` the user raises a RuntimeError at the same point (a crash with a traceback);
* ``nan``   the user's first shared parameter (and the first tensor its method aggregates itself,
  if any) becomes NaN just before the aggregation that opens round R (R >= 2), where the guard
  (``guard.nan``) must catch it (phase ``sync`` only).

and the phases, where ``kill`` and ``raise`` fire (rounds count from 1):

* ``setup``       after the user's model, data and groups are built, before the resume agreement
                  (no round: every start has one set-up);
* ``expert``      halfway through round R's local expert steps (the default);
* ``router``      after the first router step of round R (round R must hold a router phase);
* ``sync``        just before the aggregation that opens round R (R >= 2);
* ``checkpoint``  in the middle of writing round R's checkpoint (or final.pt when R is the last
                  round): the file is written but not yet renamed into place;
* ``eval``        at the start of the final evaluation (no round).

A fault fires only on attempt A (default 0: the first attempt, not after a torchrun restart or a
Slurm requeue), so a restarted run resumes past it. Unset, nothing happens. ``check`` refuses a
fault that could never fire under a configuration. Knows nothing of training beyond where it is
called from.
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass

import torch

from comigs_dist import dist

KINDS = ("kill", "raise", "nan")
PHASES = ("setup", "expert", "router", "sync", "checkpoint", "eval")
ROUNDLESS = ("setup", "eval")   # phases that happen once per start, not once per round
ENV = "COMIGS_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    user: int
    round: int = 0       # 0: a phase without rounds (setup, eval)
    attempt: int = 0
    phase: str = ""      # default: expert for kill and raise, sync for nan

    def __post_init__(self) -> None:
        if not self.phase:
            object.__setattr__(self, "phase", "sync" if self.kind == "nan" else "expert")


class InjectedFault(RuntimeError):
    """The failure ``COMIGS_FAULT=raise,...`` asked for."""


def parse(spec: str) -> Fault:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    usage = (f"{ENV} ({spec!r}) must look like '<kind>,user=U[,round=R][,phase=P][,attempt=A]' with kind one of "
             f"{', '.join(KINDS)} and phase one of {', '.join(PHASES)} (round required except for "
             f"{' and '.join(ROUNDLESS)}; nan only in the sync, R >= 2), e.g. {ENV}=kill,user=1,round=2 or "
             f"{ENV}=kill,user=1,round=2,phase=checkpoint; unset it to run without faults")
    if not parts or parts[0] not in KINDS:
        raise ValueError(usage)
    fields: dict = {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        value = value.strip()
        if key == "phase" and value in PHASES:
            fields[key] = value
        elif key in ("user", "round", "attempt") and value.isdigit():
            fields[key] = int(value)
        else:
            raise ValueError(usage)
    fault = Fault(parts[0], **{"user": -1, **fields})
    has_round = "round" in fields
    if (fault.user < 0 or (fault.kind == "nan" and fault.phase != "sync")
            or (fault.phase in ROUNDLESS) == has_round or (has_round and fault.round < 1)):
        raise ValueError(usage)
    return fault


def from_env() -> Fault | None:
    """The fault this process was asked to inject, or None (raises ValueError on a bad spec)."""
    spec = dist.env_get(ENV)
    return parse(spec) if spec else None


def check(fault: Fault | None, cfg) -> None:
    """Refuse (ValueError) a fault that this configuration would never reach: a round past
    train.rounds, a sync before round 2, a round without router steps or without a checkpoint."""
    if fault is None:
        return
    t, where = cfg.train, f"{ENV} ({fault.kind},user={fault.user},round={fault.round},phase={fault.phase})"
    problem = None
    if fault.phase not in ROUNDLESS and fault.round > t.rounds:
        problem = f"round {fault.round} is past train.rounds ({t.rounds})"
    elif fault.phase == "sync" and fault.round < 2:
        problem = "the aggregation that opens round 1 is the common initialisation: choose round >= 2"
    elif fault.phase == "router":
        steps = range((fault.round - 1) * t.local_steps + 1, fault.round * t.local_steps + 1)
        if not t.router_steps or not any(s % t.router_every == 0 for s in steps):
            problem = (f"round {fault.round} holds no router step (train.router_every={t.router_every}, "
                       f"train.local_steps={t.local_steps}, train.router_steps={t.router_steps})")
    elif fault.phase == "checkpoint":
        every = cfg.checkpoint.every
        if not ((every and fault.round % every == 0) or (fault.round == t.rounds and cfg.checkpoint.final)):
            problem = (f"round {fault.round} writes no checkpoint (checkpoint.every={every}, "
                       f"checkpoint.final={cfg.checkpoint.final})")
    if problem:
        raise ValueError(f"{where} would never fire: {problem}; change the fault or the run")


def _due(run, phase: str, round_idx: int | None = None) -> Fault | None:
    """The fault to fire here: this user, this phase, this round (0-based; None for roundless phases)
    and this attempt."""
    fault = from_env()
    if (fault is None or fault.phase != phase or fault.user != run.user_idx
            or fault.attempt != dist.restart_count()):
        return None
    if round_idx is not None and fault.round != round_idx + 1:
        return None
    return fault


def _fire(fault: Fault, where: str) -> None:
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"user {fault.user}: fault injected by {ENV} {where}")


def at_setup(run) -> None:
    """Called once the user is built, before the resume agreement."""
    if (fault := _due(run, "setup")) is not None:
        _fire(fault, "during set-up")


def during_round(run, round_idx: int, local_step: int) -> None:
    """Called after each local step of round ``round_idx``; fires halfway through the round."""
    if local_step != run.cfg.train.local_steps // 2:
        return
    if (fault := _due(run, "expert", round_idx)) is not None and fault.kind != "nan":
        _fire(fault, f"halfway through round {fault.round}")


def during_router(run, round_idx: int) -> None:
    """Called after each router step; fires after the first one of round ``round_idx``."""
    if (fault := _due(run, "router", round_idx)) is not None:
        _fire(fault, f"in the router steps of round {fault.round}")


def before_sync(run, round_idx: int) -> None:
    """Called just before the guard and the aggregation that open round ``round_idx`` (0-based)."""
    fault = _due(run, "sync", round_idx)
    if fault is None:
        return
    if fault.kind != "nan":
        _fire(fault, f"just before the aggregation that opens round {fault.round}")
    with torch.no_grad():
        for group in sorted(run.shared):
            if run.shared[group]:
                run.shared[group][0][1].view(-1)[0] = math.nan
                break
        own = run.method.own_aggregated(run)  # e.g. HetLoRA's MLP LoRA, outside the groups
        if own:
            own[0][1].view(-1)[0] = math.nan


def during_checkpoint(run, round_idx: int) -> None:
    """Called between writing the user's checkpoint of round ``round_idx`` (1-based here, as the
    file names) and renaming it into place."""
    if (fault := _due(run, "checkpoint", round_idx - 1)) is not None:
        _fire(fault, f"while writing its checkpoint of round {fault.round}")


def at_final_eval(run) -> None:
    """Called as the final evaluation starts."""
    if (fault := _due(run, "eval")) is not None:
        _fire(fault, "at the start of the final evaluation")
