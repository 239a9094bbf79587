"""FedAvg: every LoRA (attention and both uniformly mixed MLP experts, the "2x LoRA" that matches
CoMiGS-1G1S's parameter count) is averaged over all users each round (McMahan et al. 2017,
uniform weights as in the paper)."""
from comigs_dist.methods.base import Method, register_method, share_experts


@register_method("fedavg")
class FedAvg(Method):
    description = "FedAvg: 2x LoRA (uniform mix, no router), all LoRA averaged every round"
    routed = False
    router_training = "none"

    def is_shared(self, tag) -> bool:
        return share_experts(tag)
