"""Where a round's CPU goes: user and kernel time per phase, with and without the chunked loss.

    python benchmarks/cpu_split.py [--quick] [--ranks 4] [--rounds 3] [--local-steps 5]
                                   [--base DIR] [--data DIR] [--loss-chunk 128]

The setting of the performance issue: a small GPT-2 (4 layers, d = 128, GPT-2's 50,257-token
vocabulary; seeded random weights unless --base names a checkpoint such as models/small-gpt2),
one user per rank (4 ranks), CoMiGS-1G1S, batch 8 x 128, one thread per rank, expert steps only
(a round is the sync and train.local_steps expert steps, benchmarks/_rounds.py). Every rank
measures its own phases with getrusage: user and kernel (system) CPU seconds and minor page
faults, summed over the ranks (_rounds.PhaseMeter):

    forward    the transformer up to the final hidden states
    loss       output projection and cross-entropy (chunked: also the hidden states' gradient,
               which the fused loss computes in its forward pass)
    backward   Tensor.backward
    optimiser  AdamW step and zero_grad
    sync       the generalists' aggregation
    other      the rest of the round (sampling batches, scalars, routing statistics)

The same ranks alternate rounds between train.loss_chunk = --loss-chunk and 0 (the logits of a
whole micro-batch at once, as before the chunked loss), so both are measured under the same load.
CPU seconds and fault counts are the process's own, so they move less than wall time when other
jobs share the machine; wall time is printed for reference only. Target: the kernel's share of a
round's CPU with the chunked loss.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import multiprocessing as mp

import _rounds as R

PHASES = R.PhaseMeter.PHASES + ("other",)


def overrides(base: str, data: str, ranks: int, local_steps: int, batch: int, seq_len: int) -> list[str]:
    return ["method=comigs_1g1s", f"model.name={base}", f"data.path={data}", f"n_users={ranks}",
            f"train.batch_size={batch}", f"train.seq_len={seq_len}", f"train.local_steps={local_steps}",
            "train.threads=1"]


def summarise(per_rank: dict[int, list[dict]]) -> dict[str, dict[str, float]]:
    """{phase: {user, sys, minflt, wall}}: CPU and faults summed over ranks and rounds; wall the
    slowest rank's, summed over rounds."""
    out = {p: {"user": 0.0, "sys": 0.0, "minflt": 0.0, "wall": 0.0} for p in PHASES + ("round",)}
    n_rounds = len(next(iter(per_rank.values())))
    for i in range(n_rounds):
        for phase in out:
            rows = [per_rank[r][i].get(phase) for r in per_rank]
            rows = [row for row in rows if row]
            for k in ("user", "sys", "minflt"):
                out[phase][k] += sum(row[k] for row in rows)
            out[phase]["wall"] += max((row["wall"] for row in rows), default=0.0)
    return out


def kernel_share(row: dict[str, float]) -> float:
    return row["sys"] / max(row["user"] + row["sys"], 1e-12)


def print_table(label: str, totals: dict[str, dict[str, float]], n_rounds: int, steps: int) -> None:
    print(f"\n{label}: per round, summed over ranks ({n_rounds} rounds, {steps} expert steps per rank per round)")
    print(f"{'phase':10s} {'user s':>8s} {'kernel s':>9s} {'kernel %':>9s} {'faults':>10s} {'faults/step':>12s} "
          f"{'wall s':>8s}")
    for phase in PHASES + ("round",):
        row = totals[phase]
        print(f"{phase:10s} {row['user'] / n_rounds:8.2f} {row['sys'] / n_rounds:9.2f} {kernel_share(row):8.1%} "
              f"{row['minflt'] / n_rounds:10.0f} {row['minflt'] / n_rounds / steps:12.0f} "
              f"{row['wall'] / n_rounds:8.2f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="users, one per rank (the issue: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per variant (after one warm-up each)")
    parser.add_argument("--local-steps", type=int, default=5, help="expert steps per round")
    parser.add_argument("--loss-chunk", type=int, default=128, help="train.loss_chunk of the chunked variant")
    parser.add_argument("--base", default="", help="a GPT-2 checkpoint directory (default: seeded random weights "
                                                   "with the small preset's shapes)")
    parser.add_argument("--data", default="", help="a prepared dataset with GPT-2 BPE ids (default: random tokens)")
    args = parser.parse_args(argv)
    batch, seq_len, vocab = 8, 128, 50257
    if args.quick:
        args.ranks, args.rounds, args.local_steps, args.loss_chunk = 2, 1, 1, 16
        batch, seq_len, vocab = 2, 32, 4096
    base = args.base or str(C.random_gpt2_base("tiny" if args.quick else "small", vocab))
    data = args.data or str(C.random_token_dataset(args.ranks, vocab))
    ov = overrides(base, data, args.ranks, args.local_steps, batch, seq_len)
    R.prepare(R.bench_config(ov), args.ranks)
    print(f"CPU split: {base}, {args.ranks} users on {args.ranks} ranks, CoMiGS-1G1S, batch {batch} x {seq_len}, "
          f"one thread per rank, expert steps only")
    print(C.machine_line())
    variants = {f"loss_chunk={args.loss_chunk}": args.loss_chunk, "loss_chunk=0 (whole logits)": 0}
    group = R.RankGroup(args.ranks, ov, mp.get_context("spawn"), phases=True)
    collected = {name: {} for name in variants}
    try:
        group.ready()
        names = list(variants)
        for r in range(args.rounds + 1):  # round 0 warms each variant up and is dropped
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                got = group.run_rounds(1, variants[name])
                if r > 0:
                    for rank, rounds in got.items():
                        collected[name].setdefault(rank, []).extend(rounds)
            print(f"  round {r + 1}/{args.rounds + 1}" + (" (warm-up)" if r == 0 else ""), flush=True)
    finally:
        group.stop()
    totals = {name: summarise(collected[name]) for name in names}
    for name in names:
        print_table(name, totals[name], args.rounds, args.local_steps)
    chunked, plain = (totals[n]["round"] for n in names)
    cpu_ratio = (chunked["user"] + chunked["sys"]) / (plain["user"] + plain["sys"])
    print("\n(kernel % = system / (user + system) CPU; faults = minor page faults; wall = the slowest rank's, "
          "which other jobs on the machine stretch)")
    print(f"round CPU-seconds, chunked over whole logits: {cpu_ratio:.3f}; kernel share with whole logits: "
          f"{kernel_share(plain):.3f}")
    share = kernel_share(chunked)
    print(C.target_line("round_kernel_share", share, "<=", 0.05))
    return {"kernel_share": share, "kernel_share_whole_logits": kernel_share(plain), "cpu_ratio": cpu_ratio}


if __name__ == "__main__":
    main()
