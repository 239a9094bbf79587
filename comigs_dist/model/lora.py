"""LoRA: a frozen linear map plus a trainable low-rank update, W x + b + g * B (A x).

Owns the LoRA factors (A: Kaiming-uniform, B: zeros, so an untrained adapter changes nothing),
the rank-stabilised scale g = alpha / sqrt(r), and the wrapper around a frozen projection
(``nn.Linear`` or GPT-2's ``Conv1D``, whose weight is stored in x out) that adds, row by row, the
LoRA of the user each row belongs to. Knows nothing of routers or of which adapters are shared.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from comigs_dist.model.roles import ParamTag

if TYPE_CHECKING:
    from comigs_dist.model.serving import ServedRows


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a frozen projection; GPT-2's Conv1D stores its weight as (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D":
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"cannot adapt a {type(layer).__name__}: expected nn.Linear or transformers' Conv1D")


def frozen_weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The frozen weight as (out, in), whatever the storage convention (for tests and merging)."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


def rs_scale(alpha: float, rank: int) -> float:
    """Rank-stabilised LoRA scale (Kalajdzievski 2023): alpha / sqrt(r)."""
    return alpha / math.sqrt(rank)


class LoRAFactors(nn.Module):
    """A pair of LoRA factors A (r x in) and B (out x r) with its scale; computes g * B A x."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 tag_a: ParamTag | None = None, tag_b: ParamTag | None = None):
        super().__init__()
        self.rank = rank
        self.scale = rs_scale(alpha, rank)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        # Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear does
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.tags = {"lora_A": tag_a, "lora_B": tag_b}

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """A x, shape (..., r). As a linear map, the gradient of A is the fast (r, N) @ (N, in) product."""
        return F.linear(x, self.lora_A.to(x.dtype))

    def up_t(self, dtype: torch.dtype) -> torch.Tensor:
        """g * B^T as a contiguous (r, out) matrix. Multiplying by it (rather than by a transposed
        view of B) keeps the gradient of B a fast (r, N) @ (N, out) product on CPU."""
        return (self.lora_B.t().to(dtype) * self.scale).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x) @ self.up_t(x.dtype)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """base + g * B (A x) for 2-D x (N, in) and base (N, out), the add fused into the product
        (one pass over the (N, out) result instead of three)."""
        return torch.addmm(base, self.down(x), self.up_t(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The dense update g * B A, shape (out, in)."""
        return self.scale * self.lora_B @ self.lora_A

    def extra_repr(self) -> str:
        return f"in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, r={self.rank}, scale={self.scale:.3f}"


class AdaptedLinear(nn.Module):
    """A frozen projection (kept as ``base_layer``) that adds the LoRA of whichever user owns each
    row of the batch: ``rows`` (shared by every adapted module of one base) names the users being
    served and the rows each owns; ``layer`` and ``key`` find the user's LoRA in its adapters.
    The frozen product runs once over all rows, each user's low-rank update on its own rows."""

    def __init__(self, base_layer: nn.Module, rows: "ServedRows", layer: int, key: str):
        super().__init__()
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.rows, self.layer, self.key = rows, layer, key
        self.in_features, self.out_features = in_out_features(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        segments = self.rows.current()
        if len(segments) == 1:
            return y + segments[0].adapters.attn_lora(self.layer, self.key)(x)
        # split, not slicing: the backward of a split concatenates the pieces' gradients once, where
        # each slice's backward would write its gradient into a zero tensor of the whole batch
        sizes = [s.stop - s.start for s in segments]
        return torch.cat([y_s + s.adapters.attn_lora(self.layer, self.key)(x_s)
                          for s, y_s, x_s in zip(segments, y.split(sizes), x.split(sizes))])

    def extra_repr(self) -> str:
        return f"layer={self.layer}, key={self.key!r}, in={self.in_features}, out={self.out_features}"
