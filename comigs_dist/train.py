"""Algorithm 1 of the paper as a readable loop, with its optimisers and schedules.

Owns one user's run: build the model, data, optimisers and samplers; then, every round,
synchronise the shared parameters, take the local expert steps on training batches (router
frozen) and, every tau local iterations, the router steps on the router's split (experts
frozen); evaluate; checkpoint. Methods plug in through their hooks; this file never branches on
a method's name. Gradients never leak between the two levels: only the phase's parameters
require gradients, and gradients are dropped after every step (unless a method reproduces the
reference code's leak, ``Method.requires_grad_in``: then each optimiser clears only its own
gradients, and the other level's pile up as in the reference). Resuming
(``resume.restore_user``) and the non-finite guard (``guard``) are called from here but live in
modules of their own.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comigs_dist import dist, faults, guard, resume
from comigs_dist.config import RunConfig, resolve_users, to_yaml
from comigs_dist.data import BatchSampler, UserData, load_user_data
from comigs_dist.evaluate import EvalResult, evaluate_split
from comigs_dist.methods import Method, SyncContext, get_method
from comigs_dist.metrics import NullProgress, build_logger, build_progress, scalar_layout
from comigs_dist.model import UserModel, adapter_spec_for, build_user_model
from comigs_dist.model.shared_base import plan_sharing
from comigs_dist.wandb_logger import options_for as wandb_options
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


def prepare_assets(cfg: RunConfig, n_users: int, progress: bool = False) -> None:
    """Generate the embedded corpus and pretrain the embedded base if they are not cached yet;
    refuse a dataset that cannot serve this run (a malformed meta.json, fewer users than ranks,
    splits shorter than one window, users holding other categories than data.categories says) and
    data tokenized differently from the model."""
    data_dir = resolve_dataset(cfg, n_users)
    from comigs_dist.data import check_categories, check_dataset
    from comigs_dist.model import check_model_matches_data
    meta = check_dataset(data_dir, n_users, cfg.train.seq_len)
    check_categories(cfg.data.categories, meta, f"data.path={cfg.data.path}")
    check_model_matches_data(cfg.model.name, meta, f"data.path={cfg.data.path}")
    if cfg.model.name == "embedded":
        from comigs_dist.synthetic import ensure_embedded_base
        ensure_embedded_base(progress=progress)


def resolve_amp(device: torch.device, amp: str) -> str:
    """'auto' = bf16 on CUDA devices that support it, off elsewhere."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return amp


def resolve_base_dtype(dtype: str, device: torch.device, amp: str) -> torch.dtype:
    """How the frozen base is stored. 'auto' and 'fp32': fp32, computed under the autocast of
    train.amp (bf16 on a GPU), as the reference runs it; 'bf16' only when asked for, which halves
    the base's memory but runs the residual stream in bf16 (README: the measured difference)."""
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


