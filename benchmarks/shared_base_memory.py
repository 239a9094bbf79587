"""Memory of 1, 2 and 4 users on one host, with and without the shared frozen base.

Starts N real ranks (gloo, one thread each) of GPT-2 124M's shapes (``model.name=gpt2-random``,
seeded random weights, so every rank holds the same base), runs the project's own set-up and one
expert step on a small batch, and reads the proportional set size (PSS) of every rank from
/proc/<pid>/smaps_rollup while all of them are alive. PSS splits each shared page between the
processes that map it, so the sum over ranks counts the shared base once. Linux only.

    python benchmarks/shared_base_memory.py [--ranks 1 2 4] [--batch 2] [--seq-len 128]

Prints one row per (sharing, ranks) and ends with
    4-rank PSS / 1-rank PSS: <ratio> (target <= 1.6)
for the shared base, after the same ratio without sharing.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _overrides(args, share: str, n_ranks: int) -> list[str]:
    return [f"model.name={args.model}", f"model.share_base={share}", f"n_users={n_ranks}",
            f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}", "train.threads=1",
            "log.tensorboard=false", "log.progress=false", "checkpoint.final=false"]


def _rank(rank: int, n_ranks: int, port: int, overrides: list[str], conn) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(n_ranks), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(n_ranks), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch
    from comigs_dist import dist, train
    from comigs_dist.config import load_config
    cfg = load_config(None, overrides)
    topo = dist.init_distributed("gloo", "cpu", 600.0, threads=1)
    try:
        run = train.setup_user(cfg, topo)
        # what train.run does first (the base evaluation): a forward without gradients, which
        # also faults every base page into this rank's address space, so PSS counts them
        with torch.no_grad():
            run.model(*run.router_sampler.sample(cfg.train.batch_size, topo.device))
        info = getattr(run.model.lm, "shared_base", None)
        conn.send(("setup", info.inode if info else None))
        conn.recv()
        run.model.set_trainable(run.method.trains_in_expert_phase)
        train.optimizer_step(run, run.train_sampler, run.expert_opt, train.autocast_for(topo.device, "off"))
        conn.send(("step", None))
        conn.recv()
        dist.barrier(topo)
    finally:
        dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, share: str, n_ranks: int) -> dict:
    """Total PSS over n_ranks live ranks after set-up and after one training step."""
    from comigs_dist.model.shared_base import pss_bytes
    ctx = mp.get_context("spawn")
    port, procs, conns = _free_port(), [], []
    for rank in range(n_ranks):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_rank, args=(rank, n_ranks, port, _overrides(args, share, n_ranks), child))
        p.start()
        procs.append(p)
        conns.append(parent)
    out = {}
    try:
        for phase in ("setup", "step"):
            replies = [c.recv() for c in conns]
            assert all(r[0] == phase for r in replies), replies
            if phase == "setup":
                out["inodes"] = sorted({r[1] for r in replies if r[1] is not None})
            out[phase] = [pss_bytes(p.pid) for p in procs]
            for c in conns:
                c.send("go")
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", default="gpt2-random")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        print("this benchmark reads /proc/<pid>/smaps_rollup: Linux only", file=sys.stderr)
        return 2
    from comigs_dist import train
    from comigs_dist.config import load_config
    for n in args.ranks:  # the embedded corpus for n users, built once before any rank starts
        train.prepare_assets(load_config(None, _overrides(args, "false", n)), n)

    mib = 2 ** 20
    totals: dict[tuple[str, int], float] = {}
    print(f"{args.model}, batch {args.batch} x {args.seq_len} tokens, one thread per rank; PSS in MiB")
    print("after set-up: the model built and one forward without gradients (every base page touched);")
    print("after a step: one expert step (forward + backward + AdamW); heap freed by then stays with the")
    print("process, so this is the peak. heap/libs/shm: the step's PSS split into anonymous memory,")
    print("shared libraries and the shared-memory base file, summed over ranks.")
    print(f"{'share_base':>10} {'ranks':>5} {'after set-up':>12} {'after a step':>12} {'per rank':>9} "
          f"{'heap':>6} {'libs':>6} {'shm':>6}  base file")
    for share in ("true", "false"):
        for n in args.ranks:
            start = time.perf_counter()
            m = measure(args, share, n)
            setup, step = (sum(r["Pss"] for r in m[k]) / mib for k in ("setup", "step"))
            parts = [sum(r.get(k, 0) for r in m["step"]) / mib for k in ("Pss_Anon", "Pss_File", "Pss_Shmem")]
            totals[(share, n)] = step
            where = f"one inode ({m['inodes'][0]})" if len(m["inodes"]) == 1 else (m["inodes"] or "private")
            print(f"{share:>10} {n:>5} {setup:>12.0f} {step:>12.0f} {step / n:>9.0f} "
                  + " ".join(f"{x:>6.0f}" for x in parts) + f"  {where}  [{time.perf_counter() - start:.0f} s]",
                  flush=True)
    lo, hi = min(args.ranks), max(args.ranks)
    print(f"{hi}-rank PSS / {lo}-rank PSS without sharing: {totals[('false', hi)] / totals[('false', lo)]:.2f}")
    print(f"{hi}-rank PSS / {lo}-rank PSS: {totals[('true', hi)] / totals[('true', lo)]:.2f} (target <= 1.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
