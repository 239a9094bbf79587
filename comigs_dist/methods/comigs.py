"""CoMiGS: a mixture of generalists and specialists (the paper's method).

Expert 0 (the generalist) and the attention LoRA are averaged over users every round;
specialists and the router stay local. The router trains every ``train.router_every`` local
iterations for ``train.router_steps`` steps on validation batches, with the experts frozen
(Algorithm 1, eqs. 2 and 3).
"""
from comigs_dist.methods.base import Method, register_method


@register_method("comigs_1g1s")
class CoMiGS1G1S(Method):
    description = "CoMiGS-1G1S: 1 generalist + 1 specialist per layer, router alternating on validation data"
