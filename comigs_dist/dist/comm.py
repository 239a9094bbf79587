"""``Comm``: every collective a method may use, over the users of sharing groups, with its bytes.

Methods receive a ``Comm`` and never call torch.distributed. Every operation takes the tensors of
this rank's users in a group (``{user: [tensors]}``): a rank first combines its own users, then
crosses ranks in one collective per group.

Bytes are counted per simulated user as *delivered payload* in ``comm.dtype`` (what a device
would send; the contributor count of guard.nan=skip, one element, included), whatever the backend
does underneath, and separately per rank as what the backend moved. With S the bytes of a user's
flat buffer and N the group's members, one mean costs a user
  server   S sent (the upload) and S received (the mean, downloaded once): a trusted server;
  all2all  N*S sent (the buffer delivered to each of the N members, the sender's own copy
           included, as all_gather materialises it) and N*S received (the N buffers): section
           3.3's "N times the bytes". Between distinct peers that is (N - 1)*S each way.
``round_bytes`` is that formula; results.json puts it beside what was counted. The round-0
broadcast (one common start) is set-up and not counted.

Means are exact by default (``comm.exact``): what travelled (fp32 or bf16) is summed in float64,
and a float64 sum of N float32 (bf16) values is exact, so independent of the order it is added
in, whenever the nonzero values of one element span less than a factor 2^(29 - log2 N)
(2^(45 - log2 N) for bf16). Server (a float64 all_reduce, ring order), all2all (the gathered
payloads added in member order) and any placement of users on ranks then give the same float64
sum and so bit-identical parameters: round_fp32(sum / N). Beyond that span they can differ only
where the sum lies within one float64 rounding of an fp32 rounding boundary. The server
all_reduce then carries float64 on the backend (2x the fp32 payload); the counted bytes stay the
payload in comm.dtype. ``comm.exact=false`` reduces in the wire dtype instead (backend order).

Under ``privacy.dp`` or ``privacy.secure_agg`` the means of the shared groups after round 0 take
``_mean_private`` instead: each planned contributor's payload is privatized and/or masked by a
``privacy.PrivateMean``, summed exactly (float64, or int64 modulo the masks' ring, which travels
as 8 bytes an element and is counted so), then released (unmasked, noised) and divided. Every
other collective refuses to move a shared group's data while privacy is on (docs/privacy.md).
Knows nothing of models or methods: it moves lists of tensors.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping, Sequence

import torch
import torch.distributed as tdist

from comigs_dist.dist.buffers import Scratch, flatten, packed_buffer, unflatten_into
from comigs_dist.dist.collectives import raise_shape_problems, shape_list, shape_problems
from comigs_dist.dist.failures import collective
from comigs_dist.dist.topology import Topology
from comigs_dist.guard import NothingLeft
from comigs_dist.privacy.mean import PrivateMean

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECURE_AGG_WIRE = "int64"  # what travels under privacy.secure_agg: fixed point masked modulo 2^62 or less
MODES = ("server", "all2all")
Tensors = Mapping[int, Sequence[torch.Tensor]]


def payload_bytes(numel: int, dtype: str) -> int:
    """Bytes of ``numel`` elements in the wire dtype (comm.dtype, or SECURE_AGG_WIRE)."""
    return numel * (torch.int64.itemsize if dtype == SECURE_AGG_WIRE else _DTYPES[dtype].itemsize)


def round_bytes(payload: int, mode: str, n_members: int) -> tuple[int, int]:
    """(sent, received) bytes one user is counted for one mean of a ``payload``-byte buffer over a
    group of ``n_members`` (the definition in the module docstring)."""
    if mode == "server":
        return payload, payload
    if mode == "all2all":
        return payload * n_members, payload * n_members
    raise ValueError(f"comm.mode ({mode!r}) must be 'server' or 'all2all'")


def collectives(spec) -> list[tuple[int, object, str | None]]:
    """A group's payload spec (``Method.payloads``: (elements, members[, kind]) or a list of them,
    one per collective) as a list of (elements, members, kind or None)."""
    return [(numel, members, kind[0] if kind else None)
            for numel, members, *kind in (spec if isinstance(spec, list) else [spec])]


def collective_bytes(spec, mode: str, wire: str, n_members: int, count: bool = False) -> tuple[int, int, int]:
    """(payload, sent, received) bytes of one group's collectives in a round, as Comm counts them.
    ``spec`` (``collectives``): kind None = a mean in ``mode`` (plus the contributor count when
    ``count``), 'all2all' = a gather (N payloads each way whatever ``mode`` says), 'sum' = a sum
    in ``mode`` (no count travels with it), 'gradients' = a data-parallel gradient mean
    (``Comm.mean_gradients``: fp32 and server-style whatever ``wire`` and ``mode`` say, with the
    count when ``count``)."""
    payload = sent = received = 0
    for numel, _, kind in collectives(spec):
        size = payload_bytes(numel + (1 if count and kind in (None, "gradients") else 0),
                             "fp32" if kind == "gradients" else wire)
        s, r = round_bytes(size, {"all2all": "all2all", "gradients": "server"}.get(kind, mode), n_members)
        payload, sent, received = payload + size, sent + s, received + r
    return payload, sent, received


@dataclass
class CommStats:
    """What one user (or one rank) moved, in bytes, and how long it waited."""
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    seconds: float = 0.0
    by_group: dict = field(default_factory=dict)

    def add(self, group: str, sent: int, received: int, seconds: float) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.collectives += 1
        self.seconds += seconds
        g = self.by_group.setdefault(group, {"bytes_sent": 0, "bytes_received": 0, "collectives": 0})
        g["bytes_sent"] += sent
        g["bytes_received"] += received
        g["collectives"] += 1


class Comm:
    """The communication of one rank's users, bound to the run's topology and ``comm.*`` settings.

    ``count=True`` (guard.nan=skip) sends a contributor count with every mean, so that a user
    whose values are not finite can sit a mean out (``skip``) and still receive the others'
    average in the same collective. ``privacy`` (a ``privacy.PrivateMean``) makes the shared
    groups' means private."""

    def __init__(self, topo: Topology, mode: str = "server", dtype: str = "fp32", exact: bool = True,
                 count: bool = False, privacy: PrivateMean | None = None):
        if mode not in MODES:
            raise ValueError(f"comm.mode ({mode!r}) must be 'server' or 'all2all'")
        self.topo, self.mode, self.dtype, self.exact, self.count = topo, mode, dtype, exact, count
        self.privacy = privacy
        self.wire = _DTYPES[dtype]
        self.user_stats: dict[int, CommStats] = {u: CommStats() for u in topo.local_users}
        self.rank_stats = CommStats()
        self.scratch = Scratch(topo.device)
        self._checked: set[tuple[str, str]] = set()
        self._upload: Collection[int] | None = None    # users whose sends count this round (None: all)
        self._download: Collection[int] | None = None  # users whose receipts count this round (None: all)
        # each group's latest aggregate (float64), kept when members may sit a mean out: what a server
        # holds, downloaded again in a round after one in which no member of the group took part
        self._last: dict[str, torch.Tensor] = {}
        # comm.weights=tokens: each local user's weight in the means (its training tokens); None = uniform
        self.weights: dict[int, float] | None = None

    # -- the server's memory: saved with a round checkpoint, put back at a resume ----------------
    def latest_aggregates(self, groups) -> dict[str, torch.Tensor]:
        """The latest aggregate (float64) this process holds of each of ``groups``: what a server
        keeps to hand out again after a round in which no member of a group took part."""
        return {g: self._last[g] for g in groups if g in self._last}

    def restore_latest(self, aggregates: dict[str, torch.Tensor]) -> None:
        """Put back aggregates ``latest_aggregates`` returned (from a checkpoint)."""
        for g, t in aggregates.items():
            self._last[g] = t.to(device=self.topo.device, dtype=torch.float64)

    # -- who ---------------------------------------------------------------------------------
    def members(self, group: str) -> tuple[int, ...]:
        return self.topo.members(group)

    def in_group(self, group: str) -> bool:
        return self.topo.in_group(group)

    def mark_checked(self, groups: Iterable[str], kind: str = "mean") -> None:
        """Groups whose shapes a handshake has already checked (``collectives.check_group_shapes``)."""
        self._checked.update((g, kind) for g in groups)

    # -- bookkeeping -------------------------------------------------------------------------
    def set_round(self, upload: Collection[int] | None, download: Collection[int] | None) -> None:
        """Under partial participation: the users that upload (took part in the round before) and
        download (take part in this one) in the coming collectives. A simulated device is counted
        for what it would send and receive, nothing for a round it sits out; None = every user."""
        self._upload, self._download = upload, download

    @contextmanager
    def everyone_takes_part(self):
        """Collectives in which every member sends and receives whatever ``set_round`` says (learned
        groups' gather of every user's update at the switch), counted for every member."""
        held = self._upload, self._download
        self._upload = self._download = None
        try:
            yield
        finally:
            self._upload, self._download = held

    def _downloads(self, user: int) -> bool:
        """Whether a user receives this round's means: a user that does not take part in the round
        keeps its values (``set_round``); everyone outside partial participation."""
        return self._download is None or user in self._download

    def _count(self, group: str, users: Iterable[int], sent: int, received: int, seconds: float,
               moved: int) -> None:
        for u in users:
            s = sent if self._upload is None or u in self._upload else 0
            r = received if self._download is None or u in self._download else 0
            if s or r or (self._upload is None and self._download is None):
                self.user_stats.setdefault(u, CommStats()).add(group, s, r, seconds)
        self.rank_stats.add(group, moved, moved, seconds)

    def _handshake(self, group: str, kind: str, tensors: Tensors) -> None:
        """Before the first ``kind`` collective of a group: the members' tensors must agree in
        count, shapes and dtypes (a ValueError on every rank naming the user otherwise)."""
        if (group, kind) in self._checked:
            return
        mine = {u: shape_list([(f"#{i}", t) for i, t in enumerate(ts)]) for u, ts in tensors.items()}
        everyone: dict[int, list] = dict(mine)
        ranks = self.topo.ranks_of(group)
        if len(ranks) > 1:  # over the group's ranks only: the others do not take part
            parts: list = [None] * len(ranks)
            with collective(self.topo.watch, "the shape handshake", group):
                tdist.all_gather_object(parts, mine, group=self.topo.group(group))
            for part in parts:
                everyone.update(part)
        members = [u for u in self.members(group) if u in everyone]
        problems = shape_problems(members, [everyone[u] for u in members]) if members else []
        raise_shape_problems({group: problems} if problems else {})
        self._checked.add((group, kind))

    def _local(self, group: str, tensors: Tensors) -> list[int]:
        local = sorted(tensors)
        members = set(self.members(group))
        stray = [u for u in local if u not in members]
        if stray:
            raise ValueError(f"users {stray} are not members of group {group!r} ({sorted(members)})")
        return local

    # -- the mean ----------------------------------------------------------------------------
    @torch.no_grad()
    def mean(self, group: str, tensors: Tensors, skip: Collection[int] = ()) -> int:
        """Replace each tensor of every given user by its mean over the group's members that take
        part (every member but those in ``skip``, whose values are left out; they still receive
        the mean). One collective for the whole list, whatever the number of users on the rank.
        Returns a user's payload in bytes."""
        if not self.in_group(group) or not tensors:
            return 0
        self._handshake(group, "mean", tensors)
        local = self._local(group, tensors)
        if self.privacy is not None and self.privacy.covers(group):
            return self._mean_private(group, local, tensors, set(skip))
        self._unprotected("mean", group)  # after round 0, a group privacy does not cover is in the clear
        if len(local) == 1 and self.weights is None:
            return self._mean_one(group, local[0], tensors[local[0]], local[0] not in skip)
        return self._mean_many(group, local, tensors, set(skip))

    def _mean_one(self, group: str, user: int, tensors: Sequence[torch.Tensor], contribute: bool) -> int:
        """The mean when this rank holds one member of the group: its packed buffer is reduced in
        place where it travels as it is (fp32, no count, comm.exact=false)."""
        topo, wire, count = self.topo, self.wire, self.count
        pg = topo.group(group)
        n = len(self.members(group))
        if count and wire == torch.bfloat16 and n > 256 and self.mode == "server" and not self.exact:
            raise ValueError(f"group {group!r} has {n} members: a contributor count above 256 is not exact in "
                             f"bf16; use comm.dtype=fp32 or comm.exact=true with guard.nan=skip")
        start = time.perf_counter()
        numel = sum(t.numel() for t in tensors)
        # the payload, what a deployment would send: the parameters' own buffer where they are
        # packed in the wire dtype (pack_flat; the contributor count needs a copy), else a flat copy
        flat = packed_buffer(tensors) if not count and tensors[0].dtype == wire else None
        in_place = flat is not None
        if not in_place:
            flat = self.scratch.get(group, numel + int(count), wire)
            flatten(tensors, wire, out=flat[:numel])
        if count:
            if not contribute:
                flat.zero_()
            flat[numel] = 1.0 if contribute else 0.0
        elif not contribute:
            raise ValueError("a member can sit a mean out only when contributor counts travel (guard.nan=skip)")
        size = flat.numel() * flat.element_size()
        acc = torch.float64 if self.exact else torch.float32
        ranks = len(topo.ranks_of(group))
        if self.mode == "server":
            # float64 on the backend: its ring adds in an order of its own, which an exact sum ignores
            if self.exact:
                buf = self.scratch.get(group, flat.numel(), torch.float64)
                buf.copy_(flat)
            else:
                buf = flat
            if ranks > 1:
                with collective(topo.watch, "all_reduce", group):
                    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM, group=pg)
            total = buf if buf.dtype == acc else buf.to(acc)
            moved = buf.numel() * buf.element_size()
        else:
            parts = [torch.empty_like(flat) for _ in range(ranks)]
            with collective(topo.watch, "all_gather", group):
                tdist.all_gather(parts, flat, group=pg)
            total = torch.zeros(flat.numel(), dtype=acc, device=flat.device)
            for p in parts:  # fixed member order: every rank computes the same sum
                total.add_(p.to(acc))
            moved = ranks * size
        divisor = n
        if count:
            divisor = int(round(float(total[-1])))
            total = total[:-1]
            if self._latest_again(group, divisor, [tensors] if self._downloads(user) else []):
                self._count(group, [user], 0, size, time.perf_counter() - start, moved)
                return size
            self._last[group] = total / divisor
        if in_place and total.data_ptr() == flat.data_ptr():
            total.div_(divisor)  # the sum landed in the parameters themselves
        elif in_place:
            torch.div(total, divisor, out=flat)
        elif self._downloads(user):
            unflatten_into(total, tensors, divisor)  # the mean, rounded once to the parameters' dtype
        sent, received = round_bytes(size, self.mode, n)
        self._count(group, [user], sent, received, time.perf_counter() - start, moved)
        return size

    def _mean_many(self, group: str, local: list[int], tensors: Tensors, skip: set[int]) -> int:
        """The mean when this rank holds several members: their payloads (rounded to the wire
        dtype, as they would travel) are summed here, then the rank's sums cross ranks."""
        topo = self.topo
        n = len(self.members(group))
        start = time.perf_counter()
        numel = sum(t.numel() for t in tensors[local[0]])
        acc = torch.float64 if self.exact else torch.float32
        extra = int(self.count)
        if skip and not self.count:
            raise ValueError("a member can sit a mean out only when contributor counts travel (guard.nan=skip)")
        total = self.scratch.get(group + "#sum", numel + extra, acc)
        total.zero_()
        wire_buf = self.scratch.get(group + "#wire", numel, self.wire)
        for u in local:
            if u in skip:
                continue
            flat = packed_buffer(tensors[u])
            if flat is None or flat.dtype != self.wire:
                flat = flatten(tensors[u], self.wire, out=wire_buf)
            weight = 1.0 if self.weights is None else self.weights[u]
            total[:numel].add_(flat.to(acc), alpha=weight)  # an integer weight: an exact float64 product
            if extra:
                total[numel] += weight
        size = (numel + extra) * self.wire.itemsize
        total, moved = self._sum_over_ranks(group, total)
        divisor = n
        if extra:
            # the contributors' count, or their summed weights (comm.weights=tokens)
            divisor = int(round(float(total[-1]))) if self.weights is None else float(total[-1])
            if self._latest_again(group, divisor, [tensors[u] for u in local if self._downloads(u)]):
                self._count(group, local, 0, size, time.perf_counter() - start, moved)
                return size
            self._last[group] = total[:numel] / divisor
        mean = total[:numel]
        for u in local:
            if self._downloads(u):
                unflatten_into(mean, tensors[u], divisor)
        sent, received = round_bytes(size, self.mode, n)
        self._count(group, local, sent, received, time.perf_counter() - start, moved)
        return size

    def _mean_private(self, group: str, local: list[int], tensors: Tensors, skip: set[int]) -> int:
        """The mean under privacy.dp and/or privacy.secure_agg: each of the rank's users that is a
        planned contributor sends what ``self.privacy`` makes of its buffer (as it would travel in
        comm.dtype), the rank adds them, one collective adds the ranks', and the sum is released
        (unmasked, noised) and divided. Summed exactly whatever comm.exact says (float64, or int64
        modulo the masks' ring), so server and all2all give the same parameters."""
        topo, priv = self.topo, self.privacy
        members = self.members(group)
        contributors = priv.contributors(members)
        start = time.perf_counter()
        if not contributors:  # not the guard (it keeps a skipping member planned): nobody was drawn
            # the group's latest released aggregate again (post-processing: it costs no privacy)
            self._hand_out_latest(group, [tensors[u] for u in local if self._downloads(u)])
            priv.answered_again(group)
            size = payload_bytes(self._last[group].numel() + int(self.count),
                                 SECURE_AGG_WIRE if priv.secure else self.dtype)
            self._count(group, local, 0, size, time.perf_counter() - start, 0)
            return size
        numel = sum(t.numel() for t in tensors[local[0]])
        extra = int(self.count)
        total = None  # started from the first payload, as the plain mean's reduction is (signed zeros)
        wire_buf = self.scratch.get(group + "#wire", numel, self.wire)
        for u in local:
            if u not in contributors:
                if u not in skip:
                    raise ValueError(f"user {u} contributes to group {group!r} in a round whose planned "
                                     f"contributors are {contributors}: the masks and the divisor rest on that set")
                continue  # not part of this round's aggregate: sends nothing
            values = flatten(tensors[u], self.wire, out=wire_buf).to(torch.float64)
            values = priv.payload(group, u, values, sits_out=u in skip, n_planned=len(contributors))
            if extra:  # under DP a planned contributor always counts: the divisor is the planned count
                counted = 0.0 if u in skip and not priv.dp else 1.0
                values = torch.cat([values, values.new_full((1,), counted)])
            sent = priv.mask(group, u, values, contributors) if priv.secure else values.to(self.wire).double()
            total = sent if total is None else total.add_(sent)  # the float payload rounded as it travels
        if total is None:
            total = torch.zeros(numel + extra, dtype=torch.int64 if priv.secure else torch.float64, device=topo.device)
        total, moved = self._sum_over_ranks(group, total)
        total = priv.release(group, total, len(contributors), numel)
        divisor = len(members)
        if extra:
            divisor = int(round(float(total[-1])))
            self._no_contributor_left(group, divisor)
            self._last[group] = total[:numel] / divisor
        for u in local:
            unflatten_into(total[:numel], tensors[u], divisor)
        size = payload_bytes(numel + extra, SECURE_AGG_WIRE if priv.secure else self.dtype)
        sent, received = round_bytes(size, self.mode, len(members))
        self._count(group, local, sent, received, time.perf_counter() - start, moved)
        return size

    def _unprotected(self, op: str, group: str) -> None:
        """Privacy covers the shared groups' means only: any other collective of a round's data
        would leave a user's values in the clear."""
        if self.privacy is not None and self.privacy.round_idx > 0:
            raise ValueError(f"privacy.dp / privacy.secure_agg protect the means of the shared groups only, but "
                             f"group {group!r} would move users' values through Comm.{op} in the clear; a method "
                             f"that aggregates its own way must say so in Method.refuses_privacy, so that such "
                             f"runs are refused before training")

    def _sum_over_ranks(self, group: str, total: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each rank's partial sum of a group added over the group's ranks (one all_reduce in server
        mode, one all_gather summed in rank order in all2all); returns the sum and the bytes moved."""
        ranks = len(self.topo.ranks_of(group))
        if ranks < 2:
            return total, 0
        if self.mode == "server":
            with collective(self.topo.watch, "all_reduce", group):
                tdist.all_reduce(total, op=tdist.ReduceOp.SUM, group=self.topo.group(group))
            return total, total.numel() * total.element_size()
        parts = [torch.empty_like(total) for _ in range(ranks)]
        with collective(self.topo.watch, "all_gather", group):
            tdist.all_gather(parts, total, group=self.topo.group(group))
        total = torch.zeros_like(total)
        for part in parts:  # rank order; exact sums do not depend on it
            total.add_(part)
        return total, ranks * total.numel() * total.element_size()

    def _latest_again(self, group: str, divisor: int, targets: list) -> bool:
        """No member of the group uploaded: under partial participation (no member took part in
        the round before) the users download the group's latest aggregate again; otherwise (the
        guard set every member aside) the run stops."""
        if divisor != 0:
            return False
        if self._upload is not None and not any(u in self._upload for u in self.members(group)):
            self._hand_out_latest(group, targets)
            return True
        self._no_contributor_left(group, divisor)
        return False

    def _hand_out_latest(self, group: str, targets: list) -> None:
        """Nobody of the group was drawn in the round before: write its latest aggregate (what a
        server holds; under privacy, the latest release) into the downloading users' tensors."""
        if group not in self._last:
            raise FloatingPointError(
                f"no member of group {group!r} ({', '.join(map(str, self.members(group)))}) took part in the "
                f"round before, and this process holds no earlier aggregate of the group (none was formed "
                f"yet): raise train.participation or train.users_per_round, or give the group more users")
        for ts in targets:
            unflatten_into(self._last[group], ts)

    def _no_contributor_left(self, group: str, divisor: int) -> None:
        if divisor == 0:
            raise NothingLeft(f"every member of group {group!r} ({', '.join(map(str, self.members(group)))}) "
                              f"sat this round out with non-finite shared parameters (guard.nan=skip): there "
                              f"is nothing left to average; lower train.lr or check the data, then resume",
                              self.members(group))

    # -- other collectives -------------------------------------------------------------------
    @torch.no_grad()
    def broadcast(self, group: str, tensors: Tensors, src_user: int | None = None, *, start: bool = True) -> None:
        """Copy the tensors of one member (the group's first by default) to every given member.
        ``start``: the tensors are the group's common start of its shared parameters, kept as its
        first aggregate (handed to a member that downloads before any upload); False for anything
        else sent this way (a decision such as learned groups' labels), which leaves it alone."""
        if not self.in_group(group) or not tensors:
            return
        self._unprotected("broadcast", group)  # round 0's common start holds no data; later ones would
        self._handshake(group, "mean", tensors)
        topo = self.topo
        src = self.members(group)[0] if src_user is None else src_user
        local = self._local(group, tensors)
        first = tensors[local[0]]
        dtype = first[0].dtype if all(t.dtype == first[0].dtype for t in first) else torch.float32
        if src in tensors:
            flat = flatten(tensors[src], dtype)
        else:
            flat = torch.empty(sum(t.numel() for t in first), dtype=dtype, device=first[0].device)
        if len(topo.ranks_of(group)) > 1:
            with collective(topo.watch, "broadcast", group):
                tdist.broadcast(flat, src=topo.user_ranks[src], group=topo.group(group))
        for u in local:
            if u != src:
                unflatten_into(flat, tensors[u])
        if start and self.count:
            self._last[group] = flat.to(torch.float64)

    @torch.no_grad()
    def sum(self, group: str, tensors: Tensors) -> int:
        """Replace each tensor of every given user by its sum over the group's members (weighted
        means: each member scales its own term first). One collective; summed in float64 when
        ``comm.exact``. Counted as a mean in ``comm.mode`` is (module docstring): the members
        exchange the same payloads whatever they do with them. Returns a user's payload in bytes."""
        if not self.in_group(group) or not tensors:
            return 0
        self._unprotected("sum", group)
        self._handshake(group, "sum", tensors)
        local = self._local(group, tensors)
        start = time.perf_counter()
        acc = torch.float64 if self.exact else self.wire
        total = None
        for u in local:
            flat = flatten(tensors[u], self.wire).to(acc)
            total = flat if total is None else total.add_(flat)
        size = total.numel() * self.wire.itemsize
        moved = 0
        if len(self.topo.ranks_of(group)) > 1:
            with collective(self.topo.watch, "all_reduce", group):
                tdist.all_reduce(total, op=tdist.ReduceOp.SUM, group=self.topo.group(group))
            moved = total.numel() * total.element_size()
        for u in local:
            unflatten_into(total, tensors[u])
        sent, received = round_bytes(size, self.mode, len(self.members(group)))
        self._count(group, local, sent, received, time.perf_counter() - start, moved)
        return size

    @torch.no_grad()
    def gather(self, group: str, tensors: Tensors) -> list[torch.Tensor]:
        """Every member's tensors, flattened into one fp32 vector per member, in member order (one
        all_gather). Counted as all2all's mean is (module docstring)."""
        if not self.in_group(group) or not tensors:
            return []
        self._unprotected("gather", group)
        self._handshake(group, "gather", tensors)
        topo = self.topo
        local = self._local(group, tensors)
        start = time.perf_counter()
        members = self.members(group)
        ranks = topo.ranks_of(group)
        per_rank = max(sum(1 for m in members if topo.user_ranks[m] == r) for r in ranks)
        numel = sum(t.numel() for t in tensors[local[0]])
        mine = torch.zeros(per_rank, numel, dtype=self.wire, device=topo.device)
        for i, u in enumerate(local):
            mine[i] = flatten(tensors[u], self.wire)
        if len(ranks) > 1:
            parts = [torch.empty_like(mine) for _ in ranks]
            with collective(topo.watch, "all_gather", group):
                tdist.all_gather(parts, mine, group=topo.group(group))
        else:
            parts = [mine]
        by_user = {}
        for r, part in zip(ranks, parts):
            for i, u in enumerate([m for m in members if topo.user_ranks[m] == r]):
                by_user[u] = part[i].to(torch.float32)
        size = numel * self.wire.itemsize
        sent, received = round_bytes(size, "all2all", len(members))
        self._count(group, local, sent, received, time.perf_counter() - start, len(ranks) * mine.numel() * mine.element_size())
        return [by_user[u] for u in members]

    def sum_scalars(self, group: str, values: Mapping[int, Sequence[float]]) -> list[float]:
        """A few floats summed over the group's members (float64; too small to count as traffic)."""
        vals = list(values.values())
        if not self.in_group(group) or not vals:
            return list(vals[0]) if vals else []
        self._unprotected("sum_scalars", group)
        t = torch.tensor([sum(col) for col in zip(*vals)], dtype=torch.float64, device=self.topo.device)
        if len(self.topo.ranks_of(group)) > 1:
            with collective(self.topo.watch, "all_reduce", group):
                tdist.all_reduce(t, group=self.topo.group(group))
        return t.tolist()

    def mean_gradients(self, group: str, params: Mapping[int, Sequence[torch.Tensor]], skip: Collection[int] = ()) -> int:
        """Data parallelism: every parameter's gradient becomes its mean over the members (fp32),
        so that a step equals one step on the union of the members' batches."""
        self._unprotected("mean_gradients", group)
        grads = {u: [p.grad for p in ps if p.grad is not None] for u, ps in params.items()}
        saved = (self.mode, self.wire, self.weights)
        self.mode, self.wire, self.weights = "server", torch.float32, None  # one model: every batch counts alike
        try:
            return self.mean(group, grads, skip)
        finally:
            self.mode, self.wire, self.weights = saved
