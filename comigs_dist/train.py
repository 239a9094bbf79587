"""Algorithm 1 of the paper as a readable loop, with its optimisers and schedules.

Owns a rank's run: the frozen base (one per rank) and each of its users' state (``UserState``:
adapters, optimisers, samplers, counters); then, every round: synchronise the shared parameters
(the method's ``sync``, the first round included), take the local expert steps on training
batches (router frozen, eq. 2) and, every tau local iterations, the router steps on the router's
split (experts frozen, eq. 3); evaluate; checkpoint; after the last round, the method's closing
stage (``Method.after_training``, nothing for most). Methods plug in through their hooks; this
file never branches on a method's name. Gradients never leak between the two levels: only the
phase's parameters require gradients, and gradients are dropped after every step (unless a method
reproduces the reference code's leak, ``Method.requires_grad_in``: then each optimiser clears only
its own gradients). Monitoring (``monitor``), resuming (``resume``), the non-finite guard
(``guard``) and injected faults (``faults``) are called from here but own their details.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comigs_dist import dist, faults, guard, resume
from comigs_dist.config import (ConfigError, RunConfig, privacy_accounting, resolve_users, sampling_discount_withheld,
                                to_yaml, users_per_round)
from comigs_dist.config.users import participants
from comigs_dist.data import BatchSampler, UserData, load_user_data
from comigs_dist.evaluate import EvalResult, evaluate_split
from comigs_dist.methods import AfterTrainingContext, Method, SyncContext, get_method
from comigs_dist.model import AdaptedBase, UserModel, adapter_spec_for, build_user_model, forward_users
from comigs_dist.model.shared_base import plan_sharing
from comigs_dist.monitor import Monitor
from comigs_dist.privacy import resolve_noise_multiplier, resolution
from comigs_dist.privacy.mean import PrivateMean
from comigs_dist.seeds import derive_seed


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------

def resolve_dataset(cfg: RunConfig, n_users: int) -> Path:
    """The prepared dataset directory: data.path, or the embedded corpus (generated on first use)."""
    if cfg.data.path != "embedded":
        return Path(cfg.data.path)
    from comigs_dist.synthetic import ensure_embedded_dataset
    tokens = [u.train_tokens for u in resolve_users(cfg, n_users)]
    return ensure_embedded_dataset(n_users, cfg.data.scenario, tokens, cfg.data.valid_tokens, cfg.data.test_tokens)


def prepare_assets(cfg: RunConfig, n_users: int, progress: bool = False, say=lambda msg: None) -> None:
    """Generate the embedded corpus and pretrain the embedded base if they are not cached yet;
    refuse a dataset that cannot serve this run (a malformed meta.json, fewer users than the run
    has, splits shorter than one window, users holding other categories than data.categories
    says) and data tokenized differently from the model."""
    from comigs_dist.config.validation import local_model_problem
    if (problem := local_model_problem(cfg.model.name)) is not None:
        raise ValueError(problem)
    data_dir = resolve_dataset(cfg, n_users)
    from comigs_dist.data import check_categories, check_dataset
    from comigs_dist.model import check_model_matches_data
    meta = check_dataset(data_dir, n_users, cfg.train.seq_len)
    check_categories(cfg.data.categories, meta, f"data.path={cfg.data.path}")
    check_model_matches_data(cfg.model.name, meta, f"data.path={cfg.data.path}")
    if cfg.model.name == "embedded":
        from comigs_dist.synthetic import ensure_embedded_base
        ensure_embedded_base(progress=progress, say=say)


def resolve_amp(device: torch.device, amp: str) -> str:
    """'auto' = bf16 on CUDA devices that support it, off elsewhere."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return amp


def resolve_base_dtype(dtype: str, device: torch.device, amp: str) -> torch.dtype:
    """How the frozen base is stored. 'auto' and 'fp32': fp32, computed under the autocast of
    train.amp (bf16 on a GPU), as the reference runs it; 'bf16' only when asked for, which halves
    the base's memory but runs the residual stream in bf16 (docs: the measured difference)."""
    if dtype in ("auto", "fp32"):
        return torch.float32
    if dtype == "bf16":
        if resolve_amp(device, amp) != "bf16":
            raise ValueError(f"model.dtype=bf16 needs bf16 autocast, but train.amp={amp} runs without it on "
                             f"{device.type}; set train.amp=bf16 or model.dtype=fp32")
        return torch.bfloat16
    raise ValueError(f"model.dtype ({dtype!r}) must be 'auto', 'fp32' or 'bf16'")


def autocast_for(device: torch.device, amp: str):
    """A context factory: bf16 autocast on CUDA when supported ('auto'), or as configured."""
    amp = resolve_amp(device, amp)
    if amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def cosine_schedule(total_steps: int, min_ratio: float):
    """'One-cycle cosine' as the reference runs it: from lr down to lr * min_ratio, no warm-up."""
    def factor(step: int) -> float:
        progress = min(step, total_steps) / max(1, total_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_optimizer(params: list[torch.nn.Parameter], lr: float, cfg_train, device: torch.device):
    if not params:
        return None
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg_train.betas), eps=1e-8,
                             weight_decay=cfg_train.weight_decay, fused=device.type == "cuda")


# --------------------------------------------------------------------------------------------
# a user, and a rank's users
# --------------------------------------------------------------------------------------------

