"""Memory of 1, 2 and 4 users on one host: fresh interpreters, the shared base, the fork launcher.

Starts N real ranks (gloo, one thread each) of GPT-2 124M's shapes (``model.name=gpt2-random``,
seeded random weights, so every rank holds the same base). Each rank runs the project's own
set-up and one expert step on a small batch. While all ranks are alive, the benchmark reads the
proportional set size (PSS) of every process from /proc/<pid>/smaps_rollup. PSS divides each
shared page between the processes that map it, so a sum over processes counts every page once.
Three ways to start the ranks:

  fresh, private  one new interpreter per rank (what torchrun starts), model.share_base=false
  fresh, shared   the same, with model.share_base=true (the base file is mapped by every rank)
  fork, shared    comigs_dist.forkrun: one parent imports torch, transformers and comigs_dist,
                  then forks the ranks, with model.share_base=true; the parent's PSS is counted

Fresh interpreters are started with multiprocessing's spawn, and their parent (the benchmark, or
torchrun's agent in real use) is not counted. The fork launcher's parent runs in a subprocess of
its own, exactly as ``python -m comigs_dist.forkrun`` would.

    python benchmarks/shared_base_memory.py [--ranks 1 2 4] [--batch 1] [--seq-len 64]

Linux only. Ends with the 4-rank / 1-rank ratios of every way (after set-up, after the step, at
the step's peak), then
    4-rank PSS / 1-rank PSS: <ratio> (target <= 1.6)
for the recommended set-up (fork, shared) at the step's peak, the figure that sizes a host.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = (("fresh", "false"), ("fresh", "true"), ("fork", "true"))
FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Clean", "Private_Dirty", "Shared_Clean",
          "Shared_Dirty")


def _overrides(args, share: str, n_ranks: int) -> list[str]:
    return [f"model.name={args.model}", f"model.share_base={share}", f"n_users={n_ranks}",
            f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}", "train.threads=1",
            "log.tensorboard=false", "log.progress=false", "checkpoint.final=false"]


def _smaps(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[key] = int(rest.split()[0]) * 1024
    return out


def _rank(overrides: list[str], conn) -> int:
    """One user: the project's set-up, a forward, one expert step; waits for the reader at each."""
    import torch
    from comigs_dist import dist, train
    from comigs_dist.config import load_config
    cfg = load_config(None, overrides)
    train.prepare_assets(cfg, cfg.n_users)  # as main does: the embedded corpus, built once under a lock
    topo = dist.init_distributed("gloo", "cpu", 600.0, threads=1)
    try:
        rank_run = train.build_rank(cfg, topo)
        run = rank_run.users[0]
        # what train.run does first (the base evaluation): a forward without gradients, which
        # also faults every base page into this rank's address space, so PSS counts them
        with torch.no_grad():
            run.model(*run.router_sampler.sample(cfg.train.batch_size, topo.device))
        info = getattr(run.model.lm, "shared_base", None)
        conn.send(("setup", info.inode if info else None))
        conn.recv()
        with contextlib.suppress(OSError):  # peak RSS (VmHWM) from here on: the step's own peak
            Path("/proc/self/clear_refs").write_text("5")
        train.expert_step(rank_run, rank_run.users)
        conn.send(("step", None))
        conn.recv()
        dist.barrier(topo)
    finally:
        dist.shutdown()
    return 0


def _spawned_rank(rank: int, n_ranks: int, port: int, overrides: list[str], conn) -> None:
    from comigs_dist import dist
    dist.export_rank_env(rank, n_ranks, port)
    _rank(overrides, conn)


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _collect(conns, pids: list[int], extra: list[int]) -> dict:
    """Step the ranks through both phases, reading every process's smaps at each, and after the
    step each rank's peak RSS during it. Activations are private pages, so a rank's PSS at its
    peak is its PSS now plus (peak RSS - RSS now)."""
    out = {}
    for phase in ("setup", "step"):
        replies = [c.recv() for c in conns]
        assert all(r[0] == phase for r in replies), replies
        if phase == "setup":
            out["inodes"] = sorted({r[1] for r in replies if r[1] is not None})
        out[phase] = [_smaps(p) for p in pids]
        out[phase + "_parent"] = [_smaps(p) for p in extra]
        if phase == "step":
            status = [_status(p) for p in pids]
            out["peak"] = [m["Pss"] + s["VmHWM"] - s["VmRSS"] for m, s in zip(out["step"], status)]
        for c in conns:
            c.send("go")
    return out


def measure_fresh(args, share: str, n_ranks: int) -> dict:
    """N new interpreters (multiprocessing spawn), as torchrun would start them."""
    import torch.multiprocessing as mp
    from comigs_dist import dist
    ctx = mp.get_context("spawn")
    port, procs, conns = dist.free_port(), [], []
    for rank in range(n_ranks):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_spawned_rank, args=(rank, n_ranks, port, _overrides(args, share, n_ranks), child))
        p.start()
        procs.append(p)
        conns.append(parent)
    try:
        out = _collect(conns, [p.pid for p in procs], [])
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
    return out


