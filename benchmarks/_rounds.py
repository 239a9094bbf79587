"""Rounds of Algorithm 1 for timing, driven through the simulator's own round function.

Owns what the benchmarks call a round: ``train.run_round`` (the method's ``sync``, then
``train.local_steps`` expert steps) with router phases switched off (``train.router_steps=0``),
so that every timed round does the same work. Also a group of ranks kept alive between timed
turns (``RankGroup``), the CPU and page faults of each phase of a rank's round (``PhaseMeter``),
and the single-process comparison: several users on one rank, stepped one after the other and
their shared parameters averaged in memory, as a single-process simulator does.
"""
from __future__ import annotations

import contextlib
import queue
import time

import torch

from _common import usage, usage_since
from comigs_dist import dist, train
from comigs_dist.config import RunConfig, load_config
from comigs_dist.train import RankRun, prepare_assets

QUIET = ["log.tensorboard=false", "log.progress=false", "eval.every=0", "checkpoint.final=false",
         "train.router_steps=0"]


def bench_config(overrides: list[str]) -> RunConfig:
    return load_config(None, QUIET + list(overrides))


def prepare(cfg: RunConfig, *world_sizes: int) -> None:
    """Build the cached corpus and base before any timing (and before any process group)."""
    for n in world_sizes:
        prepare_assets(cfg, n)


def local_steps(rank: RankRun) -> None:
    """train.local_steps expert steps of the rank's users, as a round takes them (eq. 2)."""
    for _ in range(rank.cfg.train.local_steps):
        train.expert_step(rank, rank.users)


def round_(rank: RankRun, round_idx: int = 1) -> None:
    """One round as train.run takes it (sync, then the local steps)."""
    train.run_round(rank, round_idx)


def dist_round(rank: RankRun) -> tuple[float, float]:
    """One round on this rank: (round seconds, of which sync seconds)."""
    spent = []
    sync = rank.method.sync

    def timed(ctx):
        start = time.perf_counter()
        sync(ctx)
        spent.append(time.perf_counter() - start)
    rank.method.sync = timed
    try:
        start = time.perf_counter()
        round_(rank)
        return time.perf_counter() - start, spent[0]
    finally:
        del rank.method.sync


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

    def install(self, rank: RankRun) -> None:
        run = rank.users[0]
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
        # the backward pass is started inside train.expert_step; this process only benchmarks
        self._backward = torch.Tensor.backward
        torch.Tensor.backward = self.wrap("backward", self._backward)
        rank.method.sync = self.wrap("sync", rank.method.sync)

    def round(self, rank: RankRun) -> dict[str, dict[str, float]]:
        """One round (train.run_round: sync, then the expert steps) with its phases; {phase:
        usage} with ``round`` (the whole) and ``other`` (what no phase covers)."""
        self.reset()
        before = usage()
        round_(rank)
        whole = usage_since(before)
        out = {p: dict(v) for p, v in self.totals.items()}
        out["other"] = {k: whole[k] - sum(v[k] for v in self.totals.values()) for k in whole}
        out["round"] = whole
        return out


def setup_rank(cfg: RunConfig, threads: int = 1, n_users: int | None = None) -> RankRun:
    """Join the group the launcher set up (env://) and build this rank's users, as main.py does;
    round 0's sync (one initialisation for shared parameters) is taken here."""
    topo = dist.init_distributed("gloo", "cpu", cfg.comm.timeout_s, threads=threads, n_users=n_users)
    rank = train.build_rank(cfg, topo)
    train.sync(rank, 0)
    return rank


# --------------------------------------------------------------------------------------------
# a group of ranks timed in turns
# --------------------------------------------------------------------------------------------

def group_worker(rank: int, world_size: int, port: int, overrides: list[str], commands, results,
                 phases: bool = False) -> None:
    """One user per rank; runs the rounds each command asks for until told to stop. A command is
    {"rounds": n, "loss_chunk": tokens or None (leave as configured)}; the answer is one usage()
    difference per round (with ``phases``: one PhaseMeter.round dict per round)."""
    cfg = bench_config(overrides)
    rank_run = setup_rank(cfg, threads=1)
    topo, run = rank_run.topo, rank_run.users[0]
    meter = PhaseMeter() if phases else None
    if meter is not None:
        meter.install(rank_run)
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
                    rounds.append(meter.round(rank_run))
                else:
                    before = usage()
                    round_(rank_run)
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

def build_local_users(cfg: RunConfig, n_users: int) -> RankRun:
    """n_users users on one rank of a group of one (this process): each its own adapters, data,
    optimiser and sampler over one frozen base; round 0's common start taken."""
    from comigs_dist.dist.env import export_rank_env, free_port
    export_rank_env(0, 1, free_port())
    return setup_rank(cfg, threads=torch.get_num_threads(), n_users=n_users)


def local_round(rank: RankRun) -> float:
    """One round of every user of the rank, one after the other, shared parameters averaged in
    memory; seconds."""
    start = time.perf_counter()
    round_(rank)
    return time.perf_counter() - start
