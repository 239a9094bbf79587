"""Build a prepared dataset: per-user train / valid / test token shards from per-category documents.

Owns the split itself. Each user is assigned one category (section 4.1.1); documents of a
category are consumed front to back from one pool, so no document (and no part of one) is ever
in two splits, for any users. Budgets are in tokens: a split takes whole documents until the next
one would overflow, then a prefix of that one; the rest of a cut document is discarded.

* in-distribution (``in``): a user's validation and test text come from its own category;
* out-of-distribution (``out``, AG News in the paper): training from the user's category,
  validation and test a uniform mixture of every user's category (the same number of tokens from
  each, documents interleaved in a seeded order, so that any prefix of the split is mixed too).

Splits are drawn test first, then validation, then training. A user's evaluation text therefore
does not change when only the training budgets change (the data-quantity experiments of section
4.3.2 and appendix D share test sets with the standard split). ``--fit scale`` shrinks every
budget by one common factor until the source holds them all (proportions of Table 3 kept).

Documents are tokenized one by one and joined into a flat stream: ``space`` prefixes each with a
space and adds no end-of-text token, which is the reference's convention (``encode_ordinary`` of
the documents joined by single spaces, see docs/baselines.md 1.1); ``eot`` appends the tokenizer's
end-of-text id to each document instead.

Besides the shards, a dataset holds ``documents.tsv`` (which document went to which user and split,
how many of its tokens) and ``passages.u64`` (sorted 64-bit hashes of the documents' passages,
which ``comigs_dist.pretrain --exclude`` checks). Knows nothing of models.
"""
from __future__ import annotations

import math
import zlib
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np

from comigs_dist.data.documents import DOC_MODES, doc_hash, passage_hashes
from comigs_dist.data.shards import SPLITS, DataError, read_meta, write_dataset
from comigs_dist.data.sources import DocSource, get_spec, open_hub, open_local, text_categories
from comigs_dist.data.tokenizer import TextTokenizer, load_tokenizer

DRAW_ORDER = ("test", "valid", "train")
JOINS = ("space", "eot")
MANIFEST = "documents.tsv"
PASSAGES = "passages.u64"


# --------------------------------------------------------------------------------------------
# pools: one category's documents, tokenized on demand
# --------------------------------------------------------------------------------------------

@dataclass
class Piece:
    """Documents one draw took from one pool: token arrays (the last may be cut) and their records."""
    category: str
    docs: list[np.ndarray] = field(default_factory=list)
    records: list[tuple[str, int, int]] = field(default_factory=list)  # (doc hash, tokens taken, tokens in doc)
    texts: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(d) for d in self.docs)


class PoolExhausted(Exception):
    pass


class Pool:
    """Documents of one source in consumption order; a document is handed out at most once."""

    def __init__(self, category: str, source: DocSource, tokenizer: TextTokenizer, join: str,
                 on_tokens: Callable[[int], None] = lambda n: None):
        self.category, self.source, self.tokenizer, self.join = category, source, tokenizer, join
        self.pending: deque[tuple[str, np.ndarray]] = deque()
        self.tokens_seen = 0  # tokens of every document read so far (handed out or pending)
        self.max_doc_tokens = 0
        self.exhausted = False
        self._chunk = 8
        self._on_tokens = on_tokens

    def _fill(self) -> bool:
        texts = list(islice(self.source.docs, self._chunk))
        self._chunk = min(self._chunk * 2, 1024)  # small first batches: a tiny budget tokenizes little
        if not texts:
            self.exhausted = True
            return False
        prefix = " " if self.join == "space" else ""
        encoded = self.tokenizer.encode_batch([prefix + t for t in texts])
        for text, ids in zip(texts, encoded):
            if self.join == "eot":
                ids = list(ids) + [self.tokenizer.eot_id]
            if not len(ids):
                continue
            arr = np.asarray(ids, dtype=np.int64)
            self.pending.append((text, arr))
            self.tokens_seen += len(arr)
            self.max_doc_tokens = max(self.max_doc_tokens, len(arr))
        return True

    def take(self, n_tokens: int, allow_short: bool = False) -> Piece:
        """The next ``n_tokens`` tokens (whole documents, the last one cut); raises PoolExhausted when
        the source runs out first, unless ``allow_short`` (then whatever is left)."""
        piece = Piece(self.category)
        need = n_tokens
        while need > 0:
            if not self.pending and not self._fill():
                if allow_short:
                    return piece
                raise PoolExhausted(piece.n_tokens)
            if not self.pending:
                continue
            text, arr = self.pending.popleft()
            used = arr[:need]
            piece.docs.append(used)
            piece.texts.append(text)
            piece.records.append((doc_hash(text), len(used), len(arr)))
            need -= len(used)
            self._on_tokens(len(used))
        return piece

    def count_all(self) -> int:
        """Tokens the whole source holds (reads and tokenizes everything: finite sources only)."""
        while self._fill():
            pass
        return self.tokens_seen


