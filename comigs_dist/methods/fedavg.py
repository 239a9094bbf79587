"""The FedAvg family: every LoRA (attention and every MLP expert) is averaged over all users each
round with uniform weights 1/N (McMahan et al. 2017; uniform, as in the paper).

- ``fedavg``: two LoRA experts mixed uniformly, no router ("2x LoRA", matching CoMiGS-1G1S's
  trainable parameter count).
- ``fedavg_moe``: a per-token router, trained jointly with the experts on the training loss and
  kept local (Table 4, group ii).
- ``fedavg_moe_tr``: the router alternates with the experts as in Algorithm 1, on fresh training
  batches (Table 4, group iii); ``method_options.reference_quirks=true`` reproduces the reference's
  gradient leakage between router and expert steps (baselines.md 1.6).
"""
from dataclasses import replace

from comigs_dist.methods.base import AlternatingOptions, Method, register_method, share_experts


@register_method("fedavg")
class FedAvg(Method):
    description = "FedAvg: 2x LoRA (uniform mix, no router), all LoRA averaged every round"
    paper_row = "Table 1 / Table 4 group i: FedAvg"
    router = "none"

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_generalists=spec.n_experts)  # every expert is shared

    def is_shared(self, tag) -> bool:
        return share_experts(tag)


@register_method("fedavg_moe")
class FedAvgMoE(FedAvg):
    description = "FedAvg-MoE: all LoRA averaged every round; local router trained jointly on the training loss"
    paper_row = "Table 4 group ii: FedAvg-MoE"
    router = "joint"


@register_method("fedavg_moe_tr")
class FedAvgMoETr(FedAvgMoE):
    description = "FedAvg-MoE-tr: all LoRA averaged every round; local router alternating on fresh training batches"
    paper_row = "Table 4 group iii: FedAvg-MoE-tr"
    Options = AlternatingOptions
    router = "alternating_train"
