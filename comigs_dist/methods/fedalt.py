"""FedALT (Bian, Wang, Zhang, Xu; AAAI 2026): an individual LoRA per user, a frozen
rest-of-world LoRA holding the mean of the other users' individual LoRAs, and a per-token mixer.

What was read: the paper's abstract and public summaries, and the released code (``jmbian/FedALT``;
docs/methods-since-the-paper.md says which files). The method: each user trains its own
*individual* LoRA across rounds and never replaces it by an aggregate; beside it sits a
*rest-of-world* (RoW) LoRA, frozen during local training, which holds the mean of the *other*
users' individual LoRAs, factor by factor (A with A, B with B, as the released code averages
them); a mixer (a bias-free linear map of the layer's input to 2 logits, softmax) weighs the two
per token. The individual LoRA and the mixer train jointly on the training loss.

Model (``method_options.mixer``): 'projection' (default, the released code's granularity): a
``PairedLoRA`` with a mixer (``AdapterSpec.paired='mixer'``) on every adapted projection (the
attention targets and the MLP's projections, one expert, no router), ``first`` = RoW (role
generalist: it is what each user receives, so it is the method's shared tensor), ``second`` =
individual (specialist), the mixer (role router). 'mlp': the attention keeps those pairs, and each
MLP becomes a mixture of two plain LoRA experts (``AdapterSpec.mlp_paired=False``): expert 0 = RoW
(generalist), expert 1 = individual (specialist), mixed per token by a dense top-2 router (role
router, no load balancing), so the mixer weighs whole MLP outputs rather than each projection's
update. Rank ``lora.rank`` each (``lora.attn_rank`` on attention) in both. FedALT thus trains half
of CoMiGS-1G1S's LoRA parameters and sends one LoRA set per round, in either granularity.

Aggregation (``sync``): round 0 is the common start (the individual LoRAs broadcast from the
group's first user, not counted, as every method's; the RoW copies it, B = 0 so it adds nothing).
Later rounds: one ``Comm.sum`` of the individual LoRAs (sent in comm.dtype, summed in float64),
then each user holds RoW = (S - own) / (C - 1), C the users that contributed
(``compute_rest_of_world``): the bytes of one mean. A user that sat the round out (guard.nan=skip,
or it did not take part in the round before under partial participation) sends zeros and a count
of 0 and, if it downloads this round, gets S / C; a lone contributor keeps its previous RoW. A
user that sat out because its individual LoRA is not finite restarts it from that RoW (the only
finite model it can have; its optimiser moments are kept, as every method's).
Byte counts are those of a mean in comm.mode (Comm.sum counts as Comm.mean does): one LoRA set each
way under server, N sets each way under all2all, as analytic_round_bytes says.
After the last round one more sum (``after_training``) gives each user the RoW of the others'
final individual LoRAs, which the final evaluation uses (the released code aggregates before it
evaluates). Privacy is refused: the sum of whole individual LoRAs is not the mean of round updates
that privacy.dp and privacy.secure_agg protect.
Choices where the paper is silent: one mixer per adapted projection by default (the code's),
Kaiming-uniform mixer init (the code's; the 'mlp' router keeps the mixture's N(0, 0.02)), no load
balancing, the simulator's AdamW and schedule. The guard checks
the individual LoRAs (``own_aggregated``: what travels) besides the RoW.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from comigs_dist.methods.base import Method, register_method
from comigs_dist.model.roles import Role
from comigs_dist.options import opt

GROUP = "generalists"  # every user: the sum of the individual LoRAs


@torch.no_grad()
def compute_rest_of_world(total: torch.Tensor, own: torch.Tensor, n_contributing: int, contributed: bool,
                          out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mean of the other contributors' tensors, from the group's sum ``total`` (over the
    ``n_contributing`` users that contributed) and this user's own tensor: (total - own) / (C - 1)
    if this user contributed, total / C if it did not. Computed in the wider of the two dtypes (a
    float64 sum stays exact up to the final rounding); written into ``out`` when given (it may be
    ``total`` itself). None when no other user contributed: the caller keeps its previous RoW."""
    if n_contributing < 0 or (contributed and n_contributing < 1):
        raise ValueError(f"{n_contributing} contributors, but this user {'did' if contributed else 'did not'} "
                         f"contribute: the count must include it")
    others = n_contributing - (1 if contributed else 0)
    if others == 0:
        return None
    row = (total - own if contributed else total) / others
    if out is None:
        return row.to(own.dtype)
    return out.copy_(row)


