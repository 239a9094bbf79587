"""Flat buffers: a group's tensors as one contiguous vector, so a round costs one collective per group.

Owns packing parameters into one buffer (each becomes a view of its slice), finding that buffer
again, flattening and writing back, and scratch buffers reused between rounds. Knows nothing of
process groups.
"""
from __future__ import annotations

from typing import Sequence

import torch


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors, in order, as one vector of ``dtype`` (written into ``out`` when given)."""
    parts = [t.detach().reshape(-1).to(dtype) for t in tensors]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor], divisor: int | float = 1) -> None:
    """Write ``flat / divisor`` back into the tensors: one pass, one rounding to each tensor's dtype."""
    offset = 0
    for t in tensors:
        n = t.numel()
        src = flat[offset:offset + n].view_as(t)
        if divisor == 1:
            t.copy_(src)
        else:
            torch.div(src, divisor, out=t)
        offset += n


@torch.no_grad()
def pack_flat(tensors: Sequence[torch.Tensor]) -> bool:
    """Move the tensors into one new contiguous buffer, each becoming the view of its own slice
    (``.data`` swapped, values and identities unchanged), so that a mean reduces that buffer
    itself: nothing to flatten before the collective, nothing to write back after it. Tensors of
    mixed dtypes or devices are left as they are (False)."""
    if not tensors or any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
        return False
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        view = flat[offset:offset + t.numel()].view_as(t)
        view.copy_(t)
        t.data = view
        offset += t.numel()
    return True


def packed_buffer(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat buffer that ``tensors`` are consecutive contiguous views of, in order (as
    ``pack_flat`` leaves them), or None."""
    first = tensors[0]
    ptr, start = first.untyped_storage().data_ptr(), first.storage_offset()
    offset = start
    for t in tensors:
        if (t.untyped_storage().data_ptr() != ptr or t.dtype != first.dtype or t.storage_offset() != offset
                or not t.is_contiguous()):
            return None
        offset += t.numel()
    return first.new_empty(0).set_(first.untyped_storage(), start, (offset - start,))


class Scratch:
    """Flat buffers kept between rounds by (name, dtype, size), so that a round's collectives
    allocate (and page-fault) nothing; a buffer's contents are garbage when handed out."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype, numel)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf
