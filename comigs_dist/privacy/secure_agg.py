"""Secure aggregation of a group's flat buffer: pairwise additive masks in fixed-point arithmetic.

Owns the fixed-point code (float <-> int64 with ``frac_bits`` fractional bits, and its range),
the pairwise seeds and the per-round masks. Knows nothing of collectives: ``Comm`` sums what
``masked_share`` returns over the round's contributors (an int64 SUM) and ``unmask_sum`` decodes
the sum.

Each contributing user i of a round sends x_i + sum_{j>i} m_ij - sum_{j<i} m_ij (mod M), where
m_ij = m_ji is drawn from a generator seeded by (pair seed, round, group): over all contributors
the masks cancel, and what one user sends is uniform on [0, M) whatever its values. The masks run
over the round's contributing set only, which every member must know before the collective (the
assumption docs/privacy.md states); a member outside it sends nothing and no mask involves it.

Arithmetic is modulo M = 2^min(62, 63 - ceil(log2 n)) for n contributors rather than modulo 2^64
through int64 overflow: every value, mask and partial sum lies in [0, n M) <= 2^63, so nothing
relies on signed overflow (undefined in C++, whatever a backend's SUM kernel happens to do) and
masks are exactly uniform. The signed sum must lie in [-M/2, M/2); ``encode`` checks each user's
share of that range.

This simulates the arithmetic, not the cryptography: a deployment agrees on each pair's seed by
Diffie-Hellman key agreement (Bonawitz et al., CCS 2017) so that nobody else can derive it, and
recovers the masks of users that drop out mid-protocol by secret sharing. Here a pair's seed is a
hash of the run seed and the pair, which any rank can compute.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from comigs_dist.privacy.dp import sub_seed
from comigs_dist.seeds import EVERY_USER, derive_seed


class FixedPointOverflow(ValueError):
    """A value too large for secure aggregation's fixed point (the message says the limit and the fix)."""


def ring_bits(n_users: int) -> int:
    """log2 of the modulus M for ``n_users`` contributors: n M <= 2^63 and M <= 2^62."""
    if n_users < 1:
        raise ValueError(f"n_users ({n_users}) must be >= 1: the round's contributors")
    return min(62, 63 - math.ceil(math.log2(n_users)))


def _max_code(n_users: int) -> int:
    """The largest |integer| one of ``n_users`` contributors may send: n of them stay below M/2."""
    return ((1 << (ring_bits(n_users) - 1)) - 1) // n_users


def _float_at_most(k: int) -> float:
    """The largest float64 <= the integer k (float(k) may round up above 2^53)."""
    f = float(k)
    return math.nextafter(f, 0.0) if f > k else f


def max_abs_value(frac_bits: int, n_users: int) -> float:
    """The largest |value| one of ``n_users`` contributors may send with ``frac_bits`` (a value
    of exactly this size encodes)."""
    return math.ldexp(_float_at_most(_max_code(n_users)), -frac_bits)


def max_abs_sum(frac_bits: int, n_users: int) -> float:
    """The largest |sum| of ``n_users`` contributions that decodes (M/2 - 1 steps)."""
    return math.ldexp(_float_at_most((1 << (ring_bits(n_users) - 1)) - 1), -frac_bits)


def resolution(frac_bits: int, n_users: int = 1) -> float:
    """The most a decoded sum of ``n_users`` contributions differs from the plain sum, per
    element: each value is rounded to the nearest multiple of 2^-frac_bits (half a step)."""
    return n_users * 2.0 ** -(frac_bits + 1)


@torch.no_grad()
def encode(values: torch.Tensor, frac_bits: int, n_users: int, *, who: str = "a user") -> torch.Tensor:
    """``values`` as int64 multiples of 2^-frac_bits (rounded to nearest), flat; a
    FixedPointOverflow (a ValueError) when a value is non-finite or above ``max_abs_value``."""
    scaled = torch.round(values.detach().reshape(-1).to(torch.float64) * 2.0 ** frac_bits)
    if not bool(torch.isfinite(scaled).all()):
        raise FixedPointOverflow(f"secure aggregation: {who} would send a non-finite value, which fixed point cannot "
                                 f"hold; the guard must catch non-finite shared parameters first")
    limit = _max_code(n_users)
    biggest = float(scaled.abs().max()) if scaled.numel() else 0.0
    if biggest > limit:
        # the largest frac_bits that would hold this value, for the fix
        fits = frac_bits - math.ceil(math.log2(biggest / limit))
        fix = (f"lower privacy.frac_bits to at most {fits} (resolution 2^-{fits} per value), or " if fits >= 1 else "")
        raise FixedPointOverflow(
            f"secure aggregation: {who} would send |value| {biggest / 2.0 ** frac_bits:.6g}, above the largest one of "
            f"{n_users} contributors may send with privacy.frac_bits {frac_bits}: "
            f"{max_abs_value(frac_bits, n_users):.6g} (the sum of {n_users} must stay within "
            f"+-{max_abs_sum(frac_bits, n_users):.6g}); {fix}bound the updates with privacy.dp=user and privacy.clip")
    return scaled.to(torch.int64)


