"""Pretrain a small GPT-2 from scratch on a token stream and save it as a HF checkpoint.

Owns the pretraining routine (also used for the embedded default base, ``synthetic.py``) and the
command line that pretrains a small GPT-2 on real text with GPT-2 BPE:

    python -m comigs_dist.pretrain --source FILES... --config small --out DIR [--exclude PREPARED_DIR]

The saved directory loads with ``model.name=DIR`` like any Hugging Face checkpoint; it also holds
``comigs_tokenizer.json`` (the tokenizer it was trained with, checked against a dataset's meta.json)
and ``pretrain.json`` (sources, steps, time, held-out perplexity). ``--exclude`` refuses to
pretrain on text that a prepared dataset's user splits hold (its ``passages.u64`` manifest), or with
``--drop-excluded`` leaves those documents out.
Knows nothing of users, adapters or methods.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _quiet_gpt2_config(**kw):
    from transformers import GPT2Config
    kw.setdefault("resid_pdrop", 0.0)
    kw.setdefault("embd_pdrop", 0.0)
    kw.setdefault("attn_pdrop", 0.0)
    # GPT-2's default bos/eos id (50256) does not exist in a small vocabulary
    eot = 0 if kw.get("vocab_size", 50257) < 50257 else 50256
    kw.setdefault("bos_token_id", eot)
    kw.setdefault("eos_token_id", eot)
    return GPT2Config(**kw)


def save_hf_checkpoint(model, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors that ``from_pretrained`` loads. (transformers'
    ``save_pretrained`` silently writes no weights on a rank other than 0 of an initialised
    process group, and any rank may be the one that builds a cache entry.)"""
    from safetensors.torch import save_model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def evaluate_ppl(model, tokens: np.ndarray, seq_len: int, batch_size: int = 32) -> float:
    """exp(mean token cross-entropy) over non-overlapping windows of ``tokens``."""
    from comigs_dist.data import iter_eval_batches
    total, count = 0.0, 0
    for x, y in iter_eval_batches(tokens, seq_len, batch_size, 0):
        logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / max(count, 1))


def pretrain_gpt2(config: dict, tokens: np.ndarray, held_out: np.ndarray, *, steps: int, batch_size: int,
                  seq_len: int, lr: float, seed: int, out_dir: str | Path, progress: bool = False) -> dict:
    """Train a GPT-2 of the given config on ``tokens`` (random windows), save it to ``out_dir``."""
    from transformers import GPT2LMHeadModel
    from comigs_dist.data import BatchSampler

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_quiet_gpt2_config(**config))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    sampler = BatchSampler(tokens, seq_len, seed)
    start = time.perf_counter()
    loss_value = float("nan")
    from comigs_dist.metrics import build_progress
    bar = build_progress(progress).bar(total=steps, desc="pretrain", unit="step")  # lines on a file
    for step in range(steps):
        x, y = sampler.sample(batch_size)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss_value = loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - start
    model.eval()
    ppl = evaluate_ppl(model, held_out, seq_len)
    save_hf_checkpoint(model, out_dir)
    return {"steps": steps, "final_train_loss": loss_value, "held_out_ppl": ppl,
            "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
            "n_params": sum(p.numel() for p in model.parameters())}



# --------------------------------------------------------------------------------------------
# pretraining a small GPT-2 on real text (the command line)
# --------------------------------------------------------------------------------------------

# n_embd stays small: with GPT-2 BPE the tied embedding alone is 50,257 x n_embd parameters, and
# the output layer over 50,257 ids is most of the compute per token on a CPU
PRESETS = {
    "small": dict(model=dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
                  steps=300, batch_size=8, seq_len=128, lr=4e-3),
    "tiny": dict(model=dict(n_layer=1, n_head=2, n_embd=32, n_positions=128),
                 steps=20, batch_size=4, seq_len=64, lr=5e-3),
}


class PretrainError(ValueError):
    """A pretraining request a user can fix; the message names the file or flag and the fix."""


