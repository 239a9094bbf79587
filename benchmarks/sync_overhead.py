"""Cost of the generalist sync against a bare collective (target 4 of the performance issue).

    python benchmarks/sync_overhead.py [--quick] [--users 4] [--iters 30] [--rounds 2]

Each of 4 ranks (gloo on CPU, one thread each, joined through dist.init_distributed) builds a
user on GPT-2 124M's shapes: its shared parameters are the attention LoRA and expert 0 of every
layer, 1,179,648 numbers at r = 8. Timed in alternation, after a barrier each time:

    sync exact   dist.sync_mean over the generalist group as a run does it by default
                 (comm.exact=true): the fp32 parameters copied into a float64 buffer, one float64
                 all_reduce (so that server and all2all give bit-identical results,
                 docs/communication.md), the mean written back in fp32, the bytes counted
    sync         the same with comm.exact=false: the packed fp32 parameters all_reduced in place
    all_reduce   one bare torch.distributed.all_reduce of an fp32 buffer of the same size
    all_reduce f64  the same of a float64 buffer: the collective the exact sync is built on

The target is measured on the default path: the exact sync against the bare float64 all_reduce it
needs (what the sync adds around its collective: the copy in, the division and the copy out). The
exact sum moves twice the bytes of fp32 inside the backend, which no packing removes: its cost
against a bare fp32 all_reduce is printed beside the target, as is the plain sync's. The time of
a call is that of the slowest rank (the collective ends when it does); a ratio is the median over
calls of the pair measured together. Then the sync's share of a round: a
round is the sync plus train.local_steps (10) expert steps, here of one sequence of 128 tokens
per step (the paper uses 64 per step; a smaller batch keeps 4 ranks of GPT-2 on a CPU in time,
and makes the share larger than it would be). Absolute times are only meaningful on a GPU.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import multiprocessing as mp
import time

import torch

import _rounds as R
from comigs_dist.tables import format_table

OVERRIDES = ["model.name=gpt2-random", "train.batch_size=1"]
QUICK = ["model.name=tiny", "train.local_steps=2", "train.batch_size=2", "train.seq_len=32"]


def rank_worker(rank: int, world_size: int, port: int, overrides: list[str], iters: int, rounds: int,
                results) -> None:
    import torch.distributed as tdist
    from comigs_dist import dist
    cfg = R.bench_config(overrides)
    rank_run = R.setup_rank(cfg, threads=1)
    topo, run = rank_run.topo, rank_run.users[0]
    plain = dist.Comm(topo, "server", "fp32", exact=False)
    exact = dist.Comm(topo, "server", "fp32", exact=True)
    plain.mark_checked(topo.groups)
    exact.mark_checked(topo.groups)
    try:
        (group, params), = run.shared.items()
        tensors = [p.data for _, p in params]
        numel = sum(t.numel() for t in tensors)
        bare = torch.zeros(numel, dtype=torch.float32)
        bare64 = torch.zeros(numel, dtype=torch.float64)
        pg = topo.group(group)

        def timed(fn) -> float:
            dist.barrier(topo)
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        calls = {
            "sync": lambda: plain.mean(group, {run.user_idx: tensors}),
            "sync exact": lambda: exact.mean(group, {run.user_idx: tensors}),
            "all_reduce": lambda: tdist.all_reduce(bare, op=tdist.ReduceOp.SUM, group=pg),
            "all_reduce f64": lambda: tdist.all_reduce(bare64, op=tdist.ReduceOp.SUM, group=pg),
        }
        for _ in range(3):  # warm-up (and the shape handshake of the first sync)
            for fn in calls.values():
                timed(fn)
        sent_before = plain.user_stats[run.user_idx].bytes_sent + exact.user_stats[run.user_idx].bytes_sent
        times = {k: [] for k in calls}
        for i in range(iters):
            order = list(calls) if i % 2 == 0 else list(calls)[::-1]
            for k in order:
                times[k].append(timed(calls[k]))
        sent_now = plain.user_stats[run.user_idx].bytes_sent + exact.user_stats[run.user_idx].bytes_sent
        sent = (sent_now - sent_before) / iters / 2  # two syncs per iteration

        round_times, sync_times = [], []
        R.local_steps(rank_run)  # warm-up round
        for _ in range(rounds):
            dist.barrier(topo)
            total, synced = R.dist_round(rank_run)
            round_times.append(total)
            sync_times.append(synced)
        rows = dist.all_gather_objects(topo, {"times": times, "round": round_times, "sync": sync_times,
                                        "numel": numel, "sent": sent})
        if rank == 0:
            results.put(rows)
        dist.barrier(topo)
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4, help="ranks (one user each)")
    parser.add_argument("--iters", type=int, default=30, help="timed pairs (sync, all_reduce)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds for the sync's share")
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        parser.error("--clock cpu does not apply here: a collective waits on other processes; use wall")
    overrides = OVERRIDES + (QUICK if args.quick else [])
    if args.quick:
        args.iters, args.rounds = 5, 1
    cfg = R.bench_config(overrides)
    R.prepare(cfg, args.users)
    shapes = "tiny GPT-2 (quick smoke check)" if args.quick else "GPT-2 124M shapes, batch 1 x 128"
    print(f"generalist sync: {args.users} users, {shapes}, gloo, 1 thread per rank, {args.iters} timed pairs")
    print(C.machine_line())
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = C.start_ranks(rank_worker, args.users, (overrides, args.iters, args.rounds, results), ctx)
    rows = results.get(timeout=3600)
    C.join_ranks(procs, timeout_s=120)

    per_call = {k: [max(r["times"][k][i] for r in rows) for i in range(args.iters)]
                for k in ("sync", "sync exact", "all_reduce", "all_reduce f64")}
    ratio = C.paired_ratio(per_call["sync"], per_call["all_reduce"])
    ratio_exact = C.paired_ratio(per_call["sync exact"], per_call["all_reduce"])
    ratio_exact64 = C.paired_ratio(per_call["sync exact"], per_call["all_reduce f64"])
    rounds = [max(r["round"][i] for r in rows) for i in range(args.rounds)]
    syncs = [max(r["sync"][i] for r in rows) for i in range(args.rounds)]
    share = C.median([s / t for s, t in zip(syncs, rounds)])
    numel, sent = rows[0]["numel"], rows[0]["sent"]
    print(f"\nshared parameters per user: {numel:,d} ({numel * 4 / 2**20:.2f} MiB fp32); "
          f"bytes counted per sync: {sent:,.0f} sent")
    print(format_table(("call", "median ms", "spread"),
                       [(k, f"{C.median(ts) * 1e3:.2f}", f"{C.spread(ts):.1%}") for k, ts in per_call.items()]))
    print(f"round (sync + {cfg.train.local_steps} local steps): median {C.median(rounds):.2f} s, "
          f"of which the sync {C.median(syncs) * 1e3:.1f} ms")
    print(f"sync share of the round: {share:.4%}")
    print(f"sync exact / bare all_reduce: {ratio_exact:.3f}; / bare float64 all_reduce of the same numbers: "
          f"{ratio_exact64:.3f} (comm.exact=true, the default: the backend adds in float64, twice the bytes of fp32)")
    print(f"sync (comm.exact=false) / bare all_reduce: {ratio:.3f}")
    print(C.target_line("sync_exact_over_bare_f64_all_reduce", ratio_exact64, "<=", 1.30))
    return {"ratio": ratio, "ratio_exact": ratio_exact, "ratio_exact64": ratio_exact64, "share": share}


if __name__ == "__main__":
    main()