@torch.no_grad()
def decode(total: torch.Tensor, frac_bits: int, n_users: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float sum from the int64 sum of ``n_users`` masked shares (or of plain codes): reduce
    modulo M, read [M/2, M) as negative, scale by 2^-frac_bits (in float64, then ``dtype``)."""
    m = 1 << ring_bits(n_users)
    r = torch.remainder(total, m)
    r = torch.where(r >= m // 2, r - m, r)
    return r.to(torch.float64).div_(2.0 ** frac_bits).to(dtype)


@lru_cache(maxsize=4096)
def pair_seed(seed: int, user_a: int, user_b: int) -> int:
    """The seed users a and b share for the run (the same for (a, b) and (b, a)); in a deployment
    the outcome of their Diffie-Hellman key agreement, here derived from the run seed."""
    if user_a == user_b:
        raise ValueError(f"a pair needs two different users (got {user_a} twice)")
    lo, hi = sorted((int(user_a), int(user_b)))
    return sub_seed(derive_seed(seed, EVERY_USER, "secure_agg"), f"pair{lo}-{hi}")


def pair_mask(seed: int, user_a: int, user_b: int, round_idx: int, group: str, numel: int,
              n_users: int) -> torch.Tensor:
    """m_ab of one round and group: ``numel`` int64 uniform on [0, M) for ``n_users`` contributors,
    drawn on the CPU from the pair's generator (the same on every rank)."""
    g = torch.Generator(device="cpu").manual_seed(
        sub_seed(pair_seed(seed, user_a, user_b), f"round{int(round_idx)}", f"group:{group}"))
    return torch.randint(0, 1 << ring_bits(n_users), (numel,), generator=g, dtype=torch.int64)


def _check_contributing(user_idx: int, contributing: Sequence[int]) -> list[int]:
    members = sorted(int(u) for u in contributing)
    if len(set(members)) != len(members):
        raise ValueError(f"the contributing users ({list(contributing)}) must not repeat a user")
    if int(user_idx) not in members:
        raise ValueError(f"user {user_idx} masks for a round it does not contribute to (contributing: {members}); "
                         f"a user that sits the round out sends nothing")
    return members


@torch.no_grad()
def mask(codes: torch.Tensor, user_idx: int, contributing: Sequence[int], *, seed: int, round_idx: int,
         group: str) -> torch.Tensor:
    """User ``user_idx``'s int64 codes plus sum_{j>i} m_ij - sum_{j<i} m_ij modulo M, over the
    round's ``contributing`` users (which include it): uniform on [0, M) (a new tensor)."""
    members = _check_contributing(user_idx, contributing)
    n = len(members)
    m = 1 << ring_bits(n)
    out = torch.remainder(codes, m)
    for other in members:
        if other == user_idx:
            continue
        pad = pair_mask(seed, user_idx, other, round_idx, group, codes.numel(), n).to(codes.device)
        if other > user_idx:
            out.add_(pad)
        else:
            out.add_(m).sub_(pad)  # -m_ij, kept non-negative (out + M - pad < 2M <= 2^63)
        out.remainder_(m)
    return out


def masked_share(values: torch.Tensor, user_idx: int, contributing: Sequence[int], *, seed: int, round_idx: int,
                 group: str, frac_bits: int) -> torch.Tensor:
    """What user ``user_idx`` sends of a group's buffer under secure aggregation: its values in
    fixed point, masked over the round's ``contributing`` users (flat int64 on [0, M))."""
    n = len(contributing)
    codes = encode(values, frac_bits, n, who=f"user {user_idx} (group {group!r}, round {round_idx})")
    return mask(codes, user_idx, contributing, seed=seed, round_idx=round_idx, group=group)


def unmask_sum(total: torch.Tensor, n_contributing: int, frac_bits: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The plain sum of the contributors' values from the int64 sum of their masked shares
    (within ``resolution(frac_bits, n_contributing)`` of the float sum)."""
    return decode(total, frac_bits, n_contributing, dtype)
