"""Privacy of what leaves a user: user-level differential privacy (``dp``: clipping and Gaussian
noise; ``accountant``: epsilon over the rounds) and secure aggregation (``secure_agg``: pairwise
additive masks in fixed point) of a sharing group's flat buffer.

Knows nothing of collectives or of which parameters are shared: ``Comm`` calls these functions
on a group's buffer around its reduction (docs/privacy.md). ``accountant`` imports Google's
dp-accounting (the ``privacy`` extra), so it is not imported here. The options (``PrivacyConfig``)
are plain data in ``comigs_dist.config.schema``.
"""
from comigs_dist.privacy.dp import (add_server_noise, add_user_noise, clip_update, config_errors, noise_seed, noise_sum,
                                    privatize_update, resolve_noise_multiplier)
from comigs_dist.privacy.secure_agg import (FixedPointOverflow, decode, encode, mask, masked_share, max_abs_sum,
                                            max_abs_value, pair_seed, resolution, unmask_sum)

__all__ = ["add_server_noise", "add_user_noise", "clip_update", "config_errors", "noise_seed",
           "noise_sum", "privatize_update", "resolve_noise_multiplier", "FixedPointOverflow", "decode", "encode",
           "mask", "masked_share", "max_abs_sum", "max_abs_value", "pair_seed", "resolution", "unmask_sum"]
