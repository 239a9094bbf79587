"""Epsilon of user-level DP over a run's rounds, computed by Google's dp-accounting (RDP).

Owns the translation of a run's privacy parameters into the library's events: each round is one
sampled Gaussian mechanism on the users (a user's contribution to a group is clipped to C and the
sum gets noise z C). Knows nothing of tensors or collectives.

Why dp-accounting (PyPI ``dp-accounting``, from google/differential-privacy) and not Opacus:
- Sampling of users. Both give the RDP of the Poisson-subsampled Gaussian (each user takes part
  with probability q, add-or-remove-one-user neighbours). Only dp-accounting also accounts for a
  *fixed-size* sample drawn without replacement (``SampledWithoutReplacementDpEvent``, the bound of
  Wang, Balle and Kasiviswanathan, AISTATS 2019, under replace-one neighbours), which is what a
  fixed fraction of users per round (issue 18) is; Opacus's accountants assume Poisson sampling, and
  applying them to a fixed-size sample is not a valid bound.
- Footprint. Opacus is a DP-SGD training library (per-sample-gradient hooks, its own optimizers)
  that we would install for one function; dp-accounting is accounting only (numpy, scipy, mpmath,
  absl, attrs, dm-tree). Its ``attrs<24`` pin is compatible with the project's dependencies.
- Calibration ships with it (``calibrate_dp_mechanism``: a root search that returns a parameter
  whose epsilon does not exceed the target).
RDP rather than the library's PLD accountant: RDP is fast enough to report epsilon after every
round and to calibrate before the run, and is the figure most DP federated-learning papers report;
PLD is tighter but slower.

Sensitivity. ``poisson``: neighbouring runs differ by one user's presence; the sum of clipped
updates moves by at most C per group, so the noise multiplier seen by the library is z (over
``groups_per_user`` groups released together, the user's joint contribution is sqrt(k) C: z /
sqrt(k)). ``fixed``: the number of users is public and neighbours replace one user, which moves
the sum by up to 2 C: z / (2 sqrt(k)). With every user in every round (sample_rate 1, today),
``poisson`` is the plain Gaussian mechanism composed over the rounds.
"""
from __future__ import annotations

import contextlib
import logging
import math

try:
    from dp_accounting import (ExplicitBracketInterval, GaussianDpEvent, NeighboringRelation, PoissonSampledDpEvent,
                               SampledWithoutReplacementDpEvent, SelfComposedDpEvent, calibrate_dp_mechanism)
    from dp_accounting.rdp import RdpAccountant
except ImportError as exc:  # the privacy extra is optional
    raise ImportError('privacy.dp=user needs Google\'s dp-accounting: pip install -e ".[privacy]" '
                      '(or pip install dp-accounting)') from exc

SAMPLINGS = ("poisson", "fixed")
# calibrate_noise looks no further: at z = 100 the noise on a group's sum is 100 times the largest
# update one user may send, far past where the average carries any signal for tens of users
MAX_NOISE_MULTIPLIER = 100.0
_MIN_NOISE_MULTIPLIER = 1e-3