@dataclass
class UserState:
    """Everything one user holds during a run: it trains, sits a round out, checkpoints and is
    restored on its own."""
    cfg: RunConfig
    user_idx: int
    device: torch.device
    method: Method
    model: UserModel
    data: UserData
    shared: dict[str, list]                   # group -> [(name, parameter)], one flat buffer per group
    expert_opt: torch.optim.Optimizer | None
    expert_sched: torch.optim.lr_scheduler.LambdaLR | None
    router_opt: torch.optim.Optimizer | None
    train_sampler: BatchSampler
    router_sampler: BatchSampler
    stats: dist.CommStats = field(default_factory=dist.CommStats)  # what this user sent and received
    method_state: object = None               # what the method keeps for this user (HetLoRA's ranks, ...)
    step: int = 0                             # local iterations done, across rounds (s in the paper's appendix)
    round: int = 0                            # the round (1-based) whose steps it takes now, for the guard's record
    router_step: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float = float("nan")
    history: list = field(default_factory=list)      # test perplexity at evaluations
    train_curve: list = field(default_factory=list)  # per round: the mean loss of its expert steps
    base: EvalResult | None = None            # the model before training (kept for a resume)
    final: EvalResult | None = None           # the final evaluation (kept in final.pt, see train.run)
    guard_skipped_rounds: int = 0             # rounds this user sat out (guard.nan=skip)
    guard_skipped_steps: int = 0              # optimiser steps dropped for a non-finite loss
    contributing: bool = True                 # takes part in this round's means (guard.nan=skip, participation)
    rounds_taken: int = 0                     # rounds this user took part in (train.participation)
    sits_out_gradients: bool = False          # sits this step's gradient average out (guard.nan=skip)
    # privacy.*: per group the aggregate last downloaded ("references"), epsilon after every round,
    # how many updates were sent and clipped (empty when privacy is off)
    privacy: dict = field(default_factory=dict)

    @property
    def n_train_tokens(self) -> int:
        return len(self.data.train)

    def expert_params(self) -> list[torch.nn.Parameter]:
        """The parameters the expert optimiser steps that hold a gradient now."""
        if self.expert_opt is None:
            return []
        return [p for g in self.expert_opt.param_groups for p in g["params"] if p.grad is not None]


@dataclass
class RankRun:
    """One rank's part of a run: the topology, the method, the communication, the frozen base its
    users share, and its users."""
    cfg: RunConfig
    topo: dist.Topology
    method: Method
    comm: dist.Comm
    base: AdaptedBase
    users: list[UserState]
    autocast: object
    accountant: object = None                 # privacy.dp=user: epsilon over the rounds (privacy.accountant)
    privacy: dict = field(default_factory=dict)  # the privacy settings results.json reports (empty when off)


def build_user(cfg: RunConfig, topo: dist.Topology, method: Method, base: AdaptedBase | None, user: int,
               share=None) -> UserState:
    """One user's model over the rank's base, its data, shared groups, optimisers and samplers."""
    data_dir = resolve_dataset(cfg, topo.n_users)
    configured = method.run_users()[user]
    data = load_user_data(data_dir, user, cfg.train.seq_len, configured.share, cfg.data.verify)
    spec = method.adapter_spec(cfg, user, adapter_spec_for(cfg, configured, method.routed))
    model = build_user_model(cfg, configured, data.vocab_size, method.routed, spec, share, base).to(topo.device)
    shared: dict[str, list] = {}
    for name, tag in model.report.tags.items():
        if method.is_shared(tag):
            shared.setdefault(method.group_of(tag, user), []).append((name, model.report.params[name]))
    t = cfg.train
    expert_params = model.set_trainable(lambda tag: method.trains_in("expert", tag)) if method.trains else []
    router_params = ([p for _, p in model.report.select(lambda tag: method.trains_in("router", tag))]
                     if method.trains else [])
    expert_opt = build_optimizer(expert_params, t.lr, t, topo.device)
    expert_sched = None
    if expert_opt is not None:
        factor = (cosine_schedule(t.rounds * t.local_steps, t.min_lr_ratio) if t.schedule == "cosine"
                  else (lambda s: 1.0))
        expert_sched = torch.optim.lr_scheduler.LambdaLR(expert_opt, factor)
    router_opt = build_optimizer(router_params, t.router_lr, t, topo.device)
    router_tokens = data.valid if method.router_split == "valid" else data.train
    state = UserState(cfg=cfg, user_idx=user, device=topo.device, method=method, model=model, data=data,
                      shared={g: shared[g] for g in sorted(shared)}, expert_opt=expert_opt,
                      expert_sched=expert_sched, router_opt=router_opt,
                      train_sampler=BatchSampler(data.train, t.seq_len, derive_seed(cfg.seed, user, "train_batches")),
                      router_sampler=BatchSampler(router_tokens, t.seq_len,
                                                  derive_seed(cfg.seed, user, "router_batches")))
    method.prepare_user(state)
    return state


def build_rank(cfg: RunConfig, topo: dist.Topology, method: Method | None = None) -> RankRun:
    """The rank's base (one read-only copy per host when sharing is on, cast once), its users,
    their shared groups' shape handshake and packed buffers, and the communication handle."""
    method = method or get_method(cfg.method, cfg, resolve_users(cfg, topo.n_users))
    if not topo.groups:  # main builds them right after the process group forms
        topo.build_groups(method.sharing_groups(topo.n_users))
    share = plan_sharing(cfg.model.share_base, cfg.comm.timeout_s, topo)
    users: list[UserState] = []
    base = None
    for u in topo.local_users:
        state = build_user(cfg, topo, method, base, u, share)
        base = state.model.base
        users.append(state)
    if resolve_base_dtype(cfg.model.dtype, topo.device, cfg.train.amp) == torch.bfloat16:
        base.cast_frozen_(torch.bfloat16)
    # shape handshake before the first collective: names the group, user and parameter that differ
    dist.check_group_shapes(topo, {u.user_idx: u.shared for u in users})
    for u in users:
        for params in u.shared.values():  # each group's parameters in one buffer: the sync copies nothing
            dist.pack_flat([p for _, p in params])
    private, accountant, report = build_privacy(cfg, topo, users)
    comm = dist.Comm(topo, cfg.comm.mode, cfg.comm.dtype, exact=cfg.comm.exact,
                     count=counts_contributors(cfg, topo.n_users), privacy=private)
    comm.mark_checked(topo.groups)
    if cfg.comm.weights == "tokens":  # each user weighs its training tokens in the means
        comm.weights = {u.user_idx: float(u.n_train_tokens) for u in users}
    for u in users:
        u.stats = comm.user_stats[u.user_idx]
    return RankRun(cfg=cfg, topo=topo, method=method, comm=comm, base=base, users=users,
                   autocast=autocast_for(topo.device, cfg.train.amp), accountant=accountant, privacy=report)


