"""How many simulated users of GPT-2 124M and of Llama 3.2 1B fit on one 80 GB GPU.

Measures, on this machine's CPU, what each user holds (no GPU is needed):
  * parameter bytes, exact: the frozen base in --base-dtype (bf16 by default, as model.dtype=bf16
    stores it; fp32 with model.dtype=auto or fp32) and the CoMiGS-1G1S
    adapters and router, each trainable parameter costing 16 bytes (fp32 value, gradient, two
    AdamW moments);
  * activation bytes of one expert step (forward, backward, AdamW), measured as the rise of peak
    resident memory (VmHWM) over the step, and, deterministically, the bytes autograd saves for
    the backward pass. Both in fp32 on CPU, at a few sequences of 128 tokens; bf16 autocast on a
    GPU keeps most saved activations in bf16, so these are upper bounds.
Llama 3.2 1B is built with its published shapes and random weights; its step is measured with 1
and 2 decoder layers (full width and vocabulary) and extrapolated linearly to 16 layers, since
every layer holds the same activations. Activations are extrapolated linearly in the number of
sequences. The per-process CUDA context is not measurable here: the estimate assumes 0.5 GiB.

    python benchmarks/users_per_gpu.py [--gpu-gib 74.5] [--context-gib 0.5] [--base-dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
SEQ_LEN = 128


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def llama_32_1b_config(n_layers: int = 16):
    """The published shapes of meta-llama/Llama-3.2-1B (tied embeddings), dropout off."""
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=n_layers, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=2048,
                       rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       bos_token_id=128000, eos_token_id=128001)


def build(kind: str, n_layers: int | None, meta: bool):
    """A CoMiGS-1G1S user model (2 experts, rank 8, routed) over the base of the given kind."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    from comigs_dist.config import load_config, resolve_users
    from comigs_dist.model import adapter_spec_for, wrap_user_model
    from comigs_dist.pretrain import _quiet_gpt2_config
    where = torch.device("meta") if meta else torch.device("cpu")
    torch.manual_seed(0)
    with where:
        if kind == "gpt2":
            base = GPT2LMHeadModel(_quiet_gpt2_config(vocab_size=50257, **({"n_layer": n_layers} if n_layers else {})))
        else:
            base = LlamaForCausalLM(llama_32_1b_config(n_layers or 16))
    base.eval()
    cfg = load_config(None, ["model.name=tiny"])
    spec = adapter_spec_for(cfg, resolve_users(cfg, 1)[0], routed=True)
    return wrap_user_model(base, spec)


def parameter_counts(kind: str) -> tuple[int, int]:
    """(base parameters, trainable parameters), exact, on the meta device."""
    model = build(kind, None, meta=True)
    trainable = model.report.count()
    base = sum(p.numel() for p in model.parameters()) - trainable
    return base, trainable


def step_bytes(kind: str, n_layers: int | None, n_seq: int, vocab: int) -> tuple[int, int]:
    """(peak resident rise over one expert step, bytes autograd saved for backward) at n_seq x 128."""
    from comigs_dist.config import load_config
    from comigs_dist.methods import get_method
    from comigs_dist.train import build_optimizer
    model = build(kind, n_layers, meta=False)
    method = get_method("comigs_1g1s")
    cfg = load_config(None, [])
    params = model.set_trainable(lambda tag: method.trains_in("expert", tag))
    opt = build_optimizer(params, 1e-3, cfg.train, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)

    def step():
        x = torch.randint(0, vocab, (n_seq, SEQ_LEN), generator=g)
        out = model(x, torch.roll(x, -1, dims=1))
        (out.ce + 0.01 * out.lb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW state and every lazily built buffer now exist
    _trim()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS")
    step()
    peak = _status("VmHWM") - before

    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, vocab, (n_seq, SEQ_LEN), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.roll(x, -1, dims=1))
    del out
    model = opt = None  # dropped (a del would hide them from the closure above)
    _trim()
    return peak, sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-gib", type=float, default=74.5, help="usable memory of the GPU (80 GB = 74.5 GiB)")
    parser.add_argument("--context-gib", type=float, default=0.5, help="CUDA context per process (assumed)")
    parser.add_argument("--seqs", type=int, default=2, help="sequences of 128 tokens per measured step")
    parser.add_argument("--base-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="the frozen base on the GPU: bf16 (model.dtype=bf16) or fp32 (model.dtype=auto or fp32)")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        print("this benchmark reads /proc/self/status and resets VmHWM: Linux only", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows = {}
    for kind, name, vocab in (("gpt2", "GPT-2 124M", 50257), ("llama", "Llama 3.2 1B", 128256)):
        start = time.perf_counter()
        base, trainable = parameter_counts(kind)
        base_bytes = base * (2 if args.base_dtype == "bf16" else 4)
        if kind == "gpt2":
            peak, saved = step_bytes(kind, None, args.seqs, vocab)
            how = f"measured, 12 layers, {args.seqs} x {SEQ_LEN}"
        else:  # one and two layers at full width; every further layer adds the same
            p1, s1 = step_bytes(kind, 1, args.seqs, vocab)
            p2, s2 = step_bytes(kind, 2, args.seqs, vocab)
            peak, saved = p1 + 15 * (p2 - p1), s1 + 15 * (s2 - s1)
            how = f"measured at 1 and 2 layers, {args.seqs} x {SEQ_LEN}, extrapolated to 16"
        per_seq = peak / args.seqs
        rows[name] = dict(base=base, trainable=trainable, base_bytes=base_bytes, peak_per_seq=per_seq,
                          saved_per_seq=saved / args.seqs)
        print(f"{name}: base {base / 1e6:.1f} M parameters ({base_bytes / GIB:.2f} GiB {args.base_dtype}), trainable "
              f"{trainable / 1e6:.2f} M ({trainable * 16 / GIB:.3f} GiB with gradients and AdamW); one step "
              f"per sequence of {SEQ_LEN}: peak {per_seq / GIB:.3f} GiB, saved for backward "
              f"{saved / args.seqs / GIB:.3f} GiB ({how}) [{time.perf_counter() - start:.0f} s]", flush=True)

    print()
    print(f"users per GPU of {args.gpu_gib} GiB, assuming {args.context_gib} GiB of CUDA context per process; "
          f"the base in {args.base_dtype}; fp32 activations (bf16 autocast needs less, so these are upper "
          f"bounds and the user counts lower bounds)")
    print("| model | sequences per forward (train.micro_batch_size) | GiB per user | users | "
          "GiB per user if the base were shared on the GPU | users then |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        for micro in (64, 8, 1):
            rest = r["trainable"] * 16 + micro * r["peak_per_seq"] + args.context_gib * GIB
            own = r["base_bytes"] + rest
            print(f"| {name} | {micro} | {own / GIB:.2f} | {int(args.gpu_gib * GIB // own)} | {rest / GIB:.2f} | "
                  f"{int((args.gpu_gib * GIB - r['base_bytes']) // rest)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
