"""Step cost of the mixture against one LoRA set (target 1 of the performance issue).

    python benchmarks/step_cost.py [--quick] [--threads 1] [--rounds 7] [--clock wall|cpu]

The paper (appendix B.1 of the first version) counts +1.55% forward FLOPs over the GPT-2 base for
CoMiGS-1G1S against +0.52% for one LoRA set. That holds only if the frozen MLP runs once per token
whatever the number of experts: the routing weights of a token sum to 1 and the frozen output
projection is linear, so sum_j w_j (W0 + dW_j) h_j = W0 (sum_j w_j h_j) + sum_j w_j dW_j h_j
(comigs_dist/model/moe.py). This script times, on GPT-2 124M's shapes with random weights and a
batch of 8 x 128 tokens, one training step of the trainable parts (forward, load-balancing loss,
backward into the adapters; the frozen base gets no gradient; the router is frozen, as in the
expert phase of Algorithm 1; no optimiser step) for:

    one LoRA        attention LoRA + one MLP LoRA (n_experts = 1, no router)
    CoMiGS-1G1S     2 experts, top-2, router
    8 experts       8 experts, top-2, router
and the last two again computed naively, each selected expert running the whole frozen MLP.

All variants share one copy of the frozen weights and are timed in interleaved rounds; a ratio
is the median over rounds of the ratio within a round. Absolute times are only meaningful on a GPU.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import torch

from comigs_dist.model import AdaptedBase, AdapterSpec, UserModel, build_adapters, build_base_model
from comigs_dist.model.roles import Role
from comigs_dist.tables import format_table

VARIANTS = (  # (label, n_experts, top_k, naive)
    ("one LoRA (1 expert)", 1, 1, False),
    ("CoMiGS-1G1S (2 experts, top-2)", 2, 2, False),
    ("  naive: 2 full MLPs", 2, 2, True),
    ("8 experts, top-2", 8, 2, False),
    ("  naive: 2 full MLPs of 8", 8, 2, True),
)


def build_models(quick: bool, seq_len: int, device: torch.device) -> dict[int, UserModel]:
    """One user model per expert count, all served by the same adapted base."""
    name, vocab = ("tiny", 256) if quick else ("gpt2-random", 50257)
    base = AdaptedBase(build_base_model(name, vocab, seq_len))
    models = {}
    for n in sorted({v[1] for v in VARIANTS}):
        spec = AdapterSpec(n_experts=n, n_generalists=1, rank=8, alpha=16.0, attn_rank=8, top_k=min(2, n),
                           routed=True, load_balancing="generalist")
        model = UserModel(base, build_adapters(base.layout, spec, seed=n))
        C.randomise_adapters(model, seed=n)
        model.set_trainable(lambda t: t.role != Role.ROUTER)  # the expert phase: router frozen
        models[n] = model.to(device)
    return models


def make_step(model: UserModel, naive: bool, x: torch.Tensor, y: torch.Tensor, lb_weight: float = 0.01):
    def step():
        for m in model.moe:
            m.shared_frozen = not naive
        out = model(x, y)
        (out.ce + lb_weight * out.lb).backward()
        for p in model.parameters():
            p.grad = None
        return out.ce.detach()
    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default); default 1")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.batch, args.seq_len = 2, 1, 2, 32
    threads = C.set_threads(args.threads)
    device = C.default_device(args.device)
    models = build_models(args.quick, args.seq_len, device)
    vocab = models[1].lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g).to(device)
    y = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g).to(device)
    steps = {label: make_step(models[n], naive, x, y) for label, n, _, naive in VARIANTS}

    # the fused and the naive computation are the same function: same loss on the same batch
    losses = {label: float(step()) for label, step in steps.items()}
    for label, n, _, naive in VARIANTS:
        if naive:
            fused = next(lbl for lbl, n2, _, nv in VARIANTS if n2 == n and not nv)
            if abs(losses[label] - losses[fused]) > 1e-4 * max(1.0, abs(losses[fused])):
                raise AssertionError(f"{label}: loss {losses[label]} differs from the fused {losses[fused]}")

    shapes = "tiny GPT-2 (quick smoke check)" if args.quick else "GPT-2 124M shapes, random weights"
    print(f"step cost: {shapes}, batch {args.batch} x {args.seq_len}, {device.type}, {threads} thread(s), "
          f"{args.rounds} timed rounds after {args.warmup} warm-up")
    print(C.machine_line())
    times = C.interleaved(steps, args.warmup, args.rounds, C.Clock(device),
                          progress=lambda msg: print("  " + msg, flush=True))

    ref = VARIANTS[0][0]
    ratios, rows = {}, []
    for label, *_ in VARIANTS:
        t = times[label]
        rw = C.paired_ratio(t["wall"], times[ref]["wall"])
        rc = C.paired_ratio(t["cpu"], times[ref]["cpu"])
        ratios[label] = rw if args.clock == "wall" else rc
        rows.append((label, f"{C.median(t['wall']):.3f}", f"{C.spread(t['wall']):.1%}", f"{C.median(t['cpu']):.3f}",
                     f"{C.spread(t['cpu']):.1%}", f"{rw:.3f}", f"{rc:.3f}",
                     f"{min(t['cpu']) / min(times[ref]['cpu']):.3f}"))
    header = ("variant", "wall s", "spread", "cpu s", "spread", "ratio wall", "ratio cpu", "min/min cpu")
    print("\n" + format_table(header, rows))
    print("(spread = interquartile range / median over rounds; ratio = median over rounds of the ratio to one "
          "LoRA within the round;\n min/min = ratio of the fastest rounds, the least disturbed by other jobs)")
    print(f"\nnaive k-full-MLP ratios, for comparison: 1G1S {ratios[VARIANTS[2][0]]:.3f}, "
          f"8 experts top-2 {ratios[VARIANTS[4][0]]:.3f} ({args.clock} clock)")
    print(C.target_line("step_cost_1g1s_over_one_lora", ratios[VARIANTS[1][0]], "<=", 1.10))
    print(C.target_line("step_cost_8x_top2_over_one_lora", ratios[VARIANTS[3][0]], "<=", 1.20))
    return ratios


if __name__ == "__main__":
    main()
