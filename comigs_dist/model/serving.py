"""Which users a forward pass of a shared base serves, and which rows of the batch each owns.

One frozen base per rank serves every user the rank hosts: the adapted modules of the base
(``AdaptedLinear``, ``AdaptedMLP``) look up, for each forward, the users being served and the
contiguous block of batch rows (sequences) each owns, and apply each user's adapters to its own
rows. A forward of one user is one block covering the batch. Knows nothing of what adapters compute.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from comigs_dist.model.inject import UserAdapters


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of the batch (dimension 0) belong to the user owning ``adapters``."""
    adapters: "UserAdapters"
    start: int
    stop: int

    def scaled(self, factor: int) -> "Segment":
        """The same block in units ``factor`` times finer (sequences -> tokens)."""
        return Segment(self.adapters, self.start * factor, self.stop * factor)


class ServedRows:
    """The segments of the forward in progress, shared by every adapted module of one base."""

    def __init__(self) -> None:
        self._segments: list[Segment] | None = None

    def current(self) -> list[Segment]:
        if self._segments is None:
            raise RuntimeError("an adapted base model ran outside a serving block: call it through a UserModel "
                               "(model.logits, model(x, y)) or model.forward_users, which say whose adapters "
                               "apply to which rows")
        return self._segments

    @contextlib.contextmanager
    def serve(self, users: Sequence[tuple["UserAdapters", int]]) -> Iterator[list[Segment]]:
        """Serve ``users`` = [(adapters, number of rows)] in batch order for the block's duration."""
        if self._segments is not None:
            raise RuntimeError("serving blocks do not nest: one forward serves one batch")
        segments, start = [], 0
        for adapters, n in users:
            segments.append(Segment(adapters, start, start + int(n)))
            start += int(n)
        self._segments = segments
        try:
            yield segments
        finally:
            self._segments = None