def read_corpus(sources: list[str | Path], docs_mode: str = "auto") -> list[tuple[Path, str]]:
    """(file, document) pairs of every source: text files split into documents, AG-News CSV rows."""
    from comigs_dist.data.documents import read_agnews_csv, read_text_documents
    out = []
    for src in sources:
        path = Path(src)
        if not path.is_file():
            raise PretrainError(f"--source {path} does not exist; give text files (documents separated by "
                                f"<|endoftext|> lines, blank lines, or one per line) or AG-News CSV files")
        if path.suffix == ".csv":
            out.extend((path, d) for docs in read_agnews_csv([path]).values() for d in docs)
        else:
            out.extend((path, d) for d in read_text_documents(path, docs_mode))
    return out


def _excluded_passages(exclude: list[str | Path]):
    """(dataset, its passage manifest) for each ``--exclude`` dataset; an unreadable one is a
    PretrainError naming it."""
    from comigs_dist.data.prepare import read_passages
    for d in exclude:
        try:
            known = read_passages(d)
        except ValueError as exc:
            raise PretrainError(f"--exclude {d}: {exc}") from None
        yield d, known


def check_no_overlap(corpus: list[tuple[Path, str]], exclude: list[str | Path], threshold: float = 0.5) -> dict:
    """Refuse a corpus that holds text of a prepared dataset: a document counts as shared when its
    whole text or at least ``threshold`` of its passages (lines of 32+ characters) are in the
    dataset's passage manifest. Returns what was checked, for pretrain.json."""
    from comigs_dist.data.documents import overlap_fraction
    checked = {}
    for d, known in _excluded_passages(exclude):
        shared: dict[Path, list[str]] = {}
        for path, text in corpus:
            if overlap_fraction(text, known) >= threshold:
                shared.setdefault(path, []).append(text)
        if shared:
            lines = [f"{p}: {len(v)} documents, e.g. {v[0][:80]!r}" for p, v in shared.items()]
            raise PretrainError(f"--exclude {d}: the pretraining corpus holds text that "
                                f"the prepared user splits in {d} "
                                f"also hold (they would leak into the base model):\n  " + "\n  ".join(lines)
                                + "\npretrain on other files, or prepare the dataset from a different source")
        checked[str(d)] = {"passages": int(len(known)), "documents_checked": len(corpus), "shared": 0}
    return checked


def drop_overlap(corpus: list[tuple[Path, str]], exclude: list[str | Path],
                 threshold: float = 0.5) -> tuple[list[tuple[Path, str]], dict]:
    """The corpus without the documents that a prepared dataset's user splits hold (the test of
    ``check_no_overlap``), and per dataset what was dropped, for pretrain.json: pretraining on the
    rest of a corpus whose other documents became user data (the CPU-scale SlimPajama-like split)."""
    from comigs_dist.data.documents import overlap_fraction
    checked = {}
    for d, known in _excluded_passages(exclude):
        kept = [(path, text) for path, text in corpus if overlap_fraction(text, known) < threshold]
        checked[str(d)] = {"passages": int(len(known)), "documents_checked": len(corpus),
                           "dropped": len(corpus) - len(kept)}
        corpus = kept
    return corpus, checked


