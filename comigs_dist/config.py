"""Run configuration: a typed dataclass tree, YAML files, dotted ``key=value`` overrides, validation.

Owns: every option a user can set, its default, its help text, and the checks that reject a bad
configuration before any process group exists (all problems are reported together).
Knows nothing of torch.distributed, models or training.

The defaults are the *embedded default run* (what ``python -m comigs_dist.main`` does with no
arguments): the paper's hyper-parameters wherever they fit a laptop, a smaller batch otherwise.
The paper's own settings live in ``configs/*.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


IntOrList = Union[int, list[int]]
FloatOrList = Union[float, list[float]]


@dataclass
class ModelConfig:
    name: str = opt("embedded", "Base model: 'embedded' (small GPT-2 pretrained by the project on its "
                    "synthetic public text, cached), 'tiny' (random 2-layer GPT-2, for tests), "
                    "'gpt2-random' (GPT-2 124M shapes, random weights), 'llama-tiny' (small random "
                    "Llama), or a Hugging Face model name or local checkpoint path (e.g. 'gpt2').")
    family: Literal["auto", "gpt2", "llama"] = opt("auto", "Model family for adapter injection; 'auto' reads it from the HF config.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where each user's model lives; 'auto' = cuda:<local_rank> when CUDA is available, else cpu.")
    share_base: Literal["auto", "true", "false"] = opt(
        "auto", "Hold the frozen base once per host: one rank writes it to a file in /dev/shm ($COMIGS_SHM_DIR) "
        "and every rank of the host maps it read-only. 'auto' = on when several ranks share a host and the "
        "model stays on CPU; on CUDA 'true' only shares the host copy used while loading.")
    dtype: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "Storage type of the frozen base weights; 'auto' = fp32 (computed under train.amp's autocast, bf16 "
        "on a GPU, as the reference does); 'bf16' halves the base's memory (needs train.amp=bf16, or auto on a "
        "GPU). Adapters and routers stay fp32.")


@dataclass
class LoRAConfig:
    rank: IntOrList = opt(8, "LoRA rank r of every MLP expert (paper: 8); a list gives one rank per user (HetLoRA, FlexLoRA).")
    alpha: float = opt(16.0, "LoRA alpha; the scale is alpha / sqrt(r) (rank-stabilised, paper: 16).")
    attn_rank: int = opt(8, "LoRA rank of the attention adapters (always shared; paper: 8).")


@dataclass
class MoEConfig:
    n_experts: IntOrList = opt(2, "Experts per MLP layer n_i; a list gives one value per user (system heterogeneity, CoMiGS-1GXS).")
    n_generalists: IntOrList = opt(1, "How many of the experts (the first ones) are generalists, shared with other users; int or per-user list.")
    top_k: Union[int, None] = opt(None, "Experts per token; default min(2, n_i). Must not exceed any user's n_i.")
    load_balancing: Literal["none", "uniform", "generalist"] = opt(
        "generalist", "Load-balancing loss (Table 5): none, uniform (Switch: n sum_j f_j P_j), or generalist-favoured "
        "(paper eq. 5 as written); with n_i = 2 and top-2 both are constant.")
    lb_weight: float = opt(0.01, "Weight lambda of the load-balancing loss (paper: 0.01).")


@dataclass
class TrainConfig:
    rounds: int = opt(20, "Communication rounds T (paper: 20; 50 on SlimPajama).")
    local_steps: int = opt(10, "Local expert iterations per round (paper: 10).")
    router_every: int = opt(30, "tau: router steps happen after every tau-th local iteration, counted across rounds (paper: 30).")
    router_steps: int = opt(10, "s: router optimiser steps per router phase, on validation batches (paper: 10).")
    batch_size: int = opt(8, "Sequences per optimiser step (paper: 64; the embedded default uses 8).")
    micro_batch_size: int = opt(0, "Sequences per forward pass; gradients accumulate up to batch_size. 0 = batch_size.")
    loss_chunk: int = opt(128, "Tokens whose vocabulary-sized logits exist at once in the loss and the evaluation "
                          "(output projection and cross-entropy a chunk at a time, forward and backward; the "
                          "same loss to float32 rounding); 0 = a whole micro-batch's at once. See docs/performance.md.")
    seq_len: int = opt(128, "Tokens per sequence (paper: 128).")
    lr: float = opt(5e-3, "Expert (and attention LoRA) learning rate, AdamW (paper: 2e-3; the embedded default's "
                    "small model uses 5e-3).")
    router_lr: float = opt(2e-3, "Router learning rate, constant, AdamW (paper: 2e-3).")
    schedule: Literal["cosine", "constant"] = opt("cosine", "Expert lr schedule: cosine decay over rounds * local_steps down to lr * min_lr_ratio, no warm-up.")
    min_lr_ratio: float = opt(0.1, "Final expert lr as a fraction of lr (cosine schedule).")
    weight_decay: float = opt(0.01, "Decoupled weight decay on adapters and routers.")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas.")
    grad_clip: float = opt(0.0, "Clip the gradient norm of each step to this value; 0 = no clipping (paper: none).")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "Autocast: 'auto' = bf16 on CUDA devices that support it, off on CPU. "
                                                      "'fp16' is refused (it needs loss scaling, not implemented): use bf16.")
    threads: int = opt(0, "torch threads per rank; 0 = cores of the host divided by ranks on the host (at least 1).")


@dataclass
class DataConfig:
    path: str = opt("embedded", "A prepared dataset directory (see `python -m comigs_dist.data prepare`), or 'embedded' for the generated corpus.")
    scenario: Literal["in", "out"] = opt("in", "Embedded corpus only: 'in' = valid/test from the user's own distribution, 'out' = a uniform mixture of all users.")
    train_tokens: IntOrList = opt(4_000, "Embedded corpus only: training tokens per user (int or per-user list, e.g. low- and high-data users).")
    valid_tokens: int = opt(2_000, "Embedded corpus only: validation tokens per user.")
    test_tokens: int = opt(16_000, "Embedded corpus only: test tokens per user.")
    share: FloatOrList = opt(1.0, "Fraction of its training split each user trains on (0 < share <= 1); int or per-user list.")
    verify: bool = opt(True, "Check each shard's size and sha256 against meta.json before training.")
    categories: list[str] = opt([], "The category of each user, in user order, as the prepared dataset must hold them "
                                "(its meta.json), e.g. [de, nl, fr, it]: per-user lists such as moe.n_experts then "
                                "mean what the config says; checked before training. Empty = not checked.")


@dataclass
class GroupConfig:
    """One sharing group (an entry of comm.groups)."""
    name: str = opt("", "Name of the group (letters, digits, '_', '-', '.'); TensorBoard and results.json use it.")
    users: Union[str, list[int]] = opt("all", "'all' or the indices of the users in the group, e.g. [0, 1].")
    experts: list[int] = opt([], "Indices of the generalist experts the users of the group average together, e.g. [1].")
    attention: bool = opt(False, "The users' attention LoRA is averaged in this group (one such group per user; "
                          "none marked: the first group listed with users: all carries it).")


@dataclass
class CommConfig:
    mode: Literal["server", "all2all"] = opt("server", "'server': generalists averaged by one all_reduce per group; 'all2all': serverless, every user gathers all and averages itself.")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "Element type of what travels (and of the counted bytes).")
    exact: bool = opt(True, "Sum what travelled in float64, so the mean is the same in any summation order: server "
                      "and all2all give bit-identical parameters (the server all_reduce then carries float64).")
    groups: list[GroupConfig] = opt([], "Sharing groups: a list of {name, users, experts, attention}; empty = one "
                                    "group 'generalists' of every user sharing expert 0..n_generalists-1 and the "
                                    "attention LoRA. See docs/communication.md.")
    backend: Literal["auto", "gloo", "nccl"] = opt("auto", "torch.distributed backend; 'auto' = nccl when every rank has a GPU, else gloo.")
    timeout_s: float = opt(300.0, "Seconds a collective may wait before the run stops with an error (a dead rank never hangs the run).")


@dataclass
class EvalConfig:
    every: int = opt(5, "Evaluate test perplexity every this many rounds (and always at the end); 0 = only at the end.")
    max_tokens: int = opt(65_536, "Cap on test tokens per evaluation (non-overlapping windows of train.seq_len "
                          "predicted tokens from the start of the split); 0 = the whole split, else >= train.seq_len.")
    batch_size: int = opt(16, "Sequences per evaluation forward pass.")


@dataclass
class LogConfig:
    tensorboard: bool = opt(True, "Write TensorBoard event files under <out_dir>/tb/user_XX.")
    every: int = opt(1, "Log training scalars every this many local iterations.")
    progress: bool = opt(True, "Print progress on rank 0: bars on a terminal, plain lines on a file or pipe.")
    wandb: Literal["off", "online", "offline"] = opt(
        "off", "Also send every scalar to Weights & Biases, one W&B run per user: 'online', 'offline' (written "
        "under <out_dir>/wandb, uploaded later with `wandb sync`), or 'off'. Needs `pip install -e \".[wandb]\"`.")
    wandb_project: str = opt("comigs_dist", "W&B project of the runs (log.wandb).")
    wandb_entity: Union[str, None] = opt(None, "W&B entity (user or team) of the runs; default your W&B default.")
    wandb_group: Union[str, None] = opt(None, "W&B group that holds the users' runs of this experiment; default the "
                                        "out_dir's name.")


@dataclass
class CheckpointConfig:
    every: int = opt(0, "Save every user's full state (adapters, optimisers, schedule, RNG, data position, counters) "
                     "every this many rounds, for resume; 0 = only at the end.")
    final: bool = opt(True, "Save every user's trainable state at the end of the run.")
    keep: int = opt(0, "Keep only this many newest round checkpoints per user (older ones are deleted once every "
                    "user has written a newer one); 0 = keep all.")


@dataclass
class GuardConfig:
    nan: Literal["stop", "skip"] = opt("stop", "A non-finite loss or shared parameter: 'stop' the run naming the user, "
                                       "round and parameter; 'skip' = that user contributes nothing to the round's "
                                       "average (and drops that optimiser step) and takes the others' average.")


@dataclass
class RunConfig:
    method: str = opt("comigs_1g1s", "Method to run (see `python -m comigs_dist.main --methods`).")
    method_options: dict[str, Any] = opt({}, "Options of the chosen method, as method_options.<key>=value "
                                         "(e.g. method_options.lambda_p=5e-3 for hetlora); each method's "
                                         "options are listed below and by --methods. Unknown keys are errors.")
    seed: int = opt(42, "Seed; each user's random streams (adapter init, training and router batches) are drawn "
                    "from a hash of (seed, user, stream), so no two seeds share one (paper: 42, 45, 47).")
    out_dir: Union[str, None] = opt(None, "Where the run writes; default a fresh runs/<timestamp>_<method> directory "
                                    "(with resume=auto under Slurm or torchrun: runs/<job id>_<method>_s<seed>).")
    resume: Literal["false", "true", "auto"] = opt("false", "Continue from the newest round every user checkpointed in "
                                                   "out_dir: 'true' (out_dir required, a checkpoint must exist), "
                                                   "'auto' (resume if one exists, else start fresh: for torchrun "
                                                   "--max-restarts and Slurm requeues), 'false' (start fresh).")
    n_users: Union[int, None] = opt(None, "Number of simulated users; must equal the world size (one rank per user). Default: the world size.")
    model: ModelConfig = sub(ModelConfig, "Base model.")
    lora: LoRAConfig = sub(LoRAConfig, "LoRA adapters.")
    moe: MoEConfig = sub(MoEConfig, "Mixture of LoRA experts and router.")
    train: TrainConfig = sub(TrainConfig, "Algorithm 1: rounds, local steps, optimisers.")
    data: DataConfig = sub(DataConfig, "Per-user data shards.")
    comm: CommConfig = sub(CommConfig, "Communication between users.")
    eval: EvalConfig = sub(EvalConfig, "Evaluation.")
    log: LogConfig = sub(LogConfig, "Logging.")
    checkpoint: CheckpointConfig = sub(CheckpointConfig, "Checkpoints.")
    guard: GuardConfig = sub(GuardConfig, "What happens to non-finite numbers.")

    def __post_init__(self) -> None:
        errors = collect_errors(self)
        if errors:
            raise ConfigError(format_errors(errors))
        # the resolved config lists every option of the method with its value (reproducibility)
        self.method_options = dataclasses.asdict(method_options_of(self))

    # ----- per-user views -------------------------------------------------------------------
    def per_user(self, key: str, user_idx: int) -> Any:
        """The value of a per-user option (int or list) for one user."""
        value = get_dotted(self, key)
        if isinstance(value, list):
            return value[user_idx]
        return value

    def n_experts(self, user_idx: int) -> int:
        return int(self.per_user("moe.n_experts", user_idx))

    def n_generalists(self, user_idx: int) -> int:
        return int(self.per_user("moe.n_generalists", user_idx))  # <= n_experts (validated)

    def top_k(self, user_idx: int) -> int:
        n = self.n_experts(user_idx)
        return min(2, n) if self.moe.top_k is None else int(self.moe.top_k)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

PER_USER_KEYS = ("moe.n_experts", "moe.n_generalists", "lora.rank", "data.train_tokens", "data.share",
                 "data.categories")


def _list_lengths(cfg: RunConfig) -> dict[str, int]:
    # data.categories empty means "not checked", not "no users"
    return {k: len(v) for k in PER_USER_KEYS
            if isinstance(v := get_dotted(cfg, k), list) and (v or k != "data.categories")}


def inferred_n_users(cfg: RunConfig) -> int | None:
    """n_users as configured, or as implied by the per-user lists, or None."""
    if cfg.n_users is not None:
        return cfg.n_users
    lengths = set(_list_lengths(cfg).values())
    return lengths.pop() if len(lengths) == 1 else None


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
    if cfg.resume == "true" and not cfg.out_dir:
        e.append("resume=true needs out_dir: set out_dir to the directory of the run to continue "
                 "(the one holding checkpoints/)")

    # per-user lists: one length, matching n_users
    lengths = _list_lengths(cfg)
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
            n_exp = cfg.n_experts(user)
            n_gen = int(cfg.per_user("moe.n_generalists", user))
            rank = int(cfg.per_user("lora.rank", user))
            share = float(cfg.per_user("data.share", user))
            tokens = int(cfg.per_user("data.train_tokens", user))
        except (IndexError, TypeError, ValueError):
            break  # already reported as a list-length problem
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

    from comigs_dist.methods import known_methods  # light import: the registry only
    methods = known_methods()
    if cfg.method not in methods:
        e.append(f"method ({cfg.method!r}) is not a known method; choose one of: {', '.join(sorted(methods))}")
    else:
        from comigs_dist.methods import method_class
        cls = method_class(cfg.method)
        _, option_errors = parse_options(cls.Options, cfg.method_options, cfg.method)
        e.extend(option_errors)
        if not option_errors:
            e.extend(cls.config_errors(cfg))
            if cfg.comm.groups:
                e.extend(comm_group_errors(cfg, n_users if inferred_n_users(cfg) is not None else None))
    return e


def comm_group_errors(cfg: RunConfig, n_users: int | None) -> list[str]:
    """Problems of comm.groups for the configured method and ``n_users`` users (None: unknown yet,
    checked again by ``check_world_size``)."""
    from comigs_dist.groups import plan_errors
    from comigs_dist.methods import known_methods, method_class
    cls = method_class(cfg.method)
    if not cls.accepts_comm_groups:
        takers = [m for m in known_methods() if method_class(m).accepts_comm_groups]
        return [f"comm.groups is set, but method {cfg.method!r} shares its parameters its own way; remove "
                f"comm.groups or choose one of: {', '.join(takers)}"]
    try:
        from comigs_dist.methods.base import generalist_counter
        n_generalists = generalist_counter(cls(cfg), cfg)
        if n_users is not None:
            [n_generalists(u) for u in range(n_users)]
    except (IndexError, TypeError, ValueError):
        return []  # a per-user list problem, reported on its own
    return plan_errors(cfg.comm.groups, n_users, n_generalists, f"moe.n_generalists with method {cfg.method}")


def parse_options(options_cls: type, raw: dict, method: str) -> tuple[Any, list[str]]:
    """A method's typed options from the raw ``method_options`` mapping: (options, errors)."""
    if not dataclasses.fields(options_cls) and raw:
        return None, [f"method_options ({raw}) are given but method {method!r} takes no options; remove them"]
    errors: list[str] = []
    kwargs = _merge(raw, options_cls, "method_options.", errors)
    if errors:
        return None, [f"{err} (method {method!r})" for err in errors]
    return _build(options_cls, kwargs), []


