"""What a private mean of a shared group does around its sum: each user's payload, then the release.

Owns the state such a mean needs beyond the buffers: the options, the resolved noise multiplier,
the run seed, the round, its planned contributors (the users whose round is aggregated: known to
every rank before the collective, which the masks require) and each user's reference per group
(the aggregate it last downloaded, from which its update is measured). ``Comm`` calls
``payload`` for each of its users, sums, and calls ``release`` on the sum (docs/privacy.md).
Knows nothing of collectives, models or methods.

Under ``privacy.dp=user`` a contributor sends ``reference + clip(buffer - reference)`` (plus its
noise share under ``noise_at=users``): every contributor of a round downloaded the same aggregate
A, so the mean of what they send is ``A + mean(clipped updates)``, and users that did not
contribute still download the full aggregate. An update within the clip travels as the buffer
itself, so that noise 0 and a huge clip give the plain mean bit for bit. A planned contributor
that sits the mean out (the guard) sends a zero update and still counts: the divisor is the
planned count, which is public, and that user's noise share still reaches the sum.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Collection, Mapping

import torch

from comigs_dist.privacy.dp import noise_sum, privatize_update
from comigs_dist.privacy.secure_agg import masked_share, unmask_sum

if TYPE_CHECKING:
    from comigs_dist.config.schema import PrivacyConfig


class PrivateMean:
    """The privacy of a rank's means of its users' shared groups (``groups``), one round at a time."""

    def __init__(self, p: PrivacyConfig, *, noise_multiplier: float, seed: int, groups: Collection[str]):
        self.p, self.noise_multiplier, self.seed = p, float(noise_multiplier), int(seed)
        self.groups = frozenset(groups)
        self.dp, self.secure = p.dp == "user", bool(p.secure_agg)
        self.round_idx = 0
        self._planned: frozenset[int] | None = None
        self._references: Mapping[int, Mapping[str, torch.Tensor]] = {}
        self.released = 0                       # private means answered this round (released or again)
        self.norms: dict[int, list[float]] = {}  # this round's pre-clip update norms of the rank's users

    def start_round(self, round_idx: int, planned: Collection[int] | None,
                    references: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Round ``round_idx`` begins: ``planned`` are the users whose training it aggregates (None:
        every member), ``references`` each local user's {group: aggregate it last downloaded}."""
        self.round_idx = round_idx
        self._planned = None if planned is None else frozenset(planned)
        self._references = references
        self.released = 0
        self.norms = {}

    def covers(self, group: str) -> bool:
        """Whether a mean of ``group`` is private: a shared group, after round 0's common start."""
        return self.round_idx > 0 and group in self.groups

    def contributors(self, members: Collection[int]) -> list[int]:
        """The group's planned contributors this round, sorted: the set the masks run over."""
        return sorted(u for u in members if self._planned is None or u in self._planned)

    @torch.no_grad()
    def payload(self, group: str, user: int, values: torch.Tensor, *, sits_out: bool, n_planned: int) -> torch.Tensor:
        """What planned contributor ``user`` sends of ``group`` (float64, flat): ``values`` is its
        buffer as it would travel; ``sits_out``: the guard keeps its values back this round."""
        if not self.dp:
            return torch.zeros_like(values) if sits_out else values
        ref = self._reference(group, user).to(values)
        update = torch.zeros_like(values) if sits_out else values - ref
        sent, norm = privatize_update(update, self.p, noise_multiplier=self.noise_multiplier,
                                      n_contributing=n_planned, seed=self.seed, round_idx=self.round_idx,
                                      group=group, user_idx=user)
        if not sits_out:
            self.norms.setdefault(user, []).append(norm)
            if sent is update:
                return values  # within the clip and no noise share: the buffer itself, bit for bit
        return ref + sent

    def mask(self, group: str, user: int, values: torch.Tensor, contributors: list[int]) -> torch.Tensor:
        """``values`` in fixed point, masked over the group's ``contributors`` (int64 on [0, M))."""
        return masked_share(values, user, contributors, seed=self.seed, round_idx=self.round_idx, group=group,
                            frac_bits=self.p.frac_bits)

    @torch.no_grad()
    def release(self, group: str, total: torch.Tensor, n_contributors: int, numel: int) -> torch.Tensor:
        """The float64 sum as released, from the sum over every rank of what the users sent: unmasked
        under secure aggregation, plus the server's noise on the first ``numel`` elements (not on a
        contributor count behind them) under ``noise_at=server``."""
        if self.secure:
            total = unmask_sum(total, n_contributors, self.p.frac_bits, torch.float64)
        if self.dp:
            total[:numel] = noise_sum(total[:numel], self.p, noise_multiplier=self.noise_multiplier, seed=self.seed,
                                      round_idx=self.round_idx, group=group)
        self.released += 1
        return total

    def answered_again(self, group: str) -> None:
        """No planned contributor of ``group`` this round (nobody of it was drawn): its users get the
        group's latest release again (post-processing). The round still counts as a run of the
        mechanism, as it does for every other group: the accountant's sampled Gaussian already prices
        in each user's chance of being drawn, so leaving out the rounds in which a group happened to
        be undrawn would use the draw's outcome and understate epsilon, and ranks holding different
        groups would disagree."""
        assert group in self.groups and self.round_idx > 0, group
        self.released += 1

    def _reference(self, group: str, user: int) -> torch.Tensor:
        ref = self._references.get(user, {}).get(group)
        if ref is None:
            raise ValueError(f"user {user} has no reference for group {group!r} in round {self.round_idx}: "
                             f"privacy.dp=user measures a user's update from the aggregate it last downloaded, "
                             f"which train.sync records from round 0's common start on; start the run from round 0 "
                             f"or resume from a checkpoint written with privacy.dp=user")
        return ref