class CommHandle:
    """The communication a method may use, bound to this run's topology and comm settings.

    ``count=True`` (guard.nan=skip) sends a contributor count with every mean, and
    ``contributing`` says whether this user takes part in the next ones: a user whose shared
    parameters are not finite sits the round out and receives the others' average. A method
    with its own aggregation operator must honour ``contributing`` too."""

    def __init__(self, topo: dist.Topology, mode: str, dtype: str, count: bool = False, exact: bool = True):
        self.topo, self.mode, self.dtype, self.count, self.exact = topo, mode, dtype, count, exact
        self.contributing = True

    def mean(self, group: str, tensors: list[torch.Tensor]) -> int:
        return dist.sync_mean(self.topo, group, tensors, self.mode, self.dtype, self.count, self.contributing,
                              self.exact)

    @contextlib.contextmanager
    def abstaining(self, abstain: bool = True):
        """Within the block this user contributes nothing to a mean (it still takes part)."""
        before = self.contributing
        self.contributing = before and not abstain
        try:
            yield
        finally:
            self.contributing = before

    def broadcast(self, group: str, tensors: list[torch.Tensor]) -> None:
        dist.broadcast_from(self.topo, group, tensors)

    def sum(self, group: str, tensors: list[torch.Tensor]) -> int:
        """In place: each tensor becomes its sum over the group (weighted means, scalars first)."""
        return dist.sync_sum(self.topo, group, tensors, self.dtype, self.exact)

    def gather(self, group: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every member's tensors as one flat fp32 vector per member, in member order."""
        return dist.gather_flat(self.topo, group, tensors, self.dtype)

    def sum_scalars(self, group: str, values: list[float]) -> list[float]:
        return dist.sync_sum_scalars(self.topo, group, values)

    def mean_gradients(self, group: str, params: list[torch.nn.Parameter]) -> int:
        return dist.mean_gradients(self.topo, group, params, self.count, self.contributing, self.exact)

    def members(self, group: str) -> tuple[int, ...]:
        return self.topo.members(group)


@dataclass
class UserRun:
    """Everything one user holds during a run."""
    cfg: RunConfig
    topo: dist.Topology
    method: Method
    model: UserModel
    data: UserData
    shared: dict[str, list]
    expert_opt: torch.optim.Optimizer | None
    expert_sched: torch.optim.lr_scheduler.LambdaLR | None
    router_opt: torch.optim.Optimizer | None
    train_sampler: BatchSampler
    router_sampler: BatchSampler
    step: int = 0                 # local iterations done, counted across rounds (s in the paper's appendix)
    router_step: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float = float("nan")
    history: list = field(default_factory=list)
    train_curve: list = field(default_factory=list)  # per round: the mean loss of its expert steps
    base: EvalResult | None = None            # the model before training (kept for a resume)
    guard_skipped_rounds: int = 0             # rounds this user sat out (guard.nan=skip)
    guard_skipped_steps: int = 0              # optimiser steps dropped for a non-finite loss


def analytic_round_bytes(run: UserRun, comm_cfg, topo: dist.Topology, count: bool) -> dict:
    """What one aggregation round should cost this user, from the shapes of its shared parameters
    (``dist.round_bytes``: S up and down in server mode, N*S each way in all2all, S in comm.dtype
    plus the contributor count under guard.nan=skip): per group and in total. This is the mean
    every method defaults to; methods with an aggregation of their own move what they move."""
    groups, total = {}, {"sent": 0, "received": 0}
    for group, params in run.shared.items():
        numel = sum(p.numel() for _, p in params)
        members = topo.members(group)
        payload = dist.payload_bytes(numel + (1 if count else 0), comm_cfg.dtype)
        sent, received = dist.round_bytes(payload, comm_cfg.mode, len(members))
        groups[group] = {"members": list(members), "shared_params": numel, "payload_bytes": payload,
                         "analytic_sent_per_round": sent, "analytic_received_per_round": received}
        total["sent"] += sent
        total["received"] += received
    return {"groups": groups, "total": total}


def setup_user(cfg: RunConfig, topo: dist.Topology) -> UserRun:
    user = topo.user_idx
    users = resolve_users(cfg, topo.world_size)
    method = get_method(cfg.method, cfg, users)
    data_dir = resolve_dataset(cfg, topo.world_size)
    data = load_user_data(data_dir, user, cfg.train.seq_len, users[user].share, cfg.data.verify)
    spec = method.adapter_spec(cfg, user, adapter_spec_for(cfg, users[user], method.routed))
    # the frozen base: one read-only copy per host, mapped by every local rank, when sharing is on
    share = plan_sharing(cfg.model.share_base, cfg.comm.timeout_s, topo)
    model = build_user_model(cfg, users[user], data.vocab_size, method.routed, spec, share).to(topo.device)
    method.prepare_model(model, user)
    if resolve_base_dtype(cfg.model.dtype, topo.device, cfg.train.amp) == torch.bfloat16:
        model.cast_frozen_(torch.bfloat16)

    # process groups, created once on every rank in a fixed order
    topo.build_groups(method.sharing_groups(topo.world_size))
    by_group: dict[str, list] = {}
    for name, tag in model.report.tags.items():
        if method.is_shared(tag):
            by_group.setdefault(method.group_of(tag, user), []).append((name, model.report.params[name]))
    # sorted: a user in several groups meets the others in each group's collective in one order
    shared = {group: by_group[group] for group in sorted(by_group)}
    # shape handshake before the first collective: names the group, user and parameter that differ
    dist.check_group_shapes(topo, shared)
    for params in shared.values():  # each group's parameters in one buffer: the sync copies nothing
        dist.pack_flat([p for _, p in params])

    expert_params = model.set_trainable(method.trains_in_expert_phase) if method.trains else []
    router_params = [p for n, p in model.report.select(method.trains_in_router_phase)] if method.trains else []
    t = cfg.train
    expert_opt = build_optimizer(expert_params, t.lr, t, topo.device)
    expert_sched = None
    if expert_opt is not None:
        factor = cosine_schedule(t.rounds * t.local_steps, t.min_lr_ratio) if t.schedule == "cosine" else (lambda s: 1.0)
        expert_sched = torch.optim.lr_scheduler.LambdaLR(expert_opt, factor)
    router_opt = build_optimizer(router_params, t.router_lr, t, topo.device)
    router_tokens = data.valid if method.router_split == "valid" else data.train
    return UserRun(cfg=cfg, topo=topo, method=method, model=model, data=data, shared=shared,
                   expert_opt=expert_opt, expert_sched=expert_sched, router_opt=router_opt,
                   train_sampler=BatchSampler(data.train, t.seq_len, derive_seed(cfg.seed, user, "train_batches")),
                   router_sampler=BatchSampler(router_tokens, t.seq_len,
                                               derive_seed(cfg.seed, user, "router_batches")))


def optimizer_step(run: UserRun, sampler: BatchSampler, opt: torch.optim.Optimizer, autocast,
                   expert_phase: bool = True, comm: "CommHandle | None" = None) -> tuple[float, float, float]:
    """One optimiser step on ``train.batch_size`` sequences, accumulated over micro-batches.
    Returns (loss, cross-entropy, load-balancing loss) averaged over the micro-batches."""
    t = run.cfg.train
    micro = t.micro_batch_size or t.batch_size
    n_micro = t.batch_size // micro
    totals = [0.0, 0.0, 0.0]
    for _ in range(n_micro):
        x, y = sampler.sample(micro, run.topo.device)
        with autocast():
            out = run.model(x, y)
            loss = out.ce + run.cfg.moe.lb_weight * out.lb
            extra = run.method.extra_loss(run.model) if expert_phase else None
            if extra is not None:
                loss = loss + extra
        (loss / n_micro).backward()
        for i, v in enumerate((loss, out.ce, out.lb)):
            totals[i] += float(v.detach()) / n_micro
    # a non-finite loss stops the run (guard.nan=stop) before any collective, or drops the step
    drop = not math.isfinite(totals[0]) and guard.check_loss(run, totals[0], expert_phase)
    params = [p for g in opt.param_groups for p in g["params"]]
    averaged = expert_phase and comm is not None and run.method.reduces_gradients
    if expert_phase and comm is not None:
        if not drop and averaged:  # gradients are about to meet the other users': none may be NaN or inf
            drop = guard.check_gradients(run, params)
        with comm.abstaining(drop):
            run.method.reduce_gradients(comm, [p for p in params if p.grad is not None])
    if drop and not averaged:
        opt.zero_grad(set_to_none=True)
        return totals[0], totals[1], totals[2]
    # a user that sat out a gradient average received the others' mean: it steps with it, so that
    # data-parallel replicas stay one model
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if expert_phase:
        run.method.after_expert_step(run.model)
    return totals[0], totals[1], totals[2]


def evaluate_test(run: UserRun, autocast, progress: NullProgress = NullProgress()) -> EvalResult:
    e = run.cfg.eval
    return evaluate_split(run.model, run.data.test, run.cfg.train.seq_len, e.batch_size, e.max_tokens,
                          run.topo.device, autocast, progress=progress)


def evaluate_valid(run: UserRun, autocast) -> EvalResult:
    e = run.cfg.eval
    return evaluate_split(run.model, run.data.valid, run.cfg.train.seq_len, e.batch_size, e.max_tokens,
                          run.topo.device, autocast)


def log_eval(logger, res: EvalResult, step: int, prefix: str = "test") -> None:
    logger.scalar(f"{prefix}/loss", res.loss, step)
    logger.scalar(f"{prefix}/ppl", res.ppl, step)
    for layer, (probs, shares) in enumerate(res.routing):
        for j, (p, s) in enumerate(zip(probs, shares)):
            logger.scalar(f"{prefix}_router/prob/layer_{layer:02d}/expert_{j}", p, step)
            logger.scalar(f"{prefix}_router/share/layer_{layer:02d}/expert_{j}", s, step)


def save_checkpoint(run: UserRun, out_dir: Path, name: str, round_idx: int) -> Path:
    """Every user's full state (a collective: every user saves the same round); see resume.py."""
    return resume.save_user(run, out_dir, name, round_idx)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

def run(cfg: RunConfig, topo: dist.Topology, out_dir: Path, say=lambda msg: None) -> dict:
    """Run Algorithm 1 for this rank's user; returns the user's row of results.json."""
    dist.set_phase("setup")
    user_run = setup_user(cfg, topo)
    faults.at_setup(user_run)
    # a fresh start, or every user restored to the newest round they all checkpointed
    done = resume.restore_user(user_run, out_dir, say)
    if topo.rank == 0:  # only now: a refused start or resume leaves the directory as it found it
        from comigs_dist.checkpoint import write_atomic
        write_atomic(Path(out_dir) / "config.yaml", lambda f: f.write(to_yaml(cfg)), text=True)
    r, model, method, t = user_run, user_run.model, user_run.method, cfg.train
    # a resumed writer drops what the interrupted attempt logged after its checkpoint
    logger = build_logger(out_dir, topo.user_idx, cfg.log.tensorboard, purge_step=r.step + 1 if done else None,
                          wandb=wandb_options(cfg, out_dir, topo.user_idx, resumed=bool(done)))
    autocast = autocast_for(topo.device, t.amp)
    comm = CommHandle(topo, cfg.comm.mode, cfg.comm.dtype, count=cfg.guard.nan == "skip", exact=cfg.comm.exact)
    analytic = analytic_round_bytes(r, cfg.comm, topo, comm.count)
    logger.layout(scalar_layout(len(model.moe), model.spec.n_experts, model.spec.n_generalists))
    progress = build_progress(topo.rank == 0 and cfg.log.progress)  # bars on rank 0 only

    # the base model: untrained adapters leave it unchanged (B = 0)
    if r.base is None:
        logger.text("config", "```\n" + to_yaml(cfg) + "\n```")
        r.base = evaluate_test(r, autocast, progress)
        log_eval(logger, r.base, 0, "base")
    base = r.base
    say(f"base model: mean test ppl over users {_mean_over_users(topo, base.ppl):.3f}")

    rounds = t.rounds if method.trains else 0
    round_bar = progress.bar(total=rounds - done, desc="rounds")
    for round_idx in range(done, rounds):
        round_start = time.perf_counter()
        comm_before = (topo.stats.bytes_sent, topo.stats.bytes_received, topo.stats.seconds)
        dist.set_phase(f"round {round_idx + 1}")

        # sync generalists: users download the aggregate of what they uploaded last round
        # (Algorithm 1 aggregates at the start of each round; round 0 starts every shared
        # parameter from user 0's initialisation instead)
        if round_idx == 0:
            if method.initial_sync:
                for group, params in r.shared.items():
                    comm.broadcast(group, [p.data for _, p in params])
        else:
            # no NaN or inf reaches the collective: stop, or sit the round out (guard.nan)
            faults.before_sync(r, round_idx)
            comm.contributing = guard.check_shared(r, round_idx)
            method.aggregate(SyncContext(
                shared=r.shared, comm=comm, round_idx=round_idx, user_idx=topo.user_idx, n_users=topo.world_size,
                evaluate_valid=lambda: evaluate_valid(r, autocast).loss, n_train_tokens=len(r.data.train),
                model=model))
            comm.contributing = True

        round_losses = []
        for local_idx in range(t.local_steps):
            faults.during_round(r, round_idx, local_idx)
            # expert steps on training batches, router frozen (eq. 2)
            model.set_trainable(method.requires_grad_in("expert"))
            step_start = time.perf_counter()
            loss, ce, lb = optimizer_step(r, r.train_sampler, r.expert_opt, autocast, True, comm)
            r.expert_sched.step()
            r.step += 1
            r.train_tokens += t.batch_size * t.seq_len
            r.train_seconds += time.perf_counter() - step_start
            r.last_loss = loss
            round_losses.append(loss)
            if r.step % cfg.log.every == 0:
                logger.scalars({"train/loss": loss, "train/ce": ce, "train/lb": lb,
                                "lr/expert": r.expert_opt.param_groups[0]["lr"],
                                "perf/tokens_per_second": r.train_tokens / max(r.train_seconds, 1e-9)}, r.step)
                for layer, stats in enumerate(model.routing_stats()):
                    if stats is None:
                        continue
                    for j, (p, s) in enumerate(zip(*stats)):
                        logger.scalar(f"router/prob/layer_{layer:02d}/expert_{j}", float(p), r.step)
                        logger.scalar(f"router/share/layer_{layer:02d}/expert_{j}", float(s), r.step)

            # router steps every tau local iterations, on the router's split, experts frozen (eq. 3)
            if r.router_opt is not None and r.step % t.router_every == 0 and t.router_steps > 0:
                model.set_trainable(method.requires_grad_in("router"))
                router_losses = []
                for _ in range(t.router_steps):
                    router_losses.append(optimizer_step(r, r.router_sampler, r.router_opt, autocast, False)[0])
                    r.router_step += 1
                    faults.during_router(r, round_idx)
                # on validation batches this is the documented valid/loss; on training batches
                # (-tr variants) it must not collide with the expert phase's train/loss
                router_tag = "valid/loss" if method.router_split == "valid" else f"{method.router_split}/router_loss"
                logger.scalars({router_tag: sum(router_losses) / len(router_losses),
                                "lr/router": r.router_opt.param_groups[0]["lr"]}, r.step)

        r.train_curve.append({"round": round_idx + 1, "loss": sum(round_losses) / len(round_losses)})
        s = topo.stats
        logger.scalars({"comm/bytes_sent": s.bytes_sent, "comm/bytes_received": s.bytes_received,
                        "comm/round_bytes_sent": s.bytes_sent - comm_before[0],
                        "comm/round_bytes_received": s.bytes_received - comm_before[1],
                        "comm/analytic_round_bytes": analytic["total"]["sent"],
                        "comm/round_seconds": s.seconds - comm_before[2],
                        "guard/skipped_rounds": r.guard_skipped_rounds, "guard/skipped_steps": r.guard_skipped_steps},
                       r.step)
        if cfg.eval.every and (round_idx + 1) % cfg.eval.every == 0 and round_idx + 1 < rounds:
            res = evaluate_test(r, autocast, progress)
            log_eval(logger, res, r.step)
            r.history.append({"round": round_idx + 1, "step": r.step, "test_ppl": res.ppl})
        if cfg.checkpoint.every and (round_idx + 1) % cfg.checkpoint.every == 0:
            save_checkpoint(r, out_dir, f"round_{round_idx + 1:04d}.pt", round_idx + 1)
        say(f"round {round_idx + 1}/{rounds}: mean train loss {_mean_over_users(topo, r.last_loss):.4f} "
            f"({time.perf_counter() - round_start:.1f}s)")
        round_bar.update(1)
    round_bar.close()

    # the user's model after its last local steps (what Algorithm 1 returns)
    dist.set_phase("the final evaluation")
    faults.at_final_eval(r)
    final = evaluate_test(r, autocast, progress)
    log_eval(logger, final, r.step)
    r.history.append({"round": rounds, "step": r.step, "test_ppl": final.ppl})
    if cfg.checkpoint.final and method.trains:
        save_checkpoint(r, out_dir, "final.pt", rounds)
    shared_numel = sum(p.numel() for params in r.shared.values() for _, p in params) if method.trains else 0
    row = {
        "user": topo.user_idx,
        "n_experts": model.spec.n_experts,          # as the method built it (HetLoRA: 1)
        "n_generalists": model.spec.n_generalists,
        "lora_rank": model.spec.rank,
        "test_ppl": final.ppl,
        "test_loss": final.loss,
        "test_accuracy": final.accuracy,
        "base_test_ppl": base.ppl,
        "bytes_sent": topo.stats.bytes_sent,
        "bytes_received": topo.stats.bytes_received,
        "comm_seconds": topo.stats.seconds,
        "analytic_bytes_per_round": analytic["total"],
        "comm_groups": _comm_groups(topo, analytic),
        "shared_params": shared_numel,
        "trainable_params": model.report.count(),
        "tokens_per_second": r.train_tokens / r.train_seconds if r.train_seconds else 0.0,
        "train_tokens": r.train_tokens,
        "local_steps": r.step,
        "router_steps": r.router_step,
        "final_train_loss": r.last_loss,
        "routing": final.routing,
        "test_curve": r.history,
        "train_curve": r.train_curve,
        "guard_skipped_rounds": r.guard_skipped_rounds,
        "guard_skipped_steps": r.guard_skipped_steps,
    }
    logger.summary(row)
    logger.close()
    return row


def _comm_groups(topo: dist.Topology, analytic: dict) -> dict:
    """Per group this user belongs to: its members, the analytic figures (groups of shared
    parameters) and what was counted (every group that moved bytes, a method's own included)."""
    none = {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}
    names = sorted(set(analytic["groups"]) | set(topo.stats.by_group))
    return {g: {"members": list(topo.members(g)), **analytic["groups"].get(g, {}), **topo.stats.by_group.get(g, none)}
            for g in names}


def _mean_over_users(topo: dist.Topology, value: float) -> float:
    return dist.sum_scalars([value], topo.device)[0] / topo.world_size
