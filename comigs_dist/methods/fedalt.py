"""FedALT (Bian et al., AAAI 2026): the rest-of-world arithmetic.

Each user trains an individual LoRA (and a per-token mixer) and never overwrites it; a frozen
rest-of-world (RoW) LoRA holds the mean of the *other* users' individual LoRAs, factor by factor
(A with A, B with B, as the released code averages them). One all_reduce of the individual LoRAs
gives every user the sum S; a user that contributed then holds RoW = (S - own) / (C - 1), C the
number of contributors, and a user that sat the round out (its payload zeroed) RoW = S / C.

The Method class comes with the redesigned hooks (``sync`` every round, a typed ``Comm``);
docs/methods-since-the-paper.md says what it will need. The model side is
``comigs_dist.model.paired.PairedLoRA`` (``first`` = RoW, ``second`` = individual, with a mixer).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def compute_rest_of_world(total: torch.Tensor, own: torch.Tensor, n_contributing: int, contributed: bool,
                          out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mean of the other contributors' tensors, from the group's sum ``total`` (over the
    ``n_contributing`` users that contributed) and this user's own tensor: (total - own) / (C - 1)
    if this user contributed, total / C if it did not. Computed in the wider of the two dtypes (a
    float64 sum stays exact up to the final rounding); written into ``out`` when given (it may be
    ``total`` itself). None when no other user contributed: the caller keeps its previous RoW."""
    if n_contributing < 0 or (contributed and n_contributing < 1):
        raise ValueError(f"{n_contributing} contributors, but this user {'did' if contributed else 'did not'} "
                         f"contribute: the count must include it")
    others = n_contributing - (1 if contributed else 0)
    if others == 0:
        return None
    row = (total - own if contributed else total) / others
    if out is None:
        return row.to(own.dtype)
    return out.copy_(row)
