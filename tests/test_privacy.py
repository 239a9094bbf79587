"""Privacy of the shared parameters: clipping and Gaussian noise (user-level DP), epsilon from
dp-accounting, secure aggregation's masks in fixed point, and the privacy options' checks."""
import dataclasses
import math
import subprocess
import sys

import dp_accounting  # the dev extra installs it (setup.cfg)
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from comigs_dist.privacy import accountant, dp
from comigs_dist.privacy import secure_agg as sa
from comigs_dist.config import PrivacyConfig
from helpers import subprocess_env


SEED = 42


# --------------------------------------------------------------------------------------------
# clipping
# --------------------------------------------------------------------------------------------

def test_clip_scales_an_update_above_the_bound_and_keeps_one_below():
    """[3, 4] (norm 5) clipped to 1 is [0.6, 0.8]; [0.3, 0.4] and a norm exactly at the bound come
    back as the same tensor, bit for bit; the input is never modified."""
    above = torch.tensor([3.0, 4.0])
    clipped, norm = dp.clip_update(above, 1.0)
    assert norm == 5.0
    assert clipped.tolist() == pytest.approx([0.6, 0.8], rel=2 ** -23)
    assert above.tolist() == [3.0, 4.0]
    below = torch.tensor([0.3, 0.4])
    same, norm = dp.clip_update(below, 1.0)
    assert same is below and norm == pytest.approx(0.5, rel=1e-7)
    at = torch.tensor([3.0, 4.0])
    same, norm = dp.clip_update(at, 5.0)
    assert same is at and norm == 5.0
    with pytest.raises(FloatingPointError, match="non-finite L2 norm"):
        dp.clip_update(torch.tensor([1.0, float("nan")]), 1.0)


def test_clipping_bounds_what_one_user_moves_the_sum():
    """Over a group buffer the clipped update keeps its direction at norm C; replacing one user's
    update by one 10^4 times larger moves the sum of the clipped updates by at most 2 C."""
    g = torch.Generator().manual_seed(0)
    clip = 2.5
    updates = [torch.randn(10_000, generator=g) * s for s in (0.001, 0.1, 1.0, 3.0)]
    clipped = [dp.clip_update(u, clip)[0] for u in updates]
    for u, c in zip(updates, clipped):
        n = float(torch.linalg.vector_norm(u.double()))
        assert float(torch.linalg.vector_norm(c.double())) == pytest.approx(min(n, clip), rel=1e-6)
        assert torch.allclose(c * (n / float(torch.linalg.vector_norm(c.double()))), u, rtol=1e-5, atol=1e-7)
    total = torch.stack(clipped).sum(0)
    other = torch.randn(10_000, generator=g) * 1e4
    moved = torch.stack(clipped[:2] + [dp.clip_update(other, clip)[0]] + clipped[3:]).sum(0)
    assert float(torch.linalg.vector_norm((moved - total).double())) <= 2 * clip * (1 + 1e-6)
    assert float(torch.linalg.vector_norm((torch.stack(updates[:2] + [other] + updates[3:]).sum(0)
                                          - torch.stack(updates).sum(0)).double())) > 1e5  # unclipped: no bound


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------

def _std(t: torch.Tensor) -> float:
    return float(t.double().std())


