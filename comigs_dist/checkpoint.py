"""Checkpoints of each user's trainable state, written atomically.

Owns the on-disk layout ``<out_dir>/checkpoints/user_XX/round_XXXX.pt`` (and ``final.pt``) and
atomic writes (a temporary file in the same directory, fsync, then rename), so a crash never
leaves a file that looks complete. Loading uses ``weights_only=True``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def user_dir(out_dir: Path, user_idx: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"user_{user_idx:02d}"


def save_atomic(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or tampered files all land here
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                         f"it is truncated or not a comigs_dist checkpoint") from None
