"""Checking a run configuration: every problem at once, each naming the key, the value, the rule
and the fix, before any process group exists.

Owns ``collect_errors`` (the checks), ``validate`` (raise them together; resolve the method's
options), the checks of ``comm.groups`` and of the world size. The only module of the config
package that imports the method registry (a method's options and its own checks).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from comigs_dist.config.schema import ConfigError, RunConfig
from comigs_dist.config.users import inferred_n_users, list_lengths, participants, resolve_users, user_spec, \
    users_per_round
from comigs_dist.groups import plan_errors
from comigs_dist.methods import known_methods, method_class
from comigs_dist.methods.base import generalist_counter
from comigs_dist.options import format_errors, get_dotted, parse_options

__all__ = ["check_world_size", "collect_errors", "comm_group_errors", "format_errors", "privacy_accounting",
           "privacy_errors", "validate"]


def validate(cfg: RunConfig) -> RunConfig:
    """``cfg`` checked (a ConfigError lists every problem), with ``method_options`` resolved to
    every option of the method and its value (the resolved config records them all)."""
    errors = collect_errors(cfg)
    if errors:
        raise ConfigError(format_errors(errors))
    options, _ = parse_options(method_class(cfg.method).Options, cfg.method_options, f"method {cfg.method!r}")
    cfg.method_options = dataclasses.asdict(options)
    return cfg


def collect_errors(cfg: RunConfig) -> list[str]:
    """Every problem of a configuration, each naming the key, the value, the constraint and the fix."""
    e: list[str] = []
    t = cfg.train

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        bad = value < 0 if allow_zero else value <= 0
        if bad or (isinstance(value, float) and not math.isfinite(value)):
            e.append(f"{key} ({value}) must be {'>= 0' if allow_zero else '> 0'}")

    for key in ("train.rounds", "train.local_steps", "train.router_every", "train.batch_size",
                "train.seq_len", "train.lr", "lora.alpha", "lora.attn_rank", "comm.timeout_s",
                "eval.batch_size", "log.every"):
        positive(key, get_dotted(cfg, key))
    for key in ("train.router_steps", "train.router_lr", "train.weight_decay", "train.grad_clip",
                "moe.lb_weight", "eval.every", "eval.max_tokens", "checkpoint.every", "checkpoint.keep",
                "train.micro_batch_size", "train.loss_chunk", "train.threads", "data.valid_tokens", "data.test_tokens"):
        positive(key, get_dotted(cfg, key), allow_zero=True)
    if not 0 < t.min_lr_ratio <= 1:
        e.append(f"train.min_lr_ratio ({t.min_lr_ratio}) must be in (0, 1]")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        e.append(f"train.betas ({t.betas}) must be two numbers in [0, 1)")
    if t.amp == "fp16":
        e.append("train.amp (fp16) is refused: fp16 gradients need loss scaling (a GradScaler) not to underflow "
                 "to zero, and comigs_dist does not scale losses; use train.amp=bf16 (no scaling needed) or off")
    if cfg.eval.max_tokens and 0 < t.seq_len and cfg.eval.max_tokens < t.seq_len:
        e.append(f"eval.max_tokens ({cfg.eval.max_tokens}) is below one evaluation window of train.seq_len "
                 f"({t.seq_len}) predicted tokens, so nothing would be evaluated; set it to 0 (the whole split) "
                 f"or to at least {t.seq_len}")
    if cfg.model.dtype == "bf16" and t.amp in ("off", "fp16"):
        e.append("model.dtype (bf16) needs bf16 autocast; set train.amp=bf16 (or auto on a GPU) or model.dtype=fp32")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        e.append(f"train.micro_batch_size ({t.micro_batch_size}) must divide train.batch_size ({t.batch_size})")
    if cfg.n_users is not None and cfg.n_users < 1:
        e.append(f"n_users ({cfg.n_users}) must be >= 1")
    lu = cfg.log.users
    if isinstance(lu, str) and lu not in ("auto", "all", "none"):
        e.append(f"log.users ({lu!r}) must be 'auto', 'all', 'none' or a list of user indices such as [0, 3]")
    elif isinstance(lu, list) and cfg.n_users is not None and any(not 0 <= u < cfg.n_users for u in lu):
        e.append(f"log.users ({lu}) names users outside 0..{cfg.n_users - 1}")
    if not 0 < t.participation <= 1:
        e.append(f"train.participation ({t.participation}) must be in (0, 1]: the fraction of the users that take "
                 f"part in each round (1 = all of them)")
    if t.users_per_round < 0:
        e.append(f"train.users_per_round ({t.users_per_round}) must be >= 0 (0 = use train.participation)")
    elif t.users_per_round and cfg.n_users is not None and t.users_per_round > cfg.n_users:
        e.append(f"train.users_per_round ({t.users_per_round}) must be <= n_users ({cfg.n_users})")
    if cfg.resume == "true" and not cfg.out_dir:
        e.append("resume=true needs out_dir: set out_dir to the directory of the run to continue "
                 "(the one holding checkpoints/)")

    # per-user lists: one length, matching n_users
    lengths = list_lengths(cfg)
    if len(set(lengths.values())) > 1:
        e.append("per-user lists have different lengths: "
                 + ", ".join(f"{k} has {n}" for k, n in lengths.items())
                 + "; give one value per user in each")
    elif lengths and cfg.n_users is not None and next(iter(lengths.values())) != cfg.n_users:
        k, n = next(iter(lengths.items()))
        e.append(f"{k} has {n} entries but n_users is {cfg.n_users}; give one value per user")

    n_users = inferred_n_users(cfg) or 1
    for user in range(n_users):
        try:
            spec = user_spec(cfg, user)
        except (IndexError, TypeError, ValueError):
            break  # already reported as a list-length problem
        n_exp, n_gen, rank = spec.n_experts, spec.n_generalists, spec.lora_rank
        share, tokens = spec.share, spec.train_tokens
        who = f" for user {user}" if lengths else ""
        if n_exp < 1:
            e.append(f"moe.n_experts ({n_exp}) must be >= 1{who}")
        if n_gen < 0:
            e.append(f"moe.n_generalists ({n_gen}) must be >= 0{who}")
        elif n_exp >= 1 and n_gen > n_exp:
            # the value as given; methods that set their own count (comigs_2g, local, ...) ignore it,
            # but a count above the experts is a mistake either way (it was once clamped silently)
            e.append(f"moe.n_generalists ({n_gen}) must be <= moe.n_experts ({n_exp}){who}: a user cannot share "
                     f"more experts than it holds; lower moe.n_generalists or raise moe.n_experts")
        if rank < 1:
            e.append(f"lora.rank ({rank}) must be >= 1{who}")
        if not 0 < share <= 1:
            e.append(f"data.share ({share}) must be in (0, 1]{who}")
        if tokens <= 0:
            e.append(f"data.train_tokens ({tokens}) must be > 0{who}")
        if cfg.moe.top_k is not None and n_exp >= 1:
            if cfg.moe.top_k < 1:
                e.append(f"moe.top_k ({cfg.moe.top_k}) must be >= 1")
            elif cfg.moe.top_k > n_exp:
                e.append(f"moe.top_k ({cfg.moe.top_k}) must be <= moe.n_experts ({n_exp}){who}; "
                         f"lower moe.top_k or raise moe.n_experts")
        if not lengths:
            break  # every user is the same

    if cfg.log.wandb != "off":
        from comigs_dist.wandb_logger import config_errors as wandb_errors  # imports wandb itself only if on
        e.extend(wandb_errors(cfg.log))

    if cfg.data.path != "embedded" and not Path(cfg.data.path).exists():
        e.append(f"data.path ({cfg.data.path}) does not exist; prepare it with "
                 f"`python -m comigs_dist.data prepare ... --out {cfg.data.path}` or use data.path=embedded")

    methods = known_methods()
    if cfg.method not in methods:
        e.append(f"method ({cfg.method!r}) is not a known method; choose one of: {', '.join(sorted(methods))}")
    else:
        cls = method_class(cfg.method)
        _, option_errors = parse_options(cls.Options, cfg.method_options, f"method {cfg.method!r}")
        e.extend(option_errors)
        if not option_errors:
            e.extend(cls.config_errors(cfg))
            if (t.participation < 1 or t.users_per_round) and cls.full_participation_only:
                e.append(f"method {cfg.method!r} cannot run with partial participation (train.participation="
                         f"{t.participation}, train.users_per_round={t.users_per_round}): "
                         f"{cls.full_participation_only}; set train.participation=1 and train.users_per_round=0")
            elif not e:
                e.extend(participation_errors(cfg, inferred_n_users(cfg)))
            if cfg.comm.groups:
                e.extend(comm_group_errors(cfg, n_users if inferred_n_users(cfg) is not None else None))
    e.extend(privacy_errors(cfg, inferred_n_users(cfg)))
    return e


def local_model_problem(name: str) -> str | None:
    """A model.name written as a local directory (a path: absolute, relative with ./ ../ or ~, more
    than one '/', or under models/, where the project's small bases go) that holds no model: said
    before any process starts (comigs_dist.main) or any job is submitted (launch), instead of a hub
    download failing on every rank. A hub name ('gpt2', 'org/name') passes: whether it downloads is
    the network's business. Not part of collect_errors: configs are read and checked without the
    assets they name (tests, launch.reproduce's planning), as data.path=embedded stands in for data."""
    from comigs_dist.model import BUILTIN_MODELS
    if name in BUILTIN_MODELS:
        return None
    first = name.split("/", 1)[0]
    path_like = (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name
                 or (first == "models" and "/" in name) or ("/" in name and Path(first).is_dir()))
    path = Path(name).expanduser()
    if not path_like or (path / "config.json").is_file():
        return None
    what = "does not exist" if not path.exists() else "holds no config.json (not a saved model)"
    return (f"model.name ({name}) is a local directory that {what}; build the small base of the CPU configs "
            f"with `python -m launch.reproduce --scale cpu --prepare`, pretrain one with `python -m "
            f"comigs_dist.pretrain --source <text files> --out {name}` (docs/data.md), or give a hub name "
            f"such as model.name=gpt2")


def participation_errors(cfg: RunConfig, n_users: int | None) -> list[str]:
    """The method's problems with the run's seeded participant draw (``Method.participation_errors``),
    once the number of users is known (``n_users`` None: not yet; check_world_size asks again)."""
    if n_users is None or users_per_round(cfg, n_users) >= n_users:
        return []
    return method_class(cfg.method).participation_errors(cfg, n_users, lambda r: participants(cfg, n_users, r))


def _privacy_waits_for_world_size(cfg: RunConfig, n_users: int | None) -> bool:
    """Whether calibrating privacy.target_epsilon needs the number of users, which the world size
    gives later (check_world_size): the sample of users per round, or the users' groups."""
    t, p = cfg.train, cfg.privacy
    return (n_users is None and p.dp == "user" and p.target_epsilon is not None
            and (t.participation < 1 or bool(t.users_per_round) or bool(cfg.comm.groups)))


def privacy_errors(cfg: RunConfig, n_users: int | None) -> list[str]:
    """Problems of privacy.* for this run: the options (comigs_dist.privacy.dp.config_errors, which
    calibrates privacy.target_epsilon, so an unreachable one is refused here), and a method whose
    traffic privacy cannot cover. ``n_users`` None: not known yet (check_world_size asks again)."""
    from comigs_dist.privacy import config_errors
    p = cfg.privacy
    e: list[str] = []
    if p.dp == "user" or p.secure_agg is True:
        reason = ""
        if cfg.method in known_methods():
            cls = method_class(cfg.method)
            options, option_errors = parse_options(cls.Options, cfg.method_options, f"method {cfg.method!r}")
            reason = cls.refuses_privacy if option_errors else cls.privacy_refusal(options)
        if reason:
            on = ", ".join(k for k, v in (("privacy.dp=user", p.dp == "user"),
                                           ("privacy.secure_agg=true", p.secure_agg is True)) if v)
            takers = [m for m in known_methods() if not method_class(m).refuses_privacy]
            e.append(f"{on} cannot run with method {cfg.method!r}: {reason}; set privacy.dp=off and "
                     f"privacy.secure_agg=false, or choose one of: {', '.join(takers)}")
            return e
    if (p.dp == "user" or p.secure_agg is True) and cfg.comm.weights == "tokens":
        e.append("comm.weights=tokens cannot run with privacy.dp or privacy.secure_agg: the private mean divides "
                 "by the round's planned number of contributors; set comm.weights=uniform")
    if p.dp == "user" and not p.secure_agg and cfg.comm.dtype != "fp32":  # secure aggregation sends float64 shares
        e.append(f"privacy.dp=user cannot run with comm.dtype={cfg.comm.dtype}: a user's payload (the aggregate it "
                 f"downloaded plus its clipped update) is rounded to {cfg.comm.dtype} after the clip, which can move "
                 f"its contribution by more than privacy.clip (about sqrt(d) x the {cfg.comm.dtype} spacing of the "
                 f"parameters' size), beyond what the accountant assumes; set comm.dtype=fp32 (or add "
                 f"privacy.secure_agg=true, whose fixed-point shares are made from the unrounded payload)")
    if _privacy_waits_for_world_size(cfg, n_users):
        return e + config_errors(dataclasses.replace(p, target_epsilon=None), rounds=0)
    errors = config_errors(p, **privacy_accounting(cfg, n_users or 1))
    withheld = sampling_discount_withheld(cfg, n_users or 1)
    if withheld:  # an unreachable target: say why the partial participation earns no discount here
        errors = [f"{x} (no sampling discount: {withheld})" if "is unreachable" in x else x for x in errors]
    return e + errors


def privacy_accounting(cfg: RunConfig, n_users: int) -> dict:
    """How the accountant sees this run (the keyword arguments of privacy.accountant.epsilon and of
    privacy.dp.resolve_noise_multiplier): ``rounds`` noised aggregations (train.rounds - 1: round
    0's sync moves the initialisation, which holds no data; one more for a method that aggregates
    after the last round, ``Method.aggregates_after_training``); users sampled every round 'poisson'
    at rate 1 (everyone), or a fixed number out of ``n_users`` without replacement ('fixed',
    train.participation / users_per_round: the seeded draw); ``groups_per_user``: the most sharing
    groups one user sends in a round.

    The sampling discount needs the draw to stay hidden from whoever sees the releases. A group
    that holds only some of the users gives it away: its release is divided by its planned
    contributor count, which travels with it, and a group nobody of which was drawn hands out its
    last release unchanged. So with such groups (``comm.groups``) a partial draw is accounted as
    every user in every round (Poisson at rate 1: an upper bound, since a user that is not drawn
    sends nothing), without the discount (``sampling_discount_withheld`` says why)."""
    k = users_per_round(cfg, n_users)
    members = _comm_group_members(cfg, n_users)
    groups = max(1, max(sum(u in m for m in members.values()) for u in range(n_users))) if members else 1
    # a method's aggregation after the last round releases that round's local steps too
    closing = int(cfg.method in known_methods() and method_class(cfg.method).aggregates_after_training)
    full = k >= n_users or bool(_groups_revealing_the_draw(cfg, n_users, members))
    return {"rounds": max(0, cfg.train.rounds - 1) + closing, "sample_rate": 1.0 if full else k / n_users,
            "sampling": "poisson" if full else "fixed", "n_users": n_users, "groups_per_user": groups}


def sampling_discount_withheld(cfg: RunConfig, n_users: int) -> str | None:
    """Why a run drawing some users a round gets no sampling discount from the accountant
    (``privacy_accounting``), or None: a sharing group that holds only some of the users reveals
    how many of its members were drawn."""
    partial = _groups_revealing_the_draw(cfg, n_users, _comm_group_members(cfg, n_users))
    if not partial:
        return None
    return (f"comm.groups {', '.join(map(repr, partial))} hold only some of the users: each release carries its "
            f"group's planned contributor count, and a group nobody of which was drawn hands out its last release "
            f"again, so the draw is not hidden and each round is accounted as if every user took part")


def _comm_group_members(cfg: RunConfig, n_users: int) -> dict | None:
    """The sharing groups comm.groups gives the method ({group: members}), or None (no comm.groups,
    or an invalid one: reported on its own)."""
    if not cfg.comm.groups or cfg.method not in known_methods():
        return None
    try:
        return method_class(cfg.method)(cfg, resolve_users(cfg, n_users)).sharing_groups(n_users)
    except (ConfigError, IndexError, TypeError, ValueError):
        return None


def _groups_revealing_the_draw(cfg: RunConfig, n_users: int, members: dict | None) -> list[str]:
    """Under partial participation, the sharing groups that hold only some of the users."""
    if not members or users_per_round(cfg, n_users) >= n_users:
        return []
    return sorted(g for g, m in members.items() if set(m) != set(range(n_users)))


def comm_group_errors(cfg: RunConfig, n_users: int | None) -> list[str]:
    """Problems of comm.groups for the configured method and ``n_users`` users (None: unknown yet,
    checked again by ``check_world_size``)."""
    cls = method_class(cfg.method)
    if not cls.accepts_comm_groups:
        takers = [m for m in known_methods() if method_class(m).accepts_comm_groups]
        return [f"comm.groups is set, but method {cfg.method!r} shares its parameters its own way; remove "
                f"comm.groups or choose one of: {', '.join(takers)}"]
    n_generalists = None
    if n_users is not None:
        try:
            n_generalists = generalist_counter(cls(cfg, resolve_users(cfg, n_users)))
            [n_generalists(u) for u in range(n_users)]
        except (ConfigError, IndexError, TypeError, ValueError):
            return []  # a per-user list problem, reported on its own
    return plan_errors(cfg.comm.groups, n_users, n_generalists, f"moe.n_generalists with method {cfg.method}")


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    """Users spread over the ranks: every rank needs at least one user (n_users >= world size);
    n_users unset means as many users as the per-user lists give, else one user per rank. Sets
    cfg.n_users, so that everything after this reads the number of users from it."""
    n = inferred_n_users(cfg)
    if n is not None and cfg.n_users is None:
        cfg.n_users = n  # from the per-user lists (moe.n_experts=[4,2,2,2]): the run's users
    if n is not None and n < world_size:
        raise ConfigError(
            f"invalid configuration: n_users ({n}) is smaller than the number of ranks ({world_size}): every rank "
            f"simulates at least one user; start at most {n} processes (torchrun --nproc_per_node={n}) or set "
            f"n_users={world_size} or more")
    if n is not None:
        k = users_per_round(cfg, n)
        if k < 1 or k > n:
            raise ConfigError(f"invalid configuration: train.users_per_round ({cfg.train.users_per_round}) must be "
                              f"between 1 and n_users ({n}); 0 takes train.participation ({cfg.train.participation}) "
                              f"of the users")
    if n is None:
        cfg.n_users = world_size
        errors = []
        if cfg.comm.groups:  # user indices can be checked now that the number of users is known
            errors = comm_group_errors(cfg, world_size)
        if not errors and _privacy_waits_for_world_size(cfg, None):  # the target epsilon can be calibrated now
            errors = privacy_errors(cfg, world_size)
        if not errors:  # the method's rules that depend on the number of users (checked with it known)
            errors = method_class(cfg.method).config_errors(cfg) + participation_errors(cfg, world_size)
        if errors:
            raise ConfigError(format_errors(errors))
