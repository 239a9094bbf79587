"""Every random stream of a run, derived from (seed, user, stream) by one hash.

A stream is a named source of randomness: a user's adapter and router initialisation, its
training-batch sampler, its router-batch sampler, or a draw that every user makes alike (the
global initialisation of HetLoRA/FlexLoRA). Hashing the triple, rather than adding the user to the
seed, keeps the paper's seeds 42, 45 and 47 independent: with ``seed + user``, seed 45's user 0
drew what seed 42's user 3 drew. Knows nothing of torch or of what a stream is used for.
"""
from __future__ import annotations

import hashlib

# every stream a run draws from; a new use of randomness adds its name here
STREAMS = ("adapters", "train_batches", "router_batches", "global_init", "participation",
           "feddpa_references", "dp_noise", "secure_agg")
EVERY_USER = None  # the ``user`` of a stream that every user draws alike


def derive_seed(seed: int, user: int | None, stream: str, index: int | None = None) -> int:
    """A 63-bit seed for ``stream`` of ``user`` (``EVERY_USER`` for a common draw) in run ``seed``:
    the first 8 bytes of BLAKE2b over the triple, so distinct triples give unrelated seeds.
    ``index`` numbers the draws of a stream that is drawn afresh each time (the participants of
    round ``index``), so that any one of them can be recomputed alone, after a resume too."""
    if stream not in STREAMS:
        raise ValueError(f"random stream {stream!r} is not one of {', '.join(STREAMS)}; add it to seeds.STREAMS")
    who = "all" if user is EVERY_USER else f"user{int(user)}"
    which = "" if index is None else f"|{int(index)}"
    digest = hashlib.blake2b(f"comigs_dist|seed{int(seed)}|{who}|{stream}{which}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)
