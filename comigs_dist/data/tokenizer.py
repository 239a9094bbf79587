"""Text to token ids: GPT-2 BPE through tiktoken, or a Hugging Face tokenizer (name or path).

Owns the choice of tokenizer from one string, batch encoding of documents, a short description
written into ``meta.json`` (kind, name, vocabulary size, end-of-text id, fingerprint), and reading
the tokenizer a model checkpoint was trained with, so that data and model can be compared.
Knows nothing of users, splits or models' weights.

The fingerprint is a hash of how the first 2,048 and the last 64 ids decode. Two tokenizers that
share it map the same ids to the same text, whatever library loaded them: tiktoken's ``gpt2`` and
the Hugging Face GPT-2 files have the same fingerprint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from comigs_dist.data.shards import DataError

CHECKPOINT_FILE = "comigs_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class TextTokenizer:
    """Encode documents; ``kind`` is 'tiktoken' or 'hf'."""
    kind: str
    name: str
    vocab_size: int
    eot_id: int | None
    _encode_batch: Callable[[list[str]], list[list[int]]]
    _decode: Callable[[list[int]], str]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as ordinary text (a literal '<|endoftext|>' is not special)."""
        return self._encode_batch(texts)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        ids = list(range(min(self.vocab_size, 2048))) + list(range(max(2048, self.vocab_size - 64), self.vocab_size))
        h = hashlib.sha256()
        for i in ids:
            h.update(self._decode([i]).encode("utf-8", "replace") + b"\x00")
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """What meta.json (and a pretrained checkpoint) records about the tokenizer."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "fingerprint": self.fingerprint()}


def _tiktoken(name: str, threads: int) -> TextTokenizer:
    import tiktoken
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises requests/IO errors when it cannot fetch the BPE files
        raise DataError(
            f"tokenizer {name!r}: tiktoken could not load its BPE files ({type(exc).__name__}: {exc}); without a "
            f"network set TIKTOKEN_CACHE_DIR to a directory holding them (here: ../shared/data/tiktoken_cache, "
            f"see DEVELOPERS.md)") from None
    eot = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    return TextTokenizer("tiktoken", name, enc.n_vocab, eot,
                         lambda texts: enc.encode_ordinary_batch(texts, num_threads=threads),
                         lambda ids: enc.decode(ids, errors="replace"))


def _huggingface(name: str) -> TextTokenizer:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise DataError(f"tokenizer {name!r} could not be loaded as a Hugging Face tokenizer ({exc}); give a "
                        f"tiktoken encoding (gpt2), a local directory with tokenizer files, or a hub name "
                        f"reachable from here") from None

    def encode(texts: list[str]) -> list[list[int]]:
        # no BOS/EOS added, and special-token strings inside the text stay ordinary text
        return tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    return TextTokenizer("hf", str(name), len(tok), tok.eos_token_id, encode,
                         lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False))


def load_tokenizer(spec: str = "gpt2", threads: int = 2) -> TextTokenizer:
    """``gpt2`` (or another tiktoken encoding name) -> tiktoken; ``hf:NAME``, a local directory or
    any other name -> a Hugging Face tokenizer (e.g. ``meta-llama/Llama-3.2-1B``)."""
    if spec.startswith("hf:"):
        return _huggingface(spec[3:])
    import tiktoken
    if spec in tiktoken.list_encoding_names():
        return _tiktoken(spec, threads)
    return _huggingface(spec)


def checkpoint_tokenizer(model_name: str) -> dict | None:
    """What a checkpoint says about its tokenizer: ``comigs_tokenizer.json`` (written by
    ``comigs_dist.pretrain``), else Hugging Face tokenizer files in the directory or the local hub
    cache; None when nothing can be told without a download."""
    path = Path(model_name)
    if (path / CHECKPOINT_FILE).is_file():
        try:
            return json.loads((path / CHECKPOINT_FILE).read_text())
        except json.JSONDecodeError:
            return None
    if path.is_dir() and not any((path / f).is_file() for f in HF_TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_name, local_files_only=True)
    except Exception:  # not cached, not a tokenizer, or no network: nothing to compare with
        return None
    return TextTokenizer("hf", model_name, len(tok), tok.eos_token_id, lambda texts: [],
                         lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False)).describe()


def write_checkpoint_tokenizer(out_dir: str | Path, description: dict) -> None:
    Path(out_dir, CHECKPOINT_FILE).write_text(json.dumps(description, indent=2))