# --------------------------------------------------------------------------------------------
# the plan: which draws, in which order
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Draw:
    user: int
    split: str
    category: str
    role: str  # 'train' or 'heldout': which pool of the category
    tokens: int


def mixture_categories(categories: list[str]) -> list[str]:
    return list(dict.fromkeys(categories))


def plan_draws(categories: list[str], scenario: str, budgets: dict[str, list[int]]) -> list[Draw]:
    mix = mixture_categories(categories)
    draws = []
    for split in DRAW_ORDER:
        role = "train" if split == "train" else "heldout"
        for user, cat in enumerate(categories):
            b = budgets[split][user]
            if split == "train" or scenario == "in":
                draws.append(Draw(user, split, cat, role, b))
            else:  # a uniform mixture: the same number of tokens from each category
                for k, c in enumerate(mix):
                    draws.append(Draw(user, split, c, role, b // len(mix) + (1 if k < b % len(mix) else 0)))
    return draws


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

def parse_budget(text: str | int | list | None, n_users: int, flag: str) -> list[int] | None:
    """'1000' -> every user; '1000,2000,...' -> one per user; '1e6' and '1_000_000' are accepted."""
    if text is None:
        return None
    parts = text if isinstance(text, list) else [text] if isinstance(text, int) else str(text).split(",")
    values = []
    for p in parts:
        try:
            v = float(str(p).strip().replace("_", ""))
        except ValueError:
            raise DataError(f"{flag} {text!r}: {p!r} is not a number of tokens") from None
        if not v.is_integer() or v <= 0:
            raise DataError(f"{flag} {text!r}: token budgets must be positive integers")
        values.append(int(v))
    if len(values) == 1:
        return values * n_users
    if len(values) != n_users:
        raise DataError(f"{flag} gives {len(values)} budgets for {n_users} users; give one value, or one per user "
                        f"(in the order of --categories)")
    return values


def _budget_flag(split: str) -> str:
    return f"--{split}-tokens"


# --------------------------------------------------------------------------------------------
# the whole preparation
# --------------------------------------------------------------------------------------------

def prepare_dataset(dataset: str, out: str | Path, *, source: list[str | Path] | None = None,
                    categories: list[str] | None = None, scenario: str | None = None,
                    train_tokens=None, valid_tokens=None, test_tokens=None, low_data: list[str] | None = None,
                    data_ratio: float = 4.0, fit: str | None = None, tokenizer: str = "gpt2", join: str = "space",
                    docs: str = "auto", lines_per_doc: int | None = None, seed: int = 0, seq_len: int = 128,
                    force: bool = False, loader: Callable | None = None, progress: bool = False,
                    budget_scale: float = 1.0) -> dict:
    """Prepare ``dataset`` into ``out``; returns the meta.json written. Every argument problem is
    reported before any text is read. ``budget_scale`` multiplies every budget (Table 3's defaults
    or the given ones) before anything else, e.g. 0.1 for a CPU-sized copy with Table 3's proportions."""
    spec = get_spec(dataset)
    out = Path(out)
    sources = [Path(s) for s in source] if source else None

    # ----- arguments, all checked before any work --------------------------------------------
    if sources is None and spec.name == "text":
        raise DataError("--dataset text reads local files: give --source DIR with one <category>.txt per user")
    if categories is None or not categories:
        categories = list(spec.categories) if spec.categories else text_categories(sources[0])
    categories = [c.strip() for c in categories]
    if spec.categories:
        unknown = [c for c in categories if c not in spec.categories]
        if unknown:
            raise DataError(f"--categories: {', '.join(map(repr, unknown))} not in dataset {spec.name}; "
                            f"choose from: {', '.join(spec.categories)}")
    n_users = len(categories)
    scenario = scenario or spec.scenario
    if scenario not in ("in", "out"):
        raise DataError(f"--scenario {scenario!r} must be 'in' or 'out'")
    fit = fit or spec.fit
    if fit not in ("error", "scale"):
        raise DataError(f"--fit {fit!r} must be 'error' or 'scale'")
    if join not in JOINS:
        raise DataError(f"--join {join!r} must be one of {', '.join(JOINS)}")
    if docs not in DOC_MODES:
        raise DataError(f"--docs {docs!r} must be one of {', '.join(DOC_MODES)}")
    if seq_len < 1:
        raise DataError(f"--seq-len ({seq_len}) must be >= 1")
    if out.exists() and not force:
        raise DataError(f"--out {out} already exists; pass --force to replace it, or choose another --out")
    requested = {}
    for split, given in (("train", train_tokens), ("valid", valid_tokens), ("test", test_tokens)):
        values = parse_budget(given, n_users, _budget_flag(split))
        if values is None:
            if spec.table3 is None:
                raise DataError(f"--dataset {spec.name} has no default budgets: give --train-tokens, --valid-tokens "
                                f"and --test-tokens (one value, or one per user)")
            values = [spec.table3[split][c] for c in categories]
        requested[split] = values
    if not 0 < budget_scale <= 1e6:
        raise DataError(f"--budget-scale ({budget_scale}) must be > 0 (e.g. 0.1 for a tenth of every budget)")
    if budget_scale != 1.0:
        requested = {split: [max(1, round(b * budget_scale)) for b in values] for split, values in requested.items()}
    low_data = [c.strip() for c in (low_data or []) if c.strip()]
    bad = [c for c in low_data if c not in categories]
    if bad:
        raise DataError(f"--low-data: {', '.join(map(repr, bad))} is not a user's category ({', '.join(categories)})")
    if low_data and data_ratio < 1:
        raise DataError(f"--data-ratio ({data_ratio}) must be >= 1 (low-data users get train budget / ratio)")
    if low_data:  # section 4.3.2 / appendix D: low-data users hold 1/ratio of the training text
        requested["train"] = [max(1, int(b / data_ratio)) if c in low_data else b
                              for b, c in zip(requested["train"], categories)]
    _check_windows(requested, requested, 1.0, categories, seq_len)
    tok = load_tokenizer(tokenizer)
    if join == "eot" and tok.eot_id is None:
        raise DataError(f"--join eot: tokenizer {tok.name!r} has no end-of-text token; use --join space")

    # ----- sources and pools ------------------------------------------------------------------
    lines = lines_per_doc if lines_per_doc is not None else (spec.lines_per_doc if sources else 1)
    bar = _Progress(progress)
    pools: dict[tuple[str, str], Pool] = {}
    if sources is not None:
        streams, source_meta = open_local(spec, sources, categories, seed, docs, lines)
        for c, s in streams.items():
            pools[(c, "train")] = pools[(c, "heldout")] = Pool(c, s, tok, join, bar.update)
    else:
        if spec.name == "text":
            raise DataError("--dataset text needs --source DIR")
        try:
            hub, source_meta = open_hub(spec, categories, seed, loader)
        except OSError as exc:  # no network, or HF_HUB_OFFLINE=1 (datasets' ConnectionError is an OSError)
            raise DataError(f"--dataset {spec.name} without --source reads the Hugging Face Hub, which failed: "
                            f"{type(exc).__name__}: {exc}. Without a network, prepare it from local files with "
                            f"--source DIR (docs/data.md, 'Real datasets': the files each dataset expects)") from exc
        for c, (train_src, held_src) in hub.items():
            p = Pool(c, train_src, tok, join, bar.update)
            pools[(c, "train")] = p
            pools[(c, "heldout")] = p if held_src is train_src else Pool(c, held_src, tok, join, bar.update)

    # ----- budgets: scale to the source, or check they fit --------------------------------------
    used = {s: list(v) for s, v in requested.items()}
    scale, available = 1.0, {}
    if fit == "scale":
        not_finite = sorted({p.category for p in pools.values() if not p.source.finite})
        if not_finite:
            raise DataError(f"--fit scale needs sources that can be counted; {', '.join(not_finite)} come from a "
                            f"stream; use --fit error (the default) with budgets the stream can meet")
        lengths = {}
        for p in dict.fromkeys(pools.values()):
            available[_pool_name(p, pools)] = p.count_all()
            lengths[p] = [len(arr) for _, arr in p.pending]
        scale = _largest_scale(lambda f: _scaled(requested, f), categories, scenario, pools, lengths)
        if scale <= 0:
            raise DataError(f"the source is too small for {n_users} users' three splits ({available} tokens per "
                            f"category); add text, or give fewer --categories")
        used = _scaled(requested, scale)
    _check_windows(used, requested, scale, categories, seq_len)

    # ----- draw: test, then valid, then train --------------------------------------------------
    draws = plan_draws(categories, scenario, used)
    bar.start(sum(d.tokens for d in draws))
    pieces: dict[tuple[int, str], list[Piece]] = {}
    for d in draws:
        pool = pools[(d.category, d.role)]
        try:
            piece = pool.take(d.tokens)
        except PoolExhausted:
            raise DataError(_exhausted_message(pool, d, categories, scenario, used, pools,
                                               sources is not None)) from None
        pieces.setdefault((d.user, d.split), []).append(piece)
    bar.close()

    # ----- assemble streams, manifest, meta ------------------------------------------------------
    users, user_extra, manifest_rows, passages = [], [], ["user\tsplit\tcategory\tdocument\ttokens\tdoc_tokens"], set()
    for user, cat in enumerate(categories):
        splits, mixes = {}, {}
        for split in SPLITS:
            ps = pieces[(user, split)]
            docs = [(p.category, arr, rec, text) for p in ps for arr, rec, text in zip(p.docs, p.records, p.texts)]
            if len(ps) > 1:  # a mixture: interleave the documents of the categories
                rng = np.random.default_rng([seed, user, zlib.crc32(split.encode())])
                docs = [docs[i] for i in rng.permutation(len(docs))]
            splits[split] = np.concatenate([arr for _, arr, _, _ in docs])
            mixes[split] = {p.category: p.n_tokens for p in ps}
            for c, _, (h, taken, total), text in docs:
                manifest_rows.append(f"{user}\t{split}\t{c}\t{h}\t{taken}\t{total}")
                passages.update(passage_hashes(text))
        users.append(splits)
        user_extra.append({"category": cat, "mix": mixes})
    passages_arr = np.array(sorted(passages), dtype=np.uint64)
    meta_extra = {
        "dataset": spec.name, "scenario": scenario, "categories": categories,
        "tokenizer": tok.describe(), "join": join, "seed": seed, "min_seq_len": seq_len,
        "source": source_meta,
        "budgets": {"fit": fit, "scale": scale, "budget_scale": budget_scale, "requested": requested, "used": used,
                    "available": available, "low_data": low_data, "data_ratio": data_ratio if low_data else None},
        "manifest": {"documents": MANIFEST, "passages": PASSAGES},
    }
    return write_dataset(out, users, tok.vocab_size, meta_extra=meta_extra, user_extra=user_extra,
                         extra_files={MANIFEST: ("\n".join(manifest_rows) + "\n").encode(),
                                      PASSAGES: passages_arr.astype("<u8").tobytes()})


def _check_windows(used, requested, scale, categories, seq_len) -> None:
    """Every split must hold at least one training or evaluation window."""
    for split in SPLITS:
        for user, b in enumerate(used[split]):
            if b < seq_len + 1:
                raise DataError(
                    f"user {user} ({categories[user]}) {split} split would hold {b} tokens"
                    + (f" (budget {requested[split][user]} scaled by {scale:.4f} to fit the source)"
                       if scale < 1 else "")
                    + f", fewer than one context window of --seq-len + 1 = {seq_len + 1}; raise {_budget_flag(split)}, "
                      f"give a larger source, or lower --seq-len")


def _scaled(budgets: dict[str, list[int]], factor: float) -> dict[str, list[int]]:
    return {s: [int(math.floor(b * factor)) for b in v] for s, v in budgets.items()}


def _fits(budgets: dict[str, list[int]], categories, scenario, pools, lengths) -> bool:
    """Whether the draws succeed, consuming the pools' documents in order (cut documents' tails are lost)."""
    cursor = {p: 0 for p in lengths}
    for d in plan_draws(categories, scenario, budgets):
        p = pools[(d.category, d.role)]
        need = d.tokens
        while need > 0:
            if cursor[p] == len(lengths[p]):
                return False
            need -= lengths[p][cursor[p]]
            cursor[p] += 1
    return True


def _largest_scale(budgets_at, categories, scenario, pools, lengths, steps: int = 40) -> float:
    """The largest factor in [0, 1] (to about 1e-12) at which every draw fits: one common factor keeps
    the proportions between users and splits (Table 3's), and leaves the tightest category nearly used up."""
    if _fits(budgets_at(1.0), categories, scenario, pools, lengths):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _fits(budgets_at(mid), categories, scenario, pools, lengths) else (lo, mid)
    return lo


def _pool_name(pool: Pool, pools: dict) -> str:
    roles = [r for (c, r), p in pools.items() if p is pool]
    return pool.category if len(roles) == 2 else f"{pool.category}/{roles[0]}"


def _exhausted_message(pool: Pool, failed: Draw, categories, scenario, used, pools, local: bool) -> str:
    draws = [d for d in plan_draws(categories, scenario, used) if pools[(d.category, d.role)] is pool]
    need = sum(d.tokens for d in draws)
    fix = ("lower the budgets (--train-tokens, --valid-tokens, --test-tokens), or pass --fit scale to shrink "
           "every budget by one factor until the source holds them" if local else
           "lower the budgets (--train-tokens, --valid-tokens, --test-tokens)")
    return (f"category {pool.category!r} ({pool.source.origin}) ran out of text: it holds {pool.tokens_seen} tokens "
            f"but the splits drawn from it need {need} (user {failed.user} {failed.split} was being drawn); {fix}")


class _Progress:
    """A bar over the tokens drawn (lines on a file or pipe), opened once the total is known."""

    def __init__(self, on: bool):
        self.on, self.bar = on, None

    def start(self, total: int) -> None:
        if self.on:
            from comigs_dist.metrics import build_progress
            self.bar = build_progress(True).bar(total=total, unit="tok", desc="tokens drawn", unit_scale=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# reading a dataset's manifest back
# --------------------------------------------------------------------------------------------

def read_passages(path: str | Path) -> np.ndarray:
    """Sorted passage hashes of a prepared dataset (for overlap checks)."""
    path = Path(path)
    meta = read_meta(path)
    rel = (meta.get("manifest") or {}).get("passages")
    if not rel or not (path / rel).is_file():
        raise DataError(f"{path} has no passage manifest ({PASSAGES}); it was not prepared from text by "
                        f"`python -m comigs_dist.data prepare`, so its text cannot be checked; prepare it again")
    return np.fromfile(path / rel, dtype="<u8")


def read_manifest(path: str | Path) -> list[dict]:
    path = Path(path)
    meta = read_meta(path)
    rel = (meta.get("manifest") or {}).get("documents", MANIFEST)
    lines = (path / rel).read_text().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        r = dict(zip(header, line.split("\t")))
        for k in ("user", "tokens", "doc_tokens"):
            r[k] = int(r[k])
        rows.append(r)
    return rows
