"""Per-user perplexity and routing snapshots on a split.

Owns the evaluation protocol: exp(mean token cross-entropy) over fixed, non-overlapping windows
from the start of a split (deterministic: the same tokens every time, no RNG consumed), and the
per-layer routing statistics over those tokens. Knows nothing of optimisers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from comigs_dist.data import eval_windows, iter_eval_batches


@dataclass
class EvalResult:
    loss: float
    ppl: float
    tokens: int
    accuracy: float
    # per layer: (mean router probability per expert, routing share per expert), averaged over tokens
    routing: list[tuple[list[float], list[float]]] = field(default_factory=list)


@torch.no_grad()
def evaluate_split(model, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int = 0,
                   device: torch.device | str = "cpu", autocast=contextlib.nullcontext, progress=None) -> EvalResult:
    """``progress``: a metrics.NullProgress/Progress that draws a bar over the batches (rank 0)."""
    total, count, correct = 0.0, 0, 0
    prob_sums = share_sums = None
    batches = iter_eval_batches(tokens, seq_len, batch_size, max_tokens, device)
    if progress is not None:
        n_batches = -(-len(eval_windows(tokens, seq_len, max_tokens)) // batch_size)
        batches = progress.bar(batches, total=n_batches, desc="evaluation", transient=True)
    for x, y in batches:
        with autocast():
            # the logits a chunk of tokens at a time (train.loss_chunk), never a whole batch's
            loss_sum, hits, n = model.token_sums(x, y)
        total += loss_sum
        correct += hits
        count += n
        stats = model.routing_stats()
        if stats and stats[0] is not None:
            probs = torch.stack([p.float().cpu() for p, _ in stats]) * n     # (L, E)
            shares = torch.stack([s.float().cpu() for _, s in stats]) * n
            prob_sums = probs if prob_sums is None else prob_sums + probs
            share_sums = shares if share_sums is None else share_sums + shares
    if count == 0:
        raise ValueError(f"nothing to evaluate: the split holds {len(tokens)} tokens, fewer than one window of "
                         f"{seq_len + 1}")
    loss = total / count
    routing = []
    if prob_sums is not None:
        routing = [((prob_sums[l] / count).tolist(), (share_sums[l] / count).tolist())
                   for l in range(prob_sums.shape[0])]
    return EvalResult(loss=loss, ppl=math.exp(loss), tokens=count, accuracy=correct / count, routing=routing)