def method_options_of(cfg: "RunConfig") -> Any:
    """The typed options of cfg.method (a dataclass declared by the method as ``Options``)."""
    from comigs_dist.methods import method_class
    options, errors = parse_options(method_class(cfg.method).Options, cfg.method_options, cfg.method)
    if errors:
        raise ConfigError(format_errors(errors))
    return options


def format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return f"invalid configuration: {errors[0]}"
    return "invalid configuration (%d problems):\n  - %s" % (len(errors), "\n  - ".join(errors))


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    """One rank per user: the configured number of users must equal the world size."""
    n = inferred_n_users(cfg)
    if n is not None and n != world_size:
        raise ConfigError(
            f"invalid configuration: n_users ({n}) must equal the number of ranks ({world_size}); "
            f"start {n} processes (torchrun --nproc_per_node={n}) or set n_users={world_size}")
    if n is None:
        cfg.n_users = world_size
        if cfg.comm.groups:  # user indices can be checked now that the number of users is known
            errors = comm_group_errors(cfg, world_size)
            if errors:
                raise ConfigError(format_errors(errors))


# --------------------------------------------------------------------------------------------
# YAML + overrides
# --------------------------------------------------------------------------------------------

def get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads true/false/on/off/yes/no as booleans
            words = ("true", "on", "yes") if value else ("false", "off", "no")
            value = next((w for w in words if w in choices), value)
        if value in choices:
            return value
        raise ConfigError(f"{key} ({value!r}) must be one of {', '.join(repr(c) for c in choices)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        if isinstance(value, (list, tuple)):
            for a in args:
                if typing.get_origin(a) is list:
                    return coerce(value, a, key)
        for a in args:
            if a is type(None) or typing.get_origin(a) is list:
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} ({value!r}) must be of type {_type_name(tp)}")
    if origin is dict:
        # a free mapping checked later against its own schema (method_options)
        if value in ("", None) or (isinstance(value, str) and value.strip() in ("{}", "null")):
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} ({value!r}) must be a mapping; set its entries as {key}.<name>=value")
        return dict(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if _is_dataclass_type(inner):
            return _coerce_records(value, inner, key)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} ({value!r}) must be a list ({_type_name(tp)})")
        return [coerce(v.strip() if isinstance(v, str) else v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key} ({value!r}) must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} ({value!r}) must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{key} ({value!r}) must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} ({value!r}) must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} ({value!r}) must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} ({value!r}) must be a string")
    raise TypeError(f"unsupported config type {tp} for {key}")  # internal: a field we declared badly


