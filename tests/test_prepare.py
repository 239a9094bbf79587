"""Preparing real datasets from ../shared/data: splits, scenarios, budgets, manifests, bad input."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from comigs_dist.data import DataError, load_user_data, read_meta
from comigs_dist.data.documents import (AGNEWS_CLASSES, agnews_text, doc_hash, overlap_fraction, split_documents)
from comigs_dist.data.prepare import Pool, prepare_dataset, read_manifest, read_passages
from comigs_dist.data.sources import DocSource
from comigs_dist.data.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AGNEWS_DIR = SHARED / "ag_news"
ML_DIR = SHARED / "multilingual"
DOMAINS = SHARED / "domains"


def _agnews_source() -> dict[str, tuple[str, str]]:
    """doc hash -> (class, text), read with Python's csv module independently of the package."""
    out = {}
    with open(AGNEWS_DIR / "test.csv", newline="") as f:
        for label, title, desc in csv.reader(f):
            text = agnews_text(title, desc)
            out.setdefault(doc_hash(text), (AGNEWS_CLASSES[int(label) - 1], text))
    return out


def _segments(path: Path, source: dict[str, tuple[str, str]], join: str):
    """Walk every shard along the manifest, check that each slice is the tokens of the source document
    it names (a prefix when cut), and return (user, split, source category, hash, tokens) rows."""
    enc = load_tokenizer("gpt2")
    meta = read_meta(path)
    rows = read_manifest(path)
    out = []
    for u in meta["users"]:
        for split, info in u["splits"].items():
            shard = np.fromfile(path / info["file"], dtype=meta["dtype"])
            pos = 0
            for r in (r for r in rows if r["user"] == u["user"] and r["split"] == split):
                cat, text = source[r["document"]]
                ids = (enc.encode_batch([(" " if join == "space" else "") + text])[0]
                       + ([50256] if join == "eot" else []))
                assert r["doc_tokens"] == len(ids)
                assert shard[pos: pos + r["tokens"]].tolist() == ids[: r["tokens"]], (u["user"], split, r["document"])
                pos += r["tokens"]
                out.append((u["user"], split, cat, r["document"], r["tokens"]))
            assert pos == len(shard) == info["tokens"]
    return out