def build_privacy(cfg: RunConfig, topo: dist.Topology,
                  users: list[UserState]) -> tuple[PrivateMean | None, object, dict]:
    """privacy.*: the private mean of the rank's shared groups (None when both mechanisms are off),
    the accountant (privacy.dp=user; the noise multiplier calibrated to privacy.target_epsilon
    first, the same on every rank) and the settings results.json reports. docs/privacy.md."""
    p = cfg.privacy
    if p.dp != "user" and not p.secure_agg:
        return None, None, {}
    groups = sorted({g for u in users for g in u.shared})
    report = {"dp": p.dp, "secure_agg": p.secure_agg}
    z, accountant = 0.0, None
    if p.dp == "user":
        from comigs_dist.privacy.accountant import Accountant
        plan = privacy_accounting(cfg, topo.n_users)
        z = resolve_noise_multiplier(p, **plan)
        accountant = Accountant(z, plan["sample_rate"], p.delta, sampling=plan["sampling"], n_users=plan["n_users"],
                                groups_per_user=plan["groups_per_user"])
        report.update(clip=p.clip, noise_multiplier=z, noise_at=p.noise_at, delta=p.delta,
                      target_epsilon=p.target_epsilon, accountant="dp-accounting RDP", accounting=plan,
                      neighbours=("replace one user" if plan["sampling"] == "fixed"
                                  else "add or remove one user (its update zeroed out: the divisor is public)"))
        withheld = sampling_discount_withheld(cfg, topo.n_users)
        if withheld:
            report["no_sampling_discount"] = withheld
    if p.secure_agg:
        # the largest group of the run, not only of this rank's users: the same report on every rank
        largest = max((len(topo.members(g)) for g in topo.groups), default=1)
        report.update(frac_bits=p.frac_bits, sum_resolution=resolution(p.frac_bits, largest))
    for u in users:
        u.privacy = {"references": {}, "epsilon_curve": [], "updates_sent": 0, "updates_clipped": 0}
    return PrivateMean(p, noise_multiplier=z, seed=cfg.seed, groups=groups), accountant, report


def analytic_round_bytes(user: UserState, comm_cfg, topo: dist.Topology, count: bool, secure_agg: bool = False,
                         round_idx: int | None = None) -> dict:
    """What one aggregation round should cost a user, from the shapes of its shared parameters
    (``dist.round_bytes``: S up and down in server mode, N*S each way in all2all, S in comm.dtype
    (int64 under privacy.secure_agg) plus the contributor count under guard.nan=skip): per group
    and in total, for the groups the user's payloads travel in now (``Method.payloads``: its shared
    groups, or those a method formed since, learned groups). This is the mean every method
    defaults to; methods with an aggregation of their own name its collectives in ``payloads``
    (``dist.collective_bytes``)."""
    groups, total = {}, {"sent": 0, "received": 0}
    wire = dist.SECURE_AGG_WIRE if secure_agg else comm_cfg.dtype
    for group, spec in user.method.payloads(user, round_idx).items():
        entries = dist.collectives(spec)  # one per collective in the group
        members = topo.members(group) if entries[0][1] is None else tuple(entries[0][1])
        payload, sent, received = dist.collective_bytes(entries, comm_cfg.mode, wire, len(members), count)
        numel = sum(e[0] for e in entries)
        groups[group] = {"members": list(members), "shared_params": numel, "payload_bytes": payload,
                         "analytic_sent_per_round": sent, "analytic_received_per_round": received}
        total["sent"] += sent
        total["received"] += received
    return {"groups": groups, "total": total}


# --------------------------------------------------------------------------------------------
# the steps of Algorithm 1
# --------------------------------------------------------------------------------------------

def counts_contributors(cfg: RunConfig, n_users: int) -> bool:
    """Whether a contributor count travels with every mean: users may sit a mean out, under
    guard.nan=skip or because they did not take part in the round before."""
    return cfg.guard.nan == "skip" or cfg.comm.weights == "tokens" or users_per_round(cfg, n_users) < n_users


def _held(user: UserState) -> tuple[dict, dict]:
    """A copy of what a sync may change in a user: its adapters' values and its method state."""
    params = {n: p.detach().clone() for n, p in user.model.report.params.items()}
    return params, copy.deepcopy(user.method.state_dict(user))


@torch.no_grad()
def _put_back(user: UserState, held: tuple[dict, dict]) -> None:
    params, state = held
    for n, p in user.model.report.params.items():
        p.copy_(params[n])
    user.method.load_state_dict(user, state)


