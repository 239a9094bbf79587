"""The run configuration's schema: every option a user can set, its type, default and help text,
as a tree of dataclasses under ``RunConfig``.

Plain data: building a ``RunConfig`` checks nothing and imports no method (``loading`` reads
YAML and overrides into one, ``validation`` checks it, ``users`` resolves the per-user values).

The defaults are the *embedded default run* (what ``python -m comigs_dist.main`` does with no
arguments): the paper's hyper-parameters wherever they fit a laptop, a smaller batch otherwise.
The paper's own settings live in ``configs/*.yaml``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Union

from comigs_dist.options import OptionsError, opt, sub


class ConfigError(OptionsError):
    """A configuration problem a user can fix; the message names the key and the fix."""


IntOrList = Union[int, list[int]]
FloatOrList = Union[float, list[float]]


@dataclass
class ModelConfig:
    name: str = opt("embedded", "Base model: 'embedded' (small GPT-2 pretrained by the project on its "
                    "synthetic public text, cached), 'tiny' (random 2-layer GPT-2, for tests), "
                    "'gpt2-random' (GPT-2 124M shapes, random weights), 'llama-tiny' (small random "
                    "Llama), or a Hugging Face model name or local checkpoint path (e.g. 'gpt2').")
    family: Literal["auto", "gpt2", "llama"] = opt("auto", "Model family for adapter injection; 'auto' reads it from "
                                                           "the HF config.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where each user's model lives; 'auto' = cuda:<local_rank> "
                                                         "when CUDA is available, else cpu.")
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
    rank: IntOrList = opt(8, "LoRA rank r of every MLP expert (paper: 8); a list gives one rank per user (HetLoRA, "
                             "FlexLoRA).")
    alpha: float = opt(16.0, "LoRA alpha; the scale is alpha / sqrt(r) (rank-stabilised, paper: 16).")
    attn_rank: int = opt(8, "LoRA rank of the attention adapters (always shared; paper: 8).")


@dataclass
class MoEConfig:
    n_experts: IntOrList = opt(2, "Experts per MLP layer n_i; a list gives one value per user (system heterogeneity, "
                                  "CoMiGS-1GXS).")
    n_generalists: IntOrList = opt(1, "How many of the experts (the first ones) are generalists, shared with other "
                                      "users; int or per-user list.")
    top_k: Union[int, None] = opt(None, "Experts per token; default min(2, n_i). Must not exceed any user's n_i.")
    load_balancing: Literal["none", "uniform", "generalist"] = opt(
        "generalist", "Load-balancing loss (Table 5): none, uniform (Switch: n sum_j f_j P_j), or generalist-favoured "
        "(paper eq. 5 as written); with n_i = 2 and top-2 both are constant.")
    lb_weight: float = opt(0.01, "Weight lambda of the load-balancing loss (paper: 0.01).")


@dataclass
class TrainConfig:
    rounds: int = opt(20, "Communication rounds T (paper: 20; 50 on SlimPajama).")
    local_steps: int = opt(10, "Local expert iterations per round (paper: 10).")
    router_every: int = opt(30, "tau: router steps happen after every tau-th local iteration, counted across rounds "
                                "(paper: 30).")
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
    schedule: Literal["cosine", "constant"] = opt("cosine", "Expert lr schedule: cosine decay over rounds * "
                                                            "local_steps down to lr * min_lr_ratio, no warm-up.")
    min_lr_ratio: float = opt(0.1, "Final expert lr as a fraction of lr (cosine schedule).")
    weight_decay: float = opt(0.01, "Decoupled weight decay on adapters and routers.")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas.")
    grad_clip: float = opt(0.0, "Clip the gradient norm of each step to this value; 0 = no clipping (paper: none).")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "Autocast: 'auto' = bf16 on CUDA devices that "
                                                      "support it, off on CPU. 'fp16' is refused (it needs loss "
                                                      "scaling, not implemented): use bf16.")
    pack_users: Literal["auto", "on", "off"] = opt("auto", "Run the expert steps of a rank's participating "
                                                   "users as one "
                                                   "packed forward and backward through the shared frozen base "
                                                   "(each user's adapters on its own rows); 'auto' = on CUDA only "
                                                   "(measured slower on CPU, docs/scale.md). Same losses to float32 "
                                                   "rounding.")
    participation: float = opt(1.0, "Fraction of the users that take part in each round (0 < p <= 1): "
                               "a seeded draw, the "
                               "same on every rank, picks round(p * n_users) of them (at least 1); only they take "
                               "local steps and join the round's aggregation. See docs/scale.md.")
    users_per_round: int = opt(0, "The number of users that take part in each round, instead of a fraction; 0 = use "
                               "train.participation.")
    threads: int = opt(0, "torch threads per rank; 0 = cores of the host divided by ranks on the host (at least 1).")


@dataclass
class DataConfig:
    path: str = opt("embedded", "A prepared dataset directory (see `python -m comigs_dist.data prepare`), or "
                                "'embedded' for the generated corpus.")
    scenario: Literal["in", "out"] = opt("in", "Embedded corpus only: 'in' = valid/test from the user's own "
                                               "distribution, 'out' = a uniform mixture of all users.")
    train_tokens: IntOrList = opt(4_000, "Embedded corpus only: training tokens per user (int or per-user list, e.g. "
                                         "low- and high-data users).")
    valid_tokens: int = opt(2_000, "Embedded corpus only: validation tokens per user.")
    test_tokens: int = opt(16_000, "Embedded corpus only: test tokens per user.")
    share: FloatOrList = opt(1.0, "Fraction of its training split each user trains on (0 < share <= 1); a number or "
                                  "a per-user list.")
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
    mode: Literal["server", "all2all"] = opt("server", "'server': generalists averaged by one all_reduce per group; "
                                                       "'all2all': serverless, every user gathers all and "
                                                       "averages itself.")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "Element type of what travels (and of the counted bytes).")
    weights: Literal["uniform", "tokens"] = opt("uniform", "Weights of the users in the means of the shared "
                                                "parameters: 'uniform' (the paper: 1/N over the contributing "
                                                "users) or 'tokens' (each user's training tokens, as FedAvg "
                                                "weighs clients by data size).")
    exact: bool = opt(True, "Sum what travelled in float64, so the mean is the same in any summation order: server "
                      "and all2all give bit-identical parameters (the server all_reduce then carries float64).")
    groups: list[GroupConfig] = opt([], "Sharing groups: a list of {name, users, experts, attention}; empty = one "
                                    "group 'generalists' of every user sharing expert 0..n_generalists-1 and the "
                                    "attention LoRA. See docs/communication.md.")
    backend: Literal["auto", "gloo", "nccl"] = opt("auto", "torch.distributed backend; 'auto' = nccl when every rank "
                                                           "has a GPU, else gloo.")
    timeout_s: float = opt(300.0, "Seconds a collective may wait before the run stops with an error (a dead rank "
                                  "never hangs the run).")


@dataclass
class EvalConfig:
    every: int = opt(5, "Evaluate test perplexity every this many rounds (and always at the end); 0 = only at the end.")
    max_tokens: int = opt(65_536, "Cap on test tokens per evaluation (non-overlapping windows of train.seq_len "
                          "predicted tokens from the start of the split); 0 = the whole split, else >= train.seq_len.")
    batch_size: int = opt(16, "Sequences per evaluation forward pass.")


@dataclass
class LogConfig:
    tensorboard: bool = opt(True, "Write TensorBoard event files under <out_dir>/tb/user_XX (the users of log.users) "
                            "and <out_dir>/tb/federation (means over the users, on rank 0).")
    users: Union[str, list[int]] = opt("auto", "The users that get their own TensorBoard / W&B curves: 'all', 'none', "
                                       "a list such as [0, 5, 17], or 'auto' = all up to 16 users, else users 0-7. "
                                       "Means over every user go to tb/federation whatever this says.")
    every: int = opt(1, "Log training scalars every this many local iterations.")
    progress: bool = opt(True, "Print progress on rank 0: bars on a terminal, plain lines on a file or pipe "
                               "(false: no progress; the run's messages still print).")
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
class PrivacyConfig:
    dp: Literal["off", "user"] = opt(
        "off", "User-level differential privacy on what leaves a user (the shared groups: generalists and attention "
        "LoRA; specialists and routers never leave): 'user' clips each participating user's round update of every "
        "group to privacy.clip and adds Gaussian noise to the group's sum, and the run reports epsilon at "
        "privacy.delta every round; 'off' = none. See docs/privacy.md.")
    clip: float = opt(1.0, "C: L2 bound of one user's round update of one sharing group (its shared buffer minus the "
                      "aggregate it last downloaded), over the whole group.")
    noise_multiplier: float = opt(
        1.0, "z: the noise on a group's sum has standard deviation z * privacy.clip; 0 = clipping only (epsilon is "
        "infinite). Replaced by the calibrated value when privacy.target_epsilon is set.")
    delta: float = opt(1e-5, "delta of the (epsilon, delta) guarantee; in (0, 1), well below 1 / the number of users.")
    noise_at: Literal["server", "users"] = opt(
        "server", "Who adds the noise: 'server' = N(0, (z C)^2) once on the sum (a trusted aggregator); 'users' = each "
        "of the n contributing users adds N(0, (z C)^2 / n) to its own update, so the sum carries the same noise and "
        "nobody holds it alone (pair with privacy.secure_agg).")
    target_epsilon: Union[float, None] = opt(
        None, "Pick privacy.noise_multiplier before the run: the smallest one whose epsilon at privacy.delta after the "
        "planned rounds is at most this. null = use privacy.noise_multiplier as given.")
    secure_agg: bool = opt(
        False, "Secure aggregation: users add pairwise masks to their fixed-point shared buffers, so what one user "
        "sends looks uniformly random and only the group's sum is revealed (a simulation of the arithmetic, not of the "
        "key agreement: docs/privacy.md). int64 travels: twice the bytes of fp32.")
    frac_bits: int = opt(
        32, "Fractional bits of secure aggregation's fixed point: each value is rounded to a multiple of 2^-frac_bits, "
        "so the sum of n users is within n * 2^-(frac_bits+1) of the plain sum; each bit more halves the largest "
        "value a user may send (reported when exceeded).")


@dataclass
class RunConfig:
    """One run. ``load_config`` builds it checked; one built by hand is checked (and its
    ``method_options`` resolved) by ``validation.validate``. Per-user values: ``users.resolve_users``."""
    method: str = opt("comigs_1g1s", "Method to run (see `python -m comigs_dist.main --methods`).")
    method_options: dict[str, Any] = opt({}, "Options of the chosen method, as method_options.<key>=value "
                                         "(e.g. method_options.lambda_p=5e-3 for hetlora); each method's "
                                         "options are listed below and by --methods. Unknown keys are errors.")
    seed: int = opt(42, "Seed; each user's random streams (adapter init, training and router batches) are drawn "
                    "from a hash of (seed, user, stream), so no two seeds share one (paper: 42, 45, 47).")
    out_dir: Union[str, None] = opt(None, "Where the run writes; default a fresh runs/<time>_<method>_s<seed>_<digest> "
                                    "directory (with resume=auto under Slurm or torchrun: runs/slurm-<job id>_<method>_"
                                    "s<seed> or runs/torchrun-<id>_...).")
    resume: Literal["false", "true", "auto"] = opt("false", "Continue from the newest round every user checkpointed in "
                                                   "out_dir: 'true' (out_dir required, a checkpoint must exist), "
                                                   "'auto' (resume if one exists, else start fresh: for torchrun "
                                                   "--max-restarts and Slurm requeues), 'false' (start fresh).")
    n_users: Union[int, None] = opt(None, "Number of simulated users, spread evenly over the ranks (at least "
                                        "one per rank; docs/scale.md). Default: the world size, one user per rank.")
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
    privacy: PrivacyConfig = sub(PrivacyConfig, "Privacy of what leaves a user: differential privacy and secure "
                                 "aggregation of the shared groups (docs/privacy.md).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
