"""Local: every user fine-tunes alone. Two LoRA experts mixed uniformly (no router), matching
CoMiGS-1G1S's parameter count (the paper's "2x LoRA"); nothing is shared after the common
initialisation."""
from comigs_dist.methods.base import Method, register_method, share_experts


@register_method("local")
class Local(Method):
    description = "Local: 2x LoRA per user (uniform mix, no router), no communication"
    routed = False
    router_training = "none"

    def is_shared(self, tag) -> bool:
        # shared only for the common initialisation; never aggregated
        return share_experts(tag)

    def aggregate(self, ctx) -> None:
        return None
