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
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

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
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__qualname__} and {cls.__qualname__})")
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
    """What a method needs at the end of a round to aggregate: its shared parameters by group,
    a communication handle (``comm.mean(group, tensors)`` and friends), and where it is.
    ``evaluate_valid()`` returns the user's current validation loss (PCL's trust weights);
    ``n_train_tokens`` is the size of the user's training split (data-size weighted averages);
    ``model`` is the user's ``UserModel`` (tags of every parameter, for methods that aggregate
    tensors outside the standard groups)."""
    shared: dict[str, list[tuple[str, Any]]]
    comm: Any
    round_idx: int
    user_idx: int
    n_users: int
    evaluate_valid: Callable[[], float] | None = None
    n_train_tokens: int = 0
    model: Any = None


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
LEAK_HELP = f"Reproduce the reference code's gradient leakage between the two levels (baselines.md 1.6): {LEAK}."


@dataclass
class AlternatingOptions:
    """Options of a method whose router alternates with the experts (Algorithm 1)."""
    reference_quirks: bool = opt(False, LEAK_HELP)


class Method:
    """Defaults: CoMiGS-1G1S (routed experts, router alternating on validation data, generalists
    averaged over every user each round). Override the class attributes or hooks that differ."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper_row: ClassVar[str] = ""                  # where the paper reports it
    Options: ClassVar[type] = NoOptions             # the method's own options (method_options.<key>)
    routed: ClassVar[bool] = True                  # False: every token averages all experts (no router)
    router_training: ClassVar[str] = "alternating"  # "alternating" | "joint" | "none"
    router_split: ClassVar[str] = "valid"           # split the router trains on when alternating
    trains: ClassVar[bool] = True                   # False: evaluate the base only (Pretrained)
    initial_sync: ClassVar[bool] = True             # start shared parameters from one init (user 0's)
    accepts_comm_groups: ClassVar[bool] = True      # comm.groups may split the generalists into groups

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

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        """Method-specific configuration problems (empty when the config fits the method).
        ``cfg.method_options`` has been checked against ``Options`` already."""
        return []

    def adapter_spec(self, cfg, user_idx: int, spec):
        """The adapters of one user's model (an ``AdapterSpec``); by default what the configuration
        says. Methods that fix the architecture (one LoRA of a matched rank, no router, all experts
        generalists, ...) return an edited copy (``dataclasses.replace``)."""
        return spec

    def prepare_model(self, model, user_idx: int) -> None:
        """Called once after the user's model is built, before anything trains or is shared
        (e.g. start heterogeneous-rank adapters from one global initialisation)."""
        return None

    # -- roles ---------------------------------------------------------------------------------
    def is_shared(self, tag: ParamTag) -> bool:
        """Which parameters are aggregated across users."""
        return share_generalists(tag)

    def own_aggregated(self, model) -> list[tuple[str, Any]]:
        """(name, tensor) of what ``aggregate`` sends outside ``is_shared`` (tensors whose shapes
        differ between users). The guard checks them with the shared ones before every
        aggregation; under guard.nan=skip the method must then leave this user's values out
        (``ctx.comm.contributing`` is False)."""
        return []

    def trains_in_expert_phase(self, tag: ParamTag) -> bool:
        if self.router_training == "joint":
            return True
        return is_adapter(tag)

    def trains_in_router_phase(self, tag: ParamTag) -> bool:
        return self.router_training == "alternating" and is_router(tag)

    @property
    def leaks_gradients(self) -> bool:
        """The reference's leak between router and expert steps (baselines.md 1.6, a [DIFF]-bug),
        reproduced under ``method_options.reference_quirks`` by the methods whose router alternates."""
        return self.router_training == "alternating" and bool(getattr(self.options, "reference_quirks", False))

    def requires_grad_in(self, phase: str) -> Callable[[ParamTag], bool]:
        """Which parameters receive gradients in a phase ('expert' or 'router'): the ones the phase
        trains (the paper: the other level is frozen and keeps no gradient), or, when the method
        reproduces the reference's leak, both levels' trainable parameters. The phase's optimiser
        steps and clears only its own, so the other level's gradients accumulate."""
        own = self.trains_in_expert_phase if phase == "expert" else self.trains_in_router_phase
        if not self.leaks_gradients:
            return own
        return lambda tag: self.trains_in_expert_phase(tag) or self.trains_in_router_phase(tag)

    # -- groups ----------------------------------------------------------------------------------
    def sharing_groups(self, n_users: int) -> dict[str, list[int]]:
        """Process groups the method communicates on (created once, before the first round): the
        groups of ``comm.groups``, or one group ``generalists`` of every user."""
        if not self._configured_groups():
            return {DEFAULT_GROUP: list(range(n_users))}
        return {name: list(users) for name, users in self.sharing_plan(n_users).members.items()}

    def group_of(self, tag: ParamTag, user_idx: int) -> str:
        """The group in which user ``user_idx`` averages a shared parameter: with ``comm.groups``,
        the group listing that user and expert (the attention LoRA: the user's attention group);
        otherwise ``generalists``."""
        if not self._configured_groups():
            return DEFAULT_GROUP
        plan = self.sharing_plan()
        if tag.kind == "attn":
            return plan.attention[user_idx]
        if tag.kind == "expert" and (user_idx, tag.expert) in plan.experts:
            return plan.experts[(user_idx, tag.expert)]
        raise ValueError(f"method {self.name!r} shares {tag.kind} parameter {tag} of user {user_idx}, which no "
                         f"group of comm.groups holds; only generalist experts and the attention LoRA can be grouped")

    def generalist_counter(self) -> Callable[[int], int]:
        """user -> how many generalist experts the method gives that user (its adapter_spec)."""
        from comigs_dist.model import adapter_spec_for
        users, cfg = self.run_users(), self.cfg
        return lambda u: self.adapter_spec(cfg, u, adapter_spec_for(cfg, users[u], self.routed)).n_generalists

    def sharing_plan(self, n_users: int | None = None) -> SharingPlan:
        """comm.groups resolved for the run's users (built once)."""
        if getattr(self, "_plan", None) is None:
            n = n_users if n_users is not None else len(self.run_users())
            groups = self.cfg.comm.groups if self.cfg is not None else []
            self._plan = build_plan(groups, n, self.generalist_counter(),
                                    f"moe.n_generalists with method {self.name}")
        return self._plan

    def _configured_groups(self) -> bool:
        return self.cfg is not None and bool(self.cfg.comm.groups)

    # -- per-step hooks (no-ops by default) -----------------------------------------------------
    def extra_loss(self, model) -> Any:
        """A term added to the expert-phase loss (e.g. a pruning regulariser); None for nothing."""
        return None

    def reduce_gradients(self, comm, params: list) -> None:
        """Called after the expert-phase backward, before the optimiser step (e.g. data-parallel
        averaging of every gradient for Centralized)."""
        return None

    @property
    def reduces_gradients(self) -> bool:
        """Whether gradients reach a collective (the method overrides ``reduce_gradients``): the
        guard then checks them before every such step."""
        return type(self).reduce_gradients is not Method.reduce_gradients

    def after_expert_step(self, model) -> None:
        """Called after every expert optimiser step (e.g. re-apply rank masks)."""
        return None

    # -- state beyond the parameters (checkpoints) -----------------------------------------------
    def state_dict(self) -> dict:
        """What the method keeps between rounds besides the model (HetLoRA: pruned ranks and the
        global LoRA); saved with every checkpoint. Tensors, numbers, strings and lists only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    # -- description -----------------------------------------------------------------------------
    @classmethod
    def option_rows(cls) -> list[tuple[str, str, str]]:
        """(key, default, help) of every option of the method, for --help and --methods."""
        return describe_options(cls.Options, "method_options.") if dataclasses.fields(cls.Options) else []

    # -- aggregation -----------------------------------------------------------------------------
    def aggregate(self, ctx: SyncContext) -> None:
        """End of round: replace every shared parameter by its mean over its group (weight 1/N).
        Groups in sorted order: users in several groups meet in each collective in the same order."""
        for group in sorted(ctx.shared):
            ctx.comm.mean(group, [p.data for _, p in ctx.shared[group]])