def test_noise_std_matches_its_calibration_server_and_users():
    """Over 400k draws the server's noise has std z C (within 1%, ~9 standard errors) and mean 0;
    under noise_at=users each of n = 5 users draws z C / sqrt(5), and their sum has std z C
    (users drawing alike would give sqrt(5) z C)."""
    z, clip, n, d = 1.3, 0.7, 5, 400_000
    zero = torch.zeros(d)
    server = dp.add_server_noise(zero, noise_multiplier=z, clip=clip, seed=SEED, round_idx=3, group="generalists")
    assert _std(server) == pytest.approx(z * clip, rel=0.01)
    assert abs(float(server.double().mean())) < 5 * z * clip / math.sqrt(d)
    shares = [dp.add_user_noise(zero, noise_multiplier=z, clip=clip, n_contributing=n, seed=SEED, round_idx=3,
                                group="generalists", user_idx=u) for u in range(n)]
    for s in shares:
        assert _std(s) == pytest.approx(z * clip / math.sqrt(n), rel=0.01)
    assert _std(torch.stack(shares).sum(0)) == pytest.approx(z * clip, rel=0.01)
    # through the config-level calls: the same draws
    p = PrivacyConfig(dp="user", clip=clip, noise_at="users")
    sent, _ = dp.privatize_update(zero, p, noise_multiplier=z, n_contributing=n, seed=SEED, round_idx=3,
                                  group="generalists", user_idx=2)
    assert torch.equal(sent, shares[2])
    assert dp.noise_sum(sent, p, noise_multiplier=z, seed=SEED, round_idx=3, group="generalists") is sent
    p_server = dataclasses.replace(p, noise_at="server")
    assert torch.equal(dp.noise_sum(zero, p_server, noise_multiplier=z, seed=SEED, round_idx=3, group="generalists"),
                       server)


