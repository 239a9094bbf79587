"""Per-user values, resolved once: ``resolve_users(cfg, n_users)`` reads every option that may be
a per-user list (or one value for everyone) into one typed ``UserSpec`` per user.

Owns which options are per-user (``PER_USER_KEYS``) and how many users their lists imply. Knows
nothing of methods: a method's changes to a user's architecture (``Method.adapter_spec``) apply
on top of the ``UserSpec``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comigs_dist.config.schema import ConfigError
from comigs_dist.options import get_dotted

if TYPE_CHECKING:
    from comigs_dist.config.schema import RunConfig

PER_USER_KEYS = ("moe.n_experts", "moe.n_generalists", "lora.rank", "data.train_tokens", "data.share",
                 "data.categories")


@dataclass(frozen=True)
class UserSpec:
    """What the configuration says about one user (its method may change the architecture on top:
    ``Method.adapter_spec``)."""
    user_idx: int
    n_experts: int          # moe.n_experts: experts per MLP layer
    n_generalists: int      # moe.n_generalists as given (validated <= n_experts, never clamped)
    top_k: int              # moe.top_k, default min(2, n_experts)
    lora_rank: int          # lora.rank of every MLP expert
    train_tokens: int       # data.train_tokens (embedded corpus only)
    share: float            # data.share: fraction of its training split the user trains on
    category: str | None    # data.categories[user_idx]; None when data.categories is empty (not checked)


def list_lengths(cfg: RunConfig) -> dict[str, int]:
    """key -> length of every per-user option given as a list."""
    # data.categories empty means "not checked", not "no users"
    return {k: len(v) for k in PER_USER_KEYS
            if isinstance(v := get_dotted(cfg, k), list) and (v or k != "data.categories")}


def inferred_n_users(cfg: RunConfig) -> int | None:
    """n_users as configured, or as implied by the per-user lists, or None."""
    if cfg.n_users is not None:
        return cfg.n_users
    lengths = set(list_lengths(cfg).values())
    return lengths.pop() if len(lengths) == 1 else None


def _pick(value: Any, user_idx: int) -> Any:
    return value[user_idx] if isinstance(value, list) else value


def user_spec(cfg: RunConfig, user_idx: int) -> UserSpec:
    """One user's values; IndexError when a per-user list is too short (``resolve_users`` checks
    the lengths first and says which list)."""
    n_experts = int(_pick(cfg.moe.n_experts, user_idx))
    categories = cfg.data.categories
    return UserSpec(user_idx=user_idx, n_experts=n_experts,
                    n_generalists=int(_pick(cfg.moe.n_generalists, user_idx)),
                    top_k=min(2, n_experts) if cfg.moe.top_k is None else int(cfg.moe.top_k),
                    lora_rank=int(_pick(cfg.lora.rank, user_idx)),
                    train_tokens=int(_pick(cfg.data.train_tokens, user_idx)),
                    share=float(_pick(cfg.data.share, user_idx)),
                    category=categories[user_idx] if categories else None)


def resolve_users(cfg: RunConfig, n_users: int) -> list[UserSpec]:
    """Every user's ``UserSpec``, in user order; a per-user list of another length than ``n_users``
    is a ConfigError naming it."""
    wrong = {k: n for k, n in list_lengths(cfg).items() if n != n_users}
    if wrong:
        raise ConfigError("; ".join(f"{k} has {n} entries but the run has {n_users} users" for k, n in wrong.items())
                          + "; give one value per user (or one value for everyone)")
    return [user_spec(cfg, u) for u in range(n_users)]


def users_per_round(cfg: RunConfig, n_users: int) -> int:
    """How many users take part in each round: ``train.users_per_round``, else
    ``train.participation`` of them rounded, at least one."""
    t = cfg.train
    if t.users_per_round:
        return t.users_per_round
    return max(1, round(t.participation * n_users))


def participants(cfg: RunConfig, n_users: int, round_idx: int) -> frozenset[int]:
    """The users that take part in round ``round_idx``: every user at full participation, else
    ``users_per_round`` of them drawn without replacement from the round's own seed (the same draw
    on every rank, recomputable alone after a resume, and known before the run starts)."""
    import torch

    from comigs_dist.seeds import EVERY_USER, derive_seed
    k = users_per_round(cfg, n_users)
    if k >= n_users:
        return frozenset(range(n_users))
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, EVERY_USER, "participation", round_idx))
    return frozenset(torch.randperm(n_users, generator=g)[:k].tolist())
