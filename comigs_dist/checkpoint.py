"""Checkpoint files: layout, atomic writes, validated loads, the manifest, disk checks.

Owns the on-disk layout::

    <out_dir>/checkpoints/manifest.json            newest round every user completed (rank 0 writes it)
    <out_dir>/checkpoints/user_XX/round_XXXX.pt    one user's full state after that round
    <out_dir>/checkpoints/user_XX/final.pt         the state at the end of the run

atomic writes (a temporary file in the same directory, fsync, then rename, so a crash or a full
disk never leaves a file that looks complete), loads with ``weights_only=True`` that reject a
truncated, foreign or mismatched file with a message naming the file and the parameter, the
capture of every random generator a run touches, and the probes that find an unwritable or full
output directory before training. Knows nothing of process groups or of training.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "comigs-checkpoint/1"
MANIFEST = "manifest.json"
_ROUND_FILE = re.compile(r"^round_(\d{4,})\.pt$")

# keys every checkpoint holds (a file without them was not written by this version)
REQUIRED_KEYS = ("format", "user", "round", "method", "params", "config")
# keys a resume needs on top (final.pt from an older version may lack them)
RESUME_KEYS = ("step", "router_step", "expert_opt", "expert_sched", "router_opt", "train_sampler",
               "router_sampler", "rng", "counters", "history", "base", "comm")
# options that may change between a run and its resume without changing what it computes
RESUME_MAY_DIFFER = ("resume", "out_dir", "log.", "checkpoint.", "guard.", "comm.timeout_s", "comm.backend",
                     "model.device", "model.share_base", "train.threads", "data.verify")


class CheckpointError(ValueError):
    """A checkpoint or output directory a run cannot use; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------

def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def user_dir(out_dir: Path, user_idx: int) -> Path:
    return checkpoints_dir(out_dir) / f"user_{user_idx:02d}"


def round_file(round_idx: int) -> str:
    return f"round_{round_idx:04d}.pt"


def manifest_path(out_dir: Path) -> Path:
    return checkpoints_dir(out_dir) / MANIFEST


def available_rounds(directory: Path) -> list[int]:
    """Rounds with a complete checkpoint in one user's directory (atomic writes: a file that
    exists under its final name is complete)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    rounds = [int(m.group(1)) for f in directory.iterdir() if (m := _ROUND_FILE.match(f.name))]
    return sorted(rounds)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it portably; set straight back
    os.umask(mask)
    return mask


def publish_mode(directory: Path) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (0700) the mode a plain mkdir would have
    (0777 minus the umask) before it is renamed into place, so that the user's group can read it."""
    os.chmod(directory, 0o777 & ~_umask())


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the directory entry, not only the file's data);
    a file system that cannot fsync a directory is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, write, text: bool = False, before_publish=None) -> None:
    """Write a file under ``path`` so that it is complete or absent: ``write(f)`` fills a temporary
    file in the same directory, which is fsynced, given the mode a plain ``open`` would give it
    (0666 minus the umask: mkstemp's 0600 would hide results from the user's group), renamed into
    place, and the directory fsynced. ``before_publish()`` runs between the write and the rename
    (the fault injection of a checkpoint write). On any failure nothing partial is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_publish is not None:
            before_publish()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # never leave a partial file behind
        raise
    fsync_dir(path.parent)


def save_atomic(obj, path: Path, before_publish=None) -> None:
    path = Path(path)
    try:
        write_atomic(path, lambda f: torch.save(obj, f), before_publish=before_publish)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            raise _disk_error(path, exc) from exc
        raise


def _disk_error(path: Path, exc: OSError) -> OSError:
    what = _DISK_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
    free = _free_bytes(path.parent)
    free_text = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
    return OSError(exc.errno, f"cannot write checkpoint {path}: {what}{free_text}. Nothing partial was left; "
                              f"the previous checkpoints are intact. Free space (or point out_dir at a writable "
                              f"disk with room) and continue with resume=true out_dir=<this run's directory>")


def write_manifest(out_dir: Path, manifest: dict) -> None:
    from comigs_dist.metrics import write_json_atomic  # the one atomic JSON writer
    write_json_atomic(manifest_path(out_dir), manifest)


def read_manifest(out_dir: Path) -> dict | None:
    path = manifest_path(out_dir)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); delete it (the per-user files are enough to "
                              f"resume) or restore it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a comigs_dist checkpoint manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}); choose another out_dir")
    return manifest


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest round checkpoints of one user; returns what went."""
    if keep <= 0:
        return []
    gone = []
    for r in available_rounds(directory)[:-keep]:
        f = Path(directory) / round_file(r)
        f.unlink(missing_ok=True)
        gone.append(f)
    return gone