def sync(rank: RankRun, round_idx: int, everyone_downloads: bool = False) -> list[UserState]:
    """The shared parameters of the rank's users meet the other users' (the method's ``sync``):
    round 0 is the common start, later rounds download the aggregate of what the users uploaded.
    Returns the rank's users that take part in this round.

    Under partial participation, the aggregate is the mean over the users that trained in the
    round before (the others sit it out), and only this round's participants download it: every
    other user leaves the sync exactly as it entered (it downloads the latest aggregate when it
    next takes part). ``everyone_downloads``: every user downloads it (the aggregate after the
    last round, which a method's closing stage hands to all). No NaN or inf reaches a
    collective: a user stops the run or sits the round out (guard.nan)."""
    users, cfg, n = rank.users, rank.cfg, rank.topo.n_users
    now = frozenset(range(n)) if everyone_downloads else participants(cfg, n, round_idx)
    uploaded = participants(cfg, n, round_idx - 1) if round_idx > 0 else frozenset(range(n))
    for u in users:
        if round_idx > 0 and u.user_idx in uploaded:
            faults.before_sync(u, round_idx)
            u.contributing = guard.check_shared(u, round_idx, closing=everyone_downloads)
        else:
            u.contributing = round_idx == 0
    # round 0 is the common start: every user receives it. Later, the default mean writes to the
    # round's participants only (Comm.set_round); a method that aggregates its own way (or the
    # private mean) may write to anyone, so the others' values are kept aside and put back
    own_way = type(rank.method).sync is not Method.sync or rank.comm.privacy is not None
    keep = {u.user_idx: _held(u) for u in users if round_idx > 0 and u.user_idx not in now and own_way}
    # a device that trained last round uploads (a user the guard sets aside sends its flag and
    # zeros); one that did not train sends nothing, and only this round's participants download
    rank.comm.set_round(upload=uploaded if round_idx > 0 else None, download=now if round_idx > 0 else None)
    if rank.comm.privacy is not None:  # the round's planned contributors, and what each user downloaded last
        rank.comm.privacy.start_round(round_idx, uploaded, {u.user_idx: u.privacy["references"] for u in users})
    try:
        rank.method.sync(SyncContext(round_idx=round_idx, comm=rank.comm, users=users,
                                     evaluate_valid=lambda u: evaluate_valid(u, rank.autocast).loss,
                                     participants=now if round_idx > 0 else None))
    finally:
        rank.comm.set_round(None, None)
    for u in users:
        if u.user_idx in keep:
            _put_back(u, keep[u.user_idx])
        u.contributing = True
    if rank.comm.privacy is not None:
        _after_private_sync(rank, round_idx, downloaded=[u for u in users if u.user_idx not in keep])
    return [u for u in users if u.user_idx in now]


@torch.no_grad()
def _after_private_sync(rank: RankRun, round_idx: int, downloaded: list[UserState]) -> None:
    """privacy.*, once a round's sync is done: the users' clipping counts; under privacy.dp=user
    the aggregate each user that downloaded starts from (its next update is measured from it),
    and epsilon after the round (the accountant counts the round if any of its private means ran:
    released, or a group's latest release answered again; ``PrivateMean.answered_again``)."""
    private = rank.comm.privacy
    for u in rank.users:
        norms = private.norms.get(u.user_idx, [])
        u.privacy["updates_sent"] += len(norms)
        u.privacy["updates_clipped"] += sum(n > rank.cfg.privacy.clip for n in norms)
    if rank.accountant is None:
        return
    for u in downloaded:
        u.privacy["references"] = {g: dist.flatten([p for _, p in params], params[0][1].dtype)
                                   for g, params in u.shared.items()}
    epsilon = rank.accountant.step() if private.released else rank.accountant.epsilon
    if rank.accountant.rounds > (planned := rank.privacy["accounting"]["rounds"]):  # a method's bug, not the user's
        raise RuntimeError(f"method {rank.cfg.method!r} released a noised aggregate {rank.accountant.rounds} times by "
                           f"round {round_idx + 1}, more than the {planned} releases privacy planned "
                           f"(config.privacy_accounting) and calibrated the noise to; its epsilon would exceed "
                           f"what was promised, so the run stops")
    for u in rank.users:
        u.privacy["epsilon_curve"].append({"round": round_idx + 1, "epsilon": epsilon})
        u.privacy["accountant"] = rank.accountant.state_dict()


def _micro_batches(user: UserState, sampler: BatchSampler, expert_phase: bool, autocast) -> tuple[float, float, float]:
    """Forward and backward of one optimiser step's micro-batches (gradients accumulate);
    returns (loss, cross-entropy, load-balancing loss) averaged over them."""
    t, model = user.cfg.train, user.model
    micro = t.micro_batch_size or t.batch_size
    n_micro = t.batch_size // micro
    totals = [0.0, 0.0, 0.0]
    for _ in range(n_micro):
        x, y = sampler.sample(micro, user.device)
        with autocast():
            out = model(x, y)
            loss = out.ce + user.cfg.moe.lb_weight * out.lb
            extra = user.method.extra_loss(user) if expert_phase else None
            if extra is not None:
                loss = loss + extra
        (loss / n_micro).backward()
        for i, v in enumerate((loss, out.ce, out.lb)):
            totals[i] += float(v.detach()) / n_micro
    return totals[0], totals[1], totals[2]