def _coerce_records(value: Any, cls: type, key: str) -> list:
    """A list of mappings, each checked against a dataclass (comm.groups)."""
    if value in ("", None):
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} ({value!r}) must be a list of mappings ({cls.__name__}: "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))})")
    out, errors = [], []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            errors.append(f"{key}[{i}] ({item!r}) must be a mapping with keys "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))}")
            continue
        kwargs = _merge(item, cls, f"{key}[{i}].", errors)
        out.append(_build(cls, kwargs))
    if errors:
        raise ConfigError("; ".join(errors))
    return out


def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _merge(raw: dict, cls: type, prefix: str, errors: list[str]) -> dict:
    """Check a nested dict against a dataclass type; returns kwargs with coerced leaves."""
    known = _fields(cls)
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in known:
            hint = _close_matches(name, list(known))
            e = f"unknown key {key!r}" + (f"; did you mean {hint}?" if hint else "")
            e += f" (known under {prefix.rstrip('.') or 'the top level'}: {', '.join(known)})"
            errors.append(e)
            continue
        tp, _ = known[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                errors.append(f"{key} must be a mapping of options, got {value!r}")
                continue
            out[name] = _merge(value, tp, key + ".", errors)
        else:
            try:
                out[name] = coerce(value, tp, key)
            except ConfigError as exc:
                errors.append(str(exc))
    return out


def _close_matches(name: str, options: list[str]) -> str:
    import difflib
    m = difflib.get_close_matches(name, options, n=1)
    return repr(m[0]) if m else ""


def _build(cls: type, kwargs: dict) -> Any:
    known = _fields(cls)
    args = {}
    for name, value in kwargs.items():
        tp, _ = known[name]
        args[name] = _build(tp, value) if _is_dataclass_type(tp) else value
    return cls(**args)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {p} is not a group of options")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.rounds=5)")
    key, value = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from an optional YAML file and ``key=value`` overrides (later wins)."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of options")
        raw = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> RunConfig:
    errors: list[str] = []
    kwargs = _merge(raw, RunConfig, "", errors)
    if errors:
        raise ConfigError(format_errors(errors))
    return _build(RunConfig, kwargs)


def describe_options(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf option, for ``--help``."""
    rows = []
    for name, (tp, f) in _fields(cls).items():
        key = f"{prefix}{name}"
        if _is_dataclass_type(tp):
            rows.extend(describe_options(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, shown, f.metadata.get("help", "")))
    return rows


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
