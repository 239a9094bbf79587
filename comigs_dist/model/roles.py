"""Parameter roles: what a trainable parameter is, as data set at injection.

Owns the Role enum and the ParamTag every adapter parameter carries. Methods select trainable
and shared sets from these tags, never from parameter names.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    GENERALIST = "generalist"   # shared with other users (expert 0..g-1 of every MLP, attention LoRA)
    SPECIALIST = "specialist"   # never leaves the user
    ROUTER = "router"           # per-token router, local

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ParamTag:
    """Where a trainable parameter sits and what it is for.

    role:    generalist / specialist / router
    kind:    'attn' (attention LoRA), 'expert' (an MLP expert's LoRA) or 'router'
    layer:   transformer block index
    module:  the adapted projection inside the block, e.g. 'attn.c_attn', 'mlp.c_fc'
    expert:  expert index for kind 'expert', else -1
    matrix:  'A' or 'B' for LoRA factors, 'W' for a router weight
    """
    role: Role
    kind: str
    layer: int
    module: str
    expert: int = -1
    matrix: str = ""
