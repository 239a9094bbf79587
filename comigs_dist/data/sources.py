"""Where each dataset's documents come from: the paper's three datasets and a generic text source.

Owns the dataset specifications (categories, default scenario, Table 3 budgets, the local file
names each category accepts, the hub datasets of the paper) and opening them as per-category
document streams in the order they will be consumed: local files (read whole, de-duplicated,
shuffled per category by the seed) or hub datasets through ``datasets`` (AG News downloaded;
Wikipedia, Wiki-40B and SlimPajama streamed, so only the documents needed are fetched).
Knows nothing of tokens, budgets or splits.

Section 4.1.1 of the paper: one category per user, users in the paper's order. Multilingual
Wikipedia (German, Dutch, French, Italian: de, fr, it from Wikimedia's Wikipedia, nl from
Wiki-40B), SlimPajama (StackExchange, GitHub, ArXiv, Book) and AG News (World, Sports, Business,
Sci/Tech). Table 3 gives the token counts per user and split.
"""
from __future__ import annotations

import sys
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from comigs_dist.data.documents import (AGNEWS_CLASSES, dedupe, doc_hash, read_agnews_csv, read_text_documents)
from comigs_dist.data.shards import DataError


@dataclass
class DocSource:
    """Documents of one category, in consumption order. ``finite`` sources can be counted in full
    (and so budgets can be scaled to them); streams cannot."""
    origin: str
    docs: Iterator[str]
    finite: bool


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    categories: tuple[str, ...]
    scenario: str
    fit: str
    description: str
    table3: dict[str, dict[str, int]] | None = None  # split -> category -> tokens
    local_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # category -> accepted file stems
    lines_per_doc: int = 1
    hub: str = ""