def rest_of_world_pairs(model) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name of the individual tensor, RoW tensor, individual tensor) of every pair of a FedALT
    model, in the order of the model's tags (the same on every user). A RoW tensor and its
    individual twin sit on the same projection; the expert index is left out of the match because
    the whole-MLP mixer keeps them in two experts (0 and 1) where a projection pair has one."""
    def where(t):
        return t.kind, t.layer, t.module, t.matrix

    own = {where(t): n for n, t in model.report.tags.items() if t.role == Role.SPECIALIST}
    n_row = sum(t.role == Role.GENERALIST for t in model.report.tags.values())
    assert len(own) == n_row == sum(t.role == Role.SPECIALIST for t in model.report.tags.values()), \
        "every RoW tensor must have exactly one individual twin"
    out = []
    for name, tag in model.report.tags.items():
        if tag.role == Role.GENERALIST:
            mine = own[where(tag)]
            out.append((mine, model.report.params[name], model.report.params[mine]))
    return out


@dataclass
class FedALTOptions:
    """FedALT's options (method_options.<key>)."""
    mixer: Literal["projection", "mlp"] = opt(
        "projection", "Where the RoW and the individual LoRA are mixed: 'projection' (the released code: a pair "
        "with its own per-token mixer on every adapted projection) or 'mlp' (every MLP a mixture of two LoRA "
        "experts, 0 = RoW and 1 = individual, weighed per token by a dense top-2 router; attention keeps its "
        "pairs).")


@register_method("fedalt")
class FedALT(Method):
    description = ("FedALT: individual LoRA (trained, kept) + frozen rest-of-world LoRA (the others' mean), "
                   "per-token mixer on every projection (method_options.mixer=mlp: one per MLP)")
    paper_row = "Bian et al., AAAI 2026 (since the paper)"
    accepts_comm_groups = False  # the rest of the world is every other user
    router = "joint"             # the mixers train with the individual LoRAs, on the training loss
    Options = FedALTOptions
    aggregates_after_training = True  # the RoW evaluated is the others' final individual LoRAs
    refuses_privacy = ("each user's rest-of-world LoRA is the sum of every user's individual LoRA minus its own "
                       "(Comm.sum of the individual LoRAs, which are never replaced by an aggregate), not a mean of "
                       "round updates, which is what privacy.dp and privacy.secure_agg protect")

    def adapter_spec(self, cfg, user_idx, spec):
        if self.options.mixer == "mlp":
            # expert 0 the RoW, expert 1 the individual, the mixture's router (top-2 of 2: every
            # token weighs both) the mixer; the attention keeps its pairs
            return replace(spec, n_experts=2, n_generalists=1, top_k=2, routed=True, load_balancing="none",
                           paired="mixer", mlp_paired=False)
        return replace(spec, n_experts=1, n_generalists=1, top_k=1, routed=False, paired="mixer")

    def prepare_user(self, user) -> None:
        user.method_state = rest_of_world_pairs(user.model)

    def is_shared(self, tag) -> bool:
        return tag.role == Role.GENERALIST     # the RoW LoRA: what each user receives

    def trains_in(self, phase, tag) -> bool:
        return phase == "expert" and tag.role in (Role.SPECIALIST, Role.ROUTER)  # RoW frozen

    def own_aggregated(self, user):
        return [(name, ind) for name, _, ind in user.method_state]

    def after_training(self, ctx) -> None:
        """One more sum after the last round: each user is evaluated with the rest of the world as
        the others' individual LoRAs ended, as the released code aggregates before it evaluates
        (otherwise the RoW would be the one the last round started from)."""
        ctx.aggregate()

    @torch.no_grad()
    def sync(self, ctx) -> None:
        if ctx.round_idx == 0:
            ctx.comm.broadcast(GROUP, {u.user_idx: [ind.data for _, _, ind in u.method_state] for u in ctx.users})
            for u in ctx.users:
                for _, row, ind in u.method_state:
                    row.copy_(ind)
            return
        comm = ctx.comm
        count = comm.count  # a contributor count travels when users may sit the round out
        payload = {}
        for u in ctx.users:
            # what travels, rounded to the wire dtype, in float64 so that the sum stays exact
            own = [ind.detach().to(comm.wire).to(torch.float64) for _, _, ind in u.method_state]
            sent = own if u.contributing else [torch.zeros_like(t) for t in own]
            if count:
                sent.append(own[0].new_full((1,), 1.0 if u.contributing else 0.0))
            payload[u.user_idx] = sent
        ctx.comm.sum(GROUP, payload)
        n_members = len(comm.members(GROUP))
        for u in ctx.users:
            total = payload[u.user_idx]
            contributors = int(round(float(total[-1]))) if count else n_members
            # a user that sat out because its individual LoRA is not finite (guard.nan=skip) cannot
            # keep it: it starts again from its new RoW, the others' mean
            restart = not u.contributing and not all(torch.isfinite(ind).all() for _, _, ind in u.method_state)
            for (_, row, ind), t in zip(u.method_state, total):
                own = ind.detach().to(comm.wire).to(torch.float64)
                mean = compute_rest_of_world(t, own, contributors, u.contributing)
                if mean is not None:
                    row.copy_(mean)  # rounded once to the parameter's dtype; copy_ keeps the packing
                if restart:
                    ind.copy_(row)
