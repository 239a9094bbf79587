"""Documents from local files, and the text hashes that tell whether two corpora share text.

Owns: splitting a text file into documents (``<|endoftext|>`` lines, blank lines, or lines, the
last optionally grouped), reading AG-News-format CSV files, the document hash that names a
document in a dataset's manifest, and the *passage* hashes used to refuse pretraining on text a
prepared dataset holds. Knows nothing of tokens, users or splits.

A passage is a line of a document with at least ``MIN_PASSAGE_CHARS`` characters once runs of
whitespace are collapsed (shorter lines, such as ``}`` or a chapter number, are common to
unrelated texts). A document with no such line is its own single passage.
"""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from comigs_dist.data.shards import DataError

EOT_LINE = "<|endoftext|>"
DOC_MODES = ("auto", "eot", "blank", "line")
MIN_PASSAGE_CHARS = 32
AGNEWS_CLASSES = ("world", "sports", "business", "scitech")  # AG News labels 1..4

_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------

def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def normalise(text: str) -> str:
    return _WS.sub(" ", text).strip()


def doc_hash(text: str) -> str:
    """16 hex digits naming a document (whitespace differences ignored)."""
    return f"{_h64(normalise(text)):016x}"


def passage_hashes(text: str) -> list[int]:
    """64-bit hashes of the document's passages (see the module docstring)."""
    out = [_h64(n) for line in text.splitlines() if len(n := normalise(line)) >= MIN_PASSAGE_CHARS]
    return out or [_h64(normalise(text))]


def overlap_fraction(text: str, known: np.ndarray) -> float:
    """Fraction of a document's passages found in ``known`` (a sorted uint64 array)."""
    hashes = np.array(passage_hashes(text), dtype=np.uint64)
    if not len(known):
        return 0.0
    idx = np.clip(np.searchsorted(known, hashes), 0, len(known) - 1)
    return float(np.mean(known[idx] == hashes))


# --------------------------------------------------------------------------------------------
# text files
# --------------------------------------------------------------------------------------------

def detect_mode(text: str) -> str:
    """'eot' when a line is exactly <|endoftext|>, else 'blank' when blank lines occur, else 'line'."""
    if re.search(r"^<\|endoftext\|>$", text, flags=re.M):
        return "eot"
    if re.search(r"\n[ \t]*\n", text.strip()):
        return "blank"
    return "line"


def split_documents(text: str, mode: str = "auto", lines_per_doc: int = 1) -> list[str]:
    """Documents of a text file. ``lines_per_doc`` > 1 (line mode only) keeps runs of that many
    consecutive lines together, for files of one sentence per line whose neighbours share an article."""
    if mode not in DOC_MODES:
        raise DataError(f"document mode {mode!r} is not one of {', '.join(DOC_MODES)}")
    if mode == "auto":
        mode = detect_mode(text)
    if mode == "eot":
        parts = re.split(r"^<\|endoftext\|>$", text, flags=re.M)
    elif mode == "blank":
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        k = max(1, lines_per_doc)
        parts = ["\n".join(lines[i: i + k]) for i in range(0, len(lines), k)]
    return [p.strip("\n") for p in parts if p.strip()]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8") from None


def read_text_documents(path: str | Path, mode: str = "auto", lines_per_doc: int = 1) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"source file {path} does not exist")
    docs = split_documents(read_text(path), mode, lines_per_doc)
    if not docs:
        raise DataError(f"source file {path} holds no documents; give a non-empty UTF-8 text file")
    return docs


# --------------------------------------------------------------------------------------------
# AG News CSV
# --------------------------------------------------------------------------------------------

def agnews_text(title: str, description: str) -> str:
    """One AG News document: title and description joined by a space (as the hub's ``text`` field)."""
    return f"{title.strip()} {description.strip()}".strip()


def read_agnews_csv(paths: Iterable[str | Path]) -> dict[str, list[str]]:
    """Documents per class from AG-News-format CSV files (headerless ``class,title,description``,
    class 1..4 = World, Sports, Business, Sci/Tech), in file order."""
    by_class: dict[str, list[str]] = {c: [] for c in AGNEWS_CLASSES}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"source file {path} does not exist")
        with open(path, newline="", encoding="utf-8") as f:
            for line_no, row in enumerate(csv.reader(f), start=1):
                if not row:
                    continue
                if len(row) != 3 or row[0].strip() not in ("1", "2", "3", "4"):
                    if line_no == 1 and row and not row[0].strip().isdigit():
                        continue  # a header line
                    raise DataError(f"{path} line {line_no}: expected an AG-News row 'class,title,description' "
                                    f"with class 1..4, got {row[:3]!r}; give the original AG News CSV files")
                by_class[AGNEWS_CLASSES[int(row[0]) - 1]].append(agnews_text(row[1], row[2]))
    return by_class


def dedupe(pools: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    """Drop every repeat of a document (across all categories; the first occurrence stays), so that
    no text can land in two splits. Returns the pools and the number dropped."""
    seen: set[str] = set()
    out, dropped = {}, 0
    for cat, docs in pools.items():
        kept = []
        for d in docs:
            h = doc_hash(d)
            if h in seen:
                dropped += 1
                continue
            seen.add(h)
            kept.append(d)
        out[cat] = kept
    return out, dropped
