"""The Method base class, its hooks and defaults, and the registry.

A method is a point in four knobs (baselines.md section 4): the experts and whether a router
mixes them; which parameters are shared (and so aggregated); how the router trains (not at all,
jointly with the experts, or alternating on a split of its own, Algorithm 1); and the
aggregation operator (the mean over the group by default). Subclasses override only what differs.
A method's own options are a dataclass ``Options`` on the class, filled from the configuration's
``method_options`` mapping (unknown keys are configuration errors).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Collection, Sequence

from comigs_dist.groups import DEFAULT_GROUP, SharingPlan, build_plan
from comigs_dist.model.roles import ParamTag, Role
from comigs_dist.options import build_options, describe_options, opt

if TYPE_CHECKING:  # never at run time: the config package imports this registry
    from comigs_dist.config.users import UserSpec

_REGISTRY: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Class decorator: make a Method available as ``method=<name>``; names are unique."""
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__qualname__} and "
                             f"{cls.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def known_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type["Method"]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return _REGISTRY[name]


def get_method(name: str, cfg=None, users: Sequence[UserSpec] | None = None) -> "Method":
    """An instance of the named method, with its options read from ``cfg.method_options``;
    ``users``: every user's configured values (``config.resolve_users``), for the hooks that
    look across users (sharing groups, a rank common to all)."""
    return method_class(name)(cfg, users)


@dataclass
class SyncContext:
    """What a method's ``sync`` works with at the start of a round: the round (0 = the start, before
    any local step), the communication handle and the rank's users that take part. Each user
    carries its shared parameters by group (``user.shared``: each group's parameters are views of
    one flat buffer), its model, its own state (``user.method_state``), its training-split size
    and whether it contributes (``user.contributing``: False when the guard made it sit the round
    out, or under partial participation when it did not train in the round before; it still
    receives the others' aggregate if it takes part in this round: ``downloads``)."""
    round_idx: int
    comm: Any
    users: list
    evaluate_valid: Callable[[Any], float] | None = None   # user -> its validation loss now
    participants: Collection[int] | None = None  # the users that take part in the round; None: every user

    def downloads(self, user) -> bool:
        """Whether ``user`` takes part in this round and so receives its aggregate (a user that
        does not leaves the sync exactly as it entered it: train.sync puts its values back)."""
        return self.participants is None or user.user_idx in self.participants

    def groups(self) -> list[str]:
        """Every group a user of this rank shares parameters in, sorted: users in several groups
        meet the others in each group's collective in the same order."""
        return sorted({g for u in self.users for g in u.shared})

    def tensors(self, group: str) -> dict[int, list]:
        """The rank's users' shared parameters of one group, by user."""
        return {u.user_idx: [p.data for _, p in u.shared[group]] for u in self.users if group in u.shared}

    @property
    def skip(self) -> set[int]:
        """Users that sit this round's means out (guard.nan=skip)."""
        return {u.user_idx for u in self.users if not u.contributing}


@dataclass
class AfterTrainingContext:
    """What a method's ``after_training`` works with once the last round is done: the rounds done,
    the rank's users, and three services of the run loop, so that the method neither talks to
    torch.distributed nor re-implements a training step. ``aggregate()`` runs one more sync of the
    shared parameters as a round's start would (every rank together; the last round's
    participants' local steps averaged), which every user downloads; ``optimizer(params)`` is a
    fresh AdamW at ``train.lr`` with the run's betas and weight decay; ``step(user, optimizer)``
    takes one optimiser step of whatever the user's model has set trainable, on a batch from the
    user's training sampler, and returns its loss (a non-finite loss is handled as ``guard.nan``
    says)."""
    rounds: int
    users: list
    aggregate: Callable[[], None]
    optimizer: Callable[[list], Any]
    step: Callable[[Any, Any], float]


# sharing patterns (baselines.md section 2), as predicates on parameter tags
def share_generalists(tag: ParamTag) -> bool:
    """'expert_0': attention LoRA and the generalist experts (CoMiGS-1G1S/1GXS/-tr, pFedMoE)."""
    return tag.role == Role.GENERALIST


def share_experts(tag: ParamTag) -> bool:
    """'experts': every LoRA, routers stay local (FedAvg, FedAvg-MoE, CoMiGS-2G)."""
    return tag.kind in ("attn", "expert")


def share_nothing(tag: ParamTag) -> bool:
    return False


def share_all(tag: ParamTag) -> bool:
    """'all': every trainable tensor, routers included."""
    return True


def is_router(tag: ParamTag) -> bool:
    return tag.role == Role.ROUTER


def is_adapter(tag: ParamTag) -> bool:
    return tag.role != Role.ROUTER


