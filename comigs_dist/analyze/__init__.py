"""Offline analysis of finished runs: ``python -m comigs_dist.analyze <command> ...``.

Commands (each one module):
  routing   colour each token of a text by its top-1 expert, per user and layer (paper Fig. 2, 14-19)
  table     methods x datasets, mean (std) over seeds of the mean test perplexity (Tables 1, 2, 4, 5)
  curves    test perplexity against iterations, per user and method (Figures 4-6, 9, 11-13)
  sweep     the final mean test perplexity against an option, one line per another (Figure 7: tau, s)
  overhead  forward FLOPs, router memory and bytes per round of a configuration (appendix B.1)

Reads only what a run writes (results.json, config.yaml, checkpoints); never talks to a process
group and knows nothing of training.
"""
from __future__ import annotations

import argparse
import sys


class AnalysisError(ValueError):
    """A problem with the input of an analysis command; the message names the file or flag and the fix."""


def _add_runs(parser) -> None:
    """The --runs argument of the commands that read many runs."""
    parser.add_argument("--runs", required=True, nargs="+", metavar="DIR",
                        help="run directories, results.json files, or directories searched recursively for "
                             "results.json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comigs_dist.analyze",
                                description="Tables, plots and routing pictures from finished comigs_dist runs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{routing,table,curves,sweep,overhead}")

    r = sub.add_parser("routing", help="colour a text's tokens by each user's top-1 expert (HTML + PNG)",
                       description="Colour every token of a text by the expert its router ranks first, for each "
                                   "user's trained model and each chosen layer (paper Figures 2 and 14-19).")
    r.add_argument("--run", required=True, help="a run directory (holds config.yaml and checkpoints/)")
    r.add_argument("--text", nargs="+", default=[], metavar="FILE",
                   help="text file(s) to route; for the embedded corpus (synthetic vocabulary) a file of "
                        "whitespace-separated token ids")
    r.add_argument("--from-split", nargs="+", default=[], metavar="SPLIT:USER",
                   help="route the start of a user's split of the run's dataset instead of (or besides) a file, "
                        "e.g. test:0 test:1 (each user's model on each user's text, as Figures 14-19)")
    r.add_argument("--layers", default=None, help="comma-separated layer indices (default: first, middle, last)")
    r.add_argument("--users", default=None, help="comma-separated users (default: all)")
    r.add_argument("--checkpoint", default="final.pt", help="checkpoint file name under checkpoints/user_XX/")
    r.add_argument("--tokenizer", default="auto",
                   help="'auto' (from the dataset's meta.json), 'ids' (token ids in the file), or a tiktoken "
                        "encoding / Hugging Face tokenizer name such as 'gpt2'")
    r.add_argument("--max-tokens", type=int, default=512, help="route at most this many tokens of each text")
    r.add_argument("--out", default=None, help="output directory (default: <run>/analysis/routing)")
    r.add_argument("--device", default="cpu", help="where the models run (cpu, cuda, cuda:1, ...)")

    t = sub.add_parser("table", help="mean (std) over seeds of the mean test perplexity (Markdown + CSV)",
                       description="A table of runs: one row per value of --rows, one column per value of --cols, "
                                   "each cell the mean (std) over seeds of --metric (paper Tables 1, 2, 4, 5).")
    _add_runs(t)
    t.add_argument("--rows", default="method", help="results.json key of the rows (dotted, e.g. config.moe.n_experts)")
    t.add_argument("--cols", default="dataset", help="results.json key of the columns")
    t.add_argument("--metric", default="mean_test_ppl", help="results.json key averaged over seeds")
    t.add_argument("--pretrained", action="store_true",
                   help="add a 'pretrained base' row from mean_base_test_ppl (the paper's first row)")
    t.add_argument("--ddof", type=int, default=1, choices=(0, 1),
                   help="1: sample standard deviation over seeds (default); 0: population")
    t.add_argument("--digits", type=int, default=2, help="decimals in the Markdown table")
    t.add_argument("--out", default="table", help="writes OUT.md and OUT.csv (default: ./table.md, ./table.csv)")

    c = sub.add_parser("curves", help="test perplexity against iterations per user and method (PNG)",
                       description="Test perplexity against local iterations, one panel per user (and dataset), "
                                   "one line per --label value, mean over seeds with a +-std band.")
    _add_runs(c)
    c.add_argument("--label", default="method", help="results.json key naming a line (e.g. config.moe.n_experts)")
    c.add_argument("--from-base", action="store_true", help="start every line at iteration 0 with the base perplexity")
    c.add_argument("--log-y", action="store_true", help="logarithmic perplexity axis")
    c.add_argument("--user-names", default=None, help="panel titles by user, comma-separated (e.g. 'de (low),nl (low),"
                                                       "fr (high),it (high)' for Figures 4-6)")
    c.add_argument("--out", default="curves.png", help="PNG path; the plotted points go to the same name .csv")

    w = sub.add_parser("sweep", help="final metric against an option, one line per another option (PNG)",
                       description="The final --metric (mean and std over seeds) against the numeric option --x, one "
                                   "line per value of --label (paper Figure 7: tau and s).")
    _add_runs(w)
    w.add_argument("--x", default="config.train.router_every", help="results.json key of the x axis")
    w.add_argument("--label", default="config.train.router_steps", help="results.json key naming a line")
    w.add_argument("--metric", default="mean_test_ppl", help="results.json key plotted")
    w.add_argument("--out", default="sweep.png", help="PNG path; the plotted points go to the same name .csv")

    o = sub.add_parser("overhead", help="forward FLOPs, router memory and bytes per round (appendix B.1)",
                       description="For a configuration: forward FLOPs added by adapters and routers relative to "
                                   "the base model, router memory, and bytes per user and round, next to the "
                                   "paper's appendix B.1 figures when the model has GPT-2 124M's shapes.")
    o.add_argument("--config", default=None, help="a YAML file (as for comigs_dist.main); default: the defaults")
    o.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.name=gpt2-random")
    o.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from comigs_dist.config import ConfigError
    from comigs_dist.data import DataError
    try:
        if args.command == "routing":
            from comigs_dist.analyze.routing import run_routing
            run_routing(args)
        elif args.command == "table":
            from comigs_dist.analyze.runs import run_table
            run_table(args)
        elif args.command == "curves":
            from comigs_dist.analyze.runs import run_curves
            run_curves(args)
        elif args.command == "sweep":
            from comigs_dist.analyze.runs import run_sweep
            run_sweep(args)
        else:
            from comigs_dist.analyze.overhead import run_overhead
            run_overhead(args)
    except (AnalysisError, ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["AnalysisError", "main"]
