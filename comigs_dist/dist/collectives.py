"""Small collectives over the whole run: objects, scalars, a barrier, and the shape handshake.

Owns gathering and broadcasting picklable objects, summing a few floats, the barrier every rank
leaves the run through, and the handshake before a group's first mean: every member must share
the same names, shapes and dtypes, else every rank raises the same ValueError naming the group,
the users and the parameter. Every call runs under ``failures.collective``. Knows nothing of models.
"""
from __future__ import annotations

import datetime
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as tdist

from comigs_dist.dist.failures import collective
from comigs_dist.dist.topology import Topology


def all_gather_objects(topo: Topology, obj) -> list:
    """One picklable object from every rank (every rank gets the list, in rank order)."""
    if topo.world_size == 1:
        return [obj]
    out: list = [None] * topo.world_size
    with collective(topo.watch, "all_gather_object", "world"):
        tdist.all_gather_object(out, obj)
    return out


def broadcast_object(topo: Topology, obj, src: int = 0):
    """Rank ``src``'s object on every rank."""
    if topo.world_size == 1:
        return obj
    box = [obj]
    with collective(topo.watch, "broadcast_object", "world"):
        tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(topo: Topology) -> None:
    with collective(topo.watch, "barrier", "world"):
        if topo.backend == "gloo":
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=topo.timeout_s))
        else:
            tdist.barrier()


def sum_scalars(topo: Topology, values: Iterable[float]) -> list[float]:
    """A few floats summed over every rank (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=topo.device)
    if topo.world_size > 1:
        with collective(topo.watch, "all_reduce", "world"):
            tdist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# the shape handshake
# --------------------------------------------------------------------------------------------

def shape_list(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple, str]]:
    return [(n, tuple(t.shape), str(t.dtype)) for n, t in named]


def shape_problems(members: Sequence[int], lists: Sequence[list]) -> list[str]:
    """What differs between the members' (name, shape, dtype) lists, against the first member's."""
    ref_user, ref = members[0], lists[0]
    problems = []
    for user, theirs in zip(members, lists):
        if theirs == ref:
            continue
        ref_map = {n: (s, d) for n, s, d in ref}
        their_map = {n: (s, d) for n, s, d in theirs}
        found = []
        for n in sorted(set(ref_map) | set(their_map)):
            a, b = ref_map.get(n), their_map.get(n)
            if a is None:
                found.append(f"user {user} shares {n} {b[0]} which user {ref_user} does not hold")
            elif b is None:
                found.append(f"user {user} lacks {n}, which user {ref_user} shares with shape {a[0]}")
            elif a != b:
                found.append(f"user {user} holds {n} with shape {b[0]} ({b[1]}) but user {ref_user} "
                             f"holds {a[0]} ({a[1]})")
        problems += found or [f"user {user} lists its shared parameters in another order than user {ref_user}"]
    return problems


def raise_shape_problems(by_group: Mapping[str, list[str]]) -> None:
    if not by_group:
        return
    parts = []
    for group, problems in by_group.items():
        parts.append(f"shared parameters of group {group!r} differ between users, so they cannot be averaged: "
                     + "; ".join(problems[:8]) + ("" if len(problems) <= 8 else f"; ... ({len(problems)} differences)"))
    raise ValueError(". ".join(parts) + ". Give these users the same shapes for their shared experts (moe.*, lora.*).")


def check_group_shapes(topo: Topology, shared: Mapping[int, Mapping[str, Sequence[tuple[str, torch.Tensor]]]]) -> None:
    """The handshake of every group at once, before any of them communicates: one gather over all
    ranks, every group checked by every rank, so every rank raises the same ValueError (naming the
    group, user and parameter), a member of a sound group included: no rank is left waiting in a
    collective that a failed member never joins. ``shared``: this rank's users -> group -> tensors."""
    mine = {u: {g: shape_list(named) for g, named in groups.items()} for u, groups in shared.items()}
    everyone: dict[int, dict] = {}
    for part in all_gather_objects(topo, mine):
        everyone.update(part)
    problems = {}
    for group in sorted(topo.groups):
        members = topo.members(group)
        found = shape_problems(members, [everyone.get(u, {}).get(group, []) for u in members])
        if found:
            problems[group] = found
    raise_shape_problems(problems)
