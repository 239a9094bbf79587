"""FedALT's rest-of-world arithmetic against hand values: the mean of the other contributors,
from the group's sum, with users that sit the round out."""
import pytest
import torch

from comigs_dist.methods.fedalt import compute_rest_of_world

# three users' individual LoRA factors (one small tensor each), by hand
OWN = [torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([-2.0, 5.0, 0.5])]


def test_rest_of_world_is_the_mean_of_the_others():
    """Sum (2, 3, 3.5): user 0 gets ((3,0,-1) + (-2,5,0.5)) / 2 = (0.5, 2.5, -0.25), and so on."""
    total = sum(OWN)
    expected = [torch.tensor([0.5, 2.5, -0.25]), torch.tensor([-0.5, 1.5, 2.25]), torch.tensor([2.0, -1.0, 1.5])]
    for own, want in zip(OWN, expected):
        torch.testing.assert_close(compute_rest_of_world(total, own, 3, True), want)


def test_rest_of_world_with_users_that_sat_out():
    """User 2 sits out (payload zeroed, C = 2): the contributors get each other's tensor, user 2
    the mean of both; a lone contributor has no rest of world (None: keep the previous one)."""
    total = OWN[0] + OWN[1]
    torch.testing.assert_close(compute_rest_of_world(total, OWN[0], 2, True), OWN[1])
    torch.testing.assert_close(compute_rest_of_world(total, OWN[1], 2, True), OWN[0])
    torch.testing.assert_close(compute_rest_of_world(total, OWN[2], 2, False), torch.tensor([2.0, -1.0, 1.5]))
    assert compute_rest_of_world(OWN[0], OWN[0], 1, True) is None
    assert compute_rest_of_world(torch.zeros(3), OWN[1], 0, False) is None
    with pytest.raises(ValueError, match="0 contributors, but this user did contribute"):
        compute_rest_of_world(total, OWN[0], 0, True)


def test_rest_of_world_in_place_from_a_float64_sum():
    """Written into the summed buffer itself (what the sync does with its packed RoW LoRA), or
    into an fp32 tensor from a float64 sum: the same values as the mean of the others in float64,
    rounded once."""
    g = torch.Generator().manual_seed(0)
    own = [torch.randn(1000, generator=g) * 10 ** k for k in (0, 3, -3, 1)]
    exact = sum(o.double() for o in own)
    for u in range(4):
        out = torch.empty(1000)
        compute_rest_of_world(exact, own[u], 4, True, out=out)
        want = (sum(o.double() for i, o in enumerate(own) if i != u) / 3).float()
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    buf = sum(own)                        # fp32 sum, overwritten in place
    result = compute_rest_of_world(buf, own[0], 4, True, out=buf)
    assert result is buf
    torch.testing.assert_close(buf, (own[1] + own[2] + own[3]) / 3, rtol=1e-4, atol=1e-3)
