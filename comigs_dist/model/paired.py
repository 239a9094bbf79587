"""Two LoRAs on one frozen projection, combined per token: FedALT's and FedDPA's adapter.

Owns ``PairedLoRA``: a LoRA that comes from the collective (``first``: FedALT's rest-of-world
LoRA, FedDPA's global adapter; role generalist) and the user's own LoRA (``second``: FedALT's
individual LoRA, FedDPA's local adapter; role specialist), added to the frozen layer as
    g * (w_0 B_0 A_0 x + w_1 B_1 A_1 x),
with the weights (w_0, w_1) from one of three sources, checked in this order: per-sequence weights
set for the next forwards (``row_weights``, FedDPA at test time), a per-token mixer
(``TokenMixer``, FedALT), or a fixed pair (``weights``, FedDPA while training). Both LoRAs start
with B = 0, so an untrained pair changes nothing whatever its weights.

The pair has the interface of ``LoRAFactors`` (``down``, ``up_t``, ``forward``, ``add_to``): it is
one LoRA of rank 2r whose codes are weighted per token, so it plugs into an attention slot of
``AdaptedLinear`` as it is, and into an MLP expert on every path that calls those methods (the
mixture's one-node GPT-2 path reads ``out_lora.lora_A`` directly: experts built with pairs,
``AdapterSpec.paired``, take the plain-autograd path instead).
Knows nothing of which method uses it or how its halves are aggregated.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from comigs_dist.model.lora import LoRAFactors
from comigs_dist.model.roles import ParamTag, Role
from comigs_dist.model.routing import TopKRouter

PAIRINGS = ("none", "mixer", "fixed")  # AdapterSpec.paired: a plain LoRA, a pair with a mixer, a fixed pair


class TokenMixer(TopKRouter):
    """FedALT's adaptive mixer: per token, the softmax of a bias-free linear map of the adapted
    layer's input, one weight per LoRA of the pair. A router whose k is every expert, so that
    injection collects its tag like any router's."""

    def __init__(self, d_in: int, n: int = 2, tag: ParamTag | None = None):
        super().__init__(d_in, n, n, tag)
        # the FedALT reference initialises its mixer like nn.Linear (Kaiming-uniform, a = sqrt(5)),
        # where the CoMiGS router uses GPT-2's N(0, 0.02)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the n logits of every token, (..., n), in float32."""
        return F.softmax(F.linear(x, self.weight.to(x.dtype)).float(), dim=-1)