@contextlib.contextmanager
def _quiet():
    """Silence the library's warning that a fractional RDP order did not converge: it then leaves
    that order out, which can only raise epsilon (a valid bound), and would print it every call."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _mechanism(noise_multiplier: float, sample_rate: float, sampling: str, n_users: int | None,
               groups_per_user: int):
    """(one round's event, the neighbouring relation) for the library."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling ({sampling!r}) must be one of {', '.join(map(repr, SAMPLINGS))}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample rate ({sample_rate}) must be in (0, 1]: the fraction of users that take part in "
                         f"a round")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"privacy.noise_multiplier ({noise_multiplier}) must be a finite number >= 0")
    if groups_per_user < 1:
        raise ValueError(f"groups_per_user ({groups_per_user}) must be >= 1: the sharing groups one user sends "
                         f"per round")
    z = noise_multiplier / math.sqrt(groups_per_user)
    if sampling == "poisson":
        return PoissonSampledDpEvent(sample_rate, GaussianDpEvent(z)), NeighboringRelation.ADD_OR_REMOVE_ONE
    if n_users is None or n_users < 1:
        raise ValueError(f"sampling 'fixed' needs n_users, the number of users sampled from (got {n_users})")
    sample_size = round(sample_rate * n_users)
    if sample_size < 1 or abs(sample_size - sample_rate * n_users) > 1e-9 * n_users:
        raise ValueError(f"sample rate ({sample_rate}) times n_users ({n_users}) must be a whole number of users "
                         f"per round (sampling 'fixed')")
    return (SampledWithoutReplacementDpEvent(n_users, sample_size, GaussianDpEvent(z / 2)),
            NeighboringRelation.REPLACE_ONE)


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, *, sampling: str = "poisson",
            n_users: int | None = None, groups_per_user: int = 1) -> float:
    """Epsilon at ``delta`` after ``rounds`` noised aggregations with noise multiplier z, users
    sampled at ``sample_rate`` per round (``sampling`` 'poisson', or 'fixed' size out of
    ``n_users``), each user sending ``groups_per_user`` groups per round. ``inf`` for z = 0,
    0 for no rounds."""
    event, relation = _mechanism(noise_multiplier, sample_rate, sampling, n_users, groups_per_user)
    _check_delta(delta)
    if rounds < 0:
        raise ValueError(f"rounds ({rounds}) must be >= 0")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with _quiet():
        return float(RdpAccountant(neighboring_relation=relation).compose(event, rounds).get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sample_rate: float, rounds: int, delta: float, *,
                    sampling: str = "poisson", n_users: int | None = None, groups_per_user: int = 1,
                    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER) -> float:
    """The smallest noise multiplier (to 1e-5 relative) whose epsilon at ``delta`` after
    ``rounds`` is at most ``target_epsilon``; the result never exceeds the target. A target that
    even ``max_noise_multiplier`` misses is a ValueError naming the key, the epsilon reached and
    the fix."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"privacy.target_epsilon ({target_epsilon}) must be a finite number > 0")
    if rounds == 0:
        return 0.0  # nothing is released

    def eps(z: float) -> float:
        return epsilon(z, sample_rate, rounds, delta, sampling=sampling, n_users=n_users,
                       groups_per_user=groups_per_user)

    # sampling only lowers epsilon, so full participation's answer (closed form, fast) bounds it
    hi = max_noise_multiplier
    if sample_rate < 1:
        with contextlib.suppress(ValueError):
            hi = calibrate_noise(target_epsilon, 1.0, rounds, delta, sampling=sampling, n_users=n_users,
                                 groups_per_user=groups_per_user, max_noise_multiplier=max_noise_multiplier)
        if eps(hi) > target_epsilon:  # not expected of the library's bounds, but never trust it blindly
            hi = max_noise_multiplier
    if hi == max_noise_multiplier and (worst := eps(hi)) > target_epsilon:
        raise ValueError(
            f"privacy.target_epsilon ({target_epsilon}) is unreachable in {rounds} rounds at sample rate "
            f"{sample_rate} and privacy.delta {delta}: even noise multiplier {max_noise_multiplier:g} (noise "
            f"{max_noise_multiplier:g} x privacy.clip on the sum, the most the calibration tries) gives epsilon "
            f"{worst:.4g}; raise privacy.target_epsilon to at least {worst:.4g}, plan fewer rounds (train.rounds), "
            f"or raise privacy.delta")
    # bracket the answer between a z that meets the target and one half as large that does not
    while hi / 2 >= _MIN_NOISE_MULTIPLIER and eps(hi / 2) <= target_epsilon:
        hi /= 2
    if hi / 2 < _MIN_NOISE_MULTIPLIER:
        return hi  # so loose a target that almost no noise meets it
    _, relation = _mechanism(hi, sample_rate, sampling, n_users, groups_per_user)
    with _quiet():
        z = calibrate_dp_mechanism(
            make_fresh_accountant=lambda: RdpAccountant(neighboring_relation=relation),
            make_event_from_param=lambda z: _rounds_event(z, sample_rate, rounds, sampling, n_users, groups_per_user),
            target_epsilon=target_epsilon, target_delta=delta,
            bracket_interval=ExplicitBracketInterval(hi / 2, hi), tol=hi * 1e-5)
    return float(z)


def _rounds_event(z: float, sample_rate: float, rounds: int, sampling: str, n_users: int | None,
                  groups_per_user: int):
    event, _ = _mechanism(z, sample_rate, sampling, n_users, groups_per_user)
    return SelfComposedDpEvent(event, rounds)


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"privacy.delta ({delta}) must be in (0, 1)")


class Accountant:
    """Epsilon of a run so far, one round at a time: ``step()`` after each noised aggregation
    returns the epsilon at ``delta`` after the rounds done; ``state_dict`` / ``load_state_dict``
    carry it across a resume (the rounds done; the mechanism is rebuilt from the configuration)."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, *, sampling: str = "poisson",
                 n_users: int | None = None, groups_per_user: int = 1):
        self._event, self._relation = _mechanism(noise_multiplier, sample_rate, sampling, n_users, groups_per_user)
        _check_delta(delta)
        self.noise_multiplier, self.sample_rate, self.delta = float(noise_multiplier), float(sample_rate), delta
        self.sampling, self.n_users, self.groups_per_user = sampling, n_users, groups_per_user
        self._library = RdpAccountant(neighboring_relation=self._relation)
        self.rounds = 0

    def step(self) -> float:
        """Account for one more noised aggregation; returns epsilon after it."""
        with _quiet():
            self._library.compose(self._event)
        self.rounds += 1
        return self.epsilon

    @property
    def epsilon(self) -> float:
        if self.rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        with _quiet():
            return float(self._library.get_epsilon(self.delta))

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "delta": self.delta, "sampling": self.sampling, "n_users": self.n_users,
                "groups_per_user": self.groups_per_user}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the same mechanism (else a ValueError naming what differs), ``rounds`` done."""
        mine = self.state_dict()
        differ = [f"{k} ({state.get(k)!r} saved, {mine[k]!r} now)" for k in mine if k != "rounds"
                  and state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"the privacy accountant was saved for another mechanism: {', '.join(differ)}; resume "
                             f"with the privacy options of the saved run, or start a fresh run")
        self._library = RdpAccountant(neighboring_relation=self._relation)
        if state["rounds"]:
            with _quiet():
                self._library.compose(self._event, int(state["rounds"]))
        self.rounds = int(state["rounds"])