def test_noise_draws_depend_only_on_seed_round_group_user():
    """A user's draw is the same whichever order (rank) draws it and leaves the global RNG as it was;
    another round, group, user or seed draws differently."""
    kw = dict(noise_multiplier=1.0, clip=1.0, n_contributing=4)
    zero = torch.zeros(1000)
    state = torch.get_rng_state()
    first = [dp.add_user_noise(zero, **kw, seed=SEED, round_idx=1, group="g", user_idx=u) for u in range(4)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(10)  # another consumer of the global generator in between
    again = {u: dp.add_user_noise(zero, **kw, seed=SEED, round_idx=1, group="g", user_idx=u) for u in (3, 1, 0, 2)}
    assert all(torch.equal(first[u], again[u]) for u in range(4))
    others = [dp.add_user_noise(zero, **kw, seed=SEED, round_idx=2, group="g", user_idx=0),
              dp.add_user_noise(zero, **kw, seed=SEED, round_idx=1, group="h", user_idx=0),
              dp.add_user_noise(zero, **kw, seed=SEED + 1, round_idx=1, group="g", user_idx=0),
              dp.add_server_noise(zero, noise_multiplier=1.0, clip=0.5, seed=SEED, round_idx=1, group="g")]
    assert not any(torch.equal(o, first[0]) for o in others)  # all of std 0.5: equal seeds would be equal
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("noise_at", ["server", "users"])
def test_zero_noise_and_a_huge_clip_leave_the_sum_bit_for_bit(noise_at):
    """With z = 0 and C = 1e30 the privatized and released sum equals the plain sum in every bit,
    signed zeros included."""
    g = torch.Generator().manual_seed(1)
    updates = [torch.randn(5000, generator=g) for _ in range(4)]
    for u in updates:
        u[::7] = -0.0
    p = PrivacyConfig(dp="user", clip=1e30, noise_multiplier=0.0, noise_at=noise_at)
    sent = [dp.privatize_update(u, p, noise_multiplier=0.0, n_contributing=4, seed=SEED, round_idx=5, group="g",
                                user_idx=i)[0] for i, u in enumerate(updates)]
    released = dp.noise_sum(torch.stack(sent).sum(0), p, noise_multiplier=0.0, seed=SEED, round_idx=5, group="g")
    plain = torch.stack(updates).sum(0)
    assert torch.equal(released.view(torch.int32), plain.view(torch.int32))


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------

def _library_epsilon(event, rounds, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    return RdpAccountant(neighboring_relation=relation).compose(dp_accounting.SelfComposedDpEvent(event, rounds)) \
        .get_epsilon(delta)


def test_epsilon_equals_the_library_called_directly():
    """epsilon() is dp-accounting's RDP epsilon of the Poisson-sampled Gaussian (q = 1 and 0.25),
    of a fixed-size sample without replacement (replace-one: the sum moves by 2 C, so z / 2), and of
    k groups per user (at q = 1: 2 R Gaussian releases of multiplier z)."""
    G = dp_accounting.GaussianDpEvent
    for z, q, rounds, delta in [(1.0, 1.0, 19, 1e-5), (0.8, 0.25, 12, 1e-6), (4.0, 1.0, 49, 1e-3)]:
        want = _library_epsilon(dp_accounting.PoissonSampledDpEvent(q, G(z)), rounds, delta)
        assert accountant.epsilon(z, q, rounds, delta) == want
    want = _library_epsilon(dp_accounting.SampledWithoutReplacementDpEvent(8, 2, G(1.5 / 2)), 10, 1e-5,
                            dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert accountant.epsilon(1.5, 0.25, 10, 1e-5, sampling="fixed", n_users=8) == want
    assert accountant.epsilon(2.0, 1.0, 10, 1e-5, groups_per_user=2) == pytest.approx(
        _library_epsilon(G(2.0), 20, 1e-5), rel=1e-12)
    assert accountant.epsilon(0.0, 1.0, 10, 1e-5) == math.inf
    assert accountant.epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match=r"sample rate \(0.3\) times n_users \(8\) must be a whole number"):
        accountant.epsilon(1.0, 0.3, 10, 1e-5, sampling="fixed", n_users=8)


def test_accountant_steps_rounds_monotone_and_resumes():
    """The per-round epsilon of Accountant.step() equals epsilon() for that many rounds, rises
    strictly with every round (and falls with more noise); a resumed accountant continues it, and
    one saved for another mechanism is refused."""
    for q in (1.0, 0.5):
        acc = accountant.Accountant(1.1, q, 1e-5)
        curve = [acc.step() for _ in range(6)]
        assert curve == pytest.approx([accountant.epsilon(1.1, q, k, 1e-5) for k in range(1, 7)], rel=1e-9)
        assert all(a < b for a, b in zip(curve, curve[1:]))
        assert accountant.epsilon(2.2, q, 6, 1e-5) < curve[-1]
    resumed = accountant.Accountant(1.1, 0.5, 1e-5)
    resumed.load_state_dict(acc.state_dict())
    assert resumed.rounds == 6 and resumed.epsilon == pytest.approx(curve[-1], rel=1e-12)
    assert resumed.step() == pytest.approx(accountant.epsilon(1.1, 0.5, 7, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match=r"noise_multiplier \(1.1 saved, 0.9 now\)"):
        accountant.Accountant(0.9, 0.5, 1e-5).load_state_dict(acc.state_dict())


@pytest.mark.parametrize("target,q,sampling,n_users", [(0.5, 1.0, "poisson", None), (2.0, 1.0, "poisson", None),
                                                       (8.0, 1.0, "fixed", 6), (3.0, 0.5, "fixed", 8)])
def test_calibrated_noise_reaches_the_target_epsilon(target, q, sampling, n_users):
    """calibrate_noise then epsilon gives the target from below (within 1e-3 relative); a tenth
    less noise would overshoot it."""
    z = accountant.calibrate_noise(target, q, 19, 1e-5, sampling=sampling, n_users=n_users)
    reached = accountant.epsilon(z, q, 19, 1e-5, sampling=sampling, n_users=n_users)
    assert target * (1 - 1e-3) <= reached <= target
    assert accountant.epsilon(0.9 * z, q, 19, 1e-5, sampling=sampling, n_users=n_users) > target


def test_unreachable_target_epsilon_is_a_clear_error():
    """A target that even the largest noise multiplier misses names the key, the value, the
    rounds, the epsilon reached and the fix, from calibrate_noise and from config_errors."""
    reached = accountant.epsilon(accountant.MAX_NOISE_MULTIPLIER, 1.0, 19, 1e-5)
    with pytest.raises(ValueError, match=r"privacy.target_epsilon \(0.05\) is unreachable in 19 rounds") as err:
        accountant.calibrate_noise(0.05, 1.0, 19, 1e-5)
    assert f"raise privacy.target_epsilon to at least {reached:.4g}" in str(err.value)
    errors = dp.config_errors(PrivacyConfig(dp="user", target_epsilon=0.05), rounds=19)
    assert len(errors) == 1 and "unreachable in 19 rounds" in errors[0] and "train.rounds" in errors[0]
    assert dp.config_errors(PrivacyConfig(dp="user", target_epsilon=reached * 1.01), rounds=19) == []


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,key,value,fix", [
    ({"clip": -1.0}, "privacy.clip", "-1.0", "set e.g. privacy.clip=1.0"),
    ({"clip": float("nan")}, "privacy.clip", "nan", "set e.g. privacy.clip=1.0"),
    ({"noise_multiplier": -0.5}, "privacy.noise_multiplier", "-0.5", "or 0 for clipping only"),
    ({"delta": 1.0}, "privacy.delta", "1.0", "e.g. privacy.delta=1e-5"),
    ({"delta": 0.0}, "privacy.delta", "0.0", "e.g. privacy.delta=1e-5"),
    ({"target_epsilon": -2.0}, "privacy.target_epsilon", "-2.0", "or null"),
    ({"target_epsilon": 3.0, "dp": "off"}, "privacy.target_epsilon", "3.0", "set privacy.dp=user"),
    ({"frac_bits": 0}, "privacy.frac_bits", "0", "e.g. privacy.frac_bits=32"),
    ({"frac_bits": 60}, "privacy.frac_bits", "60", "e.g. privacy.frac_bits=32"),
    ({"noise_at": "client"}, "privacy.noise_at", "'client'", "one of 'server', 'users'"),
    ({"dp": "example"}, "privacy.dp", "'example'", "one of 'off', 'user'"),
])
def test_bad_options_name_the_key_value_rule_and_fix(change, key, value, fix):
    """Each bad option is one error naming the key, its value, the rule (must ...) and the fix."""
    base = {"dp": "user"}
    errors = dp.config_errors(PrivacyConfig(**{**base, **change}), rounds=19)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{key} ({value})")
    assert " must " in errors[0] or " is set but " in errors[0]
    assert fix in errors[0]


def test_options_are_checked_together_and_fit_the_run_config_tree():
    """Defaults are valid (dp off and on); three bad values give three errors at once; the dataclass
    parses from YAML-like strings with the RunConfig machinery (types coerced, unknown keys named)
    and every option has a help text; a missing dp-accounting is an error with the install command."""
    from comigs_dist.options import build as _build, describe_options, merge as _merge
    assert dp.config_errors(PrivacyConfig(), rounds=19) == []
    assert dp.config_errors(PrivacyConfig(dp="user", secure_agg=True, noise_at="users"), rounds=19) == []
    assert len(dp.config_errors(PrivacyConfig(clip=0.0, delta=2.0, frac_bits=99), rounds=19)) == 3
    errors: list = []
    raw = {"dp": "user", "clip": "0.5", "noise_at": "users", "secure_agg": "true", "target_epsilon": "null",
           "frac_bits": "20", "delta": "1e-6"}
    p = _build(PrivacyConfig, _merge(raw, PrivacyConfig, "privacy.", errors))
    assert errors == []
    assert p == PrivacyConfig(dp="user", clip=0.5, noise_at="users", secure_agg=True, target_epsilon=None,
                              frac_bits=20, delta=1e-6)
    _merge({"clipp": 1.0, "noise_at": "client"}, PrivacyConfig, "privacy.", errors)
    assert any("unknown key 'privacy.clipp'; did you mean 'clip'?" in e for e in errors)
    assert any("privacy.noise_at ('client') must be one of 'server', 'users'" in e for e in errors)
    rows = describe_options(PrivacyConfig, "privacy.")
    assert [r[0] for r in rows] == [f"privacy.{f.name}" for f in dataclasses.fields(PrivacyConfig)]
    assert all(len(help_text) > 20 for _, _, help_text in rows)


def test_missing_accountant_library_is_a_config_error(monkeypatch):
    """privacy.dp=user without dp-accounting installed: an error with the install command (dp off: none)."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dp_accounting" else real(name, *a))
    errors = dp.config_errors(PrivacyConfig(dp="user"), rounds=19)
    assert len(errors) == 1 and 'pip install -e ".[privacy]"' in errors[0] and "privacy.dp=off" in errors[0]
    assert dp.config_errors(PrivacyConfig(), rounds=19) == []


def test_privacy_package_imports_without_the_accountant_library():
    """Importing comigs_dist.privacy (what the config tree will do) does not import dp-accounting."""
    code = "import sys, comigs_dist.privacy; assert 'dp_accounting' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), timeout=120)


def test_calibration_replaces_the_noise_multiplier_only_with_a_target():
    """resolve_noise_multiplier: the configured z without a target, the calibrated one with it."""
    assert dp.resolve_noise_multiplier(PrivacyConfig(dp="user", noise_multiplier=0.7), rounds=19) == 0.7
    z = dp.resolve_noise_multiplier(PrivacyConfig(dp="user", target_epsilon=4.0), rounds=19)
    assert z == accountant.calibrate_noise(4.0, 1.0, 19, 1e-5)


# --------------------------------------------------------------------------------------------
# secure aggregation
# --------------------------------------------------------------------------------------------

def _shares(buffers: dict, contributing, frac_bits, round_idx=7, group="generalists"):
    return {u: sa.masked_share(buffers[u], u, contributing, seed=SEED, round_idx=round_idx, group=group,
                               frac_bits=frac_bits) for u in contributing}


@pytest.mark.parametrize("n", range(2, 9))
def test_masked_sum_decodes_to_the_plain_sum(n):
    """For n = 2..8 users (indices not contiguous) with buffers of mixed scales, the int64 sum of the
    masked shares decodes to the fixed-point sum exactly and to the float sum within
    resolution(frac_bits, n); with one member sitting out (masks over the others) the others' sum
    decodes the same way, while masks drawn over the full set would not cancel."""
    g = torch.Generator().manual_seed(n)
    users = [3 * i + (i % 2) for i in range(n)]
    buffers = {u: torch.randn(3000, generator=g) * 10.0 ** float(torch.randint(-4, 3, (1,), generator=g))
               for u in users}
    for frac_bits in (16, 32):
        for contributing in (users, users[:1] + users[2:]) if n > 2 else (users,):
            k = len(contributing)
            shares = _shares(buffers, contributing, frac_bits)
            assert all(s.dtype == torch.int64 and int(s.min()) >= 0 and int(s.max()) < 2 ** sa.ring_bits(k)
                       for s in shares.values())
            total = torch.stack(list(shares.values())).sum(0)  # what the int64 SUM collective computes
            decoded = sa.unmask_sum(total, k, frac_bits, torch.float64)
            codes = torch.stack([sa.encode(buffers[u], frac_bits, k) for u in contributing]).sum(0)
            assert torch.equal(decoded, codes.double() / 2.0 ** frac_bits)
            plain = torch.stack([buffers[u].double() for u in contributing]).sum(0)
            # (plus the float64 rounding of the reference sum itself)
            assert float((decoded - plain).abs().max()) <= (sa.resolution(frac_bits, k)
                                                            + 1e-15 * float(plain.abs().max()))
    if n > 2:  # the one sitting out is left out of the masks: drawn over everyone, they do not cancel
        wrong = torch.stack([sa.masked_share(buffers[u], u, users, seed=SEED, round_idx=7, group="generalists",
                                             frac_bits=32) for u in users if u != users[1]]).sum(0)
        rest = torch.stack([buffers[u].double() for u in users if u != users[1]]).sum(0)
        assert float((sa.unmask_sum(wrong, n, 32, torch.float64) - rest).abs().max()) > 1e3


def test_secure_aggregation_composes_with_dp():
    """Clipped updates with each user's noise share, masked: the decoded sum is the sum of what
    the users would have sent in the clear, within the fixed-point resolution."""
    g = torch.Generator().manual_seed(5)
    p = PrivacyConfig(dp="user", clip=0.5, noise_at="users", secure_agg=True, frac_bits=32)
    users = [0, 1, 2, 4]
    sent = {u: dp.privatize_update(torch.randn(2000, generator=g), p, noise_multiplier=1.0, n_contributing=4,
                                   seed=SEED, round_idx=2, group="attn", user_idx=u)[0] for u in users}
    shares = _shares(sent, users, p.frac_bits, round_idx=2, group="attn")
    decoded = sa.unmask_sum(torch.stack(list(shares.values())).sum(0), 4, p.frac_bits, torch.float64)
    plain = torch.stack([sent[u].double() for u in users]).sum(0)
    assert float((decoded - plain).abs().max()) <= sa.resolution(p.frac_bits, 4)


def test_a_single_masked_share_is_uncorrelated_with_its_values():
    """Over 200k elements, Pearson |r| between a user's plain values and what it sends is below
    0.01 (about 4 standard errors), where its unmasked fixed-point code has r > 0.999; the share
    is spread over [0, M) (mean M/2 within 1%)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g) + torch.linspace(-2, 2, 200_000)
    share = sa.masked_share(x, 1, [0, 1, 2], seed=SEED, round_idx=0, group="generalists", frac_bits=32)
    code = sa.encode(x, 32, 3)

    def pearson(a, b):
        return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])
    assert abs(pearson(x, share)) < 0.01
    assert pearson(x, code) > 0.999
    m = 2 ** sa.ring_bits(3)
    assert float(share.double().mean()) == pytest.approx(m / 2, rel=0.01)