def _packed_micro_batches(users: list[UserState], autocast) -> list[tuple[float, float, float]]:
    """``_micro_batches`` of the expert phase for several users at once: each micro-batch of every
    user goes through the shared base in one packed forward (``model.forward_users``), and the sum
    of their losses in one backward, which reaches each user's own adapters only."""
    cfg = users[0].cfg
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size
    n_micro = t.batch_size // micro
    totals = [[0.0, 0.0, 0.0] for _ in users]
    for _ in range(n_micro):
        batches = [u.train_sampler.sample(micro, u.device) for u in users]
        with autocast():
            outs = forward_users([u.model for u in users], [x for x, _ in batches], [y for _, y in batches])
            losses = []
            for u, out in zip(users, outs):
                loss = out.ce + cfg.moe.lb_weight * out.lb
                extra = u.method.extra_loss(u)
                losses.append(loss + extra if extra is not None else loss)
        (sum(losses) / n_micro).backward()
        for tot, loss, out in zip(totals, losses, outs):
            for i, v in enumerate((loss, out.ce, out.lb)):
                tot[i] += float(v.detach()) / n_micro
    return [tuple(tot) for tot in totals]


def packs_users(cfg: RunConfig, device: torch.device, users: list[UserState]) -> bool:
    """Whether the expert steps of these users run packed (train.pack_users)."""
    mode = cfg.train.pack_users
    wanted = mode == "on" or (mode == "auto" and device.type == "cuda")
    return wanted and len(users) > 1


def _step(opt: torch.optim.Optimizer, grad_clip: float) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def expert_step(rank: RankRun, users: list[UserState]) -> list[tuple[float, float, float]]:
    """One local iteration of the experts on training batches, router frozen (eq. 2), for each
    user; a method that averages gradients (Centralized) does so between the backward and the
    step. Returns each user's (loss, cross-entropy, load-balancing loss)."""
    method, t = rank.method, rank.cfg.train
    results, dropped = [], []
    packed = None
    if packs_users(rank.cfg, rank.topo.device, users):
        for u in users:
            u.model.set_trainable(method.requires_grad_in("expert"))
            method.before_phase(u, "expert")
        start = time.perf_counter()
        packed = _packed_micro_batches(users, rank.autocast)
        share = (time.perf_counter() - start) / len(users)  # each user is charged an equal part
        for u in users:
            u.train_seconds += share
    for i, u in enumerate(users):
        start = time.perf_counter()
        if packed is not None:
            losses = packed[i]
        else:
            u.model.set_trainable(method.requires_grad_in("expert"))
            method.before_phase(u, "expert")
            losses = _micro_batches(u, u.train_sampler, True, rank.autocast)
        # a non-finite loss stops the run (guard.nan=stop) before any collective, or drops the step
        drop = not math.isfinite(losses[0]) and guard.check_loss(u, losses[0], True)
        if method.reduces_gradients and not drop:  # gradients are about to meet the other users'
            drop = guard.check_gradients(u, u.expert_params())
        u.sits_out_gradients = drop
        u.train_seconds += time.perf_counter() - start
        results.append(losses)
        dropped.append(drop)
    if method.reduces_gradients:
        method.reduce_gradients(rank.comm, users)
    for u, losses, drop in zip(users, results, dropped):
        start = time.perf_counter()
        if drop and not method.reduces_gradients:
            u.expert_opt.zero_grad(set_to_none=True)
        else:
            # a user that sat out a gradient average received the others' mean: it steps with it,
            # so that data-parallel replicas stay one model
            _step(u.expert_opt, t.grad_clip)
            method.after_expert_step(u)
        u.sits_out_gradients = False
        u.expert_sched.step()
        u.step += 1
        u.train_tokens += t.batch_size * t.seq_len
        u.train_seconds += time.perf_counter() - start
        u.last_loss = losses[0]
    return results


def _guarded_step(rank: RankRun, user: UserState, sampler: BatchSampler, opt: torch.optim.Optimizer,
                  expert_phase: bool) -> float:
    """One optimiser step of ``opt`` on a batch of ``sampler`` (no method extra loss). A
    non-finite loss stops the run or drops the step, as ``guard.nan`` says; ``expert_phase``
    names the phase in the guard's message. Returns the step's loss."""
    loss = _micro_batches(user, sampler, False, rank.autocast)[0]
    if math.isfinite(loss) or not guard.check_loss(user, loss, expert_phase):
        _step(opt, rank.cfg.train.grad_clip)
    else:
        opt.zero_grad(set_to_none=True)
    return loss


def router_steps(rank: RankRun, user: UserState, round_idx: int) -> float:
    """s optimiser steps of a user's routers on its router split, experts frozen (eq. 3);
    returns their mean loss."""
    user.model.set_trainable(rank.method.requires_grad_in("router"))
    rank.method.before_phase(user, "router")
    losses = []
    for _ in range(rank.cfg.train.router_steps):
        losses.append(_guarded_step(rank, user, user.router_sampler, user.router_opt, expert_phase=False))
        user.router_step += 1
        faults.during_router(user, round_idx)
    return sum(losses) / len(losses)


def closing_step(rank: RankRun, user: UserState, opt: torch.optim.Optimizer) -> float:
    """One optimiser step of ``opt`` on a batch of the user's training sampler, for a method's
    stage after the last round (``Method.after_training``); its tokens and time count towards the
    user's. Returns the step's loss."""
    t = rank.cfg.train
    start = time.perf_counter()
    loss = _guarded_step(rank, user, user.train_sampler, opt, expert_phase=True)
    user.train_tokens += t.batch_size * t.seq_len
    user.train_seconds += time.perf_counter() - start
    return loss


