"""Gather finished runs' results.json into one table: mean and std over seeds.

    python -m launch.collect runs/sweeps/<folder> [more folders or results.json files] [--csv FILE]

Runs are grouped by their resolved configuration with the seed (and options that cannot change
the numbers: out_dir, threads, logging, checkpointing, evaluation points, timeouts, resuming) left
out; the table shows the options that differ between groups, the seeds, and per group the mean and
sample standard deviation (n - 1) over seeds of the run's mean test perplexity over users. When a
folder holds a sweep's jobs.json, the jobs that left no results.json are listed with their state
(or as diverged, where guard.nan=stop left its stopped.json).
Reads files only; knows nothing of training.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from comigs_dist import tables
from comigs_dist.checkpoint import flatten_keys

MANIFEST = "jobs.json"

# options that do not change what a run computes, so runs that differ only here are seeds of one row
# (eval.every only adds points to the test curve: tests/test_train.py)
IGNORED = {"seed", "out_dir", "train.threads", "comm.timeout_s", "resume", "model.device", "eval.every"}
IGNORED_PREFIXES = ("log.", "checkpoint.")


def _ignored(key: str) -> bool:
    return key in IGNORED or key.startswith(IGNORED_PREFIXES)


def find_results(paths: list[Path]) -> tuple[list[Path], list[dict]]:
    """results.json files under the given folders (or given directly), and the sweep manifests."""
    files, manifests = [], []
    for p in paths:
        p = Path(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("results.json")))
            if (p / MANIFEST).is_file():
                manifests.append({**json.loads((p / MANIFEST).read_text()), "folder": str(p)})
        else:
            raise FileNotFoundError(f"{p} does not exist; give a sweep folder, a run directory or a results.json")
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique, manifests


def load_runs(files: list[Path]) -> list[dict]:
    runs = []
    for f in files:
        try:
            r = json.loads(Path(f).read_text())
            runs.append({"path": str(f), "seed": int(r["seed"]), "method": r["method"],
                         "dataset": r.get("dataset"), "world_size": r.get("world_size"),
                         "mean_test_ppl": float(r["mean_test_ppl"]),
                         "mean_base_test_ppl": float(r.get("mean_base_test_ppl", math.nan)),
                         "mb_sent": (sum(u.get("bytes_sent", 0) for u in r.get("users", []))
                                     / max(1, len(r.get("users", []))) / 1e6),
                         "config": flatten_keys(r.get("config", {}))})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{f} is not a comigs_dist results.json ({type(exc).__name__}: {exc})") from None
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """(the option columns that tell groups apart, one row per group)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        identity = {k: v for k, v in run["config"].items() if not _ignored(k)}
        identity.update({"method": run["method"], "dataset": run["dataset"], "world_size": run["world_size"]})
        key = json.dumps(identity, sort_keys=True, default=str)
        run["identity"] = identity
        groups.setdefault(key, []).append(run)
    identities = [members[0]["identity"] for members in groups.values()]
    all_keys = sorted({k for ident in identities for k in ident})
    # a method's own options exist only for that method (the method column tells that apart): they
    # vary only when groups that have them disagree
    varying = [k for k in all_keys
               if len({json.dumps(ident.get(k), default=str) for ident in identities
                       if k in ident or not k.startswith("method_options.")}) > 1]
    columns = ["method"] + [k for k in varying if k != "method"]
    rows = []
    for members in groups.values():
        members.sort(key=lambda r: r["seed"])
        for a, b in zip(members, members[1:]):
            if a["seed"] == b["seed"]:  # the same run twice (a copy, or a rerun elsewhere) would count double
                raise ValueError(f"{a['path']} and {b['path']} are the same configuration with the same seed "
                                 f"({a['seed']}): a seed counted twice shrinks the spread; pass only one of them")
        ppl_mean, ppl_std = mean_std([r["mean_test_ppl"] for r in members])
        base_mean, _ = mean_std([r["mean_base_test_ppl"] for r in members])
        mb_mean, _ = mean_std([r["mb_sent"] for r in members])
        rows.append({**{c: members[0]["identity"].get(c) for c in columns},
                     "seeds": [r["seed"] for r in members], "n": len(members),
                     "test_ppl_mean": ppl_mean, "test_ppl_std": ppl_std, "base_ppl_mean": base_mean,
                     "mb_sent_per_user": mb_mean, "runs": [r["path"] for r in members]})
    rows.sort(key=lambda row: [str(row[c]) for c in columns])
    return columns, rows


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def format_table(columns: list[str], rows: list[dict]) -> str:
    header = columns + ["seeds", "n", "test ppl (mean ± std)", "base ppl", "MB sent/user"]
    body = [[str(row[c]) for c in columns]
            + [",".join(str(s) for s in row["seeds"]), str(row["n"]),
               f"{_fmt(row['test_ppl_mean'])} ± {_fmt(row['test_ppl_std'])}",
               _fmt(row["base_ppl_mean"]), f"{row['mb_sent_per_user']:.2f}"]
            for row in rows]
    return tables.format_table(header, body, "<" * len(header))


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns + ["seeds", "n", "test_ppl_mean", "test_ppl_std", "base_ppl_mean", "mb_sent_per_user",
                              "runs"])
        for row in rows:
            w.writerow([row[c] for c in columns] + [" ".join(map(str, row["seeds"])), row["n"], row["test_ppl_mean"],
                                                    row["test_ppl_std"], row["base_ppl_mean"], row["mb_sent_per_user"],
                                                    " ".join(row["runs"])])


