"""``python -m comigs_dist.data prepare ...`` builds a dataset; ``... info DIR`` describes one."""
from __future__ import annotations

import argparse
import sys

from comigs_dist.data.shards import DataError, read_meta
from comigs_dist.tables import format_table

EPILOG = """examples:
  python -m comigs_dist.data prepare --dataset agnews --out data/agnews                  # hub (network)
  python -m comigs_dist.data prepare --dataset agnews --source ../shared/data/ag_news --out data/agnews
  python -m comigs_dist.data prepare --dataset multilingual --source ../shared/data/multilingual \\
      --out data/multilingual
  python -m comigs_dist.data prepare --dataset slimpajama --source ../shared/data/domains --fit scale \\
      --low-data stackexchange,github --data-ratio 4 --out data/slimpajama-lowhigh
  python -m comigs_dist.data prepare --dataset text --source my_corpus/ --scenario out \\
      --train-tokens 200000 --valid-tokens 20000 --test-tokens 20000 --out data/mine
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comigs_dist.data",
                                     description="Prepare per-user token shards from real text.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a dataset directory", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="agnews, multilingual, slimpajama, or text (your own files)")
    p.add_argument("--out", required=True, help="the dataset directory to write (e.g. data/agnews)")
    p.add_argument("--source", nargs="+", default=None,
                   help="local files instead of the hub: a directory of <category>.txt files (multilingual, "
                        "slimpajama, text) or AG-News-format CSV files or their directory (agnews)")
    p.add_argument("--categories", default=None,
                   help="comma-separated, one per user in rank order (default: the dataset's four; text: every "
                        "*.txt in --source); a category may repeat (two users of one category share no text)")
    p.add_argument("--scenario", choices=("in", "out"), default=None,
                   help="in: valid/test from the user's own category; out: a uniform mixture of every user's "
                        "category (default: out for agnews, in otherwise)")
    for split in ("train", "valid", "test"):
        p.add_argument(f"--{split}-tokens", default=None,
                       help=f"{split} tokens per user: one value or one per user (default: Table 3 of the paper)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every budget (Table 3's or the given ones) by this, e.g. 0.1 for a CPU-sized copy "
                        "with Table 3's proportions")
    p.add_argument("--low-data", default=None,
                   help="comma-separated categories whose users get the training budget / --data-ratio "
                        "(section 4.3.2, appendix D)")
    p.add_argument("--data-ratio", type=float, default=4.0, help="high-data to low-data training ratio (default 4)")
    p.add_argument("--fit", choices=("error", "scale"), default=None,
                   help="when the source holds fewer tokens than the budgets: error, or scale every budget by "
                        "one factor (default: scale for agnews, error otherwise)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="a tiktoken encoding (gpt2, the default), or a Hugging Face tokenizer name or path "
                        "(prefix hf: to force), e.g. meta-llama/Llama-3.2-1B")
    p.add_argument("--join", choices=("space", "eot"), default="space",
                   help="between documents: a space (the reference's convention, default) or the end-of-text token")
    p.add_argument("--docs", choices=("auto", "eot", "blank", "line"), default="auto",
                   help="text files: documents end at <|endoftext|> lines, at blank lines, or at every line "
                        "(auto: the first of these the file uses)")
    p.add_argument("--lines-per-doc", type=int, default=None,
                   help="with one document per line: keep this many consecutive lines together "
                        "(default 16 for local multilingual files, else 1)")
    p.add_argument("--seed", type=int, default=0, help="the split is a deterministic function of the seed")
    p.add_argument("--seq-len", type=int, default=128, help="every split must hold at least one window of this")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="describe a prepared dataset")
    i.add_argument("path")
    return parser


def _split_list(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t.strip()] if text else None


def describe(path: str) -> str:
    meta = read_meta(path)
    b = meta.get("budgets", {})
    lines = [f"{path}: {meta.get('dataset', '?')}, scenario {meta.get('scenario', '?')}, {meta['n_users']} users, "
             f"tokenizer {meta.get('tokenizer', {}).get('name', '?')} (vocab {meta['vocab_size']}, {meta['dtype']})"]
    if b:
        lines.append(f"budgets: fit {b.get('fit')}, scale {b.get('scale', 1.0):.4f}")
    rows = []
    for u in meta["users"]:
        s = u["splits"]
        mix = u.get("mix", {}).get("test", {})
        mix_text = " ".join(f"{c}:{n}" for c, n in mix.items()) if len(mix) > 1 else "own category"
        rows.append((u["user"], u.get("category", "?"), s["train"]["tokens"], s["valid"]["tokens"], s["test"]["tokens"],
                     mix_text))
    lines.append(format_table(("user", "category", "train", "valid", "test", "valid/test mix"), rows, "><>>><"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.path))
            return 0
        from comigs_dist.data.prepare import prepare_dataset
        prepare_dataset(args.dataset, args.out, source=args.source, categories=_split_list(args.categories),
                        scenario=args.scenario, train_tokens=args.train_tokens, valid_tokens=args.valid_tokens,
                        test_tokens=args.test_tokens, low_data=_split_list(args.low_data), data_ratio=args.data_ratio,
                        fit=args.fit, tokenizer=args.tokenizer, join=args.join, docs=args.docs,
                        lines_per_doc=args.lines_per_doc, seed=args.seed, seq_len=args.seq_len, force=args.force,
                        progress=not args.quiet, budget_scale=args.budget_scale)
        print(describe(args.out))
        return 0
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
