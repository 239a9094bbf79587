"""Pretraining a small GPT-2 on text files, refusing prepared text, and the tokenizer/model check."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from comigs_dist.data.prepare import prepare_dataset, read_manifest
from comigs_dist.data.tokenizer import load_tokenizer, write_checkpoint_tokenizer
from comigs_dist.model import build_base_model, check_model_matches_data
from comigs_dist.pretrain import (PretrainError, check_no_overlap, evaluate_ppl, pretrain_gpt2, pretrain_main,
                                  read_corpus, save_hf_checkpoint, unigram_ppl)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _corpus(tmp_path: Path, n_chars: int = 120_000) -> Path:
    """A small pretraining file: the start of each SlimPajama-like domain, documents kept whole."""
    parts = []
    for name in ("stackexchange", "arxiv"):
        text = (SHARED / "domains" / f"{name}.txt").read_text()
        parts.append(text[: text.index("\n<|endoftext|>\n", n_chars)] + "\n<|endoftext|>\n")
    path = tmp_path / "corpus.txt"
    path.write_text("".join(parts))
    return path


def _agnews(tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "ag"
    meta = prepare_dataset("agnews", d, source=[SHARED / "ag_news"], categories=["sports"], scenario="in",
                           train_tokens=1500, valid_tokens=300, test_tokens=300, fit="error")
    return d, meta


@pytest.mark.slow
def test_pretrain_cli_writes_a_checkpoint_that_loads(tmp_path, capsys):
    """The CLI trains, holds back whole documents, and saves config, weights, tokenizer and report;
    model.name=DIR loads it and the data check accepts GPT-2 BPE data for it."""
    out = tmp_path / "base"
    rc = pretrain_main(["--source", str(_corpus(tmp_path)), "--config", "tiny", "--steps", "8", "--out", str(out),
                        "--held-out-tokens", "2000", "--max-tokens", "30000", "--quiet"])
    assert rc == 0
    assert "held-out perplexity" in capsys.readouterr().out
    report = json.loads((out / "pretrain.json").read_text())
    assert report["steps"] == 8 and report["held_out_tokens"] == 2000 and 29_000 < report["train_tokens"] <= 30_000
    assert report["model"]["vocab_size"] == 50257 and report["n_params"] > 50257 * 32
    # eight steps already beat a model that knows nothing (perplexity = vocabulary size)
    assert report["held_out_ppl"] < 0.8 * 50257 and report["final_train_loss"] < np.log(50257)
    model = build_base_model(str(out), 50257, 64)
    assert model.config.n_layer == 1
    _, meta = _agnews(tmp_path)
    check_model_matches_data(str(out), meta)


def test_saved_checkpoint_reproduces_its_perplexity(tmp_path):
    """pretrain_gpt2 -> save_hf_checkpoint -> from_pretrained gives the same held-out perplexity."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 4000)
    held = rng.integers(0, 64, 512)
    rep = pretrain_gpt2(dict(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=64), tokens, held, steps=5,
                        batch_size=4, seq_len=32, lr=1e-2, seed=0, out_dir=tmp_path / "m")
    model = build_base_model(str(tmp_path / "m"), 64, 32)
    assert evaluate_ppl(model, held, 32) == pytest.approx(rep["held_out_ppl"], rel=1e-5)


def test_unigram_perplexity_by_hand():
    """Add-one unigram perplexity: counts (2+1, 0+1, 1+1) / 6 -> ppl of [0, 2] is (1/2 * 1/3) ** -1/2."""
    assert unigram_ppl(np.array([0, 0, 2]), np.array([0, 2]), 3) == pytest.approx((0.5 * (1 / 3)) ** -0.5)