@dataclass
class NoOptions:
    """A method without options of its own."""


LEAK = ("the expert steps' backward passes also write router gradients, which pile up until the next router "
        "phase (its first step applies them with its validation gradient), and the router steps' backward "
        "passes write expert gradients, which the next expert step adds to its training gradient")
LEAK_HELP = (f"Reproduce the reference code's gradient leakage between the two levels (docs/methods.md, "
             f"'reference_quirks'): {LEAK}.")


@dataclass
class AlternatingOptions:
    """Options of a method whose router alternates with the experts (Algorithm 1)."""
    reference_quirks: bool = opt(False, LEAK_HELP)


ROUTER_MODES = ("none", "joint", "alternating_valid", "alternating_train")


class Method:
    """Defaults: CoMiGS-1G1S (routed experts, router alternating on validation data, generalists
    averaged over every user each round). Override the class attributes or hooks that differ.

    Hooks that concern one user take its state (``user``: ``user.model``, ``user.user_idx``,
    ``user.method_state``, ...); ``sync`` takes the rank's users together, since a rank's users
    meet the others in one collective per group."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper_row: ClassVar[str] = ""                   # where the paper reports it
    Options: ClassVar[type] = NoOptions              # the method's own options (method_options.<key>)
    # how the router trains: 'none' (no router: every token averages the experts), 'joint' (with the
    # experts, on the training loss), 'alternating_valid' (Algorithm 1: its own steps every tau local
    # iterations on validation batches, experts frozen) or 'alternating_train' (the same on fresh
    # training batches, the -tr variants)
    router: ClassVar[str] = "alternating_valid"
    trains: ClassVar[bool] = True                    # False: evaluate the base only (Pretrained)
    accepts_comm_groups: ClassVar[bool] = True       # comm.groups may split the generalists into groups
    full_participation_only: ClassVar[str] = ""      # why train.participation < 1 is refused ("" = accepted)
    # why privacy.dp / privacy.secure_agg are refused ("" = accepted: the method's traffic after round 0
    # is Comm.mean of its shared groups, which privacy covers; docs/privacy.md)
    refuses_privacy: ClassVar[str] = ""
    # whether after_training runs one more aggregation (a release of the last round's local steps:
    # privacy's accountant then plans train.rounds of them instead of train.rounds - 1)
    aggregates_after_training: ClassVar[bool] = False
    # False: the shared tensors travel once, for the common start (round 0), and never after (the
    # local baselines): nothing is aggregated, so a round's analytic traffic is 0
    aggregates: ClassVar[bool] = True

    def __init__(self, cfg=None, users: Sequence[UserSpec] | None = None):
        self.cfg = cfg
        self.users = list(users) if users is not None else None
        if cfg is None:
            self.options = self.Options()
        else:
            self.options = build_options(self.Options, cfg.method_options, f"method {cfg.method!r}")

    def run_users(self) -> list[UserSpec]:
        """Every user's configured values (given to ``get_method``)."""
        if self.users is None:
            raise ValueError(f"method {self.name!r} needs every user's values here; build it with "
                             f"get_method(name, cfg, resolve_users(cfg, n_users))")
        return self.users

    # -- what the router mode implies ----------------------------------------------------------
    @property
    def routed(self) -> bool:
        """Whether the users' mixtures have a router (else every token averages the experts)."""
        return self.router != "none"

    @property
    def router_split(self) -> str | None:
        """The split the router's own steps draw from ('valid', 'train'), or None without them."""
        return {"alternating_valid": "valid", "alternating_train": "train"}.get(self.router)

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        """Method-specific configuration problems (empty when the config fits the method).
        ``cfg.method_options`` has been checked against ``Options`` already."""
        return []

    @classmethod
    def privacy_refusal(cls, options) -> str:
        """Why the method, under its parsed ``options``, refuses privacy.dp / privacy.secure_agg
        ("" = it accepts them): ``refuses_privacy`` unless an option changes the answer."""
        return cls.refuses_privacy

    @classmethod
    def participation_errors(cls, cfg, n_users: int, draw: Callable[[int], frozenset]) -> list[str]:
        """Problems of this method with the run's partial participation, known before it starts:
        ``draw(round)`` gives the users that take part in a round (the seeded draw of train.sync).
        Called only when fewer than ``n_users`` take part in a round and the method accepts it."""
        return []

    def adapter_spec(self, cfg, user_idx: int, spec):
        """The adapters of one user's model (an ``AdapterSpec``); by default what the configuration
        says. Methods that fix the architecture (one LoRA of a matched rank, no router, all experts
        generalists, ...) return an edited copy (``dataclasses.replace``)."""
        return spec

    def prepare_user(self, user) -> None:
        """Called once per user after its model is built, before anything trains or is shared
        (e.g. start heterogeneous-rank adapters from one global initialisation); what the method
        keeps for the user between rounds goes into ``user.method_state``."""
        return None

    # -- roles ---------------------------------------------------------------------------------
    def is_shared(self, tag: ParamTag) -> bool:
        """Which parameters are aggregated across users."""
        return share_generalists(tag)

    def trains_in(self, phase: str, tag: ParamTag) -> bool:
        """Whether a parameter trains in a phase: 'expert' (the adapters; the router too when it
        trains jointly) or 'router' (the router's own steps, when it alternates)."""
        if phase == "expert":
            return self.router == "joint" or is_adapter(tag)
        return self.router_split is not None and is_router(tag)

    @property
    def leaks_gradients(self) -> bool:
        """The reference's leak between router and expert steps (baselines.md 1.6, a [DIFF]-bug),
        reproduced under ``method_options.reference_quirks`` by the methods whose router alternates."""
        return self.router_split is not None and bool(getattr(self.options, "reference_quirks", False))

    def requires_grad_in(self, phase: str) -> Callable[[ParamTag], bool]:
        """Which parameters receive gradients in a phase: the ones the phase trains (the paper: the
        other level is frozen and keeps no gradient), or, when the method reproduces the
        reference's leak, both levels' trainable parameters. The phase's optimiser steps and clears
        only its own, so the other level's gradients accumulate."""
        if not self.leaks_gradients:
            return lambda tag: self.trains_in(phase, tag)
        return lambda tag: self.trains_in("expert", tag) or self.trains_in("router", tag)

    # -- groups ----------------------------------------------------------------------------------
    def sharing_groups(self, n_users: int) -> dict[str, list[int]]:
        """Process groups the method communicates on (created once, before the first round): the
        groups of ``comm.groups``, or one group ``generalists`` of every user."""
        if not configured_groups(self):
            return {DEFAULT_GROUP: list(range(n_users))}
        return {name: list(users) for name, users in sharing_plan(self, n_users).members.items()}

    def group_of(self, tag: ParamTag, user_idx: int) -> str:
        """The group in which user ``user_idx`` averages a shared parameter: with ``comm.groups``,
        the group listing that user and expert (the attention LoRA: the user's attention group);
        otherwise ``generalists``."""
        if not configured_groups(self):
            return DEFAULT_GROUP
        plan = sharing_plan(self)
        if tag.kind == "attn":
            return plan.attention[user_idx]
        if tag.kind == "expert" and (user_idx, tag.expert) in plan.experts:
            return plan.experts[(user_idx, tag.expert)]
        raise ValueError(f"method {self.name!r} shares {tag.kind} parameter {tag} of user {user_idx}, which no "
                         f"group of comm.groups holds; only generalist experts and the attention LoRA can be grouped")

    # -- per-step hooks (no-ops by default) -----------------------------------------------------
    def before_phase(self, user, phase: str) -> None:
        """Called before the forward passes of every optimiser step of a phase ('expert' or
        'router'), once the phase's parameters require gradients: a method whose forward differs
        between its phases sets it up here (FedDPA: which of its two adapters the forward adds)."""
        return None

    def extra_loss(self, user) -> Any:
        """A term added to the user's expert-phase loss (a pruning regulariser, FedProx's proximal
        term); None for nothing."""
        return None

    def reduce_gradients(self, comm, users: list) -> None:
        """Called after the expert-phase backward of the rank's users, before their optimiser steps
        (e.g. data-parallel averaging of every gradient for Centralized)."""
        return None

    @property
    def reduces_gradients(self) -> bool:
        """Whether gradients reach a collective (the method overrides ``reduce_gradients``): the
        guard then checks them before every such step."""
        return type(self).reduce_gradients is not Method.reduce_gradients

    def after_expert_step(self, user) -> None:
        """Called after every expert optimiser step of a user (e.g. re-apply rank masks)."""
        return None

    # -- communication ---------------------------------------------------------------------------
    def sync(self, ctx: SyncContext) -> None:
        """Every round, the first included. Round 0 (before any local step): every shared parameter
        starts from its group's first member's initialisation (one common start). Later rounds:
        every shared parameter becomes its mean over its group (weight 1/N), the users that sit the
        round out (guard.nan=skip) left out of the mean; groups in sorted order."""
        for group in ctx.groups():
            if ctx.round_idx == 0:
                ctx.comm.broadcast(group, ctx.tensors(group))
            else:
                ctx.comm.mean(group, ctx.tensors(group), skip=ctx.skip)

    def payloads(self, user, round_idx: int | None = None) -> dict[str, tuple]:
        """Per group what the user's sync sends: (elements, the group's members or None for the
        topology's[, the collective's kind: 'all2all' for a gather, whatever comm.mode says; 'sum'
        for a sum without a contributor count]), or a list of them, one per collective
        (``dist.collective_bytes``).
        ``round_idx``: the sync of that round (nothing where the method does not aggregate then);
        None: a round in which it aggregates (results.json's analytic figure). By default its
        shared groups as ``wire`` lays them out: every round but round 0, whose common start is not
        counted, and never for a method that does not aggregate (``train.analytic_round_bytes``
        turns this into bytes)."""
        return self.wire({**{group: sum(p.numel() for _, p in params) for group, params in user.shared.items()},
                          **self.own_sizes(user.model)}, round_idx)

    def own_sizes(self, model) -> dict[str, int]:
        """Elements per group that the method's own collectives send besides its shared tensors,
        from a user's model alone (HetLoRA, FlexLoRA: their factors zero-padded to the largest
        rank); ``wire`` receives them with the shared sizes, from ``payloads`` and from ``analyze
        overhead`` alike, and must take them out before the base class's ``wire`` (which would
        price them as means of shared groups). None by default."""
        return {}

    def wire(self, shared: dict[str, int], round_idx: int | None = None) -> dict[str, tuple]:
        """``payloads`` from the shared elements per group alone (what ``analyze overhead`` knows
        without a run): the same tuples. A method whose collective is not the mean of its shared
        tensors every round says so here (PCL: a gather with a flag, in mixing rounds only)."""
        if round_idx == 0 or not self.aggregates:
            return {}
        return {group: (numel, None) for group, numel in shared.items()}

    def own_aggregated(self, user) -> list[tuple[str, Any]]:
        """(name, tensor) of what ``sync`` sends for a user outside ``is_shared`` (tensors whose
        shapes differ between users). The guard checks them with the shared ones before every
        round; under guard.nan=skip the method must then leave a non-contributing user out."""
        return []

    # -- after the last round ----------------------------------------------------------------------
    def after_training(self, ctx: AfterTrainingContext) -> None:
        """Called once on every rank together after the last round, before the final evaluation
        and the final checkpoint (only for methods that train): a closing stage of the method's
        own (FedDPA-F: one more aggregation, then every user's local adapter fine-tuned). Round
        checkpoints are all written before it, so a resumed run reaches it once, from the restored
        state, and final.pt holds its result (a run resumed from final.pt skips it). A method that
        aggregates here says so in ``aggregates_after_training``. Nothing by default."""
        return None

    def after_restore(self, comm, users: list) -> None:
        """Called on every rank together once a resume has restored its users (from a round
        checkpoint or final.pt), before anything else: rebuild what the checkpoint holds only as
        a description, such as the process groups of learned sharing groups (created collectively).
        Nothing by default."""
        return None

    # -- state beyond the parameters (checkpoints) -----------------------------------------------
    def state_dict(self, user) -> dict:
        """What the method keeps for a user between rounds besides its model (HetLoRA: pruned ranks
        and the global LoRA); saved with every checkpoint. Tensors, numbers, strings and lists only."""
        return {}

    def load_state_dict(self, user, state: dict) -> None:
        return None

    def results(self, user) -> dict:
        """Entries the method adds to the user's results.json row (learned sharing groups: the
        groups chosen and why); JSON values only."""
        return {}


def configured_groups(method: Method) -> bool:
    """Whether ``comm.groups`` splits the generalists into groups of the configuration's own."""
    return method.cfg is not None and bool(method.cfg.comm.groups)


def generalist_counter(method: Method) -> Callable[[int], int]:
    """user -> how many generalist experts the method gives that user (its adapter_spec)."""
    from comigs_dist.model import adapter_spec_for
    users, cfg = method.run_users(), method.cfg
    return lambda u: method.adapter_spec(cfg, u, adapter_spec_for(cfg, users[u], method.routed)).n_generalists


def sharing_plan(method: Method, n_users: int | None = None) -> SharingPlan:
    """``comm.groups`` resolved for the run's users (built once per method instance)."""
    if getattr(method, "_plan", None) is None:
        n = n_users if n_users is not None else len(method.run_users())
        groups = method.cfg.comm.groups if method.cfg is not None else []
        method._plan = build_plan(groups, n, generalist_counter(method),
                                  f"moe.n_generalists with method {method.name}")
    return method._plan


def option_rows(cls: type[Method]) -> list[tuple[str, str, str]]:
    """(key, default, help) of every option of a method, for --help and --methods."""
    return describe_options(cls.Options, "method_options.") if dataclasses.fields(cls.Options) else []