def missing_jobs(manifests: list[dict], state_of=None) -> list[str]:
    """A line per job of a manifest that has no results.json yet, with its scheduler state, or
    "diverged" with the user and round when the guard stopped it (its stopped.json)."""
    from comigs_dist.guard import STOPPED, read_stopped
    lines = []
    for m in manifests:
        for rec in m.get("jobs", []):
            if (Path(rec["out_dir"]) / "results.json").is_file():
                continue
            if (stop := read_stopped(rec["out_dir"])) is not None:
                lines.append(f"job {rec.get('job_id', '?')} {rec['label']}: diverged (guard.nan=stop: a non-finite "
                             f"value, user {stop.get('user')}, round {stop.get('round')}; "
                             f"{Path(rec['out_dir']) / STOPPED})")
                continue
            if "job_id" not in rec:  # a local pool's job that was never started (the pool was stopped first)
                lines.append(f"job - {rec['label']}: never started (its local pool was stopped before it); "
                             f"run the sweep again for it")
                continue
            state = state_of(m, rec) if state_of else "unknown"
            lines.append(f"job {rec.get('job_id', '?')} {rec['label']}: no results.json (state {state}); log: "
                         f"{rec.get('log', '?')}")
    return lines


def _scheduler_state(manifest: dict, rec: dict) -> str:
    try:
        from launch.submit import job_for
        return job_for(rec, Path(manifest["folder"]), manifest["cluster"], manifest.get("n_tasks", 1)).state
    except Exception as exc:  # no scheduler here, or the job was purged from its accounting
        return f"unknown: {type(exc).__name__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m launch.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep folders, run directories or results.json files")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    ns = parser.parse_args(argv)
    try:
        files, manifests = find_results([Path(p) for p in ns.paths])
        runs = load_runs(files)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = missing_jobs(manifests, _scheduler_state)
    if not runs:
        print(f"error: no results.json under {' '.join(ns.paths)}", file=sys.stderr)
        for line in missing:
            print(line, file=sys.stderr)
        return 1
    try:
        columns, rows = summarize(runs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(runs)} run(s) in {len(rows)} group(s): mean test perplexity over users, "
          f"then mean ± sample std (n - 1) over seeds")
    print(format_table(columns, rows))
    if ns.csv:
        write_csv(Path(ns.csv), columns, rows)
        print(f"csv: {ns.csv}")
    for line in missing:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