def test_pretrain_refuses_text_of_a_prepared_dataset(tmp_path, capsys):
    """--exclude DIR: a corpus holding a prepared document is refused before training (file named); other
    text, and a document sharing only one line in four, pass."""
    d, _ = _agnews(tmp_path)
    used = read_manifest(d)[0]["document"]
    leaking = tmp_path / "leak.csv"
    import csv
    with open(SHARED / "ag_news" / "test.csv", newline="") as f:
        rows = list(csv.reader(f))
    from comigs_dist.data.documents import agnews_text, doc_hash
    row = next(r for r in rows if doc_hash(agnews_text(r[1], r[2])) == used)
    with open(leaking, "w", newline="") as f:
        csv.writer(f).writerows([rows[0] if rows[0] is not row else rows[1], row])
    out = tmp_path / "base"
    rc = pretrain_main(["--source", str(leaking), "--config", "tiny", "--out", str(out), "--exclude", str(d),
                        "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert f"--exclude {d}: the pretraining corpus holds text that the prepared user splits" in err
    assert f"{leaking}: 1 documents" in err
    corpus = read_corpus([_corpus(tmp_path, 20_000)])
    checked = check_no_overlap(corpus, [d])
    assert checked[str(d)]["passages"] > 0 and checked[str(d)]["shared"] == 0
    text = agnews_text(row[1], row[2])
    one_in_four = [(Path("x"), "\n".join([text] + [f"an unrelated line of at least thirty-two characters {i}"
                                                   for i in range(3)]))]
    check_no_overlap(one_in_four, [d])
    with pytest.raises(PretrainError, match="1 documents"):
        check_no_overlap([(Path("x"), text + "\nanother line, also long enough to count here")], [d])
    # --drop-excluded: the shared document is left out, the others kept, and the count recorded
    from comigs_dist.pretrain import drop_overlap
    kept, report = drop_overlap(read_corpus([leaking]) + corpus, [d])
    assert len(kept) == len(corpus) + 1 and all(t != text for _, t in kept)
    assert report[str(d)]["dropped"] == 1 and report[str(d)]["documents_checked"] == len(corpus) + 2
    rc = pretrain_main(["--source", str(leaking), "--config", "tiny", "--out", str(out), "--exclude",
                        str(tmp_path), "--quiet"])
    assert rc == 2 and "is not a prepared dataset (no meta.json)" in capsys.readouterr().err


def test_pretrain_bad_input(tmp_path, capsys):
    """A missing source file and an existing --out are refused with the fix."""
    assert pretrain_main(["--source", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert pretrain_main(["--source", str(_corpus(tmp_path)), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def _checkpoint(path: Path, vocab: int, eos: int | None = None, tokenizer: dict | None = None) -> str:
    from transformers import GPT2LMHeadModel
    from comigs_dist.pretrain import _quiet_gpt2_config
    kw = {} if eos is None else {"eos_token_id": eos, "bos_token_id": eos}
    save_hf_checkpoint(GPT2LMHeadModel(_quiet_gpt2_config(n_layer=1, n_head=1, n_embd=4, n_positions=16,
                                                          vocab_size=vocab, **kw)), path)
    if tokenizer is not None:
        write_checkpoint_tokenizer(path, tokenizer)
    return str(path)


def test_model_and_dataset_tokenizers_must_match(tmp_path):
    """Data tokenized with GPT-2 BPE is refused by a model whose tokenizer, vocabulary or end-of-text id differs,
    and accepted by one with the same tokenizer (tiktoken or Hugging Face files alike)."""
    _, meta = _agnews(tmp_path)
    gpt2 = load_tokenizer("gpt2").describe()
    check_model_matches_data(_checkpoint(tmp_path / "ok", 50257, tokenizer=gpt2), meta)
    check_model_matches_data("tiny", meta)
    hf = tmp_path / "hf"
    _checkpoint(hf, 50257)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        os.symlink(SHARED / "gpt2_bpe" / f, hf / f)
    check_model_matches_data(str(hf), meta)
    with pytest.raises(ValueError, match="the ids mean different text"):
        check_model_matches_data(_checkpoint(tmp_path / "fp", 50257, tokenizer={**gpt2, "fingerprint": "0" * 16,
                                                                                 "name": "other"}), meta)
    with pytest.raises(ValueError, match=r"model '.*small' has a vocabulary of 1000; "
                                         r"prepare the data with the model's"):
        check_model_matches_data(_checkpoint(tmp_path / "small", 1000), meta)
    with pytest.raises(ValueError, match=r"ends text with id \[2\]: different tokenizers"):
        check_model_matches_data(_checkpoint(tmp_path / "eos", 50257, eos=2), meta)
    with pytest.raises(ValueError, match="far larger: probably another tokenizer"):
        check_model_matches_data(_checkpoint(tmp_path / "big", 128_256, eos=50256), meta)
    with pytest.raises(ValueError, match="model.name=embedded knows only the synthetic corpus"):
        check_model_matches_data("embedded", meta)
    check_model_matches_data("embedded", {"tokenizer": {"kind": "synthetic", "vocab_size": 256}, "vocab_size": 256})
