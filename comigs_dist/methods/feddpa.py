"""FedDPA (Yang, Long, Shen, Jiang, Blumenstein; NeurIPS 2024): a global adapter (averaged every
round) and a local adapter (kept), mixed per test instance by an instance-wise dynamic weight;
FedDPA-T (the default) and FedDPA-F (``method_options.variant=F``).

What was read: the paper's abstract, figure captions and public summaries, and the released code
(``Lydia-yang/FedDPA``; docs/methods-since-the-paper.md says which files); the paper's weighting
equation was not readable here. Implemented: FedDPA-T (what the released ``main.py`` runs): every
round, (a) the local adapter trains with the layer adding (1 - alpha) global + alpha local, the
global adapter frozen, alpha = 0.5; then (b) the global adapter trains alone (the local adapter
out of the forward); (c) the global adapters are averaged (uniform 1/N, the base class's sync).
After the last round the global adapters are averaged once more (``after_training``), so the
model evaluated holds the averaged global adapter, as the released code evaluates its aggregated
global adapter. At test time the instance of a prediction is what the model has read: the weight of
the prediction after position t of a test window is
    omega(x_<=t) = max_weight * mean_s cos(e(x_<=t), e(x_s)),
e(x_<=t) the final hidden state at position t computed with the local adapter alone (causal: it
depends on the tokens up to t only, so no prediction sees the tokens it is scored on), e(x_s) the
final hidden state of the last token of x_s (s = 1..S), windows drawn at random from the user's
training split for every test window (S = 5, max_weight = 0.5: the code's defaults; cosine and the
last token: the paper's ablations), and the pair adds (1 - omega) global + omega local
(``weighted='local'``, the default: the training convention of alpha, an instance unlike the
local data leans on the global adapter) or the released inference script's assignment, omega to
the global adapter (``weighted='global'``).

Simulator mapping: a ``PairedLoRA`` with fixed weights (``AdapterSpec.paired='fixed'``) on every
adapted projection, one expert, no router; ``first`` = global (role generalist, shared),
``second`` = local (specialist); rank ``lora.rank`` each (``lora.attn_rank`` on attention). The
two phases are Algorithm 1's two levels with the router mode ``alternating_train``: the expert
steps train the local adapter (phase (a), ``train.local_steps`` steps, the expert learning rate
and schedule), the "router" steps train the global adapter on fresh training batches (phase (b),
``train.router_steps`` steps at ``train.lr``, constant: the code trains both adapters at one
learning rate, so ``train.router_lr`` is not used) after every ``train.router_every`` =
``train.local_steps`` iterations, i.e. once per round, right before the sync; the code gives both
phases the same number of epochs (configs/feddpa.yaml: router_steps = local_steps), so a round
costs up to twice a FedAvg round. ``before_phase`` sets the pair's weights of each phase. Departures from the code: its
round 0 trains the global adapter only (here the local phase runs at round 0 too, against the
untrained global adapter, B = 0), a fresh optimiser per phase and round there (kept across rounds
here, as for every method), the instance of a prediction is its window's prefix (the paper's
instance is a prompt whose answer is generated after omega is fixed; a weight from the whole
window would let every prediction depend on the tokens after it), omega is clamped to
[0, max_weight]. Reference windows come from the user's ``feddpa_references`` stream, whose
state is checkpointed (``state_dict``).

FedDPA-F (``variant='F'``; the paper's sequential variant, absent from the released code, so its
details are choices documented in docs/methods-since-the-paper.md): the expert steps train the
global adapter alone (weights (1, 0), no second level) and the syncs average it, as FedIT; after
the last round (``after_training``) the global adapters are averaged once more (as for T), each
user's local adapter becomes a copy of that average and is fine-tuned for ``finetune_steps`` steps (default
``train.local_steps``) under (1 - alpha) global + alpha local, the global adapter frozen, on
the user's training sampler with a fresh AdamW at ``train.lr``; test time as FedDPA-T. Before the
fine-tune, evaluations use the global adapter alone. Round checkpoints precede the fine-tune, so a
resume runs it once. Under partial participation the closing average (either variant) is over the
last round's participants and every user, drawn in that round or not, downloads it (the server
hands the final global model to all); under privacy.dp it is one more noised release, which the
accountant plans (``aggregates_after_training``: train.rounds releases instead of train.rounds - 1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from comigs_dist.methods.base import AfterTrainingContext, Method, register_method
from comigs_dist.model.paired import PairedLoRA
from comigs_dist.model.roles import Role
from comigs_dist.options import opt
from comigs_dist.seeds import derive_seed


@torch.no_grad()
def compute_instance_weights(embeddings: torch.Tensor, references: torch.Tensor, max_weight: float = 0.5,
                             clamp: bool = True) -> torch.Tensor:
    """omega for each of B instances, (B,), or for each of T positions of B windows, (B, T):
    ``max_weight`` times the mean cosine similarity of the instance's embedding ((B, D), or (B, T, D)
    one per position) to the reference embeddings, (S, D) shared by every instance or (B, S, D) one
    set per instance (per window: every position of a window has its window's). A zero embedding is
    0-similar to everything. ``clamp`` keeps omega in [0, max_weight] (a negative mean cosine would
    subtract an adapter; the released code does not clamp; at the CPU scale a user's mean cosine can
    come out slightly negative, so the clamp does bind there)."""
    if embeddings.dim() not in (2, 3):
        raise ValueError(f"embeddings must be (instances, d) or (instances, positions, d); got shape "
                         f"{tuple(embeddings.shape)}")
    if references.dim() not in (2, 3) or references.shape[-1] != embeddings.shape[-1] or references.shape[-2] == 0 \
            or (references.dim() == 3 and references.shape[0] != embeddings.shape[0]):
        raise ValueError(f"references must be (S, d) or (instances, S, d) with S >= 1 and d = {embeddings.shape[-1]} "
                         f"for {embeddings.shape[0]} instances; got shape {tuple(references.shape)}")
    per_position = embeddings.dim() == 3
    if not 0.0 <= max_weight <= 1.0:
        raise ValueError(f"max_weight ({max_weight}) must be in [0, 1]")
    e = embeddings.double()
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = references.double()
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if r.dim() == 2:
        cos = e @ r.t()                                          # (B, S) or (B, T, S)
    elif per_position:
        cos = torch.einsum("btd,bsd->bts", e, r)                 # (B, T, S)
    else:
        cos = torch.einsum("bd,bsd->bs", e, r)                   # (B, S)
    omega = max_weight * cos.mean(dim=-1)
    if clamp:
        omega = omega.clamp(0.0, max_weight)
    return omega.to(embeddings.dtype if embeddings.is_floating_point() else torch.float32)


def compute_pair_weights(omega: torch.Tensor, weighted: str = "local") -> torch.Tensor:
    """(..., 2) weights of (global, local) from omega (B,) or (B, T): 'local' (the default) gives the
    local adapter omega and the global one 1 - omega; 'global' (the released inference script) the
    reverse."""
    if weighted == "local":
        return torch.stack([1.0 - omega, omega], dim=-1)
    if weighted == "global":
        return torch.stack([omega, 1.0 - omega], dim=-1)
    raise ValueError(f"weighted ({weighted!r}) must be 'local' (omega to the local adapter) or 'global' "
                     f"(the released code)")


@dataclass
class FedDPAOptions:
    alpha: float = opt(0.5, "Weight of the local adapter while it trains (the global one gets 1 - alpha); "
                       "the released code's local_weight.")
    max_weight: float = opt(0.5, "omega = max_weight * mean cosine similarity to the reference windows "
                            "(the released code: 0.5).")
    n_references: int = opt(5, "Training windows drawn per test window for its instance-wise weight "
                            "(the released code: 5).")
    instance_weights: bool = opt(True, "Weigh the two adapters per prediction (omega of its prefix); false: "
                                 "evaluate with the training mix (1 - alpha, alpha).")
    weighted: Literal["local", "global"] = opt("local", "Which adapter omega weighs at test time: 'local' "
                                               "(default; the global one gets 1 - omega) or 'global' (the released "
                                               "inference script).")
    variant: Literal["T", "F"] = opt("T", "How the local adapter learns: 'T' (default; every round, after the global "
                                     "one) or 'F' (the rounds train the global adapter alone; after the last round "
                                     "each local adapter starts as a copy of the averaged global one and is "
                                     "fine-tuned with the global one frozen).")
    finetune_steps: int | None = opt(None, "FedDPA-F: optimiser steps of each user's local fine-tune after the last "
                                     "round, on its training batches at train.lr; null: train.local_steps (one "
                                     "local phase of FedDPA-T).")


@dataclass
class FedDPAState:
    """What FedDPA keeps for one user: its adapter pairs, the sampler of reference windows and,
    under FedDPA-F, whether the local fine-tune has run and its per-step losses."""
    pairs: list
    references: object   # a BatchSampler over the user's training split
    finetuned: bool = False
    finetune_losses: list = field(default_factory=list)


@register_method("feddpa")
class FedDPA(Method):
    description = ("FedDPA-T: global adapter (trained alone, averaged) + local adapter (trained on the frozen "
                   "global one), instance-wise weights at test time; method_options.variant=F: FedDPA-F (local "
                   "adapter fine-tuned from the global one after the last round)")
    paper_row = "Yang et al., NeurIPS 2024 (since the paper)"
    Options = FedDPAOptions
    accepts_comm_groups = False  # one global adapter for every user
    router = "alternating_train"  # the second level: the global adapter's phase, on training batches

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        o, t = cls(cfg).options, cfg.train
        errors = []
        if not 0.0 <= o.alpha <= 1.0:
            errors.append(f"method_options.alpha ({o.alpha}) must be in [0, 1] (the code: 0.5)")
        if not 0.0 <= o.max_weight <= 1.0:
            errors.append(f"method_options.max_weight ({o.max_weight}) must be in [0, 1] (the code: 0.5)")
        if o.n_references < 1:
            errors.append(f"method_options.n_references ({o.n_references}) must be >= 1 (the code: 5)")
        if o.variant == "F":
            return errors + cls._variant_f_errors(o, cfg)
        if o.finetune_steps is not None:
            errors.append(f"method_options.finetune_steps ({o.finetune_steps}) applies to FedDPA-F only, but "
                          f"method_options.variant is 'T' (the local adapter trains every round); set "
                          f"method_options.variant=F or leave finetune_steps out")
        if t.router_every != t.local_steps or t.router_steps < 1:
            errors.append(f"train.router_every ({t.router_every}) must equal train.local_steps ({t.local_steps}) "
                          f"and train.router_steps ({t.router_steps}) be >= 1 for feddpa: the global adapter "
                          f"trains once per round, after the local one and right before the sync, for "
                          f"router_steps steps; set train.router_every={t.local_steps} "
                          f"train.router_steps={t.local_steps} (configs/feddpa.yaml)")
        return errors

    @staticmethod
    def _variant_f_errors(o: FedDPAOptions, cfg) -> list[str]:
        steps = o.finetune_steps
        if steps is not None and steps < 0:
            return [f"method_options.finetune_steps ({steps}) must be >= 0 for variant F (0: each local adapter "
                    f"stays a copy of the global one); leave it out for train.local_steps ({cfg.train.local_steps})"]
        return []

    aggregates_after_training = True  # the evaluated global adapter is the last round's average (T and F)

    @property
    def fine_tunes(self) -> bool:
        """FedDPA-F: the local adapter learns only after the last round."""
        return self.options.variant == "F"

    def adapter_spec(self, cfg, user_idx, spec):
        return replace(spec, n_experts=1, n_generalists=1, top_k=1, routed=False, paired="fixed")

    def prepare_user(self, user) -> None:
        from comigs_dist.data import BatchSampler
        pairs = [m for m in user.model.adapters.modules() if isinstance(m, PairedLoRA)]
        seed = derive_seed(user.cfg.seed, user.user_idx, "feddpa_references")
        user.method_state = FedDPAState(pairs, BatchSampler(user.data.train, user.cfg.train.seq_len, seed))
        user.model.eval_context = lambda x: self._instance_weights(user, x)
        if user.router_opt is not None:  # the code trains both adapters at one learning rate
            for group in user.router_opt.param_groups:
                group["lr"] = user.cfg.train.lr

    def is_shared(self, tag) -> bool:
        return tag.role == Role.GENERALIST     # the global adapter

    def trains_in(self, phase, tag) -> bool:
        if self.fine_tunes:  # F: the expert steps train the global adapter alone; no second level
            return phase == "expert" and tag.role == Role.GENERALIST
        if phase == "expert":
            return tag.role == Role.SPECIALIST  # (a) the local adapter, the global one frozen
        return tag.role == Role.GENERALIST      # (b) the global adapter, alone

    def before_phase(self, user, phase: str) -> None:
        a = self.options.alpha
        weights = (1.0 - a, a) if phase == "expert" and not self.fine_tunes else (1.0, 0.0)
        for pair in user.method_state.pairs:
            pair.set_weights(*weights)

    # -- FedDPA-F: after the last round ------------------------------------------------------------
    def after_training(self, ctx: AfterTrainingContext) -> None:
        """Average the global adapters once more (the last round's participants' local steps; every
        user downloads the average): the model evaluated holds the averaged global adapter. Then,
        FedDPA-F only: copy each user's averaged global adapter into its local one, and fine-tune
        the local adapter on the user's training batches under (1 - alpha) global + alpha local,
        the global one frozen, with a fresh optimiser. The copy makes the first step's model the
        global model itself ((1 - alpha) g + alpha g = g)."""
        ctx.aggregate()
        if not self.fine_tunes:
            return
        a = self.options.alpha
        for user in ctx.users:
            st = user.method_state
            n_steps = self.options.finetune_steps
            n_steps = user.cfg.train.local_steps if n_steps is None else n_steps
            with torch.no_grad():
                for pair in st.pairs:
                    pair.second.lora_A.copy_(pair.first.lora_A)
                    pair.second.lora_B.copy_(pair.first.lora_B)
                    pair.set_weights(1.0 - a, a)
            params = user.model.set_trainable(lambda tag: tag.role == Role.SPECIALIST)
            opt = ctx.optimizer(params)
            st.finetune_losses = [ctx.step(user, opt) for _ in range(n_steps)]
            st.finetuned = True

    # -- test time -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _instance_weights(self, user, x: torch.Tensor):
        """Around one evaluation batch: the (global, local) weights of each window, (B, 2), or of
        each of its positions, (B, T, 2) (instance-wise omega), then cleared."""
        o, st = self.options, user.method_state
        n = x.shape[0]
        if self.fine_tunes and not st.finetuned:  # F before its fine-tune: the global adapter alone (FedIT)
            weights = torch.tensor([[1.0, 0.0]]).expand(n, 2)
        elif o.instance_weights:
            weights = compute_pair_weights(self.omega(user, x), o.weighted)
        else:
            weights = torch.tensor([[1.0 - o.alpha, o.alpha]]).expand(n, 2)
        for pair in st.pairs:
            pair.set_row_weights(weights.to(x.device))
        try:
            yield weights
        finally:
            for pair in st.pairs:
                pair.set_row_weights(None)

    @torch.no_grad()
    def omega(self, user, x: torch.Tensor) -> torch.Tensor:
        """omega at each position of each window of x (B, T), (B, T): the final hidden state there
        (causal: from the tokens up to it) against the last token's of n_references training
        windows drawn for the window, all with the local adapter alone."""
        o, st = self.options, user.method_state
        n, s = x.shape[0], o.n_references
        positions = self._local_hidden(user, x)        # (B, T, D)
        references = []
        for _ in range(s):                             # one reference per window per pass: bounded memory
            refs, _ = st.references.sample(n, x.device)
            references.append(self._local_hidden(user, refs)[:, -1])
        return compute_instance_weights(positions.float(), torch.stack(references, dim=1).float(), o.max_weight)

    @staticmethod
    def _local_hidden(user, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, D) of x through the local adapter alone."""
        only_local = torch.tensor([[0.0, 1.0]], device=x.device).expand(x.shape[0], 2)
        pairs = user.method_state.pairs
        for pair in pairs:
            pair.set_row_weights(only_local)
        try:
            return user.model.hidden(x)
        finally:
            for pair in pairs:
                pair.set_row_weights(None)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, user) -> dict:
        st = user.method_state
        state = {"references": st.references.state_dict()}
        if self.fine_tunes:  # round checkpoints precede the fine-tune; final.pt records it
            state.update(finetuned=st.finetuned, finetune_losses=list(st.finetune_losses))
        return state

    def load_state_dict(self, user, state: dict) -> None:
        st = user.method_state
        if "references" in state:
            st.references.load_state_dict(state["references"])
        st.finetuned = bool(state.get("finetuned", False))
        st.finetune_losses = list(state.get("finetune_losses", []))

    def results(self, user) -> dict:
        """FedDPA-F: the fine-tune's steps and per-step training losses."""
        if not self.fine_tunes:
            return {}
        losses = user.method_state.finetune_losses
        return {"feddpa_finetune": {"steps": len(losses), "losses": list(losses)}}
