"""Rounds of Algorithm 1 assembled from the simulator's own pieces, for timing.

Owns what the benchmarks call a round: the sync of the shared parameters (the method's
``aggregate`` through ``dist.sync_mean``) followed by ``train.local_steps`` expert steps
(``train.optimizer_step``). Router phases (every tau = 30 local iterations) are left out, so that
every timed round does the same work. Also a group of ranks kept alive between timed turns
(``RankGroup``), the CPU and page faults of each phase of a rank's round (``PhaseMeter``), and
the single-process comparison: several users held in one process and stepped one after the other,
their shared parameters averaged in memory, as a single-process simulator does.
"""
from __future__ import annotations

import contextlib
import queue
import time
import types

import torch

from _common import usage, usage_since
from comigs_dist import dist
from comigs_dist.config import RunConfig, load_config, resolve_users
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


class PhaseMeter:
    """Where one rank's round goes: usage() summed per phase of the expert steps.

    Installed on a built user (``install``), it wraps the calls that make up a step: the
    transformer up to the final hidden states (``forward``, UserModel.hidden), the output
    projection and cross-entropy (``loss``, UserModel.lm_loss; with train.loss_chunk > 0 this
    also computes the hidden states' gradient, which the fused loss does in its forward pass),
    ``Tensor.backward`` (``backward``), the optimiser's step and zero_grad (``optimiser``);
    ``sync`` is timed by the round. The round's remainder (batch sampling, scalars, routing
    statistics) is ``other``."""

    PHASES = ("forward", "loss", "backward", "optimiser", "sync")

    def __init__(self):
        self.totals: dict[str, dict[str, float]] = {}
        self._active = False
        self._backward = None

    def reset(self) -> None:
        self.totals = {}

    def _begin(self) -> dict[str, float] | None:
        if self._active:  # a phase inside another is counted once, in the outer one
            return None
        self._active = True
        return usage()

    def _end(self, phase: str, before: dict[str, float] | None) -> None:
        if before is None:
            return
        self._active = False
        spent = usage_since(before)
        acc = self.totals.setdefault(phase, dict.fromkeys(spent, 0.0))
        for k, v in spent.items():
            acc[k] += v

    @contextlib.contextmanager
    def span(self, phase: str):
        before = self._begin()
        try:
            yield
        finally:
            self._end(phase, before)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            with self.span(phase):
                return fn(*args, **kwargs)
        return timed

    def install(self, run: UserRun) -> None:
        model = run.model
        model.hidden = self.wrap("forward", model.hidden)
        model.lm_loss = self.wrap("loss", model.lm_loss)
        for opt in (run.expert_opt, run.router_opt):
            if opt is None:
                continue
            # hooks rather than a replaced opt.step, which the lr scheduler would warn about
            started = []
            opt.register_step_pre_hook(lambda *_, s=started: s.append(self._begin()))
            opt.register_step_post_hook(lambda *_, s=started: self._end("optimiser", s.pop()))
            opt.zero_grad = self.wrap("optimiser", opt.zero_grad)
        # the backward pass is started by train.optimizer_step; this process only benchmarks
        self._backward = torch.Tensor.backward
        torch.Tensor.backward = self.wrap("backward", self._backward)

    def round(self, run: UserRun, comm: CommHandle) -> dict[str, dict[str, float]]:
        """One round (sync, then the expert steps) with its phases; {phase: usage} with
        ``round`` (the whole) and ``other`` (what no phase covers)."""
        self.reset()
        before = usage()
        with self.span("sync"):
            sync(run, comm)
        local_steps(run, comm)
        whole = usage_since(before)
        out = {p: dict(v) for p, v in self.totals.items()}
        out["other"] = {k: whole[k] - sum(v[k] for v in self.totals.values()) for k in whole}
        out["round"] = whole
        return out