def after_training(rank: RankRun, rounds: int, monitor: Monitor, say=lambda msg: None) -> None:
    """The method's stage after the last round (every rank together; nothing for most methods).
    Its steps' losses go to TensorBoard as ``after_training/loss``, after the user's last local
    iteration on the step axis; its aggregation is logged as it happens (``_log_closing_sync``),
    before any such step, so that loggers that need increasing steps (W&B) keep it."""
    t = rank.cfg.train
    taken: dict[int, int] = {}
    for u in rank.users:
        u.round = rounds  # its closing steps come after the last round

    def step(user: UserState, opt: torch.optim.Optimizer) -> float:
        loss = closing_step(rank, user, opt)
        taken[user.user_idx] = k = taken.get(user.user_idx, 0) + 1
        monitor.after_training_step(user.user_idx, user.step + k, loss)
        return loss

    def aggregate() -> None:
        if not rank.method.aggregates_after_training:
            raise RuntimeError(f"method {rank.cfg.method!r} aggregates after the last round, but its "
                               f"aggregates_after_training says it does not, so privacy's accountant would "
                               f"miss that release; set it to True")
        before = _traffic_so_far(rank)
        sync(rank, rounds, everyone_downloads=True)
        _log_closing_sync(rank, monitor, before, say)
    rank.method.after_training(AfterTrainingContext(
        rounds=rounds, users=rank.users, aggregate=aggregate,
        optimizer=lambda params: build_optimizer(params, t.lr, t, rank.topo.device), step=step))


def router_due(rank: RankRun, user: UserState) -> bool:
    """Router steps come after every tau-th local iteration (counted across rounds)."""
    t = rank.cfg.train
    return user.router_opt is not None and t.router_steps > 0 and user.step % t.router_every == 0


def run_round(rank: RankRun, round_idx: int, monitor: Monitor | None = None) -> None:
    """One round of Algorithm 1 for the rank's users: sync, then the local iterations (expert
    steps; router steps every tau). Benchmarks and tests drive rounds through this function."""
    monitor = monitor or Monitor.silent([u.user_idx for u in rank.users])
    active = sync(rank, round_idx)  # the users that take part; the others are left as they are
    local_iterations(rank, active, round_idx, monitor)


def local_iterations(rank: RankRun, active: list[UserState], round_idx: int, monitor: Monitor) -> None:
    """A round's local iterations of the participating users: expert steps, and router steps
    every tau (Algorithm 1)."""
    round_losses: dict[int, list[float]] = {u.user_idx: [] for u in active}
    for u in active:
        u.round = round_idx + 1
    for local_idx in range(rank.cfg.train.local_steps if active else 0):
        for u in active:
            faults.during_round(u, round_idx, local_idx)
        for u, (loss, ce, lb) in zip(active, expert_step(rank, active)):
            round_losses[u.user_idx].append(loss)
            monitor.expert_step(u.user_idx, u.step, loss, ce, lb, u.expert_opt.param_groups[0]["lr"],
                                u.train_tokens / max(u.train_seconds, 1e-9), u.model.routing_stats())
        for u in active:
            if router_due(rank, u):
                mean = router_steps(rank, u, round_idx)
                monitor.router_phase(u.user_idx, u.step, rank.method.router_split, mean,
                                     u.router_opt.param_groups[0]["lr"])
    for u in active:
        losses = round_losses[u.user_idx]
        u.rounds_taken += 1
        u.train_curve.append({"round": round_idx + 1, "loss": sum(losses) / len(losses)})


def evaluate_test(user: UserState, autocast, progress=None) -> EvalResult:
    e = user.cfg.eval
    return evaluate_split(user.model, user.data.test, user.cfg.train.seq_len, e.batch_size, e.max_tokens,
                          user.device, autocast, progress=progress)


def evaluate_valid(user: UserState, autocast) -> EvalResult:
    e = user.cfg.eval
    return evaluate_split(user.model, user.data.valid, user.cfg.train.seq_len, e.batch_size, e.max_tokens,
                          user.device, autocast)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

