"""Centralized: one model trained on the data of all users (the paper's lower bound, unrealistic
because data leave the devices).

The reference trains one model on the pooled data with a 4x batch (256 sequences). Here every
rank holds a replica of that one model and keeps its own data shard and batch of B sequences;
after every expert backward the gradients are averaged over the ranks (data parallelism). Every
rank's loss is the mean over its B sequences, so the averaged gradient is the gradient of the mean
loss over all N*B sequences: every step equals one step of one model on the union of the users'
batches, and the replicas stay identical. The model is Local's (two LoRA experts mixed uniformly,
no router). Each user is evaluated on its own test split (the reference evaluates the pooled test
stream; the mean over users of per-user perplexities is what the other rows report).
"""
from dataclasses import replace

from comigs_dist.methods.base import Method, register_method, share_experts


@register_method("centralized")
class Centralized(Method):
    description = "Centralized: one 2x LoRA model on all users' data (replicas, gradients averaged every step)"
    paper_row = "Table 1 / Table 4 group i: Centralized"
    accepts_comm_groups = False  # one model: gradients averaged over everyone
    full_participation_only = "Centralized is one model trained on every user's data at every step"
    refuses_privacy = ("its gradients are averaged at every step (data parallelism), not once per round as an "
                       "update that can be clipped and noised per user")
    router = "none"

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        errors = []
        for key, raw in (("moe.n_experts", cfg.moe.n_experts), ("lora.rank", cfg.lora.rank)):
            if isinstance(raw, list) and len(set(raw)) > 1:
                errors.append(f"{key} ({raw}) must be the same for every user with method=centralized "
                              f"(every rank holds a replica of one model); give one value")
        return errors

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_generalists=spec.n_experts)

    def sharing_groups(self, n_users: int) -> dict[str, list[int]]:
        return {"generalists": list(range(n_users)), "data_parallel": list(range(n_users))}

    def is_shared(self, tag) -> bool:
        return share_experts(tag)  # the replicas start from one initialisation (round 0 broadcast)

    def wire(self, shared: dict[str, int], round_idx: int | None = None) -> dict[str, tuple]:
        """Every expert step of every round (round 0 included) averages the gradients of all the
        LoRAs in fp32, server-style, whatever comm.mode and comm.dtype say; the sync itself moves
        nothing after the common start."""
        numel = sum(shared.values())
        return {"data_parallel": [(numel, None, "gradients")] * self.cfg.train.local_steps} if numel else {}

    def reduce_gradients(self, comm, users) -> None:
        comm.mean_gradients("data_parallel", {u.user_idx: u.expert_params() for u in users},
                            skip={u.user_idx for u in users if u.sits_out_gradients})

    def sync(self, ctx) -> None:
        if ctx.round_idx == 0:
            super().sync(ctx)  # the replicas start from one initialisation; every step then used
            # the same mean gradient, so they stay identical