def test_fixed_point_overflow_is_a_clear_error_at_the_stated_limit():
    """A value at max_abs_value encodes and n of them decode exactly to n times it; twice that is a
    FixedPointOverflow naming privacy.frac_bits, the limit, the largest sum and a frac_bits that
    fits (which does); a non-finite value is refused."""
    n, frac_bits = 4, 32
    top = sa.max_abs_value(frac_bits, n)
    for sign in (1.0, -1.0):
        x = torch.full((10,), sign * top, dtype=torch.float64)
        shares = _shares({u: x for u in range(n)}, list(range(n)), frac_bits)
        assert torch.equal(sa.unmask_sum(torch.stack(list(shares.values())).sum(0), n, frac_bits, torch.float64),
                           x * n)
    assert n * top <= sa.max_abs_sum(frac_bits, n)
    big = torch.tensor([0.5, 2 * top], dtype=torch.float64)
    with pytest.raises(sa.FixedPointOverflow, match=r"above the largest one of 4 contributors may send with "
                                                    r"privacy.frac_bits 32") as err:
        sa.encode(big, frac_bits, n, who="user 2")
    assert "user 2" in str(err.value) and f"+-{sa.max_abs_sum(frac_bits, n):.6g}" in str(err.value)
    assert "lower privacy.frac_bits to at most 31" in str(err.value)
    sa.encode(big, 31, n)  # the suggested value fits
    with pytest.raises(ValueError, match="non-finite"):
        sa.encode(torch.tensor([1.0, float("inf")]), frac_bits, n)


