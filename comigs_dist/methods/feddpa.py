"""FedDPA (Yang et al., NeurIPS 2024): the instance-wise dynamic weighting of test time.

Each user holds a global adapter (trained alone and averaged every round, as FedIT does) and a
local adapter (kept; FedDPA-T trains it each round on top of the frozen global one, the two
weighted (1 - alpha, alpha), alpha = 0.5). At test time each instance x gets its own weight
    omega(x) = max_weight * mean_s cos(e(x), e(x_s)),
e the final hidden state of the instance's last token and x_s, s = 1..S, instances drawn from the
user's training data (cosine similarity and the last token: the paper's ablations; S = 5 and
max_weight = 0.5: the released code's defaults). Which adapter omega weights: here, by default,
the local one (global 1 - omega), the convention of FedDPA-T's training weight alpha and of the
method's aim (an instance unlike the local data leans on the global adapter; one like it keeps the
training mix); the released inference script gives omega to the global adapter instead
(``weighted='global'``). The paper's own equation was not readable in this session: see
docs/methods-since-the-paper.md, where this is marked to be checked.

The Method class comes with the redesigned hooks; docs/methods-since-the-paper.md says what it
will need. The model side is ``comigs_dist.model.paired.PairedLoRA`` (``first`` = global,
``second`` = local; ``set_row_weights`` takes the (B, 2) weights computed here).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def compute_instance_weights(embeddings: torch.Tensor, references: torch.Tensor, max_weight: float = 0.5,
                             clamp: bool = True) -> torch.Tensor:
    """omega for each of B instances, (B,): ``max_weight`` times the mean cosine similarity of the
    instance's embedding (B, D) to the reference embeddings, (S, D) shared by every instance or
    (B, S, D) one set per instance. A zero embedding is 0-similar to everything. ``clamp`` keeps
    omega in [0, max_weight] (a negative mean cosine would subtract an adapter; the released code
    does not clamp, and final hidden states of a language model are rarely anti-aligned)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (instances, d); got shape {tuple(embeddings.shape)}")
    if references.dim() not in (2, 3) or references.shape[-1] != embeddings.shape[1] or references.shape[-2] == 0 \
            or (references.dim() == 3 and references.shape[0] != embeddings.shape[0]):
        raise ValueError(f"references must be (S, d) or (instances, S, d) with S >= 1 and d = {embeddings.shape[1]} "
                         f"for {embeddings.shape[0]} instances; got shape {tuple(references.shape)}")
    if not 0.0 <= max_weight <= 1.0:
        raise ValueError(f"max_weight ({max_weight}) must be in [0, 1]")
    e = embeddings.double()
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = references.double()
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if r.dim() == 2:
        cos = e @ r.t()                                         # (B, S)
    else:
        cos = torch.einsum("bd,bsd->bs", e, r)                   # (B, S)
    omega = max_weight * cos.mean(dim=1)
    if clamp:
        omega = omega.clamp(0.0, max_weight)
    return omega.to(embeddings.dtype if embeddings.is_floating_point() else torch.float32)


def compute_pair_weights(omega: torch.Tensor, weighted: str = "local") -> torch.Tensor:
    """(B, 2) weights of (global, local) from omega (B,): 'local' (the default) gives the local
    adapter omega and the global one 1 - omega; 'global' (the released inference script) the
    reverse."""
    if weighted == "local":
        return torch.stack([1.0 - omega, omega], dim=1)
    if weighted == "global":
        return torch.stack([omega, 1.0 - omega], dim=1)
    raise ValueError(f"weighted ({weighted!r}) must be 'local' (omega to the local adapter) or 'global' "
                     f"(the released code)")
