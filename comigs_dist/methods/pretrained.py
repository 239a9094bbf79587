"""Pretrained: the frozen base model, evaluated on each user's test split without any training
(the paper's upper bound on perplexity). Untrained adapters (B = 0) leave the base unchanged, so
the run evaluates exactly the base; results.json is complete, with zero bytes sent.
"""
from dataclasses import replace

from comigs_dist.methods.base import Method, register_method, share_nothing


@register_method("pretrained")
class Pretrained(Method):
    description = "Pretrained: the base model, no training, no communication"
    paper_row = "Table 1 / Table 4 group i: Pretrained"
    accepts_comm_groups = False  # nothing is shared
    router = "none"
    trains = False

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_generalists=0)

    def is_shared(self, tag) -> bool:
        return share_nothing(tag)

    def sync(self, ctx) -> None:
        return None  # nothing trains, nothing travels
