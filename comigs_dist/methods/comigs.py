"""CoMiGS: a mixture of generalists and specialists (the paper's method) and its ablations.

Expert 0 (the generalist) and the attention LoRA are averaged over users every round;
specialists and the router stay local. The router trains every ``train.router_every`` local
iterations for ``train.router_steps`` steps on validation batches, with the experts frozen
(Algorithm 1, eqs. 2 and 3).

- ``comigs_1g1s``: one generalist and one specialist per MLP (Tables 1, 4, 5).
- ``comigs_1gxs``: one generalist and a different number of specialists per user
  (``moe.n_experts`` is a per-user list; Tables 2 and 5). Only expert 0 and the attention LoRA are
  shared, so shapes agree across users.
- ``comigs_tr``: as 1G1S, but the router steps draw fresh training batches (Table 4, group iii).
- ``comigs_2g``: both experts are generalists (every LoRA averaged), the router stays local.
- ``comigs_2s``: both experts are specialists. The paper states that the attention LoRA "is always
  aggregated during synchronization" (section 4.1.2), so it is averaged every round here; the
  reference runs 2S as one round with nothing shared (``method_options.reference_quirks=true``).

The two levels never see each other's gradients, as eqs. 2 and 3 require. The reference code
leaks them (baselines.md 1.6): ``method_options.reference_quirks=true`` reproduces that for every
variant here (router gradients of the expert steps pile up until the next router phase; the router
steps' expert gradients join the next expert step).
"""
from dataclasses import dataclass, replace

from comigs_dist.methods.base import (LEAK, AlternatingOptions, Method, register_method, share_experts,
                                      share_generalists)
from comigs_dist.options import opt


@register_method("comigs_1g1s")
class CoMiGS1G1S(Method):
    description = "CoMiGS-1G1S: 1 generalist + 1 specialist per layer, router alternating on validation data"
    paper_row = "Tables 1, 4 (group iv), 5: CoMiGS-1G1S"
    Options = AlternatingOptions


@register_method("comigs_1gxs")
class CoMiGS1GXS(CoMiGS1G1S):
    description = "CoMiGS-1GXS: 1 generalist + a per-user number of specialists (moe.n_experts=[...])"
    paper_row = "Tables 2 and 5 (hetero): CoMiGS-1GXS"

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        if not isinstance(cfg.moe.n_experts, list):
            return [f"moe.n_experts ({cfg.moe.n_experts}) must be a per-user list for comigs_1gxs "
                    f"(e.g. moe.n_experts=[4,2,2,2]); with equal counts use method=comigs_1g1s"]
        return []


@register_method("comigs_tr")
class CoMiGSTr(CoMiGS1G1S):
    description = "CoMiGS-tr: as 1G1S, but the router alternates on fresh training batches"
    paper_row = "Table 4 group iii: CoMiGS-tr"
    router = "alternating_train"


@register_method("comigs_2g")
class CoMiGS2G(CoMiGS1G1S):
    description = "CoMiGS-2G: every expert a generalist (all LoRA averaged), local router on validation data"
    paper_row = "Tables 1, 4 (group iv): CoMiGS-2G"

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_generalists=spec.n_experts)

    def is_shared(self, tag) -> bool:
        return share_experts(tag)


@dataclass
class CoMiGS2SOptions:
    reference_quirks: bool = opt(False, "Run 2S as the reference does: nothing shared after the common "
                                 "initialisation, attention LoRA included (the paper aggregates attention); and "
                                 f"its gradient leakage between the two levels (docs/methods.md, "
                                 f"'reference_quirks'): {LEAK}.")


@register_method("comigs_2s")
class CoMiGS2S(CoMiGS1G1S):
    description = "CoMiGS-2S: every expert a specialist, attention LoRA averaged, router on validation data"
    paper_row = "Tables 1, 4 (group iv): CoMiGS-2S"
    Options = CoMiGS2SOptions

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_generalists=0)

    def is_shared(self, tag) -> bool:
        return share_generalists(tag)  # with no generalist expert: the attention LoRA only

    def sync(self, ctx) -> None:
        if self.options.reference_quirks and ctx.round_idx > 0:
            return None  # shared only through the common initialisation
        super().sync(ctx)

    def wire(self, shared: dict[str, int], round_idx: int | None = None) -> dict:
        """Nothing after the common start under reference_quirks (as ``sync``)."""
        return {} if self.options.reference_quirks else super().wire(shared, round_idx)
