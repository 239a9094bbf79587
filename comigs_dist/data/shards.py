"""Per-user token shards: the on-disk format, loading one user's splits, and batches.

Owns: the prepared-dataset layout (``meta.json`` plus ``user_XX/{train,valid,test}.bin`` flat
token streams), writing it atomically, checking it (sizes and sha256 against ``meta.json``),
memory-mapping only the calling user's shards, and drawing batches: random windows with
replacement for training (a per-user, per-split generator), fixed non-overlapping windows for
evaluation. Knows nothing of models, tokenizers or where the text came from (``prepare.py``).

Layout of a prepared dataset directory::

    meta.json            {"format": "comigs-shards/1", "vocab_size": ..., "dtype": "uint16", "users": [...]}
    user_00/train.bin    raw little-endian token ids, no header (dtype from meta.json)
    user_00/valid.bin
    user_00/test.bin
    ...
    (optional side files named in meta.json, e.g. the document manifest of a real dataset)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comigs_dist.checkpoint import fsync_dir, publish_mode  # the atomic-write primitives

FORMAT = "comigs-shards/1"
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_dataset(out: str | Path, users: list[dict[str, np.ndarray]], vocab_size: int,
                  meta_extra: dict | None = None, user_extra: list[dict] | None = None,
                  extra_files: dict[str, bytes] | None = None) -> dict:
    """Write shards and meta.json into ``out`` atomically: everything goes to a temporary sibling
    directory which is renamed into place at the end, so an interrupted preparation never leaves a
    directory that looks complete. ``users[i]`` maps split name -> 1-D array of token ids;
    ``extra_files`` maps a relative name to bytes written beside meta.json (in the same rename), and
    meta.json lists each with its size and sha256 under ``files``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta_users = []
        for u, splits in enumerate(users):
            entry = {"user": u, "splits": {}}
            if user_extra:
                entry.update(user_extra[u])
            (tmp / f"user_{u:02d}").mkdir()
            for split in SPLITS:
                arr = np.asarray(splits[split])
                if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                    raise DataError(f"user {u} split {split}: token ids outside 0..{vocab_size - 1}")
                rel = f"user_{u:02d}/{split}.bin"
                arr.astype(dtype).tofile(tmp / rel)
                entry["splits"][split] = {"file": rel, "tokens": int(arr.size), "sha256": sha256_file(tmp / rel)}
            meta_users.append(entry)
        files = {}
        for rel, blob in (extra_files or {}).items():
            (tmp / rel).write_bytes(blob)
            files[rel] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        meta = {"format": FORMAT, "vocab_size": int(vocab_size), "dtype": dtype.name,
                "n_users": len(users), **(meta_extra or {}), "users": meta_users}
        if files:
            meta["files"] = files
        # meta.json is written last: a directory without it is never taken for a dataset
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish_mode(tmp)
        old = None
        if out.exists():
            # move the old dataset aside first, so that a failure here leaves one or the other
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def read_meta(path: str | Path) -> dict:
    """meta.json of a prepared dataset, checked: every key a run reads is present and of its type
    (a DataError names the first that is not), and every shard path stays inside the directory."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: {path} is not a prepared dataset; build one with "
                        f"`python -m comigs_dist.data prepare --dataset ... --out {path}`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc}); prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path} has format {found!r}, expected {FORMAT!r}; prepare the dataset again")
    problem = meta_problem(meta)
    if problem:
        raise DataError(f"{meta_path}: {problem}; the file is incomplete or was edited: prepare the dataset again "
                        f"(python -m comigs_dist.data prepare ... --out {path})")
    return meta


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def meta_problem(meta: dict) -> str | None:
    """The first key of meta.json that is missing or malformed, named by its path, or None."""
    if not _is_int(meta.get("vocab_size"), 1):
        return f"key 'vocab_size' ({meta.get('vocab_size', 'missing')!r}) must be an integer >= 1"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"key 'dtype' ({meta.get('dtype', 'missing')!r}) must be 'uint16' or 'uint32'"
    users = meta.get("users")
    if not isinstance(users, list):
        return f"key 'users' ({'missing' if users is None else type(users).__name__}) must be a list of users"
    for u, entry in enumerate(users):
        splits = entry.get("splits") if isinstance(entry, dict) else None
        if not isinstance(splits, dict):
            return f"key 'users[{u}].splits' is missing or not a mapping of train/valid/test"
        for split in SPLITS:
            info, key = splits.get(split), f"users[{u}].splits.{split}"
            if not isinstance(info, dict):
                return f"key '{key}' is missing"
            for field, ok, rule in (("file", lambda v: isinstance(v, str) and v, "a relative path"),
                                    ("tokens", _is_int, "an integer >= 0"),
                                    ("sha256", lambda v: isinstance(v, str) and len(v) == 64, "64 hex digits")):
                if field not in info:
                    return f"key '{key}.{field}' is missing"
                if not ok(info[field]):
                    return f"key '{key}.{field}' ({info[field]!r}) must be {rule}"
            rel = Path(info["file"])
            if rel.is_absolute() or ".." in rel.parts:
                return (f"key '{key}.file' ({info['file']!r}) points outside the dataset directory; shard files "
                        f"must lie inside it (a relative path without '..', e.g. user_{u:02d}/{split}.bin)")
    return None


def check_dataset(path: str | Path, n_users: int, seq_len: int) -> dict:
    """Before any process group: the dataset holds ``n_users`` users whose splits each hold at least
    one window of ``seq_len + 1`` tokens (as meta.json says). Returns meta.json."""
    path = Path(path)
    meta = read_meta(path)
    users = meta["users"]
    if len(users) < n_users:
        raise DataError(f"{path} holds {len(users)} user(s) but this run has {n_users} (n_users); "
                        f"run with at most {len(users)} users or prepare the dataset for {n_users}")
    for u in range(n_users):
        for split in SPLITS:
            info = users[u]["splits"][split]
            if info["tokens"] < seq_len + 1:
                raise DataError(f"shard {path / info['file']} holds {info['tokens']} tokens (meta.json), fewer than "
                                f"one window of train.seq_len + 1 ({seq_len + 1}); lower train.seq_len or prepare "
                                f"more tokens")
    return meta


def data_fingerprint(meta: dict) -> dict:
    """What identifies the tokens of a dataset (checkpoints record it, a resume compares it): the
    vocabulary, the token dtype and every shard's token count and sha256 (from meta.json), with one
    digest over all of it. Paths of the dataset and side files do not enter."""
    shards = {info["file"]: f"{info['tokens']}:{info['sha256']}"
              for entry in meta["users"] for info in (entry["splits"][s] for s in SPLITS)}
    identity = {"vocab_size": meta["vocab_size"], "dtype": meta["dtype"], "shards": shards}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, **identity}


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """How two data fingerprints differ, one entry per key (empty when the digests agree)."""
    if saved.get("digest") == current.get("digest"):
        return []
    diffs = [f"{key} {saved.get(key)!r} then, {current.get(key)!r} now" for key in ("vocab_size", "dtype")
             if saved.get(key) != current.get(key)]
    a, b = saved.get("shards", {}), current.get("shards", {})
    changed = [f for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
    for f in changed[:5]:
        then, now = (v.split(":")[0] + " tokens, sha256 " + v.split(":")[1][:12] if v else "absent"
                     for v in (a.get(f), b.get(f)))
        diffs.append(f"shard {f}: {then} then, {now} now")
    if len(changed) > 5:
        diffs.append(f"... and {len(changed) - 5} more shards")
    return diffs or [f"digest {saved.get('digest', '')[:12]} then, {current.get('digest', '')[:12]} now"]


def check_categories(expected: list[str], meta: dict, where: str) -> None:
    """Refuse a dataset whose users hold other categories, or the same in another order, than a
    configuration's ``data.categories`` expects (its per-user lists would land on other users). A
    run of n users reads the dataset's first n users, so those must match."""
    if not expected:
        return
    users = meta.get("users") or []
    held = [u.get("category") for u in users] if users and all("category" in u for u in users) \
        else list(meta.get("categories") or [])
    if not held:
        raise DataError(f"data.categories ({', '.join(expected)}) is set but {where} records no categories per "
                        f"user (the embedded corpus has none); remove data.categories or point data.path at a "
                        f"prepared dataset")
    if list(expected) != held[:len(expected)]:
        raise DataError(f"data.categories ({', '.join(expected)}) does not match {where}, whose users hold "
                        f"{', '.join(map(str, held))} in that order: the config's per-user lists (moe.n_experts, "
                        f"...) would land on other users; prepare the dataset again (`python -m comigs_dist.data "
                        f"prepare ... --categories {','.join(expected)}`) or fix data.categories")