def setup_rank(cfg: RunConfig, threads: int = 1) -> tuple[dist.Topology, UserRun, CommHandle]:
    """Join the group the launcher set up (env://) and build this rank's user, as main.py does."""
    topo = dist.init_distributed("gloo", "cpu", cfg.comm.timeout_s, threads=threads)
    run = setup_user(cfg, topo)
    comm = CommHandle(topo, cfg.comm.mode, cfg.comm.dtype)
    for group, params in run.shared.items():  # round 0: one initialisation for shared parameters
        comm.broadcast(group, [p.data for _, p in params])
    return topo, run, comm


# --------------------------------------------------------------------------------------------
# a group of ranks timed in turns
# --------------------------------------------------------------------------------------------

def group_worker(rank: int, world_size: int, port: int, overrides: list[str], commands, results,
                 phases: bool = False) -> None:
    """One user per rank; runs the rounds each command asks for until told to stop. A command is
    {"rounds": n, "loss_chunk": tokens or None (leave as configured)}; the answer is one usage()
    difference per round (with ``phases``: one PhaseMeter.round dict per round)."""
    cfg = bench_config(overrides)
    topo, run, comm = setup_rank(cfg, threads=1)
    meter = PhaseMeter() if phases else None
    if meter is not None:
        meter.install(run)
    try:
        results.put(("ready", rank, None))
        while True:
            command = commands.get()
            if command is None:
                break
            if command.get("loss_chunk") is not None:
                run.model.loss_chunk = int(command["loss_chunk"])
            rounds = []
            for _ in range(command["rounds"]):
                dist.barrier(topo)  # every rank starts the round together (not timed)
                if meter is not None:
                    rounds.append(meter.round(run, comm))
                else:
                    before = usage()
                    sync(run, comm)
                    local_steps(run, comm)
                    rounds.append(usage_since(before))
            results.put(("rounds", rank, rounds))
        dist.barrier(topo)
    finally:
        dist.shutdown()


class RankGroup:
    """A running group of ranks (one user each, one thread each), one command queue per rank,
    kept alive between turns so that set-ups can be timed side by side."""

    def __init__(self, world_size: int, overrides: list[str], ctx, phases: bool = False):
        import _common as C
        from comigs_dist.dist import free_port
        self.world_size = world_size
        self.commands = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=C._rank_entry, daemon=True,
                                  args=(group_worker, r, world_size, port,
                                        (overrides, self.commands[r], self.results, phases)))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def _collect(self, kind: str, timeout_s: float) -> dict[int, object]:
        got = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            try:
                k, rank, payload = self.results.get(timeout=5)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"a benchmark rank died or hung (exit codes {dead}); see its traceback above")
                continue
            assert k == kind, (k, kind)
            got[rank] = payload
        return got

    def ready(self, timeout_s: float = 1800) -> None:
        self._collect("ready", timeout_s)

    def run_rounds(self, n_rounds: int, loss_chunk: int | None = None, timeout_s: float = 3600) -> dict[int, list]:
        """{rank: [per round: usage difference, or PhaseMeter.round's dict]}."""
        for q in self.commands:
            q.put({"rounds": n_rounds, "loss_chunk": loss_chunk})
        return self._collect("rounds", timeout_s)

    def time_rounds(self, n_rounds: int, timeout_s: float = 3600) -> list[float]:
        """Round times of the group: per round, the slowest rank (the round ends when it does)."""
        per_rank = self.run_rounds(n_rounds, timeout_s=timeout_s)
        return [max(per_rank[r][i]["wall"] for r in per_rank) for i in range(n_rounds)]

    def stop(self) -> None:
        import _common as C
        for q in self.commands:
            q.put(None)
        C.join_ranks(self.procs, timeout_s=120)


# --------------------------------------------------------------------------------------------
# the single-process comparison
# --------------------------------------------------------------------------------------------

def build_local_users(cfg: RunConfig, n_users: int) -> list[UserRun]:
    """n_users users in this process (no process group): model, data, optimiser, sampler each."""
    method = get_method(cfg.method)
    data_dir = resolve_dataset(cfg, n_users)
    runs = []
    for spec in resolve_users(cfg, n_users):
        user = spec.user_idx
        data = load_user_data(data_dir, user, cfg.train.seq_len, spec.share, False)
        model = build_user_model(cfg, spec, data.vocab_size, method.routed)
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
