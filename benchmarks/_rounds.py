"""Rounds of Algorithm 1 assembled from the simulator's own pieces, for timing.

Owns what the benchmarks call a round: the sync of the shared parameters (the method's
``aggregate`` through ``dist.sync_mean``) followed by ``train.local_steps`` expert steps
(``train.optimizer_step``). Router phases (every tau = 30 local iterations) are left out, so that
every timed round does the same work. Also the single-process comparison: several users held in
one process and stepped one after the other, their shared parameters averaged in memory, as a
single-process simulator does.
"""
from __future__ import annotations

import time
import types

import torch

from comigs_dist import dist
from comigs_dist.config import RunConfig, load_config
from comigs_dist.data import BatchSampler, load_user_data
from comigs_dist.methods import SyncContext, get_method
from comigs_dist.model import build_user_model
from comigs_dist.train import (CommHandle, UserRun, autocast_for, build_optimizer, optimizer_step,
                               prepare_assets, resolve_dataset, setup_user)

QUIET = ["log.tensorboard=false", "log.progress=false", "eval.every=0", "checkpoint.final=false"]


def bench_config(overrides: list[str]) -> RunConfig:
    return load_config(None, QUIET + list(overrides))


def prepare(cfg: RunConfig, *world_sizes: int) -> None:
    """Build the cached corpus and base before any timing (and before any process group)."""
    for n in world_sizes:
        prepare_assets(cfg, n)


def local_steps(run: UserRun, comm: CommHandle | None) -> None:
    """train.local_steps expert steps, as in train.run (router frozen, eq. 2)."""
    autocast = autocast_for(run.topo.device, run.cfg.train.amp)
    run.model.set_trainable(run.method.trains_in_expert_phase)
    for _ in range(run.cfg.train.local_steps):
        optimizer_step(run, run.train_sampler, run.expert_opt, autocast, True, comm)
        run.expert_sched.step()


def sync(run: UserRun, comm: CommHandle, round_idx: int = 1) -> None:
    """The method's end-of-round aggregation, as train.run calls it."""
    run.method.aggregate(SyncContext(shared=run.shared, comm=comm, round_idx=round_idx,
                                     user_idx=run.topo.user_idx, n_users=run.topo.world_size,
                                     n_train_tokens=len(run.data.train), model=run.model))


def dist_round(run: UserRun, comm: CommHandle) -> tuple[float, float]:
    """One round on this rank: (round seconds, of which sync seconds)."""
    start = time.perf_counter()
    sync(run, comm)
    synced = time.perf_counter()
    local_steps(run, comm)
    return time.perf_counter() - start, synced - start


def setup_rank(cfg: RunConfig, threads: int = 1) -> tuple[dist.Topology, UserRun, CommHandle]:
    """Join the group the launcher set up (env://) and build this rank's user, as main.py does."""
    topo = dist.init_distributed("gloo", "cpu", cfg.comm.timeout_s, threads=threads)
    run = setup_user(cfg, topo)
    comm = CommHandle(topo, cfg.comm.mode, cfg.comm.dtype)
    for group, params in run.shared.items():  # round 0: one initialisation for shared parameters
        comm.broadcast(group, [p.data for _, p in params])
    return topo, run, comm


# --------------------------------------------------------------------------------------------
# the single-process comparison
# --------------------------------------------------------------------------------------------

def build_local_users(cfg: RunConfig, n_users: int) -> list[UserRun]:
    """n_users users in this process (no process group): model, data, optimiser, sampler each."""
    method = get_method(cfg.method)
    data_dir = resolve_dataset(cfg, n_users)
    runs = []
    for user in range(n_users):
        data = load_user_data(data_dir, user, cfg.train.seq_len, float(cfg.per_user("data.share", user)), False)
        model = build_user_model(cfg, user, data.vocab_size, method.routed)
        shared: dict[str, list] = {}
        for name, tag in model.report.tags.items():
            if method.is_shared(tag):
                shared.setdefault(method.group_of(tag, user), []).append((name, model.report.params[name]))
        params = model.set_trainable(method.trains_in_expert_phase)
        t = cfg.train
        opt = build_optimizer(params, t.lr, t, torch.device("cpu"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        # optimizer_step reads only the device and the user index of the topology
        where = types.SimpleNamespace(device=torch.device("cpu"), user_idx=user, world_size=n_users)
        runs.append(UserRun(cfg=cfg, topo=where, method=method, model=model, data=data, shared=shared,
                            expert_opt=opt, expert_sched=sched, router_opt=None,
                            train_sampler=BatchSampler(data.train, t.seq_len, 1000 + user),
                            router_sampler=BatchSampler(data.valid, t.seq_len, 2000 + user)))
    sync_in_process(runs)  # one initialisation for shared parameters, as the broadcast does
    return runs


@torch.no_grad()
def sync_in_process(runs: list[UserRun]) -> None:
    """Average every shared group over the users in memory: flatten, mean, unflatten."""
    for group in runs[0].shared:
        tensors = [[p.data for _, p in run.shared[group]] for run in runs]
        flat = torch.stack([torch.cat([t.reshape(-1) for t in ts]) for ts in tensors]).mean(0)
        for ts in tensors:
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def local_round(runs: list[UserRun]) -> float:
    """One round of every in-process user, one after the other; seconds."""
    start = time.perf_counter()
    sync_in_process(runs)
    for run in runs:
        local_steps(run, None)
    return time.perf_counter() - start