# --------------------------------------------------------------------------------------------
# reading and validating
# --------------------------------------------------------------------------------------------

def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or tampered files all land here
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}); it is truncated or not a comigs_dist "
                              f"checkpoint. Delete it to resume from an earlier round, or start a new run "
                              f"in another out_dir") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a comigs_dist checkpoint; "
                              f"choose another out_dir")
    return state


def validate(state: dict, path: Path, user_idx: int, method: str, params: dict[str, torch.Tensor],
             config: dict | None = None, for_resume: bool = True) -> list[str]:
    """Everything that keeps ``state`` from being loaded into this user's model, each problem
    naming the file and the key or parameter (empty when it fits)."""
    where = f"checkpoint {path}"
    if state.get("format") != FORMAT:
        return [f"{where} is not a comigs_dist checkpoint (format {state.get('format')!r}, expected {FORMAT!r}): "
                f"it was written by another program or version; choose another out_dir"]
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if for_resume else ()) if k not in state]
    if missing:
        return [f"{where} lacks {', '.join(missing)}; it cannot be resumed from: delete it to resume from an "
                f"earlier round"]
    problems = []
    if state["user"] != user_idx:
        problems.append(f"{where} holds user {state['user']}'s state but sits in user {user_idx}'s directory; "
                        f"files were moved between users: put each back under checkpoints/user_XX")
    if state["method"] != method:
        problems.append(f"{where} was written by method {state['method']!r} but this run is {method!r}; resume with "
                        f"method={state['method']} or start a new run in another out_dir")
    saved = state["params"]
    if not isinstance(saved, dict):
        return problems + [f"{where}: 'params' is not a mapping of tensors"]
    for name in sorted(set(params) - set(saved))[:5]:
        problems.append(f"{where} lacks parameter {name} {tuple(params[name].shape)} that this model holds")
    for name in sorted(set(saved) - set(params))[:5]:
        problems.append(f"{where} holds parameter {name} {tuple(saved[name].shape)} that this model does not have")
    for name in sorted(set(saved) & set(params)):
        ours, theirs = params[name], saved[name]
        if not isinstance(theirs, torch.Tensor):
            problems.append(f"{where}: parameter {name} is a {type(theirs).__name__}, not a tensor")
        elif tuple(theirs.shape) != tuple(ours.shape):
            problems.append(f"{where}: parameter {name} has shape {tuple(theirs.shape)} but this model's is "
                            f"{tuple(ours.shape)}; the model settings (moe.*, lora.*, model.name) differ from the "
                            f"run that wrote it")
        elif not torch.is_floating_point(theirs):
            problems.append(f"{where}: parameter {name} has dtype {theirs.dtype}, not a floating point type")
    if config is not None and isinstance(state.get("config"), dict):
        problems += [f"{where} was written with {d}" for d in config_differences(state["config"], config)]
    return problems


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Options that changed since the checkpoint was written and would change what the run
    computes (paths, logging, checkpointing, timeouts and devices may change)."""
    a, b = flatten_keys(saved), flatten_keys(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_MAY_DIFFER) or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}={a.get(key)!r} but this run has {key}={b.get(key)!r}; resume with the same "
                     f"setting or start a new run in another out_dir")
    return diffs


# --------------------------------------------------------------------------------------------
# random generators
# --------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """The global generators of python, numpy and torch (and CUDA's), in types a
    ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# the output directory
# --------------------------------------------------------------------------------------------

def _free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_writable(directory: Path, need_bytes: int = 0, what: str = "out_dir") -> str | None:
    """Create ``directory``, write and remove a probe file in it, and check that ``need_bytes``
    fit; returns a problem naming the path and the fix, or None."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".comigs-probe-", dir=directory)
        try:
            os.write(fd, b"comigs")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = _DISK_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
        return (f"{what} {directory} is not writable ({reason}: {exc.filename or directory}); set out_dir to a "
                f"directory you can write to")
    free = _free_bytes(directory)
    if need_bytes and free is not None and free < need_bytes:
        return (f"{what} {directory} has {free / 2**20:.1f} MiB free but one round of checkpoints needs about "
                f"{need_bytes / 2**20:.1f} MiB; free space, point out_dir at a larger disk, or set "
                f"checkpoint.every=0 checkpoint.final=false to write none")
    return None