def _fork_driver(args) -> int:
    """Runs in a new interpreter: what `python -m comigs_dist.forkrun` does, plus the reading."""
    import multiprocessing
    from comigs_dist import forkrun
    n_ranks = args.fork_driver
    forkrun.preload()
    pipes = [multiprocessing.Pipe() for _ in range(n_ranks)]
    # each child picks its own end by rank: the target reads RANK only through dist
    pids = forkrun.start_ranks(n_ranks, _forked_rank, [c for _, c in pipes], _overrides(args, args.share, n_ranks))
    out = _collect([p for p, _ in pipes], pids, [os.getpid()])
    code = forkrun.supervise(pids)
    print("RESULT " + json.dumps(out), flush=True)
    return code


def _forked_rank(child_ends, overrides) -> int:
    from comigs_dist import dist
    return _rank(overrides, child_ends[dist.env_rank()])


def measure_fork(args, share: str, n_ranks: int) -> dict:
    cmd = [sys.executable, __file__, "--fork-driver", str(n_ranks), "--share", share, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the fork launcher failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--model", default="gpt2-random")
    parser.add_argument("--fork-driver", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--share", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        print("this benchmark reads /proc/<pid>/smaps_rollup: Linux only", file=sys.stderr)
        return 2
    if args.fork_driver:
        return _fork_driver(args)
    mib = 2 ** 20
    totals: dict[tuple[str, str, int], dict[str, float]] = {}
    print(f"{args.model}, batch {args.batch} x {args.seq_len} tokens, one thread per rank. PSS in MiB, summed over "
          f"the ranks (and, for fork, the launcher's parent):")
    print("  set-up     the model built and one forward without gradients (every base page touched)")
    print("  step       after one expert step (forward + backward + AdamW); glibc keeps most of the heap the")
    print("             step freed")
    print("  peak       at each rank's highest point during that step (PSS after it + peak RSS - RSS after it):")
    print("             what the host must provide when the ranks step together")
    print("  heap/libs/shm  the step column split into anonymous memory, libraries and the shared base file")
    print("  parent     the fork launcher's own share, and how much of its resident memory the ranks still")
    print("             share after the step (the imported state, copy-on-write)")
    print("  private    what each rank holds alone after the step (Private_Clean + Private_Dirty)")
    table = []
    for launcher, share in MODES:
        for n in args.ranks:
            start = time.perf_counter()
            m = (measure_fork if launcher == "fork" else measure_fresh)(args, share, n)
            parent = sum(r["Pss"] for r in m["step_parent"])
            t = {"setup": sum(r["Pss"] for r in m["setup"] + m["setup_parent"]),
                 "step": sum(r["Pss"] for r in m["step"]) + parent, "peak": sum(m["peak"]) + parent}
            totals[(launcher, share, n)] = t
            everyone = m["step"] + m["step_parent"]
            parts = [sum(r.get(k, 0) for r in everyone) / mib for k in ("Pss_Anon", "Pss_File", "Pss_Shmem")]
            private = sum(r["Private_Clean"] + r["Private_Dirty"] for r in m["step"]) / mib / n
            if m["step_parent"]:
                p = m["step_parent"][0]
                shared = p["Shared_Clean"] + p["Shared_Dirty"]
                private = p['Private_Clean'] + p['Private_Dirty']
                parent_col = f"{parent / mib:.0f} ({100 * shared / (shared + private):.0f}% sh)"
            else:
                parent_col = "-"
            where = ("base: one inode" if len(m["inodes"]) == 1
                     else ("base: private" if not m["inodes"] else m["inodes"]))
            table.append((launcher, share, n, *(f"{t[k] / mib:.0f}" for k in ("setup", "step", "peak")),
                          *(f"{x:.0f}" for x in parts), parent_col, f"{private:.0f}", where))
            print(f"measured: start {launcher}, share {share}, {n} ranks ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    from comigs_dist.tables import format_table
    print(format_table(("start", "share", "ranks", "set-up", "step", "peak", "heap", "libs", "shm", "parent", "private",
                        "base"), table, ">" * 11 + "<"))
    lo, hi = min(args.ranks), max(args.ranks)
    ratio = {(mode, k): totals[(*mode, hi)][k] / totals[(*mode, lo)][k]
             for mode in MODES for k in ("setup", "step", "peak")}
    names = {("fresh", "false"): "fresh interpreters without sharing",
             ("fresh", "true"): "fresh interpreters with share_base",
             ("fork", "true"): "comigs_dist.forkrun with share_base"}
    for mode in MODES:
        print(f"{hi}-rank PSS / {lo}-rank PSS, {names[mode]}: set-up {ratio[(mode, 'setup')]:.2f}, "
              f"step {ratio[(mode, 'step')]:.2f}, peak {ratio[(mode, 'peak')]:.2f}")
    print(f"(the target: comigs_dist.forkrun with share_base, at the step's peak; without sharing, fresh "
          f"interpreters: {ratio[(('fresh', 'false'), 'peak')]:.2f})")
    print(f"{hi}-rank PSS / {lo}-rank PSS: {ratio[(('fork', 'true'), 'peak')]:.2f} (target <= 1.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
