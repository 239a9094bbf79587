"""PCL, strategy 2 of Wagner et al. (2024): personalised collaboration through a client-level
trust graph learned from validation performance.

The model is Local's (two LoRA experts mixed uniformly, no router). Users start from their own
initialisations (no common broadcast, as in the reference). After round e (0-based), when
e >= ``mix_after`` and (e - mix_after) is a multiple of ``mix_every`` (the reference: e > 3 and
e even, i.e. after rounds 4, 6, ..., 18 of 20), every user i

1. receives every user's trainable parameters (one all_gather of one flat vector per user),
2. evaluates each user j's parameters on its own validation split: ppl_ij,
3. weighs them by W_ij = exp(-ppl_ij) / sum_k exp(-ppl_ik) (a softmax over raw perplexities,
   temperature 1, as the original PCL code and the reference do), and
4. mixes theta_i <- sum_j W_ij theta_j, from the snapshot gathered before anyone changed.
Optimiser states are kept. Validation uses the fixed windows of the evaluation protocol
(``eval.max_tokens``), not random batches, so W does not consume training randomness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from comigs_dist import guard
from comigs_dist.dist import unflatten_into
from comigs_dist.methods.base import Method, register_method, share_all
from comigs_dist.options import opt


@dataclass
class PCLOptions:
    mix_after: int = opt(4, "First round (0-based) after which users mix (reference: after round 4).")
    mix_every: int = opt(2, "Mix after every this many rounds from mix_after on (reference: every 2nd round).")


def compute_trust_weights(ppl_row: torch.Tensor) -> torch.Tensor:
    """W_i. = softmax(-ppl_i.): user i's weights for every user's model from its validation perplexities."""
    return torch.softmax(-ppl_row.double(), dim=0)


def compute_mix(weights: torch.Tensor, vectors: list[torch.Tensor]) -> torch.Tensor:
    """sum_j W_ij theta_j for flat parameter vectors (in member order)."""
    out = torch.zeros_like(vectors[0], dtype=torch.float64)
    for w, v in zip(weights.tolist(), vectors):
        out.add_(v.double(), alpha=w)
    return out.to(vectors[0].dtype)


@register_method("pcl")
class PCL(Method):
    description = ("PCL: 2x LoRA (uniform mix); every other round each user mixes all users' models by "
                   "softmax(-validation ppl)")
    paper_row = "Table 1 / Table 4 group i: PCL"
    Options = PCLOptions
    accepts_comm_groups = False  # every user mixes every user's model
    refuses_privacy = "every user gathers every other user's whole model (Comm.gather) to mix them, in the clear"
    router = "none"

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        o = cls(cfg).options
        errors = []
        if o.mix_after < 0:
            errors.append(f"method_options.mix_after ({o.mix_after}) must be >= 0")
        if o.mix_every < 1:
            errors.append(f"method_options.mix_every ({o.mix_every}) must be >= 1")
        return errors

    def is_shared(self, tag) -> bool:
        return share_all(tag)  # every trainable tensor takes part in the mixing

    def wire(self, shared: dict[str, int], round_idx: int | None = None) -> dict:
        """A mixing round gathers every user's whole model and its flag (Comm.gather: N payloads
        each way whatever comm.mode says); the other rounds send nothing."""
        if round_idx is not None and (round_idx == 0 or not self.mixes_after(round_idx - 1)):
            return {}
        return {group: (numel + 1, None, "all2all") for group, numel in shared.items()}

    def mixes_after(self, finished_round: int) -> bool:
        o = self.options
        return finished_round >= o.mix_after and (finished_round - o.mix_after) % o.mix_every == 0

    @torch.no_grad()
    def sync(self, ctx) -> None:
        # no common start (users begin from their own initialisations, as in the reference); sync
        # runs at the start of round t, i.e. after round t - 1 finished
        if ctx.round_idx == 0 or not self.mixes_after(ctx.round_idx - 1):
            return
        (group,) = ctx.groups()
        mine = {u.user_idx: [p.data for params in u.shared.values() for _, p in params] for u in ctx.users}
        # a user sitting the round out (guard.nan=skip) sends zeros and a flag 0 instead of its
        # non-finite model: the others give it trust 0, and it takes the mix of theirs
        payload = {}
        for u in ctx.users:
            tensors = mine[u.user_idx]
            sent = tensors if u.contributing else [torch.zeros_like(t) for t in tensors]
            payload[u.user_idx] = sent + [tensors[0].new_full((1,), 1.0 if u.contributing else 0.0)]
        vectors = ctx.comm.gather(group, payload)
        if not any(float(v[-1]) > 0.5 for v in vectors):
            raise guard.NothingLeft("every user sat this PCL round out with non-finite parameters (guard.nan=skip): "
                                     "there is no model left to mix; lower train.lr or check the data, then resume",
                                    ctx.comm.members(group))
        for u in ctx.users:
            tensors = mine[u.user_idx]
            own = [t.clone() for t in tensors]
            ppl = []
            for v in vectors:  # every user's model on this user's validation split (the flag is ignored)
                if float(v[-1]) < 0.5:
                    ppl.append(math.inf)  # trust exp(-inf) = 0
                    continue
                unflatten_into(v, tensors)
                ppl.append(math.exp(min(ctx.evaluate_valid(u), 700.0)))
            for t, o in zip(tensors, own):
                t.copy_(o)
            trust = compute_trust_weights(torch.tensor(ppl, dtype=torch.float64))
            u.method_state = {"trust": trust, "ppl": ppl}  # the last mixing, for analysis and tests
            unflatten_into(compute_mix(trust, vectors), tensors)
