"""What a round's communication costs, with GPT-2 124M's shapes, on CPU (gloo): 2 and 4 ranks.

Starts N real ranks (gloo on loopback, one thread each), each a CoMiGS-1G1S user on
``model.name=gpt2-random`` (GPT-2 124M shapes, seeded random weights: nothing to download), built
by the project's own set-up. Every round, each rank takes the round's local expert steps on a
small batch, then runs the round's aggregation once per configuration: server and all2all, in fp32
and bf16 (``comm.exact=true``, the default), and server fp32 with ``comm.exact=false`` (the wire
dtype reduced as it is). Each step is timed between two barriers, so a straggler's lateness is not
counted as communication; a phase takes as long as its slowest rank. The first round is a warm-up.

For each configuration: the aggregation's median time as a share of the round (local steps +
aggregation), and one user's bytes per round three ways: delivered, counted at the collective
itself (every torch.distributed.all_reduce and all_gather the aggregation makes is intercepted and
the tensors it passes are measured: elements times the size of comm.dtype, an all_reduce counted
once up and once down, an all_gather's buffer once per member; the "backend" column is the bytes
of those tensors as they are, float64 under comm.exact=true in server mode); counted by comigs_dist.dist
(the figure results.json reports); and analytic (dist.round_bytes from the shapes). Ends with the
ratios that have a target:
    comm_bytes_all2all_over_server_N_ranks: N (target == N), delivered at the collective
    comm_bytes_at_collective_over_analytic_worst_N_ranks: 1 (target == 1), the worst of every
        configuration and user, sent and received: the formula against what the backend was given
and, without a target, the communication shares, exact / plain server time and backend / payload.

    python benchmarks/comm.py [--quick] [--ranks 2 4] [--rounds 4] [--local-steps 2] [--batch 1] [--seq-len 64]

A real round has 10 local steps of 64 sequences of 128 tokens: its communication share is
smaller than the small batch here shows (the aggregation does not depend on the batch).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, comm.mode, comm.dtype, comm.exact)
CONFIGS = [("server fp32", "server", "fp32", True), ("all2all fp32", "all2all", "fp32", True),
           ("server bf16", "server", "bf16", True), ("all2all bf16", "all2all", "bf16", True),
           ("server fp32 plain", "server", "fp32", False)]


def _overrides(args, n_ranks: int) -> list[str]:
    return [f"model.name={args.model}", f"n_users={n_ranks}", f"train.batch_size={args.batch}",
            f"train.seq_len={args.seq_len}", f"train.local_steps={args.local_steps}", "train.threads=1",
            "log.tensorboard=false", "log.progress=false", "checkpoint.final=false", "model.share_base=auto"]


class CollectiveMeter:
    """Measures the tensors handed to torch.distributed.all_reduce and all_gather (what comigs_dist.dist
    calls; the object collectives of the shape handshake call torch's internals and stay out)."""

    def __init__(self):
        import torch.distributed as tdist
        self.calls: list[tuple] = []
        self._real = (tdist.all_reduce, tdist.all_gather)

        def all_reduce(tensor, *a, **k):
            self.calls.append(("all_reduce", tensor.numel(), tensor.element_size(), 1, tensor.numel()))
            return self._real[0](tensor, *a, **k)

        def all_gather(tensor_list, tensor, *a, **k):
            self.calls.append(("all_gather", tensor.numel(), tensor.element_size(), len(tensor_list),
                               sum(t.numel() for t in tensor_list)))
            return self._real[1](tensor_list, tensor, *a, **k)
        tdist.all_reduce, tdist.all_gather = all_reduce, all_gather

    def take(self, wire_bytes: int) -> dict:
        """Bytes since the last take: delivered payload (elements x ``wire_bytes``) sent and
        received, and the backend's own bytes sent."""
        sent = sum(copies * numel for _, numel, _, copies, _ in self.calls) * wire_bytes
        received = sum(total for *_, total in self.calls) * wire_bytes
        backend = sum(copies * numel * size for _, numel, size, copies, _ in self.calls)
        self.calls.clear()
        return {"sent": sent, "received": received, "backend_sent": backend}


def _rank(rank: int, n_ranks: int, port: int, args, out_path: str) -> None:
    from comigs_dist import dist, train
    from comigs_dist.methods import SyncContext
    overrides = _overrides(args, n_ranks)
    with benchmark_rank(rank, n_ranks, port, overrides, out_path) as (meter, cfg, topo, rank_run, report):
        run = rank_run.users[0]
        times = {"compute": [], **{label: [] for label, *_ in CONFIGS}}
        counted, delivered = {}, {}
        for _ in range(args.rounds):
            dist.barrier(topo)
            start = time.perf_counter()
            for _ in range(cfg.train.local_steps):
                train.expert_step(rank_run, rank_run.users)
            times["compute"].append(time.perf_counter() - start)
            for label, mode, dtype, exact in CONFIGS:
                comm = dist.Comm(topo, mode, dtype, exact=exact)
                comm.mark_checked(topo.groups)
                stats = comm.user_stats[run.user_idx]
                before = (stats.bytes_sent, stats.bytes_received)
                dist.barrier(topo)
                meter.take(0)
                start = time.perf_counter()
                run.method.sync(SyncContext(round_idx=1, comm=comm, users=rank_run.users))
                times[label].append(time.perf_counter() - start)
                delivered[label] = meter.take(dist.payload_bytes(1, dtype))
                counted[label] = (stats.bytes_sent - before[0], stats.bytes_received - before[1])
        analytic = {label: train.analytic_round_bytes(run, cfg.comm.__class__(mode=mode, dtype=dtype), topo,
                                                      False)["total"] for label, mode, dtype, _ in CONFIGS}
        report.update(times=times, counted=counted, delivered=delivered, analytic=analytic,
                      shared_params=sum(p.numel() for ps in run.shared.values() for _, p in ps))


def rank_environment(rank: int, n_ranks: int, port: int) -> None:
    """What torchrun would set for one rank of a single-host group, one thread each."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(n_ranks), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(n_ranks), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})


@contextlib.contextmanager
def benchmark_rank(rank: int, n_ranks: int, port: int, overrides: list[str], out_path: str):
    """One spawned rank of a benchmark: torchrun's environment (one thread), a CollectiveMeter,
    the configuration, the gloo process group and the rank's users, as (meter, cfg, topo,
    rank_run, report). The body fills ``report`` (a dict); on leaving, every rank's report is
    gathered and rank 0 writes the list to out_path (JSON) for ``spawn_ranks``."""
    rank_environment(rank, n_ranks, port)
    meter = CollectiveMeter()
    from comigs_dist import dist, train
    from comigs_dist.config import load_config
    cfg = load_config(None, overrides)
    topo = dist.init_distributed("gloo", "cpu", 600.0, threads=1)
    try:
        report: dict = {}
        yield meter, cfg, topo, train.build_rank(cfg, topo), report
        rows = dist.all_gather_objects(topo, report)
        if topo.rank == 0:
            Path(out_path).write_text(json.dumps(rows))
        dist.barrier(topo)
        Path(f"{out_path}.done.{rank}").touch()  # measured and past the last collective
    finally:
        dist.shutdown()


def spawn_ranks(target, n_ranks: int, args) -> list[dict]:
    """Run ``target(rank, n_ranks, port, args, out_path)`` on n_ranks spawned processes and return
    what rank 0 wrote to out_path (JSON); a rank that fails stops the benchmark."""
    from comigs_dist.dist import free_port
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, n_ranks, port, args, out)) for r in range(n_ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        finished = [Path(f"{out}.done.{r}").exists() for r in range(n_ranks)]
        if any(c != 0 and not done for c, done in zip(codes, finished)):
            raise RuntimeError(f"a rank failed (exit codes {codes})")
        if any(c != 0 for c in codes):  # every rank had measured and passed the last barrier
            print(f"note: a rank crashed while its process group shut down, after the measurement (exit codes "
                  f"{codes}; gloo's teardown on a loaded host); its numbers are complete", file=sys.stderr)
        return json.loads(Path(out).read_text())


def measure(args, n_ranks: int) -> list[dict]:
    """Every rank's timings and byte counts for n_ranks ranks."""
    return spawn_ranks(_rank, n_ranks, args)