def run(cfg: RunConfig, topo: dist.Topology, out_dir: Path, say=lambda msg: None) -> list[dict]:
    """Run Algorithm 1 for this rank's users; returns their rows of results.json."""
    topo.set_phase("setup")
    rank = build_rank(cfg, topo)
    for u in rank.users:
        faults.at_setup(u)
    # a fresh start, or every user restored to the newest round they all checkpointed
    done = resume.restore(rank, out_dir, say)
    if rank.accountant is not None and done:  # the rounds already accounted for, from the checkpoint
        _restore_accountant(rank)
    if topo.rank == 0:  # only now: a refused start or resume leaves the directory as it found it
        from comigs_dist.checkpoint import write_atomic
        write_atomic(Path(out_dir) / "config.yaml", lambda f: f.write(to_yaml(cfg)), text=True)
        if (note := guard.retire_stopped(out_dir)) is not None:  # under the lock rank 0 holds
            say(note)
    method, t = rank.method, cfg.train
    # restored from final.pt (stopped after it, before results.json): trained and evaluated, and
    # logged to the end (its TensorBoard events are kept whole)
    finished = bool(done) and all(u.final is not None for u in rank.users)
    monitor = Monitor.build(cfg, topo.rank, [u.user_idx for u in rank.users], out_dir,
                            {u.user_idx: u.step for u in rank.users} if done else {}, say, resumed_round=done,
                            purge=not finished)
    def analytic(round_idx: int | None = None) -> dict:
        """Each user's analytic bytes of a round in the current layout (learned groups change it):
        of round ``round_idx``'s sync, or (None) of a round in which the method aggregates."""
        return {u.user_idx: analytic_round_bytes(u, cfg.comm, topo, rank.comm.count, cfg.privacy.secure_agg,
                                                 round_idx) for u in rank.users}
    if rank.accountant is not None:
        say(f"privacy: user-level DP, noise multiplier {rank.accountant.noise_multiplier:.4g}, clip "
            f"{cfg.privacy.clip}, delta {cfg.privacy.delta}; planned epsilon {_planned_epsilon(rank):.4g}")
        if rank.privacy.get("no_sampling_discount"):
            say(f"privacy: no discount for sampling users: {rank.privacy['no_sampling_discount']}")

    # the base model: untrained adapters leave it unchanged (B = 0)
    for u in rank.users:
        monitor.start(u.user_idx, None if u.base is not None else to_yaml(cfg), len(u.model.moe),
                      u.model.spec.n_experts, u.model.spec.n_generalists, u.model.spec.routed)
        if u.base is None:
            u.base = evaluate_test(u, rank.autocast, monitor.progress)
            monitor.evaluation(u.user_idx, 0, u.base, "base")
    say(f"base model: mean test ppl over users {_mean_over_users(rank, lambda u: u.base.ppl):.3f}")

    rounds = t.rounds if method.trains else 0
    monitor.rounds_started(rounds - done, done)
    for round_idx in range(done, rounds):
        topo.set_phase(f"round {round_idx + 1}")
        round_start = time.perf_counter()
        before = _traffic_so_far(rank)
        # sync; local expert steps; router steps every tau (Algorithm 1)
        try:
            run_round(rank, round_idx, monitor)
        except guard.NothingLeft as exc:  # guard.nan=skip ran out of users: the run stops, as under stop
            raise guard.Stopped(str(exc), exc.user, round_idx + 1) from exc
        sent = {v: a["total"]["sent"] for v, a in analytic(round_idx).items()}
        for u in rank.users:
            monitor.round_end(u.user_idx, u.step, u.stats, before[u.user_idx], sent[u.user_idx],
                              u.guard_skipped_rounds, u.guard_skipped_steps)
        # evaluate
        if cfg.eval.every and (round_idx + 1) % cfg.eval.every == 0 and round_idx + 1 < rounds:
            _evaluate_users(rank, round_idx + 1, monitor)
        # checkpoint
        if cfg.checkpoint.every and (round_idx + 1) % cfg.checkpoint.every == 0:
            resume.save(rank, out_dir, f"round_{round_idx + 1:04d}.pt", round_idx + 1)
        _report_round(rank, round_idx + 1, rounds, round_start, monitor, say)
        monitor.round_done()
    monitor.rounds_finished()
    # after the last round, the method's own closing stage (FedDPA-F's fine-tune); round
    # checkpoints all precede it, so a resumed run reaches it once
    if method.trains and not finished:
        topo.set_phase("after the last round")
        try:
            after_training(rank, rounds, monitor, say)
        except guard.NothingLeft as exc:  # its closing aggregation had nobody left to average
            raise guard.Stopped(str(exc), exc.user, rounds) from exc

    # each user's model after its last local steps (what Algorithm 1 returns)
    topo.set_phase("the final evaluation")
    if not finished:
        for u, res in zip(rank.users, _evaluate_users(rank, rounds, monitor, before=faults.at_final_eval)):
            u.final = res
        if cfg.checkpoint.final and method.trains:
            resume.save(rank, out_dir, "final.pt", rounds)
    layout = analytic()
    out = {u.user_idx: user_row(u, u.final, layout[u.user_idx], topo, rank.privacy) for u in rank.users}
    monitor.finish(out)
    return [out[u.user_idx] for u in rank.users]


def _restore_accountant(rank: RankRun) -> None:
    """The privacy accountant of a resumed run, from its checkpoint; a checkpoint whose accounting
    this configuration cannot continue says why (the same on every rank)."""
    cfg = rank.cfg
    try:
        rank.accountant.load_state_dict(rank.users[0].privacy["accountant"])
    except ValueError as exc:  # every rank alike: the same checkpoint and configuration
        why = []
        if cfg.privacy.target_epsilon is not None:
            why.append("privacy.target_epsilon calibrates the noise multiplier to the planned releases: "
                       "train.rounds - 1, plus one for a method that aggregates after the last round, as FedDPA "
                       "does since 2026-11-30; so neither train.rounds nor that plan can change on resume with it")
        if rank.privacy.get("no_sampling_discount"):
            why.append("since 2026-11-30 a run whose comm.groups hold only some users gets no sampling discount "
                       "under partial participation (docs/privacy.md), so a checkpoint of such a run made before "
                       "cannot continue its accounting: start the run afresh in another out_dir")
        raise ConfigError(f"{exc}" + (f" ({'; '.join(why)})" if why else "")) from exc


def _evaluate_users(rank: RankRun, rounds_done: int, monitor: Monitor, before=lambda user: None) -> list[EvalResult]:
    """Every user's test perplexity after ``rounds_done`` rounds, into its history and the monitor
    (between rounds, and the final evaluation, whose fault hook runs as ``before`` each user's)."""
    results = []
    for u in rank.users:
        before(u)
        res = evaluate_test(u, rank.autocast, monitor.progress)
        monitor.evaluation(u.user_idx, u.step, res)
        u.history.append({"round": rounds_done, "step": u.step, "test_ppl": res.ppl})
        results.append(res)
    monitor.federation_eval(rounds_done, _mean_over_users(rank, lambda u: u.history[-1]["test_ppl"]))
    return results


