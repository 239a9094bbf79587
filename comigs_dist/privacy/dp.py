"""User-level differential privacy on a sharing group's flat update, and the checks of ``privacy.*``.

Owns what happens to one user's round update of one group before the group's sum (the L2 clip
over the whole group buffer; under ``noise_at=users`` the user's share of the noise), what
happens to the sum (``noise_at=server``: the noise, drawn once), the seed of every noise draw,
and the checks of the options. Knows nothing of collectives, of which parameters are shared, or
of how epsilon is computed (``accountant``, imported only when ``privacy.dp=user``).

Every draw comes from its own ``torch.Generator`` seeded by (run seed, round, group[, user]),
never from the global generator: enabling DP leaves the training batches unchanged, and a
user's noise is the same whichever rank simulates it. docs/privacy.md explains the wiring.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from typing import TYPE_CHECKING

import torch

from comigs_dist.seeds import EVERY_USER, derive_seed

if TYPE_CHECKING:  # the options are plain data of the config schema, which imports nothing of this package
    from comigs_dist.config.schema import PrivacyConfig

DP_MODES = ("off", "user")
NOISE_AT = ("server", "users")
MIN_FRAC_BITS, MAX_FRAC_BITS = 1, 52   # float64 carries 52 fractional bits: more would round again
INSTALL = 'pip install -e ".[privacy]"'


def config_errors(p: PrivacyConfig, *, rounds: int, sample_rate: float = 1.0, sampling: str = "poisson",
                  n_users: int | None = None, groups_per_user: int = 1) -> list[str]:
    """Every problem of the privacy options, each naming the key, the value, the rule and the fix.

    ``rounds``: the noised aggregations the run plans (train.rounds - 1: round 0's sync moves the
    initialisation, which holds no data; one more for a method that aggregates after the last
    round); ``sample_rate``, ``sampling``, ``n_users``
    and ``groups_per_user`` as for ``accountant.epsilon``. With ``privacy.dp=user`` and a target
    epsilon this calibrates the noise (an unreachable target is an error here, before training).
    """
    e: list[str] = []
    if p.dp not in DP_MODES:
        e.append(f"privacy.dp ({p.dp!r}) must be one of {', '.join(map(repr, DP_MODES))}")
    if p.noise_at not in NOISE_AT:
        e.append(f"privacy.noise_at ({p.noise_at!r}) must be one of {', '.join(map(repr, NOISE_AT))}")
    if not _finite_number(p.clip) or p.clip <= 0:
        e.append(f"privacy.clip ({p.clip}) must be a finite number > 0: it bounds the L2 norm of a user's round "
                 f"update of one group; set e.g. privacy.clip=1.0")
    if not _finite_number(p.noise_multiplier) or p.noise_multiplier < 0:
        e.append(f"privacy.noise_multiplier ({p.noise_multiplier}) must be a finite number >= 0 (the noise's standard "
                 f"deviation in units of privacy.clip); set e.g. privacy.noise_multiplier=1.0, or 0 for clipping only")
    if not _finite_number(p.delta) or not 0 < p.delta < 1:
        e.append(f"privacy.delta ({p.delta}) must be in (0, 1): it is the probability that the epsilon guarantee "
                 f"fails; use a value well below 1 / the number of users, e.g. privacy.delta=1e-5")
    if p.target_epsilon is not None:
        if not _finite_number(p.target_epsilon) or p.target_epsilon <= 0:
            e.append(f"privacy.target_epsilon ({p.target_epsilon}) must be a finite number > 0, or null to use "
                     f"privacy.noise_multiplier as given")
        elif p.dp != "user":
            e.append(f"privacy.target_epsilon ({p.target_epsilon}) is set but privacy.dp is {p.dp!r}, so nothing is "
                     f"noised; set privacy.dp=user or privacy.target_epsilon=null")
    if not isinstance(p.secure_agg, bool):
        e.append(f"privacy.secure_agg ({p.secure_agg!r}) must be true or false")
    if isinstance(p.frac_bits, bool) or not isinstance(p.frac_bits, int) \
            or not MIN_FRAC_BITS <= p.frac_bits <= MAX_FRAC_BITS:
        e.append(f"privacy.frac_bits ({p.frac_bits!r}) must be an integer in [{MIN_FRAC_BITS}, {MAX_FRAC_BITS}] "
                 f"(float64 holds no more fractional bits); e.g. privacy.frac_bits=32 (resolution 2^-32 per value)")
    if e or p.dp != "user":
        return e
    if importlib.util.find_spec("dp_accounting") is None:
        return [f"privacy.dp (user) needs Google's dp-accounting for epsilon, which is not installed; install it "
                f"with `{INSTALL}` (or `pip install dp-accounting`), or set privacy.dp=off"]
    if p.target_epsilon is not None:
        try:
            resolve_noise_multiplier(p, rounds=rounds, sample_rate=sample_rate, sampling=sampling, n_users=n_users,
                                     groups_per_user=groups_per_user)
        except ValueError as exc:
            e.append(str(exc))
    return e


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_noise_multiplier(p: PrivacyConfig, *, rounds: int, sample_rate: float = 1.0, sampling: str = "poisson",
                             n_users: int | None = None, groups_per_user: int = 1) -> float:
    """The noise multiplier the run uses: ``p.noise_multiplier``, or the one calibrated to
    ``p.target_epsilon`` over ``rounds`` (ValueError naming the key when unreachable)."""
    if p.target_epsilon is None:
        return float(p.noise_multiplier)
    from comigs_dist.privacy.accountant import calibrate_noise
    return calibrate_noise(p.target_epsilon, sample_rate, rounds, p.delta, sampling=sampling, n_users=n_users,
                           groups_per_user=groups_per_user)


# --------------------------------------------------------------------------------------------
# clipping and noise
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_update(update: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """``(clipped, pre_clip_norm)``: the update scaled by min(1, clip / ||update||_2), the norm
    taken over the whole tensor (a group's flat buffer) in float64. An update within the bound
    is returned as it is (the same tensor, bit for bit); a longer one as a new tensor of norm
    ``clip`` (to the rounding of its dtype). The input is never modified."""
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
    if not math.isfinite(norm):
        raise FloatingPointError(f"the update to clip has a non-finite L2 norm ({norm}): a non-finite shared "
                                 f"parameter must be caught by the guard before privacy is applied")
    if norm <= clip:
        return update, norm
    return update * (clip / norm), norm


def noise_seed(seed: int, round_idx: int, group: str, user_idx: int | None = None) -> int:
    """The seed of one noise draw: the server's of a group in a round (``user_idx`` None), or a
    user's share under ``noise_at=users``. Depends on nothing else (not on the rank)."""
    who = EVERY_USER if user_idx is None else int(user_idx)
    return sub_seed(derive_seed(seed, who, "dp_noise"), f"round{int(round_idx)}", f"group:{group}")


def sub_seed(base: int, *parts: str) -> int:
    """A 63-bit seed for ``parts`` (round, group, pair) under a stream's seed (seeds.derive_seed)."""
    digest = hashlib.blake2b("|".join([str(int(base)), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def gaussian_noise(like: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``like`` (its dtype and device), drawn on the CPU from a
    generator of its own, so the values do not depend on the device or on the global RNG."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(like.numel(), generator=g, dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype).mul_(std).view_as(like)


def user_noise_std(noise_multiplier: float, clip: float, n_contributing: int) -> float:
    """A user's share under ``noise_at=users``: n shares of variance (z C)^2 / n sum to (z C)^2."""
    if n_contributing < 1:
        raise ValueError(f"n_contributing ({n_contributing}) must be >= 1: the users whose noise shares make the sum")
    return noise_multiplier * clip / math.sqrt(n_contributing)


@torch.no_grad()
def add_user_noise(update: torch.Tensor, *, noise_multiplier: float, clip: float, n_contributing: int, seed: int,
                   round_idx: int, group: str, user_idx: int) -> torch.Tensor:
    """The update plus this user's noise share, N(0, (z C)^2 / n) per element (a new tensor);
    with z = 0 the update itself, bit for bit."""
    std = user_noise_std(noise_multiplier, clip, n_contributing)
    if std == 0:
        return update
    return update + gaussian_noise(update, std, noise_seed(seed, round_idx, group, user_idx))


@torch.no_grad()
def add_server_noise(total: torch.Tensor, *, noise_multiplier: float, clip: float, seed: int, round_idx: int,
                     group: str) -> torch.Tensor:
    """The group's sum plus N(0, (z C)^2) per element (a new tensor), the same draw on every rank
    that calls it; with z = 0 the sum itself, bit for bit."""
    std = noise_multiplier * clip
    if std == 0:
        return total
    return total + gaussian_noise(total, std, noise_seed(seed, round_idx, group))


def privatize_update(update: torch.Tensor, p: PrivacyConfig, *, noise_multiplier: float, n_contributing: int,
                     seed: int, round_idx: int, group: str, user_idx: int) -> tuple[torch.Tensor, float]:
    """What one contributing user sends of one group under ``privacy.dp=user``: its update
    clipped to ``p.clip`` and, under ``noise_at=users``, plus its noise share. Returns
    ``(tensor, pre_clip_norm)``; ``noise_multiplier`` is the resolved one
    (``resolve_noise_multiplier``), ``n_contributing`` the round's contributors of the group."""
    clipped, norm = clip_update(update, p.clip)
    if p.noise_at == "users":
        clipped = add_user_noise(clipped, noise_multiplier=noise_multiplier, clip=p.clip,
                                 n_contributing=n_contributing, seed=seed, round_idx=round_idx, group=group,
                                 user_idx=user_idx)
    return clipped, norm


def noise_sum(total: torch.Tensor, p: PrivacyConfig, *, noise_multiplier: float, seed: int, round_idx: int,
              group: str) -> torch.Tensor:
    """The group's sum of privatized updates as released: plus the server's noise under
    ``noise_at=server``; unchanged under ``noise_at=users`` (the users added it)."""
    if p.noise_at == "server":
        return add_server_noise(total, noise_multiplier=noise_multiplier, clip=p.clip, seed=seed,
                                round_idx=round_idx, group=group)
    return total
