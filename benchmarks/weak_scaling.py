"""Parallel users, weak scaling (target 3 of the performance issue).

    python benchmarks/weak_scaling.py [--quick] [--models embedded,gpt2-random] [--repeats 3]

Same work per user: the round time of 2 users as 2 ranks (one thread each) over the round time
of 1 user as 1 rank (one thread). 1.0 is the limit on a machine with a free core per rank: a
user on its own core costs nothing more than a user alone. Printed beside it, for comparison
with single-process simulators, the same 2 users held in one process with 2 threads and stepped
one after the other (their shared parameters averaged in memory).

A round is the sync of the generalists followed by train.local_steps (10) expert steps of
train.batch_size sequences (router phases, every tau = 30 iterations, are left out so that every
timed round does the same work). Ranks join through the project's own path (env:// and
dist.init_distributed, one thread each). The three set-ups are kept alive side by side and
timed in turns, in a rotating order; each turn times --rounds rounds after one warm-up round,
and a ratio is the median over turns of the ratio of the turn medians. Run on an otherwise idle
machine with at least 2 free cores; absolute times are only meaningful on a GPU.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import multiprocessing as mp

import torch

import _rounds as R
from comigs_dist.tables import format_table

MODELS = {  # name: (label, overrides, rounds per turn)
    "embedded": ("embedded default (4-layer GPT-2, 0.86M parameters), batch 8 x 128", [], 5),
    "gpt2-random": ("GPT-2 124M shapes (random weights), batch 1 x 128",
                    ["model.name=gpt2-random", "train.batch_size=1"], 2),
}
QUICK = ["model.name=tiny", "train.local_steps=2", "train.batch_size=2", "train.seq_len=32"]


def measure(name: str, overrides: list[str], rounds: int, repeats: int, ctx) -> dict[str, float]:
    cfg = R.bench_config(overrides)
    R.prepare(cfg, 1, 2)
    one, two = R.RankGroup(1, overrides, ctx), R.RankGroup(2, overrides, ctx)
    try:
        torch.set_num_threads(2)
        users = R.build_local_users(cfg, 2)
        one.ready()
        two.ready()
        setups = {
            "1 user, 1 rank, 1 thread": lambda n: one.time_rounds(n),
            "2 users, 2 ranks, 1 thread each": lambda n: two.time_rounds(n),
            "2 users in 1 process, 2 threads": lambda n: [R.local_round(users) for _ in range(n)],
        }
        names = list(setups)
        turns = {n: [] for n in names}
        for rep in range(repeats):
            shift = rep % len(names)
            for label in names[shift:] + names[:shift]:
                times = setups[label](rounds + 1)[1:]  # the first round of a turn warms up
                turns[label].append(C.median(times))
            print(f"  {name}: turn {rep + 1}/{repeats}", flush=True)
    finally:
        one.stop()
        two.stop()
    ref = turns[names[0]]
    ratios = {label: C.paired_ratio(turns[label], ref) for label in names}
    print(f"\n{MODELS.get(name, (name,))[0]}; a round = sync + {cfg.train.local_steps} local expert steps")
    rows = [(label, f"{C.median(turns[label]):.3f}", f"{C.spread(turns[label]):.1%}", f"{ratios[label]:.3f}")
            for label in names]
    print(format_table(("set-up", "round s", "spread", "ratio to 1 user"), rows))
    return {"ranks": ratios[names[1]], "single_process": ratios[names[2]]}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,gpt2-random",
                        help="comma-separated: embedded (the default run) and/or gpt2-random")
    parser.add_argument("--repeats", type=int, default=3, help="turns per set-up")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per turn (0 = per model default)")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.clock == "cpu":
        parser.error("--clock cpu does not apply here: rounds span several processes; use wall")
    ctx = mp.get_context("spawn")
    print(f"weak scaling: 2 users as 2 ranks vs 1 user as 1 rank, {args.repeats} turns per set-up")
    print(C.machine_line())
    results = {}
    for name in names:
        label, overrides, rounds = MODELS[name]
        if args.quick:
            overrides, rounds = overrides + QUICK, 1
        results[name] = measure(name, overrides, args.rounds or rounds, 1 if args.quick else args.repeats, ctx)
    print()
    for name in names:
        print(f"2 users in one process with 2 threads, for comparison ({name}): {results[name]['single_process']:.3f}")
    for name in names:
        print(C.target_line(f"weak_scaling_2_ranks_over_1_{name.replace('-', '_')}", results[name]["ranks"],
                            "<=", 1.10))
    return results


if __name__ == "__main__":
    main()