def unigram_ppl(train: np.ndarray, held_out: np.ndarray, vocab_size: int) -> float:
    """Perplexity of add-one unigram frequencies of the training tokens on the held-out tokens: the
    floor a model must beat to have learnt more than token frequencies."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[held_out].mean()))


def pretrain_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comigs_dist.pretrain",
                                     description="Pretrain a small GPT-2 (GPT-2 BPE) on text files and save a HF "
                                                 "checkpoint that model.name=DIR loads.")
    parser.add_argument("--source", nargs="+", required=True, help="text files (or AG-News CSV files)")
    parser.add_argument("--config", choices=sorted(PRESETS), default="small",
                        help="model and schedule preset (small: 4 layers, d=128, ~7.2M parameters)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="PREPARED_DIR",
                        help="refuse if the corpus holds text of these prepared datasets")
    parser.add_argument("--drop-excluded", action="store_true",
                        help="leave out the documents --exclude finds instead of refusing (pretrain.json counts them)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=0, help="cap on training tokens read (0 = all)")
    parser.add_argument("--held-out-tokens", type=int, default=32_768,
                        help="tokens of whole documents held back for the perplexity report")
    parser.add_argument("--docs", choices=("auto", "eot", "blank", "line"), default="auto",
                        help="how text files separate documents")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding or HF tokenizer (default gpt2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = pretrain_files(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"held-out perplexity {report['held_out_ppl']:.2f} (unigram frequencies: {report['unigram_ppl']:.2f}) "
          f"after {report['steps']} steps on {report['train_tokens']:,} tokens, {report['seconds']:.0f} s; "
          f"model.name={args.out}")
    return 0


def pretrain_files(args) -> dict:
    from comigs_dist.data.prepare import Pool
    from comigs_dist.data.shards import sha256_file
    from comigs_dist.data.sources import DocSource
    from comigs_dist.data.tokenizer import load_tokenizer, write_checkpoint_tokenizer

    preset = PRESETS[args.config]
    steps = args.steps if args.steps is not None else preset["steps"]
    batch_size = args.batch_size or preset["batch_size"]
    seq_len = args.seq_len or preset["seq_len"]
    lr = args.lr if args.lr is not None else preset["lr"]
    out = Path(args.out)
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise PretrainError(f"--steps ({steps}), --batch-size ({batch_size}) must be >= 1 and --seq-len ({seq_len}) "
                            f">= 2")
    if seq_len > preset["model"]["n_positions"]:
        raise PretrainError(f"--seq-len ({seq_len}) exceeds the context of --config {args.config} "
                            f"({preset['model']['n_positions']}); lower --seq-len")
    if out.exists() and not args.force:
        raise PretrainError(f"--out {out} already exists; pass --force to replace it, or choose another --out")
    for d in args.exclude:
        if not Path(d, "meta.json").is_file():
            raise PretrainError(f"--exclude {d} is not a prepared dataset (no meta.json); give the directory written "
                                f"by `python -m comigs_dist.data prepare`")
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = read_corpus(args.source, args.docs)
    if getattr(args, "drop_excluded", False):
        corpus, exclusion = drop_overlap(corpus, args.exclude)
    else:
        exclusion = check_no_overlap(corpus, args.exclude)
    tok = load_tokenizer(args.tokenizer)
    if tok.eot_id is None:
        raise PretrainError(f"--tokenizer {tok.name!r} has no end-of-text token to separate documents")
    # one pool of every document, shuffled by the seed: the held-out documents come first
    order = np.random.default_rng(args.seed).permutation(len(corpus))
    pool = Pool("corpus", DocSource("corpus", iter(corpus[i][1] for i in order), True), tok, "eot")
    held = pool.take(args.held_out_tokens, allow_short=True)
    train = pool.take(args.max_tokens or 2 ** 62, allow_short=True)
    held_tokens = np.concatenate(held.docs) if held.docs else np.zeros(0, dtype=np.int64)
    train_tokens = np.concatenate(train.docs) if train.docs else np.zeros(0, dtype=np.int64)
    if len(held_tokens) < args.held_out_tokens or len(train_tokens) < 10 * seq_len:
        raise PretrainError(f"the corpus holds {len(held_tokens) + len(train_tokens)} tokens: too few for "
                            f"{args.held_out_tokens} held-out tokens plus training; give more text or lower "
                            f"--held-out-tokens")
    held_set = {h for h, _, _ in held.records}
    assert not held_set & {h for h, _, _ in train.records}, "a document in both held-out and training text"

    model_config = dict(preset["model"], vocab_size=tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        report = pretrain_gpt2(model_config, train_tokens, held_tokens, steps=steps, batch_size=batch_size,
                               seq_len=seq_len, lr=lr, seed=args.seed, out_dir=tmp, progress=not args.quiet)
        report.update({
            "config": args.config, "model": model_config, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
            "train_tokens": int(len(train_tokens)), "held_out_tokens": int(len(held_tokens)),
            "tokens_seen": steps * batch_size * seq_len,
            "unigram_ppl": unigram_ppl(train_tokens.astype(np.int64), held_tokens.astype(np.int64), tok.vocab_size),
            "sources": [{"path": str(Path(s).resolve()), "sha256": sha256_file(Path(s))} for s in args.source],
            "documents": len(corpus), "excluded": exclusion, "tokenizer": tok.describe(),
            "torch_threads": torch.get_num_threads(),
            "held_out_documents": len(held_set), "train_documents": len(train.records),
        })
        write_checkpoint_tokenizer(tmp, tok.describe())
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


if __name__ == "__main__":
    sys.exit(pretrain_main())
