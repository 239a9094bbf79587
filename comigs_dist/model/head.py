"""The output projection and the language-model loss, a chunk of tokens at a time.

Owns how a model's final hidden states become its cross-entropy (training) and its summed token
losses and hits (evaluation) without holding the logits of a whole batch: over GPT-2's 50,257
tokens, the fp32 logits of 8 x 128 tokens take 206 MB, and autograd keeps more of that size
(log-softmax, its gradient). Allocations that large come from fresh pages every time on a CPU
(glibc maps anything above 32 MiB anew and unmaps it when freed), so most of a step's kernel time
went into page faults (docs/performance.md). Training uses PyTorch's own chunked
``F.linear_cross_entropy``, which computes the hidden states' gradient in the forward pass a chunk
at a time; evaluation runs its own loop under no_grad. Knows nothing of adapters or training.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # targets with this id add nothing to the loss (F.cross_entropy's default)


def output_head(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, D), bias or None) of a Hugging Face causal LM's output projection."""
    head = lm.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _fused_available() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")


@functools.lru_cache(maxsize=None)
def _options(chunk: int):
    # an explicit chunk: PyTorch's automatic sizing picks 2 tokens per chunk for GPT-2's head
    # (logits no larger than the hidden states), and then the weight is read 512 times a batch
    return nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)


@functools.lru_cache(maxsize=1)
def _warn_unfused() -> None:
    warnings.warn(f"train.loss_chunk needs F.linear_cross_entropy (torch >= 2.13; this is torch "
                  f"{torch.__version__}): the logits of each micro-batch are materialised whole", stacklevel=3)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     chunk: int) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` (..., ) under the logits ``hidden @ weight.T + bias``
    over the tokens whose target is not IGNORE_INDEX. ``chunk`` > 0: at most that many tokens'
    logits exist at once (forward and backward); 0, or a batch of at most ``chunk`` tokens, gives
    the plain computation. The same loss and gradients to float32 rounding either way."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    y = targets.reshape(-1)
    if chunk <= 0 or h.shape[0] <= chunk or not _fused_available():
        if chunk > 0 and h.shape[0] > chunk:
            _warn_unfused()
        # under autocast F.linear runs in its low precision, as the model's own head would
        return F.cross_entropy(F.linear(h, weight, bias).float(), y, ignore_index=IGNORE_INDEX)
    low = _autocast_dtype(h.device)
    if low is not None:
        # the fused op is not autocast-aware: hand it the precision autocast would have used
        h, weight = h.to(low), weight.to(low)
        bias = bias.to(low) if bias is not None else None
    with torch.autocast(h.device.type, enabled=False):
        loss = F.linear_cross_entropy(h, weight, y, linear_bias=bias, ignore_index=IGNORE_INDEX,
                                      options=_options(int(chunk)))
    return loss.float()


@torch.no_grad()
def token_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               chunk: int) -> tuple[float, int, int]:
    """(summed cross-entropy, tokens whose argmax is the target, tokens counted) over the tokens
    whose target is not IGNORE_INDEX, ``chunk`` tokens' logits at a time (0 = all at once)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    step = chunk if chunk > 0 else max(1, h.shape[0])
    total, correct = 0.0, 0
    for start in range(0, h.shape[0], step):
        logits = F.linear(h[start:start + step], weight, bias).float()  # (chunk, V)
        y_c = y[start:start + step]
        total += F.cross_entropy(logits, y_c, ignore_index=IGNORE_INDEX, reduction="sum").item()
        correct += int((logits.argmax(-1) == y_c).sum())
    return total, correct, int((y != IGNORE_INDEX).sum())
