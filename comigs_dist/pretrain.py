"""Pretrain a small GPT-2 from scratch on a token stream and save it as a HF checkpoint.

Owns the pretraining routine used for the embedded default base (``synthetic.py``). The saved
directory loads with ``model.name=DIR`` like any Hugging Face checkpoint.
Knows nothing of users, adapters or methods.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _quiet_gpt2_config(**kw):
    from transformers import GPT2Config
    kw.setdefault("resid_pdrop", 0.0)
    kw.setdefault("embd_pdrop", 0.0)
    kw.setdefault("attn_pdrop", 0.0)
    # GPT-2's default bos/eos id (50256) does not exist in a small vocabulary
    eot = 0 if kw.get("vocab_size", 50257) < 50257 else 50256
    kw.setdefault("bos_token_id", eot)
    kw.setdefault("eos_token_id", eot)
    return GPT2Config(**kw)


def save_hf_checkpoint(model, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors that ``from_pretrained`` loads. (transformers'
    ``save_pretrained`` silently writes no weights on a rank other than 0 of an initialised
    process group, and any rank may be the one that builds a cache entry.)"""
    from safetensors.torch import save_model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def evaluate_ppl(model, tokens: np.ndarray, seq_len: int, batch_size: int = 32) -> float:
    """exp(mean token cross-entropy) over non-overlapping windows of ``tokens``."""
    from comigs_dist.data import iter_eval_batches
    total, count = 0.0, 0
    for x, y in iter_eval_batches(tokens, seq_len, batch_size, 0):
        logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / max(count, 1))


def pretrain_gpt2(config: dict, tokens: np.ndarray, held_out: np.ndarray, *, steps: int, batch_size: int,
                  seq_len: int, lr: float, seed: int, out_dir: str | Path, progress: bool = False) -> dict:
    """Train a GPT-2 of the given config on ``tokens`` (random windows), save it to ``out_dir``."""
    from transformers import GPT2LMHeadModel
    from comigs_dist.data import BatchSampler

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_quiet_gpt2_config(**config))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    sampler = BatchSampler(tokens, seq_len, seed)
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        x, y = sampler.sample(batch_size)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss_value = loss.item()
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"[pretrain] step {step + 1}/{steps} loss {loss_value:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    model.eval()
    ppl = evaluate_ppl(model, held_out, seq_len)
    save_hf_checkpoint(model, out_dir)
    return {"steps": steps, "final_train_loss": loss_value, "held_out_ppl": ppl,
            "seconds": time.perf_counter() - start, "n_params": sum(p.numel() for p in model.parameters())}