def test_resolution_is_the_worst_rounding_of_the_sum():
    """Values just under half a step all round the same way: the decoded sum of n of them misses
    the plain sum by nearly resolution(frac_bits, n) = n 2^-(frac_bits+1), and never by more."""
    n, frac_bits = 6, 20
    assert sa.resolution(frac_bits, n) == n * 2.0 ** -(frac_bits + 1)
    x = torch.full((100,), 0.499 * 2.0 ** -frac_bits, dtype=torch.float64)
    shares = _shares({u: x for u in range(n)}, list(range(n)), frac_bits)
    err = float((sa.unmask_sum(torch.stack(list(shares.values())).sum(0), n, frac_bits, torch.float64)
                 - n * x).abs().max())
    assert 0.99 * sa.resolution(frac_bits, n) <= err <= sa.resolution(frac_bits, n)


def test_pair_seeds_and_masking_arguments():
    """A pair's seed is the same in either order and differs between pairs and runs; a user outside
    the contributing set, or a repeated user, is refused."""
    assert sa.pair_seed(SEED, 1, 3) == sa.pair_seed(SEED, 3, 1)
    seeds = {sa.pair_seed(s, a, b) for s in (42, 45, 47) for a in range(6) for b in range(a + 1, 6)}
    assert len(seeds) == 3 * 15
    codes = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"user 5 masks for a round it does not contribute to"):
        sa.mask(codes, 5, [0, 1], seed=SEED, round_idx=0, group="g")
    with pytest.raises(ValueError, match="must not repeat a user"):
        sa.mask(codes, 0, [0, 1, 1], seed=SEED, round_idx=0, group="g")
