"""FedDPA's instance-wise weights against hand values, and their use in a PairedLoRA."""
import math

import pytest
import torch

from comigs_dist.methods.feddpa import compute_instance_weights, compute_pair_weights
from comigs_dist.model.paired import PairedLoRA


def test_instance_weights_against_hand_values():
    """References (1,0) and (1,1): instance (1,0) has mean cosine (1 + 1/sqrt2)/2, instance (0,2)
    (0 + 1/sqrt2)/2; times max_weight 0.5. Instance (-1,0) has mean cosine (-1 - 1/sqrt2)/2 < 0:
    clamped to 0, or kept negative without the clamp (the released code)."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    refs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r2 = 1 / math.sqrt(2)
    omega = compute_instance_weights(emb, refs, max_weight=0.5)
    torch.testing.assert_close(omega, torch.tensor([0.5 * (1 + r2) / 2, 0.5 * r2 / 2, 0.0]))
    raw = compute_instance_weights(emb, refs, max_weight=0.5, clamp=False)
    assert raw[2].item() == pytest.approx(0.5 * (-1 - r2) / 2)
    # one reference set per instance (the released code draws S instances for every test instance)
    per_row = torch.stack([refs, refs[:1].expand(2, 2), refs.flip(0)])     # (3, S=2, 2)
    omega_rows = compute_instance_weights(emb, per_row, max_weight=1.0)
    torch.testing.assert_close(omega_rows, torch.tensor([(1 + r2) / 2, 0.0, 0.0]))
    # an embedding equal to every reference: omega = max_weight; a zero embedding: 0
    assert compute_instance_weights(torch.tensor([[3.0, 0.0], [0.0, 0.0]]), refs[:1], 0.5).tolist() == [0.5, 0.0]


def test_pair_weights_give_omega_to_the_chosen_adapter():
    """Columns are (global, local): by default the local adapter gets omega; 'global' is the released
    inference script's assignment."""
    omega = torch.tensor([0.1, 0.4])
    torch.testing.assert_close(compute_pair_weights(omega), torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    torch.testing.assert_close(compute_pair_weights(omega, "global"), torch.tensor([[0.1, 0.9], [0.4, 0.6]]))
    with pytest.raises(ValueError, match=r"weighted \('both'\) must be 'local'"):
        compute_pair_weights(omega, "both")


def test_bad_shapes_and_weights_are_refused():
    """Embeddings must be 2-D, references (S, d) or (B, S, d) of the same d, max_weight in [0, 1]."""
    with pytest.raises(ValueError, match=r"embeddings must be \(instances, d\)"):
        compute_instance_weights(torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"references must be .* d = 3 for 2 instances; got shape \(2, 4\)"):
        compute_instance_weights(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"got shape \(3, 5, 3\)"):
        compute_instance_weights(torch.ones(2, 3), torch.ones(3, 5, 3))
    with pytest.raises(ValueError, match=r"max_weight \(1.5\) must be in \[0, 1\]"):
        compute_instance_weights(torch.ones(2, 3), torch.ones(1, 3), max_weight=1.5)


def test_weights_reach_each_sequence_of_a_paired_adapter():
    """The (B, 2) weights set on a PairedLoRA (first = global, second = local) mix each sequence
    with its own weights: sequence b's output is w_g[b] g B_g A_g x + w_l[b] g B_l A_l x."""
    torch.manual_seed(0)
    pair = PairedLoRA(4, 3, 2, 16.0, kind="attn", layer=0, module="attn.c_attn")
    with torch.no_grad():
        pair.first.lora_B.normal_()
        pair.second.lora_B.normal_()
    x = torch.randn(2, 5, 4)
    w = compute_pair_weights(compute_instance_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                                                      torch.tensor([[1.0, 0.0]]), 0.5))   # omega = 0.5, 0
    pair.set_row_weights(w)
    d_global, d_local = pair.delta_weights()
    out = pair(x)
    torch.testing.assert_close(out[0], 0.5 * x[0] @ d_global.t() + 0.5 * x[0] @ d_local.t())
    torch.testing.assert_close(out[1], x[1] @ d_global.t())
