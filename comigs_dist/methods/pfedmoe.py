"""pFedMoE (Yi et al. 2024) as the paper adapts it to language: tokens are the routing unit and
LoRA modules the experts. The architecture and sharing are CoMiGS-1G1S's (expert 0 and attention
LoRA averaged with uniform weights, the specialist and router local), but the router trains
jointly with the experts on the training loss, with the experts' optimiser and schedule, as in
the original method where all local parts train end to end. (The original averages the global
expert with data-size weights; the paper and the reference use uniform weights.)
"""
from comigs_dist.methods.base import Method, register_method


@register_method("pfedmoe")
class PFedMoE(Method):
    description = "pFedMoE: generalist averaged, specialist + router local, router trained jointly on training data"
    paper_row = "Table 1 / Table 4 group ii: pFedMoE"
    router = "joint"
