"""Sharing groups: which users average which of their generalists together (``comm.groups``).

Owns the resolution of the configured groups into a ``SharingPlan`` (the members of every group;
for each user, the group each of its generalist experts and its attention LoRA is averaged in)
and every check of that configuration, each message naming the key, the value and the fix.
Knows nothing of torch.distributed, models or methods: it works on user and expert indices, and
is told how many generalists each user holds.

Rules (docs/communication.md):
- a group lists ``users`` ("all" or indices) and the generalist ``experts`` (indices) its users
  average together; every generalist expert of every user is averaged in exactly one group;
- the attention LoRA is shared too (the paper always aggregates it, section 4.1.2): in the group
  marked ``attention: true`` (exactly one per user), or, when no group is marked, in the first
  group listed whose users are every user;
- no ``comm.groups``: one group ``generalists`` of every user, holding every shared tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

DEFAULT_GROUP = "generalists"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SharingPlan:
    """Who averages what with whom, resolved for a number of users."""
    members: dict[str, tuple[int, ...]]        # group -> its users, sorted
    experts: dict[tuple[int, int], str]        # (user, expert index) -> group
    attention: dict[int, str]                  # user -> group of its attention LoRA

    def groups_of(self, user: int) -> list[str]:
        return sorted(g for g, m in self.members.items() if user in m)


def _users_of(group: Any, n_users: int | None) -> list[int] | None:
    """The users a group names ("all" -> every user; None while the number of users is unknown)."""
    if isinstance(group.users, str):
        return list(range(n_users)) if n_users is not None else None
    return list(group.users)


def plan_errors(groups: Sequence[Any], n_users: int | None, n_generalists: Callable[[int], int] | None,
                what: str = "") -> list[str]:
    """Every problem of ``comm.groups`` for ``n_users`` users (None: only what does not depend on
    it), where user u holds ``n_generalists(u)`` generalist experts (0 .. n-1). ``what`` names where
    that count comes from (e.g. "moe.n_generalists with method comigs_1g1s"), for the messages."""
    e: list[str] = []
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        key = f"comm.groups[{i}]"
        if not g.name or not _NAME.match(g.name):
            e.append(f"{key}.name ({g.name!r}) must be a non-empty name of letters, digits, '_', '-' or '.'")
        elif g.name in seen:
            e.append(f"{key}.name ({g.name!r}) is used by comm.groups[{seen[g.name]}] already; give every group "
                     f"its own name")
        else:
            seen[g.name] = i
        label = f"{key} ({g.name})"
        if isinstance(g.users, str) and g.users != "all":
            e.append(f"{label}.users ({g.users!r}) must be 'all' or a list of user indices, e.g. [0, 1]")
        elif isinstance(g.users, list):
            if not g.users:
                e.append(f"{label}.users is empty; list the users of the group, or 'all'")
            if len(set(g.users)) != len(g.users):
                e.append(f"{label}.users ({g.users}) names a user twice; list each user once")
            bad = [u for u in g.users if u < 0 or (n_users is not None and u >= n_users)]
            if bad:
                span = f"0..{n_users - 1}" if n_users is not None else ">= 0"
                e.append(f"{label}.users names user(s) {bad}, outside the users of the run ({span}); "
                         f"fix the indices or n_users")
        if len(set(g.experts)) != len(g.experts):
            e.append(f"{label}.experts ({g.experts}) names an expert twice; list each expert once")
        if any(x < 0 for x in g.experts):
            e.append(f"{label}.experts ({g.experts}) must be expert indices >= 0")
    if e or n_users is None or n_generalists is None:
        return e

    # which groups hold each (user, expert); problems are listed once per expert, naming the users
    src = what or "moe.n_generalists"
    holders: dict[tuple[int, int], list[str]] = {}
    for i, g in enumerate(groups):
        not_generalist: dict[int, list[int]] = {}
        for u in _users_of(g, n_users):
            for x in g.experts:
                if x >= n_generalists(u):
                    not_generalist.setdefault(x, []).append(u)
                holders.setdefault((u, x), []).append(g.name)
        for x, users in sorted(not_generalist.items()):
            e.append(f"comm.groups[{i}] ({g.name}).experts lists expert {x}, which is not a generalist of "
                     f"{_who(users, verb=False)} (generalists are experts 0..n-1, n from {src}); raise "
                     f"moe.n_generalists for {_who(users, verb=False)} or take them out of this group")
    uncovered: dict[int, list[int]] = {}
    twice: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for u in range(n_users):
        for x in range(n_generalists(u)):
            names = holders.get((u, x), [])
            if not names:
                uncovered.setdefault(x, []).append(u)
            elif len(names) > 1:
                twice.setdefault((x, tuple(names)), []).append(u)
    for x, users in sorted(uncovered.items()):
        e.append(f"comm.groups: expert {x} of {_who(users, verb=False)} is a generalist (from {src}) but no group "
                 f"shares it; add it to the experts of a group holding {_who(users, verb=False)}, or lower "
                 f"moe.n_generalists there")
    for (x, names), users in sorted(twice.items()):
        e.append(f"comm.groups: expert {x} of {_who(users, verb=False)} is shared by {len(names)} groups "
                 f"({', '.join(names)}); a generalist is averaged in one group: remove it from all but one")
    attention = _attention_groups(groups, n_users)
    alone = [u for u in range(n_users) if not any(u in _users_of(g, n_users) for g in groups)]
    if alone:
        e.append(f"comm.groups: {_who(alone)} in no group, but the attention LoRA is always shared (paper section "
                 f"4.1.2); add {_who(alone, verb=False)} to a group")
    by_count: dict[int, list[int]] = {}
    for u in range(n_users):
        if u not in alone and len(attention[u]) != 1:
            by_count.setdefault(len(attention[u]), []).append(u)
    for count, users in sorted(by_count.items()):
        e.append(f"comm.groups: the attention LoRA of {_who(users, verb=False)} would be averaged in {count} groups "
                 f"({', '.join(attention[users[0]]) or 'none'}), not exactly one; "
                 + ("mark exactly one group of each user with attention: true" if any(g.attention for g in groups) else
                    "mark one group of each user with attention: true, or add a group of every user (users: all), "
                    "which then carries it"))
    carriers = {name for names in attention.values() for name in names}
    for i, g in enumerate(groups):
        if not g.experts and g.name not in carriers:
            e.append(f"comm.groups[{i}] ({g.name}) shares nothing (no experts, not the attention LoRA's group); add "
                     f"experts or remove the group")
    return e


def _who(users: list[int], verb: bool = True) -> str:
    if len(users) == 1:
        return f"user {users[0]}" + (" is" if verb else "")
    return f"users {', '.join(map(str, users))}" + (" are" if verb else "")


def build_plan(groups: Sequence[Any], n_users: int, n_generalists: Callable[[int], int],
               what: str = "") -> SharingPlan:
    """The plan of a checked configuration; no groups: one group of every user holding every
    generalist and the attention LoRA. Raises ValueError listing every problem."""
    if not groups:
        everyone = tuple(range(n_users))
        return SharingPlan({DEFAULT_GROUP: everyone},
                           {(u, x): DEFAULT_GROUP for u in everyone for x in range(n_generalists(u))},
                           {u: DEFAULT_GROUP for u in everyone})
    errors = plan_errors(groups, n_users, n_generalists, what)
    if errors:
        raise ValueError("invalid comm.groups:\n  - " + "\n  - ".join(errors))
    members = {g.name: tuple(sorted(_users_of(g, n_users))) for g in groups}
    experts = {(u, x): g.name for g in groups for u in members[g.name] for x in g.experts}
    attention = {u: names[0] for u, names in _attention_groups(groups, n_users).items()}
    return SharingPlan(members, experts, attention)


def _attention_groups(groups: Sequence[Any], n_users: int) -> dict[int, list[str]]:
    """For each user, the groups its attention LoRA would go to: the groups marked
    ``attention: true`` that hold it, or, when no group is marked, the first group of every user."""
    marked = [g for g in groups if g.attention]
    if not marked:
        everyone = [g for g in groups if _users_of(g, n_users) is not None
                    and set(_users_of(g, n_users)) == set(range(n_users))]
        marked = everyone[:1]
    return {u: [g.name for g in marked if u in _users_of(g, n_users)] for u in range(n_users)}