def _report_round(rank: RankRun, rounds_done: int, rounds: int, round_start: float, monitor: Monitor, say) -> None:
    """The federation's line for a round: the mean training loss over the users that took part in
    it (one collective), epsilon so far under DP, to TensorBoard and the log, with the round's
    seconds from ``round_start`` (``time.perf_counter``) to the line."""
    topo = rank.topo
    took_part = [u for u in rank.users if u.train_curve and u.train_curve[-1]["round"] == rounds_done]
    total, count = dist.sum_scalars(topo, [sum(u.train_curve[-1]["loss"] for u in took_part), float(len(took_part))])
    mean_loss = total / max(count, 1.0)
    monitor.federation_round(rounds_done, mean_loss, int(count))
    epsilon = rank.users[0].privacy["epsilon_curve"][-1]["epsilon"] if rank.accountant is not None else None
    if epsilon is not None:
        monitor.federation_privacy(rounds_done, epsilon)
    say(f"round {rounds_done}/{rounds}: mean train loss {mean_loss:.4f}"
        + (f" over {int(count)} participating users" if int(count) < topo.n_users else "")
        + (f", epsilon {epsilon:.4g}" if epsilon is not None else "")
        + f" ({time.perf_counter() - round_start:.1f}s)")


def _traffic_so_far(rank: RankRun) -> dict[int, tuple[int, int, float]]:
    """Each user's (bytes sent, bytes received, seconds in collectives) so far: a round's traffic
    is the difference (``Monitor.round_end``)."""
    return {u.user_idx: (u.stats.bytes_sent, u.stats.bytes_received, u.stats.seconds) for u in rank.users}


def _log_closing_sync(rank: RankRun, monitor: Monitor, before: dict, say) -> None:
    """The aggregation after the last round (``Method.aggregates_after_training``), logged as a
    round's: its bytes after the user's last local iteration (+1, where the first closing step
    goes too), so that the last ``comm/bytes_sent`` equals results.json's; its epsilon
    (privacy.dp=user) on the federation's curve at round train.rounds + 1, as the epsilon curve
    numbers it."""
    cfg = rank.cfg
    for u in rank.users:
        sent = analytic_round_bytes(u, cfg.comm, rank.topo, rank.comm.count, cfg.privacy.secure_agg)["total"]["sent"]
        monitor.round_end(u.user_idx, u.step + 1, u.stats, before[u.user_idx], sent,
                          u.guard_skipped_rounds, u.guard_skipped_steps)
    curve = rank.users[0].privacy["epsilon_curve"] if rank.accountant is not None else []
    if curve:
        monitor.federation_privacy(curve[-1]["round"], curve[-1]["epsilon"])
    say(f"after the last round: {rank.cfg.method}'s closing aggregation"
        + (f", epsilon {curve[-1]['epsilon']:.4g}" if curve else ""))


def user_row(u: UserState, final: EvalResult, analytic: dict, topo: dist.Topology, privacy: dict | None = None) -> dict:
    """A user's row of results.json (with ``privacy``: the run's privacy settings, the epsilon
    curve and this user's clipping counts)."""
    model = u.model
    shared_numel = sum(p.numel() for params in u.shared.values() for _, p in params) if u.method.trains else 0
    extra = {}
    if privacy:
        extra["privacy"] = dict(privacy)
    if privacy and privacy["dp"] == "user":
        curve = u.privacy["epsilon_curve"]
        extra["privacy"].update(epsilon=curve[-1]["epsilon"] if curve else 0.0, epsilon_curve=list(curve),
                                updates_sent=u.privacy["updates_sent"], updates_clipped=u.privacy["updates_clipped"])
    return {
        "user": u.user_idx,
        "n_experts": model.spec.n_experts,          # as the method built it (HetLoRA: 1)
        "n_generalists": model.spec.n_generalists,
        "lora_rank": model.spec.rank,
        "test_ppl": final.ppl,
        "test_loss": final.loss,
        "test_accuracy": final.accuracy,
        "base_test_ppl": u.base.ppl,
        "bytes_sent": u.stats.bytes_sent,
        "bytes_received": u.stats.bytes_received,
        "comm_seconds": u.stats.seconds,
        "analytic_bytes_per_round": analytic["total"],
        "comm_groups": _comm_groups(u, topo, analytic),
        "shared_params": shared_numel,
        "trainable_params": model.report.count(),
        "tokens_per_second": u.train_tokens / u.train_seconds if u.train_seconds else 0.0,
        "train_tokens": u.train_tokens,
        "local_steps": u.step,
        "rounds_taken": u.rounds_taken,
        "router_steps": u.router_step,
        "final_train_loss": u.last_loss,
        "routing": final.routing,
        "test_curve": u.history,
        "train_curve": u.train_curve,
        "guard_skipped_rounds": u.guard_skipped_rounds,
        "guard_skipped_steps": u.guard_skipped_steps,
        **u.method.results(u),
        **extra,
    }


def _comm_groups(u: UserState, topo: dist.Topology, analytic: dict) -> dict:
    """Per group this user belongs to: its members, the analytic figures (groups of shared
    parameters) and what was counted (every group that moved bytes, a method's own included)."""
    none = {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}
    names = sorted(set(analytic["groups"]) | set(u.stats.by_group))
    return {g: {"members": list(topo.members(g)), **analytic["groups"].get(g, {}), **u.stats.by_group.get(g, none)}
            for g in names}


def _planned_epsilon(rank: RankRun) -> float:
    """Epsilon after every planned round (what privacy.target_epsilon was calibrated to)."""
    from comigs_dist.privacy.accountant import epsilon
    plan = rank.privacy["accounting"]
    return epsilon(rank.accountant.noise_multiplier, plan["sample_rate"], plan["rounds"], rank.cfg.privacy.delta,
                   sampling=plan["sampling"], n_users=plan["n_users"], groups_per_user=plan["groups_per_user"])


def _mean_over_users(rank: RankRun, value) -> float:
    """The mean over every user of the run of a per-user number (one scalar all_reduce)."""
    (total,) = dist.sum_scalars(rank.topo, [sum(value(u) for u in rank.users)])
    return total / rank.topo.n_users