def _phase(rows: list[dict], key: str) -> float:
    """Median over the rounds after the first of the slowest rank's time for one phase."""
    per_round = [max(r["times"][key][i] for r in rows) for i in range(1, len(rows[0]["times"][key]))]
    return statistics.median(per_round)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per world size (the first is a warm-up)")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="sequences per local step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--model", default="gpt2-random")
    parser.add_argument("--quick", action="store_true", help="smoke check: 2 ranks of the tiny model, 2 rounds "
                        "(the byte targets hold as well; the times mean nothing)")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.rounds, args.model = [2], 2, "tiny"
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is a warm-up)")
    from comigs_dist import train
    from comigs_dist.config import load_config
    for n in args.ranks:  # the embedded corpus for n users, built before any rank starts
        train.prepare_assets(load_config(None, _overrides(args, n)), n)

    mib = 2 ** 20
    print(f"{args.model}, CoMiGS-1G1S, {args.local_steps} local steps of {args.batch} x {args.seq_len} tokens per "
          f"round, one thread per rank, gloo on loopback; {os.cpu_count()} CPU cores on this host")
    print("share = aggregation / (local steps + aggregation), medians over rounds of the slowest rank; bytes are one "
          "user's per round (MiB): sent and received as delivered at the collective, the backend's own bytes, "
          "the dist package's counter and the analytic figure")
    summary, table = [], []
    for n in args.ranks:
        start = time.perf_counter()
        rows = measure(args, n)
        compute = _phase(rows, "compute")
        comm = {label: _phase(rows, label) for label, *_ in CONFIGS}
        for label, *_ in CONFIGS:
            d = rows[0]["delivered"][label]
            share = comm[label] / (compute + comm[label])
            table.append((n, label, f"{compute:.3f}", f"{comm[label]:.3f}", f"{share:.3f}", f"{d['sent'] / mib:.2f}",
                          f"{d['received'] / mib:.2f}", f"{d['backend_sent'] / mib:.2f}",
                          f"{rows[0]['counted'][label][0] / mib:.2f}",
                          f"{rows[0]['analytic'][label]['sent'] / mib:.2f}"))
        print(f"{n} ranks measured: {rows[0]['shared_params']:,} shared parameters per user "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        summary.append((n, rows, compute, comm))
    from comigs_dist.tables import format_table
    print(format_table(("ranks", "configuration", "steps s", "comm s", "share", "sent MiB", "recv MiB", "backend MiB",
                        "counted MiB", "analytic MiB"),
                       table))
    print()
    for n, rows, compute, comm in summary:
        for label in ("server fp32", "all2all fp32"):
            print(f"communication share of the round, {label}, {n} ranks: {comm[label] / (compute + comm[label]):.3f}")
        print(f"exact / plain server fp32 aggregation time, {n} ranks: "
              f"{comm['server fp32'] / comm['server fp32 plain']:.2f}")
        for label, *_ in CONFIGS:
            d = rows[0]["delivered"][label]
            print(f"backend bytes / delivered payload, {label}, {n} ranks: {d['backend_sent'] / d['sent']:.2f}")
    for n, rows, compute, comm in summary:
        ratio = min(r["delivered"]["all2all fp32"]["sent"] / r["delivered"]["server fp32"]["sent"] for r in rows)
        print(f"comm_bytes_all2all_over_server_{n}_ranks: {ratio:.2f} (target == {n:.2f})")
        worst = max(abs(r["delivered"][label][way] / r["analytic"][label][way] - 1)
                    for r in rows for label, *_ in CONFIGS for way in ("sent", "received"))
        print(f"comm_bytes_at_collective_over_analytic_worst_{n}_ranks: {1 + worst:.2f} (target == 1.00)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
