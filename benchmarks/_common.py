"""Shared pieces of the benchmark scripts: timing, robust statistics, target lines, models, ranks.

Owns how a benchmark measures (interleaved rounds, medians, paired ratios, wall or CPU clock,
peak memory) and how it prints its verdict (``<name>: <ratio> (target <op> <value>)``).
Knows nothing of what is being compared: each script hands in its variants.

Why interleaved rounds and paired ratios: on a shared machine the load drifts over minutes, so
every variant is timed once per round, in a rotating order, and the ratio of two variants is the
median over rounds of their ratio within the round (both saw about the same machine state).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout, without an install
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# command line and environment
# --------------------------------------------------------------------------------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: tiny shapes and few repetitions (the figures mean nothing)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the target lines use: wall-clock time (the definition) or this "
                             "process's CPU time (less sensitive to other jobs on a shared machine; "
                             "single-threaded measurements only). Both are printed.")
    return parser


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads (0 = leave torch's default); returns the count in use."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def default_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_line() -> str:
    load = ""
    if hasattr(os, "getloadavg"):
        load = " load average %.2f %.2f %.2f," % os.getloadavg()
    return f"{os.cpu_count()} CPU cores,{load} torch {torch.__version__}"


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------

class Clock:
    """Wall-clock and process CPU time of one call, with CUDA synchronised around it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu


def usage() -> dict[str, float]:
    """This process's clocks: wall, user and kernel CPU seconds (all its threads), minor page faults."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.perf_counter(), "user": r.ru_utime, "sys": r.ru_stime, "minflt": float(r.ru_minflt)}


def usage_since(before: dict[str, float]) -> dict[str, float]:
    now = usage()
    return {k: now[k] - before[k] for k in before}


def interleaved(variants: dict[str, Callable[[], object]], warmup: int, rounds: int, clock: Clock,
                progress: Callable[[str], None] = lambda msg: None) -> dict[str, dict[str, list[float]]]:
    """Time every variant once per round, rotating the order each round; the warm-up rounds
    are run the same way and dropped. Returns {variant: {"wall": [...], "cpu": [...]}}."""
    names = list(variants)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = clock(variants[name])
            if r >= warmup:
                out[name]["wall"].append(wall)
                out[name]["cpu"].append(cpu)
        progress(f"round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else ""))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Interquartile range over the median: how noisy a series is (0.05 = 5%)."""
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[2] - q[0]) / max(statistics.median(xs), 1e-12)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (each pair measured under about the same load)."""
    return statistics.median(a / b for a, b in zip(num, den))


def target_line(name: str, value: float, op: str, target: float) -> str:
    """The last lines of every benchmark, one per target, in a form a reader or a check compares."""
    return f"{name}: {value:.3f} (target {op} {target:.2f})"


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set since it started (ru_maxrss is in KiB on Linux)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of this process's RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_hwm_bytes() -> int | None:
    """VmHWM: the peak RSS since the last reset (Linux), or None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def current_rss_bytes() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

def randomise_adapters(model: torch.nn.Module, seed: int = 0, b_std: float = 0.02) -> None:
    """Give every LoRA B a small random value and the routers spread-out weights, so that the
    experts differ and tokens spread over them as in a trained model (untrained B are zero and a
    fresh router sends most tokens to the same experts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
            elif name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def bench_cache() -> Path:
    """Where benchmark inputs built here are kept between runs (under $COMIGS_CACHE_DIR)."""
    from comigs_dist.synthetic import cache_root
    return cache_root() / "bench"


def _build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp)`` into a sibling directory renamed into place: a half-built input is never used."""
    if out.exists():
        return out
    import shutil
    import tempfile
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        tmp.rename(out)
    except OSError:
        if not out.exists():  # another benchmark built it meanwhile, or a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# seeded random GPT-2 bases saved as Hugging Face checkpoints (what model.name=<dir> and the
# reference's loader read): the small one of `python -m comigs_dist.pretrain --config small`
# and GPT-2 124M's shapes (the built-in gpt2-random's weights)
GPT2_BASES = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, n_positions=128),
}


def random_gpt2_base(kind: str, vocab_size: int = 50257, seed: int = 1234) -> Path:
    """A GPT-2 of GPT2_BASES[kind] with weights drawn from ``seed``, saved once under bench_cache()."""
    def build(tmp: Path) -> None:
        from transformers import GPT2LMHeadModel
        from comigs_dist.pretrain import _quiet_gpt2_config, save_hf_checkpoint
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(_quiet_gpt2_config(vocab_size=vocab_size, **GPT2_BASES[kind]))
        save_hf_checkpoint(model, tmp)
    return _build_once(bench_cache() / f"gpt2-{kind}-v{vocab_size}-s{seed}", build)


def random_token_dataset(n_users: int, vocab_size: int = 50257, train_tokens: int = 200_000,
                         eval_tokens: int = 8_192, seed: int = 0) -> Path:
    """A prepared dataset (shards + meta.json) of uniformly random token ids per user: timing
    does not depend on what the tokens say."""
    out = bench_cache() / f"random-{n_users}u-v{vocab_size}-t{train_tokens}-e{eval_tokens}-s{seed}"
    if not (out / "meta.json").exists():
        import numpy as np
        from comigs_dist.data import write_dataset  # writes a sibling and renames it into place
        rng = np.random.default_rng(seed)
        users = [{"train": rng.integers(0, vocab_size, train_tokens), "valid": rng.integers(0, vocab_size, eval_tokens),
                  "test": rng.integers(0, vocab_size, eval_tokens)} for _ in range(n_users)]
        write_dataset(out, users, vocab_size)
    return out


# --------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------

def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun would export for one rank on this host, one thread per rank."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def start_ranks(target: Callable, world_size: int, args: tuple, ctx=None) -> list:
    """Start ``world_size`` processes running ``target(rank, world_size, port, *args)``; each
    joins its group through the project's own ``dist.init_distributed`` (env://)."""
    import multiprocessing as mp
    ctx = ctx or mp.get_context("spawn")
    from comigs_dist.dist import free_port
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(target, r, world_size, port, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def _rank_entry(target: Callable, rank: int, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    torch.set_num_threads(1)
    target(rank, world_size, port, *args)


def join_ranks(procs: list, timeout_s: float = 60.0) -> None:
    for p in procs:
        p.join(timeout_s)
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if bad or alive:
        raise RuntimeError(f"benchmark ranks failed: exit codes {bad}, {len(alive)} still running (killed)")
