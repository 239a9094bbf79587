"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning"): every A and B matrix trains, but only the A matrices are aggregated; the B matrices
stay with their user. The paper's finding: A learns what users share, B what is theirs. The
released code (FederatedScope, ``personalization.local_param: ['lora_B']``) starts every user from
one model (A common, B = 0) and, each round, lets every user load the averaged model except B.
What was read: the abstract, and the released code at Pengxin-Guo/FedSA-LoRA fc276b5 (its
FederatedScope YAMLs for the LLM and GLUE runs and the clients' mean aggregator); the full paper
was out of reach from where this was written.

Model: as FFA-LoRA, its sibling baseline: one MLP LoRA per user with the rank of all of
CoMiGS-1G1S's experts together (moe.n_experts * lora.rank, the "2x LoRA" parameter match), no
router, and the attention LoRA; every A (attention and MLP) is averaged in group ``generalists``
with weight 1/N, every B is local. Round 0 starts every A from user 0's initialisation (the base
class's sync: one common start, then the mean, users that sit a round out left out of it, so
partial participation and guard.nan=skip work as for FedAvg; nothing to checkpoint beyond the
parameters).
Where this departs from the released code (docs/methods-since-the-paper.md): the mean is uniform
(the code weights users by training-set size, the CoMiGS paper's baselines are uniform) and the
optimiser is the simulator's AdamW for every method (the code's default is SGD).
"""
from __future__ import annotations

from dataclasses import replace

from comigs_dist.methods.base import Method, register_method


@register_method("fedsa_lora")
class FedSALoRA(Method):
    description = "FedSA-LoRA: one LoRA of 2x rank, A and B trained, only A averaged (B stays local)"
    paper_row = "Guo et al., ICLR 2025 (since the paper)"
    accepts_comm_groups = False  # A of the attention and of the MLP LoRA travel together
    router = "none"

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_experts=1, n_generalists=1, top_k=1, routed=False,
                       rank=spec.n_experts * spec.rank)  # the configured experts' ranks together

    def is_shared(self, tag) -> bool:
        return tag.kind in ("attn", "expert") and tag.matrix == "A"
