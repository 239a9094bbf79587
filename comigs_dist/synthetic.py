"""The embedded default: a generated heterogeneous corpus and a small base model pretrained on it.

Owns the synthetic language and its cache. No third-party text is involved, so the default run
needs no download. The language is a first-order Markov chain over a 256-token vocabulary
(token 0 ends a document):

* the *public* chain P0 is what the base model is pretrained on (``public`` text);
* a *shared* change, common to every user and unknown to the base, rewires half of the states
  (their successor distribution becomes 0.6 new + 0.4 old): collaboration pays off here;
* each user has a *private* change of 15% of the states (drawn independently per user, so two
  users may disagree on the same state): only that user's data shows it.

User u's text follows P0 changed by the shared and then by its private rewiring. Per-token
routing is meaningful: a token whose state only the user rewired is best served by a specialist,
one the shared change rewired by the generalist. The in-distribution scenario draws valid and
test from the user's own chain; the out-of-distribution scenario draws them from a uniform
mixture of every user's chain, with documents disjoint from all training text.

Everything is a deterministic function of fixed seeds, so every rank, every run and every
machine builds the same corpus; datasets and the pretrained base are cached under
``$COMIGS_CACHE_DIR`` (default ``~/.cache/comigs_dist``), built once under a file lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from comigs_dist.checkpoint import publish_mode
from comigs_dist.dist import env_get

VOCAB_SIZE = 256
EOT = 0
WORLD_SEED = 20_240_919
GENERATOR_VERSION = 1
MEAN_DOC_LEN = 400
N_SUCCESSORS = 6
SHARED_FRACTION = 0.5
PRIVATE_FRACTION = 0.15
NEW_WEIGHT = 0.6

# the embedded base: a 4-layer GPT-2 of ~0.8M parameters, pretrained on public text
BASE_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=VOCAB_SIZE)
BASE_PRETRAIN = dict(tokens=1_000_000, steps=200, batch_size=32, seq_len=128, lr=5e-3, seed=0)


# --------------------------------------------------------------------------------------------
# the language
# --------------------------------------------------------------------------------------------

def _random_rows(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """n_rows successor distributions over tokens 1..V-1, each on N_SUCCESSORS tokens."""
    rows = np.zeros((n_rows, VOCAB_SIZE))
    for i in range(n_rows):
        succ = rng.choice(np.arange(1, VOCAB_SIZE), size=N_SUCCESSORS, replace=False)
        rows[i, succ] = rng.dirichlet(np.full(N_SUCCESSORS, 0.7))
    return rows


def _with_eot(rows: np.ndarray) -> np.ndarray:
    """Every state ends the document with probability 1/MEAN_DOC_LEN; EOT starts a new one."""
    t = rows * (1 - 1 / MEAN_DOC_LEN)
    t[:, EOT] = 1 / MEAN_DOC_LEN
    t[EOT] = 0.0
    t[EOT, 1:] = 1.0 / (VOCAB_SIZE - 1)
    return t / t.sum(axis=1, keepdims=True)


def _rewire(base: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    states = rng.choice(np.arange(1, VOCAB_SIZE), size=int(fraction * (VOCAB_SIZE - 1)), replace=False)
    out = base.copy()
    out[states] = NEW_WEIGHT * _random_rows(rng, len(states)) + (1 - NEW_WEIGHT) * base[states]
    return out


def public_chain() -> np.ndarray:
    """P0, the transition matrix (V x V) of the public text the base is pretrained on."""
    return _with_eot(_random_rows(np.random.default_rng([WORLD_SEED, 0]), VOCAB_SIZE))


def shared_chain() -> np.ndarray:
    """P0 with the change every user shares."""
    return _rewire(public_chain(), np.random.default_rng([WORLD_SEED, 1]), SHARED_FRACTION)


def user_chain(user_idx: int) -> np.ndarray:
    """User u's transition matrix: the shared chain with the user's private rewiring."""
    t = _rewire(shared_chain(), np.random.default_rng([WORLD_SEED, 2, user_idx]), PRIVATE_FRACTION)
    t[:, EOT] = 1 / MEAN_DOC_LEN
    t[EOT] = public_chain()[EOT]
    return t / t.sum(axis=1, keepdims=True)


def sample_chain(chains: list[np.ndarray], n_tokens: int, seed: list[int], walkers: int = 64) -> np.ndarray:
    """n_tokens of text: ``walkers`` independent documents streams concatenated; each document
    (between EOT tokens) follows one chain picked uniformly from ``chains``."""
    rng = np.random.default_rng(seed)
    cum = [np.cumsum(c, axis=1) for c in chains]
    steps = -(-n_tokens // walkers)
    out = np.zeros((walkers, steps), dtype=np.int64)
    state = np.full(walkers, EOT)
    which = rng.integers(len(chains), size=walkers)
    for t in range(steps):
        r = rng.random(walkers)
        nxt = np.empty(walkers, dtype=np.int64)
        for c in range(len(chains)):
            sel = which == c
            if sel.any():
                nxt[sel] = (cum[c][state[sel]] < r[sel, None]).sum(axis=1)
        nxt = np.minimum(nxt, VOCAB_SIZE - 1)
        ended = nxt == EOT
        if ended.any():
            which[ended] = rng.integers(len(chains), size=int(ended.sum()))
        out[:, t] = nxt
        state = nxt
    return out.reshape(-1)[:n_tokens]


def chain_entropy_rate(chain: np.ndarray) -> float:
    """Entropy rate (nats/token) of a chain under its stationary distribution: log of the best
    achievable perplexity, for reference in tests and docs/data.md."""
    evals, evecs = np.linalg.eig(chain.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(chain * np.log(np.where(chain > 0, chain, 1)), axis=1)
    return float(pi @ h)


# --------------------------------------------------------------------------------------------
# datasets in the prepared-shard format
# --------------------------------------------------------------------------------------------

def build_user_splits(n_users: int, scenario: str, train_tokens: list[int], valid_tokens: int,
                      test_tokens: int) -> list[dict[str, np.ndarray]]:
    chains = [user_chain(u) for u in range(n_users)]
    users = []
    for u in range(n_users):
        target = chains if scenario == "out" else [chains[u]]
        users.append({
            "train": sample_chain([chains[u]], train_tokens[u], [WORLD_SEED, 10, u]),
            "valid": sample_chain(target, valid_tokens, [WORLD_SEED, 11, u, scenario == "out"]),
            "test": sample_chain(target, test_tokens, [WORLD_SEED, 12, u, scenario == "out"]),
        })
    return users


def language_spec() -> dict:
    """Every constant the corpus depends on (part of the cache key)."""
    return dict(vocab=VOCAB_SIZE, seed=WORLD_SEED, doc_len=MEAN_DOC_LEN, successors=N_SUCCESSORS,
                shared=SHARED_FRACTION, private=PRIVATE_FRACTION, new_weight=NEW_WEIGHT)


def cache_root() -> Path:
    return Path(env_get("COMIGS_CACHE_DIR") or Path.home() / ".cache" / "comigs_dist")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def ensure_embedded_dataset(n_users: int, scenario: str, train_tokens: list[int], valid_tokens: int,
                            test_tokens: int) -> Path:
    """Directory of the embedded dataset for these settings, generated on first use."""
    from comigs_dist.data import write_dataset
    spec = dict(v=GENERATOR_VERSION, language=language_spec(), n_users=n_users, scenario=scenario,
                train=list(train_tokens), valid=valid_tokens, test=test_tokens)
    out = cache_root() / "embedded" / f"data-{n_users}u-{scenario}-{_key(spec)}"
    if (out / "meta.json").is_file():
        return out
    with _locked(out):
        if not (out / "meta.json").is_file():
            users = build_user_splits(n_users, scenario, list(train_tokens), valid_tokens, test_tokens)
            write_dataset(out, users, VOCAB_SIZE,
                          meta_extra={"dataset": "embedded", "scenario": scenario, "generator": spec,
                                      "tokenizer": {"kind": "synthetic", "vocab_size": VOCAB_SIZE}},
                          user_extra=[{"category": f"chain_{u}"} for u in range(n_users)])
    return out


def ensure_embedded_base(progress: bool = False, say=lambda msg: None) -> Path:
    """Directory of the embedded base model (a HF checkpoint), pretrained on first use (``say``
    announces it: a minute or two of silence otherwise)."""
    spec = dict(v=GENERATOR_VERSION, config=BASE_CONFIG, pretrain=BASE_PRETRAIN,
                public=dict(vocab=VOCAB_SIZE, seed=WORLD_SEED, doc_len=MEAN_DOC_LEN, successors=N_SUCCESSORS))
    out = cache_root() / "embedded" / f"base-{_key(spec)}"
    if (out / "config.json").is_file():
        return out
    with _locked(out):
        if not (out / "config.json").is_file():
            from comigs_dist.pretrain import pretrain_gpt2
            p = BASE_PRETRAIN
            say(f"pretraining the embedded base model once ({p['steps']} steps, about a minute on 2 CPU cores); "
                f"cached in {out} (COMIGS_CACHE_DIR moves the cache)")
            tokens = sample_chain([public_chain()], p["tokens"], [WORLD_SEED, 3])
            held_out = sample_chain([public_chain()], 32_768, [WORLD_SEED, 4])
            tmp = Path(tempfile.mkdtemp(prefix=".base.tmp-", dir=out.parent))
            try:
                report = pretrain_gpt2(BASE_CONFIG, tokens, held_out, steps=p["steps"], batch_size=p["batch_size"],
                                       seq_len=p["seq_len"], lr=p["lr"], seed=p["seed"], out_dir=tmp,
                                       progress=progress)
                report["entropy_rate_nats"] = chain_entropy_rate(public_chain())
                (tmp / "pretrain.json").write_text(json.dumps(report, indent=2))
                publish_mode(tmp)
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return out
