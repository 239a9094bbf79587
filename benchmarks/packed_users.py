"""Packed against sequential users on one rank, and the memory a user beyond the first costs.

Packed: ``train.pack_users=on``, the rank's 8 users' micro-batches through the shared frozen base
in one forward and one backward. Sequential: ``off``, one user after the other over the same base.
Both time ``train.local_steps`` expert steps of the same 8 users, interleaved (see _common.py).

Targets (the issue "Many users per rank"):
  packed_over_sequential_embedded: round time ratio on the embedded default, <= 0.75.
  packed_over_sequential_gpt2: the same on GPT-2 124M shapes (random weights, 1 sequence of 64
      tokens per user and step on CPU, so that a round takes seconds), reported, target <= 0.75.
  added_user_memory_over_own_bytes_gpt2: the growth of peak resident memory per user from 1 to
      5 users on one rank (GPT-2 124M shapes, one expert step each), over one user's own
      trainable parameter, gradient and AdamW bytes (16 bytes per trainable parameter), <= 1.5.

On a GPU (``--device auto`` finds it, as model.device=auto does) the rounds are timed with CUDA
synchronised around them, and the memory per added user is the growth of the peak CUDA memory
allocated (``torch.cuda.max_memory_allocated``) instead of the resident memory.

    python benchmarks/packed_users.py [--rounds 5] [--skip-gpt2] [--quick] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import multiprocessing as mp

from _common import Clock, base_parser, current_hwm_bytes, machine_line, paired_ratio, reset_peak_rss, \
    set_threads, spread, target_line, interleaved
from _rounds import bench_config, build_local_users, local_steps, prepare

EMBEDDED = ["train.local_steps=2"]
GPT2 = ["model.name=gpt2-random", "train.batch_size=1", "train.seq_len=64", "train.local_steps=1",
        "data.train_tokens=4000", "data.valid_tokens=1000", "data.test_tokens=512"]


def packed_ratio(overrides: list[str], n_users: int, warmup: int, rounds: int) -> tuple[float, float, float, str]:
    cfg = bench_config([f"n_users={n_users}"] + overrides)
    prepare(cfg, n_users)
    rank = build_local_users(cfg, n_users)

    def step(mode):
        def go():
            rank.cfg.train.pack_users = mode
            local_steps(rank)
        return go
    times = interleaved({"packed": step("on"), "sequential": step("off")}, warmup, rounds,
                        Clock(rank.topo.device))
    from comigs_dist import dist
    where = rank.topo.device.type
    dist.shutdown()
    return paired_ratio(times["packed"]["wall"], times["sequential"]["wall"]), \
        spread(times["packed"]["wall"]), spread(times["sequential"]["wall"]), where


def _memory_child(n_users: int, overrides: list[str], out) -> None:
    import torch
    set_threads(2)
    cfg = bench_config([f"n_users={n_users}", "train.pack_users=off"] + overrides)
    rank = build_local_users(cfg, n_users)
    cuda = rank.topo.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    local_steps(rank)
    own = sum(p.numel() for p in rank.users[0].model.report.params.values()) * 16
    out.put((torch.cuda.max_memory_allocated() if cuda else current_hwm_bytes(), own))


def memory_per_user(overrides: list[str], few: int = 1, many: int = 5) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    peaks = {}
    own = 0
    for n in (few, many):
        q = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=(n, overrides, q))
        p.start()
        peaks[n], own = q.get(timeout=1800)
        p.join()
    return (peaks[many] - peaks[few]) / (many - few), own


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="model.device of the users (auto: the GPU when there is one)")
    args = parser.parse_args()
    set_threads(2)
    print(machine_line())
    device = [f"model.device={args.device}"]
    rounds = 2 if args.quick else args.rounds
    ratio, sp, ss, where = packed_ratio(EMBEDDED + device + (["train.batch_size=2", "train.seq_len=32"] if args.quick
                                                      else []), args.users, 1, rounds)
    print(f"embedded default, {args.users} users on {where}: spread packed {sp:.2f}, sequential {ss:.2f}")
    print(target_line("packed_over_sequential_embedded", ratio, "<=", 0.75))
    if args.skip_gpt2 or args.quick:
        return
    ratio, sp, ss, where = packed_ratio(GPT2 + device, args.users, 1, max(2, rounds // 2))
    print(f"GPT-2 124M shapes, {args.users} users on {where}: spread packed {sp:.2f}, sequential {ss:.2f}")
    print(target_line("packed_over_sequential_gpt2", ratio, "<=", 0.75))
    per_user, own = memory_per_user(GPT2 + device)
    print(f"GPT-2 124M shapes: peak memory (CUDA allocated on a GPU, RSS on a CPU) grows "
          f"{per_user / 2**20:.1f} MiB per added user; a user's own "
          f"parameters, gradients and AdamW moments: {own / 2**20:.1f} MiB")
    print(target_line("added_user_memory_over_own_bytes_gpt2", per_user / own, "<=", 1.5))


if __name__ == "__main__":
    main()