@dataclass
class UserData:
    """One user's three splits as memory-mapped token streams."""
    user_idx: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int
    meta: dict

    def split(self, name: str) -> np.ndarray:
        return getattr(self, name)


_META_CACHE: dict[tuple, dict] = {}


def _shared_meta(path: Path) -> dict:
    """``read_meta`` once per version of meta.json in this process: the users of a rank share one
    parsed copy (with a thousand users, one copy each cost about 1 MiB per user and a parse of the
    whole file per user). Read-only by convention."""
    try:
        st = (path / "meta.json").stat()
    except OSError:
        return read_meta(path)  # names what is missing
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _META_CACHE:
        _META_CACHE.clear()  # one dataset at a time is the common case; keep memory flat
        _META_CACHE[key] = read_meta(path)
    return _META_CACHE[key]


def load_user_data(path: str | Path, user_idx: int, seq_len: int, share: float = 1.0,
                   verify: bool = True) -> UserData:
    """Memory-map one user's shards after checking them against meta.json."""
    path = Path(path)
    meta = _shared_meta(path)
    users = meta["users"]
    if user_idx >= len(users):
        raise DataError(f"{path} holds {len(users)} users but user {user_idx} was asked for; "
                        f"run with at most {len(users)} users or prepare the dataset for more")
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in SPLITS:
        info = users[user_idx]["splits"][split]
        f = path / info["file"]
        if not f.is_file():
            raise DataError(f"shard {f} is missing; prepare the dataset again")
        expected = info["tokens"] * dtype.itemsize
        if f.stat().st_size != expected:
            raise DataError(f"shard {f} has {f.stat().st_size} bytes but meta.json says {info['tokens']} tokens "
                            f"({expected} bytes): the file is truncated or foreign; prepare the dataset again")
        if verify and sha256_file(f) != info["sha256"]:
            raise DataError(f"shard {f} does not match the sha256 in meta.json: it was modified or corrupted; "
                            f"prepare the dataset again (or set data.verify=false to skip this check)")
        arr = np.memmap(f, dtype=dtype, mode="r") if info["tokens"] else np.zeros(0, dtype=dtype)
        if split == "train" and share < 1.0:
            arr = arr[: max(seq_len + 1, int(len(arr) * share))]
        if len(arr) < seq_len + 1:
            raise DataError(f"shard {f} holds {len(arr)} tokens, fewer than one window of train.seq_len + 1 "
                            f"({seq_len + 1}); lower train.seq_len or prepare more tokens")
        arrays[split] = arr
    return UserData(user_idx, arrays["train"], arrays["valid"], arrays["test"], int(meta["vocab_size"]), meta)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------

class BatchSampler:
    """Random windows with replacement from one token stream, on a generator of its own."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(0, high, (batch_size,), generator=self.generator).tolist()
        window = np.stack([np.asarray(self.tokens[s: s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(window)
        return t[:, :-1].to(device, non_blocking=True), t[:, 1:].to(device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Start offsets of non-overlapping windows from the start of the stream (deterministic)."""
    limit = len(tokens) - 1 if not max_tokens else min(len(tokens) - 1, max_tokens)
    return np.arange(0, limit - seq_len + 1, seq_len)


def iter_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int,
                      device: torch.device | str = "cpu"):
    starts = eval_windows(tokens, seq_len, max_tokens)
    for i in range(0, len(starts), batch_size):
        window = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts[i: i + batch_size]])
        t = torch.from_numpy(window)
        yield t[:, :-1].to(device), t[:, 1:].to(device)