def test_agnews_out_of_distribution_split(tmp_path):
    """AG News OOD: training from the user's class; valid/test a uniform, interleaved mixture of all four
    classes; no document in two splits; the manifest describes the shards token for token."""
    d = tmp_path / "ag"
    meta = prepare_dataset("agnews", d, source=[AGNEWS_DIR], train_tokens=4000, valid_tokens=1001, test_tokens="800",
                           fit="error", join="eot", seed=3)
    assert meta["scenario"] == "out" and meta["categories"] == list(AGNEWS_CLASSES)
    assert meta["tokenizer"]["name"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    rows = _segments(d, _agnews_source(), "eot")
    owner = {}
    for user, split, cat, h, _ in rows:
        assert owner.setdefault(h, (user, split)) == (user, split), f"document {h} in two splits"
    for user, cls in enumerate(AGNEWS_CLASSES):
        assert {cat for u, s, cat, _, _ in rows if u == user and s == "train"} == {cls}
        for split, budget in (("valid", 1001), ("test", 800)):
            per_class = {c: sum(n for u, s, cat, _, n in rows if u == user and s == split and cat == c)
                         for c in AGNEWS_CLASSES}
            assert sum(per_class.values()) == budget
            assert max(per_class.values()) - min(per_class.values()) <= 1, per_class
            first = [cat for u, s, cat, _, _ in rows if u == user and s == split][:12]
            assert len(set(first)) >= 3, "the mixture is interleaved, not one class after another"
    train_docs = {h for _, s, _, h, _ in rows if s == "train"}
    held_docs = {h for _, s, _, h, _ in rows if s != "train"}
    assert not train_docs & held_docs


def test_split_is_deterministic_for_a_seed(tmp_path):
    """The same arguments give byte-identical shards; another seed gives other documents."""
    kw = dict(source=[AGNEWS_DIR], categories=["sports", "business"], train_tokens=2000, valid_tokens=500,
              test_tokens=500, fit="error")
    a = prepare_dataset("agnews", tmp_path / "a", seed=1, **kw)
    b = prepare_dataset("agnews", tmp_path / "b", seed=1, **kw)
    c = prepare_dataset("agnews", tmp_path / "c", seed=2, **kw)
    sha = lambda m: [s["sha256"] for u in m["users"] for s in u["splits"].values()]
    assert sha(a) == sha(b)
    assert not set(sha(a)) & set(sha(c))
    assert (tmp_path / "a" / "documents.tsv").read_bytes() == (tmp_path / "b" / "documents.tsv").read_bytes()


def test_space_join_is_the_reference_tokenization(tmp_path):
    """join=space: a split is encode_ordinary of its documents joined by single spaces (baselines.md 1.1)."""
    d = tmp_path / "ag"
    prepare_dataset("agnews", d, source=[AGNEWS_DIR], categories=["world"], scenario="in", train_tokens=3000,
                    valid_tokens=300, test_tokens=300, fit="error")
    src = _agnews_source()
    texts = [src[r["document"]][1] for r in read_manifest(d) if r["split"] == "train"]
    import tiktoken
    reference = tiktoken.get_encoding("gpt2").encode_ordinary(" " + " ".join(texts))
    shard = np.fromfile(d / "user_00" / "train.bin", dtype=np.uint16)
    assert len(shard) == 3000 and shard.tolist() == reference[:3000]


def test_agnews_budgets_scale_to_the_local_test_file(tmp_path):
    """Table 3 budgets do not fit the 7,600-row file: all are scaled by one factor, recorded in meta.json,
    and what is drawn fits in each class's pool."""
    meta = prepare_dataset("agnews", tmp_path / "ag", source=[AGNEWS_DIR / "test.csv"], seed=0)
    b = meta["budgets"]
    assert b["fit"] == "scale" and 0.05 < b["scale"] < 0.2
    assert b["requested"]["train"] == [761_924, 756_719, 814_131, 771_460]
    for split in ("train", "valid", "test"):
        assert b["used"][split] == [int(r * b["scale"]) for r in b["requested"][split]]
        assert [u["splits"][split]["tokens"] for u in meta["users"]] == b["used"][split]
    drawn = {c: 0 for c in AGNEWS_CLASSES}
    for u in meta["users"]:
        for split in ("train", "valid", "test"):
            for c, n in u["mix"][split].items():
                drawn[c] += n
    assert all(drawn[c] <= b["available"][c] for c in AGNEWS_CLASSES)
    # the scale is the tightest class's: one class is (nearly) used up
    assert max(drawn[c] / b["available"][c] for c in AGNEWS_CLASSES) > 0.97


def test_multilingual_in_distribution_and_data_quantity(tmp_path):
    """Multilingual: every split of a user is its own language; the low-data variant (4x) keeps the same
    validation and test text and cuts only the training budget."""
    kw = dict(source=[ML_DIR], train_tokens=4000, valid_tokens=1000, test_tokens=1000, seed=5, join="eot")
    std = prepare_dataset("multilingual", tmp_path / "std", **kw)
    low = prepare_dataset("multilingual", tmp_path / "low", low_data=["de", "nl"], data_ratio=4, **kw)
    assert std["scenario"] == "in" and std["categories"] == ["de", "nl", "fr", "it"]
    assert [u["splits"]["train"]["tokens"] for u in low["users"]] == [1000, 1000, 4000, 4000]
    for u_std, u_low in zip(std["users"], low["users"]):
        for split in ("valid", "test"):
            assert u_std["splits"][split]["sha256"] == u_low["splits"][split]["sha256"]
    # every document of a user's splits is a run of lines of that user's language file
    lines = {c: set((ML_DIR / f"{c}.txt").read_text().splitlines()) for c in ("de", "fr", "it", "nl")}
    enc = load_tokenizer("gpt2")
    seen = set()
    for u, cat in enumerate(std["categories"]):
        for split in ("train", "valid", "test"):
            text = enc.decode(np.fromfile(tmp_path / "std" / f"user_{u:02d}" / f"{split}.bin", dtype=np.uint16))
            body = [l for doc in text.split("<|endoftext|>") for l in doc.split("\n")]
            body = [l for l in body[:-1] if l]  # the split's last document may be cut
            assert body and all(l in lines[cat] for l in body), (cat, split)
            assert not seen & set(body), "a sentence in two splits"
            seen |= set(body)


def test_budget_scale_keeps_table3_proportions(tmp_path):
    """--budget-scale 0.001: Table 3's budgets of each language (German and Dutch the smaller columns)
    times 0.001, rounded, in the users' order de, nl, fr, it."""
    meta = prepare_dataset("multilingual", tmp_path / "ml", source=[ML_DIR], budget_scale=0.001, seq_len=32)
    tokens = {split: [u["splits"][split]["tokens"] for u in meta["users"]] for split in ("train", "valid", "test")}
    assert tokens == {"train": [407, 452, 558, 557], "valid": [216, 166, 301, 220], "test": [220, 173, 230, 211]}
    assert meta["budgets"]["budget_scale"] == 0.001


def test_slimpajama_local_names_and_budget_error(tmp_path):
    """SlimPajama reads code.txt for github and books.txt for book; a budget the source cannot meet is an
    error naming the file and the fix (with --fit error)."""
    meta = prepare_dataset("slimpajama", tmp_path / "sp", source=[DOMAINS], categories=["github", "book"],
                           train_tokens=3000, valid_tokens=500, test_tokens=500)
    assert [u["category"] for u in meta["users"]] == ["github", "book"]
    assert meta["source"]["files"][0]["path"].endswith(("books.txt", "code.txt"))
    corpus = tmp_path / "small"
    corpus.mkdir()
    (corpus / "stackexchange.txt").write_text("Q: short\nA: tiny thread\n<|endoftext|>\n" * 3)
    with pytest.raises(DataError, match=r"category 'stackexchange' \(.*stackexchange.txt\) ran out of text: it holds "
                                        r"\d+ tokens but the splits drawn from it need 1400000.*--fit scale"):
        prepare_dataset("slimpajama", tmp_path / "sp2", source=[corpus], categories=["stackexchange"], seq_len=4)


def test_generic_text_source_document_modes_and_scenarios(tmp_path):
    """<category>.txt files split at <|endoftext|> lines, blank lines or lines; --scenario out mixes categories."""
    assert split_documents("a\nb\n<|endoftext|>\nc\n<|endoftext|>\n") == ["a\nb", "c"]
    assert split_documents("p1 l1\np1 l2\n\np2\n") == ["p1 l1\np1 l2", "p2"]
    assert split_documents("s1\ns2\ns3\n") == ["s1", "s2", "s3"]
    assert split_documents("s1\ns2\ns3\n", "line", lines_per_doc=2) == ["s1\ns2", "s3"]
    assert split_documents("p1\n\np2\n", "line") == ["p1", "p2"]
    src = tmp_path / "corpus"
    src.mkdir()
    words = {"cats": "meow purr whiskers", "dogs": "woof bark fetch", "fish": "blub swim fins"}
    for name, w in words.items():
        (src / f"{name}.txt").write_text("".join(f"{w} number {i} {w}.\n\n" for i in range(200)))
    meta = prepare_dataset("text", tmp_path / "in", source=[src], train_tokens=300, valid_tokens=90, test_tokens=90,
                           seq_len=16)
    assert meta["categories"] == ["cats", "dogs", "fish"] and meta["scenario"] == "in"
    assert meta["source"]["docs_mode"] == "auto"
    enc = load_tokenizer("gpt2")
    for u, name in enumerate(meta["categories"]):
        test_text = enc.decode(np.fromfile(tmp_path / "in" / f"user_{u:02d}" / "test.bin", dtype=np.uint16))
        assert words[name].split()[0] in test_text
        assert not any(words[o].split()[0] in test_text for o in words if o != name)
    out = prepare_dataset("text", tmp_path / "out", source=[src], scenario="out", train_tokens=300,
                          valid_tokens=90, test_tokens=90, seq_len=16)
    for u in range(3):
        assert out["users"][u]["mix"]["test"] == {"cats": 30, "dogs": 30, "fish": 30}
        text = enc.decode(np.fromfile(tmp_path / "out" / f"user_{u:02d}" / "test.bin", dtype=np.uint16))
        assert all(w.split()[0] in text for w in words.values())


def test_bad_input_is_refused_with_the_file_and_the_fix(tmp_path):
    """Missing files, unknown categories, unusable budgets, an existing --out: clear errors, nothing written."""
    with pytest.raises(DataError, match=r"source files .*ml/nl\.txt \(category 'nl'\); .*ml/fr\.txt "
                                        r"\(category 'fr'\); .*ml/it\.txt \(category 'it'\) do not exist; "
                                        r"put each category's text there"):
        partial = tmp_path / "ml"
        partial.mkdir()
        (partial / "de.txt").write_text("Ein Satz.\n" * 10)
        prepare_dataset("multilingual", tmp_path / "x", source=[partial])
    with pytest.raises(DataError, match=r"source file .*nope.csv does not exist"):
        prepare_dataset("agnews", tmp_path / "x", source=[tmp_path / "nope.csv"])
    with pytest.raises(DataError, match=r"--categories: 'es' not in dataset multilingual; choose from: de, nl, fr, it"):
        prepare_dataset("multilingual", tmp_path / "x", source=[ML_DIR], categories=["de", "es"])
    with pytest.raises(DataError, match=r"--dataset 'wiki' is not known"):
        prepare_dataset("wiki", tmp_path / "x")
    with pytest.raises(DataError, match=r"user 0 \(world\) valid split would hold 100 tokens, fewer than one context "
                                        r"window of --seq-len \+ 1 = 129; raise --valid-tokens"):
        prepare_dataset("agnews", tmp_path / "x", source=[AGNEWS_DIR], train_tokens=1000, valid_tokens=100,
                        test_tokens=1000, fit="error")
    with pytest.raises(DataError, match=r"user 0 \(world\) valid split would hold \d+ tokens \(budget 1000 scaled by "
                                        r"0\.0\d+ to fit the source\), fewer than one context window"):
        prepare_dataset("agnews", tmp_path / "x", source=[AGNEWS_DIR], train_tokens=5_000_000, valid_tokens=1000,
                        test_tokens=1000)
    with pytest.raises(DataError, match=r"--train-tokens gives 3 budgets for 4 users"):
        prepare_dataset("agnews", tmp_path / "x", source=[AGNEWS_DIR], train_tokens="1,2,3")
    with pytest.raises(DataError, match=r"--low-data: 'xx' is not a user's category"):
        prepare_dataset("agnews", tmp_path / "x", source=[AGNEWS_DIR], low_data=["xx"])
    with pytest.raises(DataError, match=r"--dataset text has no default budgets"):
        prepare_dataset("text", tmp_path / "x", source=[ML_DIR])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('"1","t","d"\n"9","t","d"\n')
    with pytest.raises(DataError, match=r"bad.csv line 2: expected an AG-News row"):
        prepare_dataset("agnews", tmp_path / "x", source=[bad_csv])
    assert not (tmp_path / "x").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(DataError, match=r"already exists; pass --force"):
        prepare_dataset("agnews", tmp_path / "exists", source=[AGNEWS_DIR])


def test_interrupted_preparation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    """A failure half-way (during the draws, or while shards are written) leaves no new directory, no
    temporary leftovers, and an older dataset at --out untouched."""
    kw = dict(source=[AGNEWS_DIR], categories=["world", "sports"], train_tokens=2000, valid_tokens=500,
              test_tokens=500, fit="error")
    calls = {"n": 0}
    real_take = Pool.take

    def failing_take(self, n, allow_short=False):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_take(self, n, allow_short)

    monkeypatch.setattr(Pool, "take", failing_take)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("agnews", tmp_path / "ag", **kw)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Pool, "take", real_take)
    old = prepare_dataset("agnews", tmp_path / "ag", seed=1, **kw)
    import comigs_dist.data.shards as shards
    real_sha = shards.sha256_file
    calls["n"] = 0

    def failing_sha(path, *a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_sha(path, *a)

    monkeypatch.setattr(shards, "sha256_file", failing_sha)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset("agnews", tmp_path / "ag", seed=2, force=True, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ag"]
    assert read_meta(tmp_path / "ag") == old
    load_user_data(tmp_path / "ag", 1, 128)  # sizes and checksums still match


def test_hf_tokenizer_gives_the_same_shards_as_tiktoken(tmp_path):
    """--tokenizer DIR (Hugging Face GPT-2 files) and tiktoken gpt2 produce identical shards and fingerprints."""
    kw = dict(source=[AGNEWS_DIR], categories=["world"], scenario="in", train_tokens=1500, valid_tokens=300,
              test_tokens=300, fit="error")
    a = prepare_dataset("agnews", tmp_path / "tt", **kw)
    b = prepare_dataset("agnews", tmp_path / "hf", tokenizer=str(SHARED / "gpt2_bpe"), **kw)
    assert b["tokenizer"]["kind"] == "hf" and b["tokenizer"]["vocab_size"] == 50257
    assert a["tokenizer"]["fingerprint"] == b["tokenizer"]["fingerprint"]
    assert ([s["sha256"] for s in a["users"][0]["splits"].values()]
            == [s["sha256"] for s in b["users"][0]["splits"].values()])


def test_passage_manifest_finds_shared_text(tmp_path):
    """passages.u64 holds the prepared documents' passages: their text is found, other text is not."""
    d = tmp_path / "ag"
    prepare_dataset("agnews", d, source=[AGNEWS_DIR], categories=["sports"], scenario="in", train_tokens=1000,
                    valid_tokens=200, test_tokens=200, fit="error")
    known = read_passages(d)
    src = _agnews_source()
    used = [src[r["document"]][1] for r in read_manifest(d)]
    assert all(overlap_fraction(t, known) == 1.0 for t in used)
    unused = [t for h, (_, t) in list(src.items())[:300] if h not in {r["document"] for r in read_manifest(d)}]
    assert max(overlap_fraction(t, known) for t in unused) == 0.0


def test_pool_hands_out_each_document_once():
    """A pool cuts the last document of a draw and never hands its rest (or any document) out again."""
    tok = load_tokenizer("gpt2")
    docs = [" ".join(["word"] * n) for n in (5, 7, 3, 9)]
    pool = Pool("c", DocSource("mem", iter(docs), True), tok, "eot")
    a = pool.take(8)  # 6 tokens (5 + eot) + 2 of the second document
    b = pool.take(4)  # the third document whole (3 + eot)
    assert [len(x) for x in a.docs] == [6, 2] and [len(x) for x in b.docs] == [4]
    assert [r[1:] for r in a.records] == [(6, 6), (2, 8)]
    assert pool.take(100, allow_short=True).n_tokens == 10
    with pytest.raises(Exception):
        pool.take(1)


def _own_shards_worker(rank, world_size, tmp_path, data_dir):
    from comigs_dist import train
    from comigs_dist.config import load_config
    from dist_harness import init_topology
    topo = init_topology()
    cfg = load_config(None, [f"data.path={data_dir}", "model.name=tiny", "train.seq_len=32", "n_users=2"])
    run = train.build_rank(cfg, topo).users[0]
    meta = read_meta(data_dir)
    for split in ("train", "valid", "test"):
        expected = np.fromfile(Path(data_dir) / f"user_{rank:02d}" / f"{split}.bin", dtype=np.uint16)
        assert np.array_equal(run.data.split(split), expected)
    assert run.data.meta["users"][rank]["category"] == meta["categories"][rank]
    maps = Path("/proc/self/maps").read_text()
    mine = [f"user_{rank:02d}/{s}.bin" for s in ("train", "valid", "test")]
    other = f"user_{1 - rank:02d}/"
    assert all(m in maps for m in mine), "own shards are memory-mapped"
    assert other not in maps, "another user's shard is mapped"


@pytest.mark.slow
def test_config_pointing_at_a_prepared_dir_maps_only_the_ranks_own_shards(tmp_path):
    """data.path=<prepared dir>: each of 2 ranks memory-maps its own three shards and no other user's."""
    from dist_harness import run_on_ranks
    d = tmp_path / "ag"
    prepare_dataset("agnews", d, source=[AGNEWS_DIR], categories=["world", "scitech"], train_tokens=2000,
                    valid_tokens=500, test_tokens=500, fit="error")
    run_on_ranks(_own_shards_worker, 2, tmp_path, str(d))


def test_cli_prepare_info_and_errors(tmp_path, capsys):
    """`python -m comigs_dist.data prepare` prints the per-user table; `info` repeats it; bad input exits 2."""
    from comigs_dist.data.__main__ import main
    out = tmp_path / "ag"
    assert main(["prepare", "--dataset", "agnews", "--source", str(AGNEWS_DIR), "--out", str(out), "--quiet",
                 "--categories", "world,sports", "--train-tokens", "3000,2000", "--valid-tokens", "400",
                 "--test-tokens", "400", "--fit", "error"]) == 0
    printed = capsys.readouterr().out
    assert "agnews, scenario out, 2 users" in printed
    rows = [line.split() for line in printed.splitlines()]
    assert ["0", "world", "3000", "400", "400", "world:200", "sports:200"] in rows
    assert main(["info", str(out)]) == 0 and capsys.readouterr().out == printed
    assert main(["prepare", "--dataset", "agnews", "--source", str(AGNEWS_DIR), "--out", str(out), "--quiet"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "meta.json is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_on_prepared_agnews(tmp_path):
    """Prepare AG News shards with the CLI, then torchrun 2 users of CoMiGS on them (tiny GPT-2, 2 rounds):
    results.json names the dataset, and fine-tuning lowers every user's test perplexity."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = tmp_path / "agnews"
    prep = subprocess.run([sys.executable, "-m", "comigs_dist.data", "prepare", "--dataset", "agnews", "--source",
                           str(AGNEWS_DIR), "--out", str(data), "--categories", "world,sports", "--train-tokens",
                           "20000", "--valid-tokens", "4000", "--test-tokens", "4000", "--fit", "error", "--quiet"],
                          cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert prep.returncode == 0, prep.stderr[-3000:]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "comigs_dist.main", "--config", "configs/debug.yaml", f"data.path={data}", "train.lr=1e-2",
           "log.tensorboard=false"]
    proc = subprocess.run(cmd + [f"out_dir={out}"], cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == str(data) and results["world_size"] == 2
    for u in results["users"]:
        assert u["test_ppl"] < u["base_test_ppl"]
    # a model with another tokenizer is refused where main.py checks assets, before any process group forms
    from comigs_dist.config import load_config
    from comigs_dist.train import prepare_assets
    cfg = load_config(root / "configs" / "debug.yaml", [f"data.path={data}", "model.name=embedded"])
    with pytest.raises(ValueError, match="model.name=embedded knows only the synthetic corpus"):
        prepare_assets(cfg, 2)


def _domain_docs(name: str) -> list[str]:
    """Whole documents from the start of a domain file (books are long: their paragraphs stand in)."""
    text = (DOMAINS / f"{name}.txt").read_text()[:400_000]
    return split_documents(text, "blank" if name == "books" else "eot")[:-1]


def _hub_loader():
    """``load_dataset`` for this test: datasets objects built in memory, in the formats of the paper's hub
    datasets (AG News splits with labels 0..3, Wikipedia and Wiki-40B articles, SlimPajama's meta field)."""
    import datasets
    with open(AGNEWS_DIR / "test.csv", newline="") as f:
        rows = list(csv.reader(f))

    def table(part):
        return datasets.Dataset.from_dict({"text": [agnews_text(r[1], r[2]) for r in part],
                                           "label": [int(r[0]) - 1 for r in part]})

    def articles(lang):
        lines = (ML_DIR / f"{lang}.txt").read_text().splitlines()[:600]
        return [lines[i: i + 12] for i in range(0, len(lines), 12)]

    def slimpajama():
        sets = {"stackexchange": "RedPajamaStackExchange", "code": "RedPajamaGithub", "arxiv": "RedPajamaArXiv",
                "books": "RedPajamaBook"}
        docs = {n: _domain_docs(n) for n in sets}
        for i in range(300):
            yield {"text": f"a web page number {i} " * 20, "meta": {"redpajama_set_name": "RedPajamaC4"}}
            for n, s in sets.items():
                if i < len(docs[n]):
                    yield {"text": docs[n][i], "meta": {"redpajama_set_name": s}}

    def load(name, config=None, split=None, streaming=False):
        if name == "fancyzhx/ag_news":
            return datasets.DatasetDict({"train": table(rows[:6000]), "test": table(rows[6000:])})
        assert streaming and split == "train"
        if name == "wikimedia/wikipedia":
            arts = articles(config.split(".")[1])
            return datasets.IterableDataset.from_generator(lambda: ({"title": a[0][:20], "text": "\n".join(a)}
                                                                    for a in arts))
        if name == "google/wiki40b":
            arts = articles(config)
            return datasets.IterableDataset.from_generator(lambda: (
                {"text": "\n_START_ARTICLE_\nTitel\n_START_PARAGRAPH_\n" + "_NEWLINE_".join(a)} for a in arts))
        if name == "cerebras/SlimPajama-627B":
            return datasets.IterableDataset.from_generator(slimpajama)
        raise AssertionError(name)

    return load, rows


@pytest.mark.slow
def test_hub_sources_through_the_datasets_library(tmp_path):
    """The hub path (used with a network) on datasets objects in the hub's formats: AG News trains on the train
    split and holds back the test split; Wiki-40B markup is removed; SlimPajama's one stream is routed to the
    four domains; a stream cannot be scaled."""
    load, rows = _hub_loader()
    ag = prepare_dataset("agnews", tmp_path / "ag", loader=load, train_tokens=2000, valid_tokens=400, test_tokens=400)
    assert ag["source"] == {"kind": "hub", "datasets": ["fancyzhx/ag_news"]} and ag["budgets"]["scale"] == 1.0
    train_rows = {doc_hash(agnews_text(r[1], r[2])) for r in rows[:6000]}
    test_rows = {doc_hash(agnews_text(r[1], r[2])) for r in rows[6000:]} - train_rows
    for r in read_manifest(tmp_path / "ag"):
        assert r["document"] in (train_rows if r["split"] == "train" else test_rows)
    ml = prepare_dataset("multilingual", tmp_path / "ml", loader=load, train_tokens=1500, valid_tokens=300,
                         test_tokens=300)
    assert "google/wiki40b nl" in ml["source"]["datasets"]
    enc = load_tokenizer("gpt2")
    nl_user = ml["categories"].index("nl")  # user 1: de, nl, fr, it
    nl_text = enc.decode(np.fromfile(tmp_path / "ml" / f"user_{nl_user:02d}" / "train.bin", dtype=np.uint16))
    assert "_START_" not in nl_text and "_NEWLINE_" not in nl_text and "Titel" in nl_text
    sp = prepare_dataset("slimpajama", tmp_path / "sp", loader=load, train_tokens=3000, valid_tokens=600,
                         test_tokens=600)
    by_domain = {c: {doc_hash(d) for d in _domain_docs(f)}
                 for c, f in (("stackexchange", "stackexchange"), ("github", "code"), ("arxiv", "arxiv"),
                              ("book", "books"))}
    for r in read_manifest(tmp_path / "sp"):
        assert r["document"] in by_domain[r["category"]] and r["category"] == sp["categories"][r["user"]]
    with pytest.raises(DataError, match="--fit scale needs sources that can be counted"):
        prepare_dataset("slimpajama", tmp_path / "sp2", loader=load, fit="scale")


def test_a_hub_dataset_without_a_network_names_the_local_way(tmp_path):
    """Without a network (or with HF_HUB_OFFLINE=1) the datasets library raises its ConnectionError
    (an OSError): the README's prepare command ended in its traceback. Now a DataError names the
    dataset, the library's reason and --source, and nothing is written."""
    def offline(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub (OfflineModeIsEnabled)")
    with pytest.raises(DataError, match=r"--dataset agnews without --source reads the Hugging Face Hub, which failed: "
                                        r"ConnectionError: Couldn't reach 'fancyzhx/ag_news'.*--source DIR"):
        prepare_dataset("agnews", tmp_path / "ag", loader=offline)
    assert not (tmp_path / "ag").exists()