def _table(train: tuple, valid: tuple, test: tuple, cats: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {s: dict(zip(cats, v)) for s, v in (("train", train), ("valid", valid), ("test", test))}


AGNEWS = DatasetSpec(
    "agnews", AGNEWS_CLASSES, "out", "scale",
    "AG News: one news category per user for training; validation and test a uniform mixture of all users' "
    "categories (out-of-distribution).",
    # Table 3, users 1..4 = World, Sports, Business, Sci/Tech (the labels' order)
    _table((761_924, 756_719, 814_131, 771_460), (48_809, 48_730, 50_398, 48_249),
           (48_167, 47_721, 48_344, 49_377), AGNEWS_CLASSES),
    hub="fancyzhx/ag_news (train split -> training pools, test split -> held-back pools)")

MULTILINGUAL = DatasetSpec(
    # the paper's order (section 4.1.1: German, Dutch, French, Italian); section 4.3.2's low-data
    # users, German and Dutch, are users 0 and 1, and the per-user lists of configs/ follow it
    "multilingual", ("de", "nl", "fr", "it"), "in", "error",
    "Multilingual Wikipedia: one language per user, validation and test from the same language.",
    # Table 3 lists users, not languages. Section 4.3.2 calls German and Dutch the low-data users,
    # so they get the two smaller columns (2 and 4), French and Italian the larger (1 and 3).
    {"train": {"fr": 557_662, "de": 407_498, "it": 556_796, "nl": 451_584},
     "valid": {"fr": 300_764, "de": 216_318, "it": 220_071, "nl": 165_984},
     "test": {"fr": 229_720, "de": 219_741, "it": 210_570, "nl": 172_547}},
    local_names={c: (c,) for c in ("de", "nl", "fr", "it")},
    # the local files hold one sentence per line, neighbours from the same article: runs of 16
    # sentences stay together so that a test sentence rarely shares an article with training text
    lines_per_doc=16,
    hub="wikimedia/wikipedia 20231101.{de,fr,it}, google/wiki40b nl (streamed)")

SLIMPAJAMA_CATS = ("stackexchange", "github", "arxiv", "book")
SLIMPAJAMA = DatasetSpec(
    "slimpajama", SLIMPAJAMA_CATS, "in", "error",
    "SlimPajama: one domain per user (StackExchange, GitHub, ArXiv, Book), validation and test from the same domain.",
    _table((1_000_000,) * 4, (200_000,) * 4, (200_000,) * 4, SLIMPAJAMA_CATS),
    local_names={"stackexchange": ("stackexchange",), "github": ("github", "code"), "arxiv": ("arxiv",),
                 "book": ("book", "books")},
    hub="cerebras/SlimPajama-627B train split (streamed, filtered by meta.redpajama_set_name)")

TEXT = DatasetSpec(
    "text", (), "in", "error",
    "Your own corpus: one <category>.txt per user in --source DIR; give the budgets.")

SPECS = {s.name: s for s in (AGNEWS, MULTILINGUAL, SLIMPAJAMA, TEXT)}

SLIMPAJAMA_SETS = {"stackexchange": "RedPajamaStackExchange", "github": "RedPajamaGithub",
                   "arxiv": "RedPajamaArXiv", "book": "RedPajamaBook"}
WIKI_HUB = {"de": ("wikimedia/wikipedia", "20231101.de"), "fr": ("wikimedia/wikipedia", "20231101.fr"),
            "it": ("wikimedia/wikipedia", "20231101.it"), "nl": ("google/wiki40b", "nl")}


def get_spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise DataError(f"--dataset {name!r} is not known; choose one of: {', '.join(SPECS)}")
    return SPECS[name]


def _shuffled(docs: list[str], seed: int, category: str) -> list[str]:
    """A per-category order that depends on the seed and the category only (adding a user or a
    category never changes another category's documents)."""
    order = np.random.default_rng([seed, zlib.crc32(category.encode())]).permutation(len(docs))
    return [docs[i] for i in order]


# --------------------------------------------------------------------------------------------
# local files
# --------------------------------------------------------------------------------------------

def text_categories(source: Path) -> list[str]:
    """The categories of a generic text source: the stems of ``*.txt`` in the directory."""
    if not source.is_dir():
        raise DataError(f"--source {source} is not a directory; give a directory of <category>.txt files")
    cats = sorted(p.stem for p in source.glob("*.txt"))
    if not cats:
        raise DataError(f"--source {source} holds no *.txt files; put one <category>.txt per user there")
    return cats


def _category_files(spec: DatasetSpec, source: Path, categories: list[str]) -> dict[str, Path]:
    """The file of each category; every missing one is named in a single error."""
    found, missing = {}, []
    for c in dict.fromkeys(categories):
        names = spec.local_names.get(c, (c,))
        hit = next((source / f"{n}.txt" for n in names if (source / f"{n}.txt").is_file()), None)
        if hit is None:
            missing.append(f"{' or '.join(str(source / f'{n}.txt') for n in names)} (category {c!r})")
        found[c] = hit
    if missing:
        raise DataError(f"source file{'s' if len(missing) > 1 else ''} {'; '.join(missing)} "
                        f"{'do' if len(missing) > 1 else 'does'} not exist; put each category's text there (documents "
                        f"separated by <|endoftext|> lines, blank lines, or one per line), or choose --categories")
    return found


def agnews_csv_files(sources: list[Path]) -> list[Path]:
    files: list[Path] = []
    for s in sources:
        if s.is_dir():
            found = sorted(s.glob("*.csv"))
            if not found:
                raise DataError(f"--source {s} holds no *.csv files; give AG-News-format CSV files "
                                f"(class,title,description), e.g. ../shared/data/ag_news")
            files.extend(found)
        elif s.is_file():
            files.append(s)
        else:
            raise DataError(f"source file {s} does not exist; give AG-News-format CSV files or their directory")
    return files


def open_local(spec: DatasetSpec, sources: list[Path], categories: list[str], seed: int, docs_mode: str,
               lines_per_doc: int) -> tuple[dict[str, DocSource], dict]:
    """One DocSource per category (training and held-back text both come from it) and what meta.json
    records about the files."""
    from comigs_dist.data.shards import sha256_file
    if spec.name == "agnews":
        files = agnews_csv_files(sources)
        by_cat = read_agnews_csv(files)
        origin = {c: ", ".join(str(f) for f in files) for c in categories}
    else:
        if len(sources) != 1:
            raise DataError(f"--source for --dataset {spec.name} is one directory of <category>.txt files, "
                            f"got {len(sources)} paths")
        src = sources[0]
        if not src.is_dir():
            raise DataError(f"--source {src} is not a directory; give the directory holding "
                            + ", ".join(f"{spec.local_names.get(c, (c,))[0]}.txt" for c in categories))
        paths = _category_files(spec, src, categories)  # every missing file before any reading
        files = sorted(set(paths.values()))
        by_cat = {c: read_text_documents(paths[c], docs_mode, lines_per_doc) for c in dict.fromkeys(categories)}
        origin = {c: str(paths[c]) for c in categories}
    # keep every category's documents for de-duplication, so that a text filed under two
    # categories lands in at most one split
    by_cat, dropped = dedupe(by_cat)
    for c in dict.fromkeys(categories):
        if not by_cat.get(c):
            raise DataError(f"category {c!r} has no documents in {origin[c]}; check the source")
    streams = {c: DocSource(origin[c], iter(_shuffled(by_cat[c], seed, c)), True) for c in dict.fromkeys(categories)}
    meta = {"kind": "local", "files": [{"path": str(f.resolve()), "bytes": f.stat().st_size,
                                         "sha256": sha256_file(f)} for f in files],
            "duplicates_dropped": dropped, "docs_mode": docs_mode, "lines_per_doc": lines_per_doc,
            "documents": {c: len(by_cat[c]) for c in dict.fromkeys(categories)}}
    return streams, meta


# --------------------------------------------------------------------------------------------
# the hub (needs a network; ``loader`` defaults to datasets.load_dataset)
# --------------------------------------------------------------------------------------------

def _default_loader() -> Callable:
    import datasets
    if not sys.stderr.isatty():  # download bars redraw with carriage returns: noise in a log file
        datasets.disable_progress_bars()
    return datasets.load_dataset


def clean_wiki40b(text: str) -> str:
    """Wiki-40B marks structure inline; keep the paragraphs as plain text."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line in ("_START_ARTICLE_", "_START_SECTION_", "_START_PARAGRAPH_"):
            continue
        out.append(line.replace("_NEWLINE_", "\n"))
    return "\n".join(out)


def _unique(texts: Iterator[str]) -> Iterator[str]:
    seen: set[str] = set()
    for t in texts:
        if not t or not t.strip():
            continue
        h = doc_hash(t)
        if h not in seen:
            seen.add(h)
            yield t


class _Multiplexer:
    """One stream, documents routed to per-category queues on demand (SlimPajama holds all four
    domains in one stream: a single pass serves every user)."""

    def __init__(self, stream, key: Callable[[dict], str | None], max_pending: int = 20_000):
        self.stream, self.key, self.max_pending = iter(stream), key, max_pending
        self.queues: dict[str, deque] = {}
        self.seen: set[str] = set()

    def docs(self, category: str) -> Iterator[str]:
        q = self.queues.setdefault(category, deque())
        while True:
            if q:
                yield q.popleft()
                continue
            example = next(self.stream, None)
            if example is None:
                return
            cat, text = self.key(example), example.get("text") or ""
            if cat not in self.queues or not text.strip():
                continue
            h = doc_hash(text)
            if h in self.seen:
                continue
            self.seen.add(h)
            if len(self.queues[cat]) < self.max_pending:  # bounded memory while a rare domain is sought
                self.queues[cat].append(text)


def open_hub(spec: DatasetSpec, categories: list[str], seed: int, loader: Callable | None = None,
             shuffle_buffer: int = 1_000) -> tuple[dict[str, tuple[DocSource, DocSource]], dict]:
    """Per category: (training source, held-back source), possibly the same object; and the meta."""
    load = loader or _default_loader()
    cats = list(dict.fromkeys(categories))
    if spec.name == "agnews":
        ds = load("fancyzhx/ag_news")
        train = {c: [] for c in AGNEWS_CLASSES}
        test = {c: [] for c in AGNEWS_CLASSES}
        for split, into in (("train", train), ("test", test)):
            for row in ds[split]:
                into[AGNEWS_CLASSES[int(row["label"])]].append(row["text"])
        # test rows first: a text in both hub splits stays held back, never in training
        pools, _ = dedupe({**{("test", c): v for c, v in test.items()}, **{("train", c): v for c, v in train.items()}})
        out = {c: (DocSource(f"fancyzhx/ag_news train/{c}", iter(_shuffled(pools[("train", c)], seed, c)), True),
                   DocSource(f"fancyzhx/ag_news test/{c}", iter(_shuffled(pools[("test", c)], seed, c)), True))
               for c in cats}
        return out, {"kind": "hub", "datasets": ["fancyzhx/ag_news"]}
    if spec.name == "multilingual":
        out, names = {}, []
        for c in cats:
            name, config = WIKI_HUB[c]
            stream = load(name, config, split="train", streaming=True).shuffle(seed=seed, buffer_size=shuffle_buffer)
            clean = clean_wiki40b if name == "google/wiki40b" else (lambda t: t)
            # map binds this language's cleaner now; a generator expression would look ``clean`` up
            # lazily and clean every language as the last one of the loop
            src = DocSource(f"{name} {config}", _unique(map(clean, (ex["text"] for ex in stream))), False)
            out[c] = (src, src)
            names.append(f"{name} {config}")
        return out, {"kind": "hub", "datasets": names}
    if spec.name == "slimpajama":
        name = "cerebras/SlimPajama-627B"
        stream = load(name, split="train", streaming=True).shuffle(seed=seed, buffer_size=shuffle_buffer)
        by_set = {v: k for k, v in SLIMPAJAMA_SETS.items()}
        mux = _Multiplexer(stream, lambda ex: by_set.get((ex.get("meta") or {}).get("redpajama_set_name")))
        for c in cats:
            mux.queues[c] = deque()
        out = {}
        for c in cats:
            src = DocSource(f"{name} {SLIMPAJAMA_SETS[c]}", mux.docs(c), False)
            out[c] = (src, src)
        return out, {"kind": "hub", "datasets": [name], "sets": {c: SLIMPAJAMA_SETS[c] for c in cats}}
    raise DataError(f"--dataset {spec.name} has no hub source; give --source DIR")
