"""Peak memory of a user with 8 experts against a user with 2 (target 2 of the performance issue).

    python benchmarks/memory.py [--quick] [--steps 3] [--device auto|cpu|cuda]

A user holds its frozen base once, whatever its number of experts: every expert of a layer uses
the same frozen MLP (comigs_dist/model/moe.py), and the mixture gathers only the tokens routed to
an expert, so activation memory grows with top-k, not with the number of experts. Each variant
runs in a fresh process (peaks are per process): it builds a user on GPT-2 124M's shapes (random
weights) with its optimisers, then takes expert steps (forward, backward, AdamW) and one router
step on batches of 8 x 128 tokens. Reported per variant:

    peak       the process's peak resident memory (CPU: ru_maxrss) or peak allocated CUDA memory
    built      resident (CUDA: allocated) memory after building the user, before the first step
    training   the peak while training (CPU: the kernel's high-water mark, reset after building;
               CUDA: max_memory_allocated after a reset), and its excess over "built"

The target uses the whole peak, what a user's machine must have.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import json
import subprocess
import sys

import torch

from comigs_dist.tables import format_table

VARIANTS = (  # (label, n_experts, naive)
    ("2 experts, top-2", 2, False),
    ("8 experts, top-2", 8, False),
    ("8 experts, top-2, naive k full MLPs", 8, True),
)


def child(n_experts: int, naive: bool, steps: int, quick: bool, device_name: str) -> dict:
    """One user in this (fresh) process: build, train a few steps, report memory."""
    from comigs_dist.model import AdapterSpec, build_base_model, wrap_user_model
    from comigs_dist.model.roles import Role

    torch.set_num_threads(1)
    device = C.default_device(device_name)
    name, vocab, batch, seq_len = ("tiny", 256, 2, 32) if quick else ("gpt2-random", 50257, 8, 128)
    lm = build_base_model(name, vocab, seq_len)
    spec = AdapterSpec(n_experts=n_experts, n_generalists=1, rank=8, alpha=16.0, attn_rank=8, top_k=2,
                       routed=True, load_balancing="generalist")
    torch.manual_seed(0)
    model = wrap_user_model(lm, spec).to(device)
    C.randomise_adapters(model)
    for m in model.moe:
        m.shared_frozen = not naive
    expert_params = model.set_trainable(lambda t: t.role != Role.ROUTER)
    router_params = [p for _, p in model.report.select(lambda t: t.role == Role.ROUTER)]
    expert_opt = torch.optim.AdamW(expert_params, lr=1e-3)
    router_opt = torch.optim.AdamW(router_params, lr=1e-3)
    tagged = {id(p) for p in model.report.params.values()}
    frozen = {p.data_ptr(): p.numel() for p in model.parameters() if id(p) not in tagged}  # unique storages
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (batch, seq_len), generator=g).to(device),
                torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)) for _ in range(2)]

    def train_step(params_on, opt, x, y):
        model.set_trainable(params_on)
        out = model(x, y)
        (out.ce + 0.01 * out.lb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model_bytes = C.current_rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated()
    reset_ok = C.reset_peak_rss() if device.type == "cpu" else True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        train_step(lambda t: t.role != Role.ROUTER, expert_opt, *batches[i % 2])
    train_step(lambda t: t.role == Role.ROUTER, router_opt, *batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = training = torch.cuda.max_memory_allocated()
    else:
        peak = C.peak_rss_bytes()
        training = C.current_hwm_bytes() if reset_ok else None
    return {"peak": peak, "model": model_bytes, "training": training, "device": device.type,
            "frozen_params": sum(frozen.values()), "trainable_params": model.report.count()}


def run_child(n_experts: int, naive: bool, steps: int, quick: bool, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n_experts), str(int(naive)), str(steps), str(int(quick)), device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child ({n_experts} experts) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="expert steps per process")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 1
    shapes = "tiny GPT-2 (quick smoke check)" if args.quick else "GPT-2 124M shapes, batch 8 x 128"
    print(f"peak memory per user: {shapes}, {args.steps} expert steps + 1 router step, one fresh process each")
    print(C.machine_line())
    res = {}
    for label, n, naive in VARIANTS:
        res[label] = run_child(n, naive, args.steps, args.quick, args.device)
        print(f"  measured: {label}", flush=True)
    mib = 1024 ** 2
    dev = res[VARIANTS[0][0]]["device"]
    peak_name = "peak RSS" if dev == "cpu" else "peak CUDA"
    rows = []
    for label, *_ in VARIANTS:
        r = res[label]
        train = excess = "n/a"
        if r["training"] is not None:
            train, excess = f"{r['training'] / mib:.0f}", f"{(r['training'] - r['model']) / mib:.0f}"
        rows.append((label, f"{r['peak'] / mib:.0f}", f"{r['model'] / mib:.0f}", train, excess,
                     f"{r['frozen_params']:,d}", f"{r['trainable_params']:,d}"))
    header = ("variant", peak_name + " MiB", "built MiB", "training MiB", "excess MiB", "frozen params", "trainable")
    print("\n" + format_table(header, rows, "<" + ">" * 6))
    frozen = {res[label]["frozen_params"] for label, *_ in VARIANTS}
    print(f"frozen base parameters per user: {', '.join(f'{f:,d}' for f in sorted(frozen))} "
          f"({'the same for every expert count' if len(frozen) == 1 else 'DIFFERENT across expert counts'})")
    two, eight, naive = (res[v[0]] for v in VARIANTS)
    ratio = eight["peak"] / two["peak"]
    print(f"naive k-full-MLP computation, for comparison: {naive['peak'] / two['peak']:.3f}")
    print(C.target_line("peak_memory_8_over_2_experts", ratio, "<=", 1.10))
    return {"ratio": ratio}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        n, naive, steps, quick, device = sys.argv[2:7]
        print(json.dumps(child(int(n), bool(int(naive)), int(steps), bool(int(quick)), device)))
    else:
        main()
