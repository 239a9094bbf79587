"""The local baselines: every user fine-tunes alone; nothing is communicated after the common
initialisation (the reference starts every user from the server's initial adapters).

- ``local``: two LoRA experts mixed uniformly, no router (the paper's "2x LoRA", which matches
  CoMiGS-1G1S's trainable parameter count).
- ``local_moe``: the same two experts with a per-token router trained jointly with them on the
  training loss (Table 4, group ii).
- ``local_moe_tr``: the router alternates with the experts as in Algorithm 1, but its steps use
  fresh training batches instead of validation batches (Table 4, group iii);
  ``method_options.reference_quirks=true`` reproduces the reference's gradient leakage between
  router and expert steps (baselines.md 1.6).
"""
from dataclasses import replace

from comigs_dist.methods.base import AlternatingOptions, Method, register_method, share_all, share_experts


class _Alone(Method):
    """What the local baselines share: no generalist, and one common start (round 0) then nothing."""
    accepts_comm_groups = False  # nothing is averaged after the common start
    aggregates = False  # no round after the common start sends anything (Method.payloads)

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_generalists=0)  # nothing is shared with anyone

    def sync(self, ctx) -> None:
        if ctx.round_idx == 0:
            super().sync(ctx)  # one common start, then nothing


@register_method("local")
class Local(_Alone):
    description = "Local: 2x LoRA per user (uniform mix, no router), no communication"
    paper_row = "Table 1 / Table 4 group i: Local"
    router = "none"

    def is_shared(self, tag) -> bool:
        # shared only for the common initialisation; never aggregated
        return share_experts(tag)


@register_method("local_moe")
class LocalMoE(_Alone):
    description = "Local-MoE: 2 LoRA experts + router trained jointly on the training loss, no communication"
    paper_row = "Table 4 group ii: Local-MoE"
    router = "joint"

    def is_shared(self, tag) -> bool:
        # the reference's 'all' pattern: adapters and routers start from one initialisation
        return share_all(tag)


@register_method("local_moe_tr")
class LocalMoETr(LocalMoE):
    description = "Local-MoE-tr: router alternating with the experts on fresh training batches, no communication"
    paper_row = "Table 4 group iii: Local-MoE-tr"
    Options = AlternatingOptions
    router = "alternating_train"