class PairedLoRA(nn.Module):
    """A collective LoRA (``first``, generalist) and the user's own (``second``, specialist) on one
    frozen projection, weighted per token; see the module docstring.

    kind, layer, module, expert: where the pair sits, for the tags ('attn' with expert -1, or
    'expert' with the expert's index); mixer: give the pair a trainable ``TokenMixer`` (role
    router); weights: the fixed (w_0, w_1) used when there is no mixer and no row weights."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *, kind: str, layer: int,
                 module: str, expert: int = -1, mixer: bool = False, weights: tuple[float, float] = (0.5, 0.5)):
        super().__init__()

        def tags(role: Role) -> tuple[ParamTag, ParamTag]:
            return (ParamTag(role, kind, layer, module, expert, "A"), ParamTag(role, kind, layer, module, expert, "B"))

        # built in this order (collective, own, mixer) so that a seed gives the same initial values
        self.first = LoRAFactors(in_features, out_features, rank, alpha, *tags(Role.GENERALIST))
        self.second = LoRAFactors(in_features, out_features, rank, alpha, *tags(Role.SPECIALIST))
        self.mixer = (TokenMixer(in_features, 2, ParamTag(Role.ROUTER, "router", layer, module, expert, "W"))
                      if mixer else None)
        self.rank = rank
        self.weights = weights
        self.row_weights: torch.Tensor | None = None

    # -- where the weights come from --------------------------------------------------------------
    def set_weights(self, w_first: float, w_second: float) -> None:
        """Fix the weights of the two LoRAs (used when there is no mixer and no row weights)."""
        self.weights = (float(w_first), float(w_second))

    def set_row_weights(self, weights: torch.Tensor | None) -> None:
        """Weights of the two LoRAs for the next forwards: (B, 2), one pair per sequence of B, or
        (B, T, 2), one per position of each; None to go back to the mixer or the fixed weights."""
        if weights is not None and (weights.dim() not in (2, 3) or weights.shape[-1] != 2):
            raise ValueError(f"row weights must have shape (sequences, 2) or (sequences, positions, 2), got "
                             f"{tuple(weights.shape)}")
        self.row_weights = weights

    def _terms(self, x: torch.Tensor) -> list[tuple[LoRAFactors, torch.Tensor | float]]:
        """(LoRA, weight) of every LoRA the forward of x adds: a weight is a float, or a tensor
        that broadcasts against the LoRA's codes (..., r). A fixed weight of 0 drops its LoRA."""
        if self.row_weights is not None:
            w = self._per_row(self.row_weights, x)
            return [(self.first, w[..., 0:1]), (self.second, w[..., 1:2])]
        if self.mixer is not None:
            w = self.mixer.probabilities(x).to(x.dtype)                  # (..., 2)
            return [(self.first, w[..., 0:1]), (self.second, w[..., 1:2])]
        return [(lora, w) for lora, w in zip((self.first, self.second), self.weights) if w != 0.0]

    @staticmethod
    def _per_row(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The weights laid out against x: per sequence (B, 2) -> (B, 1, 2) for x (B, T, in),
        (B*T, 2) for flattened tokens (B*T, in); per position (B, T, 2) -> itself, or (B*T, 2)."""
        n_rows = weights.shape[0]
        if weights.dim() == 3:
            n_tokens = weights.shape[0] * weights.shape[1]
            if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(weights.shape[:2]):
                return weights.to(x.dtype)
            if x.dim() == 2 and x.shape[0] == n_tokens:
                return weights.to(x.dtype).reshape(n_tokens, 2)
            raise ValueError(f"position weights are set for {tuple(weights.shape[:2])} (sequences, positions) but "
                             f"the forward's input has shape {tuple(x.shape)}")
        if x.dim() >= 3:
            if x.shape[0] != n_rows:
                raise ValueError(f"row weights are set for {n_rows} sequences but the forward has {x.shape[0]}")
            return weights.to(x.dtype).reshape(n_rows, *([1] * (x.dim() - 2)), 2)
        if x.shape[0] % n_rows:
            raise ValueError(f"row weights are set for {n_rows} sequences but the forward has {x.shape[0]} tokens, "
                             f"not a multiple")
        return weights.to(x.dtype).repeat_interleave(x.shape[0] // n_rows, dim=0)

    # -- the LoRAFactors interface ---------------------------------------------------------------------
    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of both LoRAs, each scaled by its weight: (..., 2r), or (..., r) when a fixed
        weight of 0 drops one LoRA (``up_t`` then drops it too)."""
        codes = [lora.down(x) * w for lora, w in self._terms(x)]
        return codes[0] if len(codes) == 1 else torch.cat(codes, dim=-1)

    def up_t(self, dtype: torch.dtype) -> torch.Tensor:
        """g * [B_0 B_1]^T, (2r, out), or the one LoRA's (r, out) under a fixed weight of 0."""
        loras = [self.first, self.second]
        if self.row_weights is None and self.mixer is None:
            loras = [lora for lora, w in zip(loras, self.weights) if w != 0.0]
        parts = [lora.up_t(dtype) for lora in loras]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_weights is None and self.mixer is None and not any(self.weights):
            return x.new_zeros(*x.shape[:-1], self.first.lora_B.shape[0])
        return self.down(x) @ self.up_t(x.dtype)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """base + the pair's update, for 2-D x (N, in) and base (N, out)."""
        if self.row_weights is None and self.mixer is None and not any(self.weights):
            return base
        return torch.addmm(base, self.down(x), self.up_t(x.dtype))

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense updates g * B A of the two LoRAs, each (out, in) (tests, merging)."""
        return self.first.delta_weight(), self.second.delta_weight()

    def extra_repr(self) -> str:
        source = "row weights" if self.row_weights is not None else "mixer" if self.mixer is not None else \
            f"weights={self.weights}"
        return f"r={self.rank} each, {source}"
