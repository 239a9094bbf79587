"""Reproduce one table or figure of the paper and print it beside the paper's numbers.

    python -m launch.reproduce --table 1 --dataset agnews [--seeds 42,45,47] [--executor slurm|local]
        [--scale paper|cpu|debug] [--rows Local,FedAvg] [--quirks] [--dry-run | --collect]

``--table`` takes 1, 2, 4, 5, 6 (the tables), fig4, fig5, fig6 (section 4.3.2, Multilingual),
fig11, fig12, fig13 (appendix D, SlimPajama), tau_s (Figure 7), since (the methods published since the
paper beside CoMiGS, with the megabytes each user sent) and privacy (not in the paper: test perplexity
against user-level DP's privacy.target_epsilon, docs/privacy.md). Every cell of the table is one
configuration (a YAML of ``configs/`` and its row's overrides, as the YAML's header lists them) run
once per seed through the sweep machinery (``launch.submit``: submitit, to Slurm or to local
processes). Each run has a fixed directory, ``<root>/<scale>/<config>/<overrides>/seed-<s>``, so a
run that left its results.json is never run again and a later call only fills what is missing
(an interrupted run resumes from its checkpoints); ``--collect`` submits nothing and prints the
table of the runs finished so far (while the others run on Slurm, say). The table is then printed in the paper's layout,
each cell with the paper's number (``launch/paper_numbers.yaml``, with its source), ours (mean
(sample std) over the seeds found) and the difference, and written as CSV and Markdown; the figures
also get their plot (``comigs_dist.analyze``).

Scales: ``paper`` runs the configs as they are (GPT-2 124M or Llama 3.2 1B, data/<dataset>);
``cpu`` the same rows on the small GPT-2 pretrained here and the CPU-sized copies of the local text
(data/cpu/<dataset>; ``--prepare`` builds them, see README "Reproducing the paper on a CPU");
``debug`` on a tiny random model and the embedded corpus, two users, two rounds (tests).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from comigs_dist.config import ConfigError
from comigs_dist.guard import STOPPED
from launch.reproduce import scales
from launch.reproduce.report import (collect_results, format_markdown, format_orderings, format_text, mixed_bases,
                                     plot, write_csv)
from launch.reproduce.runs import command_line, ended, execute, plan_runs
from launch.reproduce.tables import SCALES, SEEDS, TABLE_KEYS, build_spec, paper_numbers, select


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Tables: " + ", ".join(TABLE_KEYS))
    p.add_argument("--table", required=True,
                   help="1, 2, 4, 5, 6, fig4, fig5, fig6, fig11, fig12, fig13, tau_s, since or privacy")
    p.add_argument("--dataset", default=None,
                   help="comma-separated datasets of the table to run (agnews, multilingual, slimpajama; Table 6 "
                        "also common_corpus); default: all of the table's")
    p.add_argument("--rows", default=None, help="comma-separated row labels as printed (default: every row)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (paper: 42,45,47)")
    p.add_argument("--scale", choices=SCALES, default="paper",
                   help="paper (the configs as they are), cpu (small GPT-2 on the local text), debug (tiny, tests)")
    p.add_argument("--quirks", action="store_true",
                   help="method_options.reference_quirks=true wherever a method has it (the reference code's "
                        "behaviour, e.g. its gradient leakage: how the paper's numbers were made)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="slurm, local processes, or auto: slurm when sbatch is on PATH")
    p.add_argument("--max-parallel", type=int, default=1,
                   help="local executor: runs at a time, the next starting when one ends (each runs one process per "
                        "user, or --ranks-per-node); --no-wait cannot hold to it and is refused beyond it")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="at most this many processes per run; its users share them (same results, bit for bit; "
                        "fewer processes than cores avoids oversubscribing a laptop)")
    p.add_argument("--wait", dest="wait", action="store_true", default=None,
                   help="wait for the runs, then print the table (default with the local executor)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return (default on Slurm)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--dry-run", action="store_true", help="list every run, its state and its command; run nothing")
    only.add_argument("--collect", action="store_true",
                      help="print and write the table from the runs finished so far; submit nothing (e.g. while "
                           "the rest still run on Slurm)")
    p.add_argument("--prepare", action="store_true", help="--scale cpu: build the missing data and small base first")
    p.add_argument("--root", default="runs/reproduce", help="runs go to ROOT/<scale>/...")
    p.add_argument("--out", default=None, help="table files OUT.csv, OUT.md (and OUT.png for the figures); default "
                                               "ROOT/<scale>/table<key>[_<datasets>]")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPUs (threads) per user")
    p.add_argument("--time", type=int, default=240, help="time limit of each job, minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--slurm", nargs="+", default=[], metavar="OPTION=VALUE", help="more sbatch options")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    echo = lambda line: print(line, flush=True)
    try:
        from launch.submit import _slurm_kv
        seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
        if not seeds:
            raise ConfigError("--seeds is empty; give e.g. --seeds 42,45,47")
        datasets = [d.strip() for d in ns.dataset.split(",")] if ns.dataset else None
        from launch.submit import split_values
        rows = split_values(ns.rows) if ns.rows else None  # commas inside (4,2,2,2) belong to the label
        spec = select(build_spec(ns.table), datasets, rows)
        numbers = paper_numbers()
        root = Path(ns.root).resolve()
        if ns.scale == "cpu" and not (ns.dry_run or ns.collect):
            if ns.prepare:
                scales.prepare_cpu(echo)
            missing = scales.missing_cpu_assets()
            if missing:
                raise ConfigError("--scale cpu needs the CPU-sized data and the small base; run these from the "
                                  "checkout's root (or add --prepare):\n    " + "\n    ".join(missing))
        if ns.ranks_per_node is not None and ns.ranks_per_node < 1:
            raise ConfigError(f"--ranks-per-node {ns.ranks_per_node} must be at least 1 (or left out: one process "
                              f"per user)")
        runs = plan_runs(spec, seeds, ns.scale, root, ns.quirks, ns.cpus_per_task, ns.gpus_per_node,
                         ns.ranks_per_node)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: preparing the CPU scale failed: {exc}", file=sys.stderr)
        return 2

    counts = {s: sum(1 for r in runs if r.status.split(" ")[0].rstrip(":") == s)
              for s in ("done", "stale", "diverged", "running", "to", "invalid")}
    echo(f"table {spec.key}, scale {ns.scale}: {len(runs)} run(s): {counts['done']} done, "
         + (f"{counts['stale']} stale, " if counts["stale"] else "")
         + (f"{counts['diverged']} diverged, " if counts["diverged"] else "")
         + f"{counts['running']} running, {counts['to']} to run"
         + (f", {counts['invalid']} invalid" if counts["invalid"] else ""))
    invalid = [r for r in runs if r.status.startswith("invalid")]
    if stale_runs := [r for r in runs if r.status.startswith("stale")]:
        echo(f"{len(stale_runs)} finished run(s) were made with another configuration than the table has for them "
             f"today, so they are left out of the table and not run again over their results; move each directory "
             f"aside (mv DIR DIR.old) and run the command again to redo them:")
        for r in stale_runs:
            echo(f"  - {r.out_dir}: {r.status.split(': ', 1)[1]}")
    if ns.dry_run:
        for r in runs:
            n_users = r.job["users_per_node"] if r.job else "?"
            echo(f"  [{r.status}] {r.label}, seed {r.seed}: {r.out_dir}")
            if r.argv:  # a finished run's too: its command is how to make it again elsewhere
                echo(f"      {command_line(r, n_users)}")
        return 0
    if invalid and not ns.collect:
        seen = []
        for r in invalid:
            if r.status not in seen:
                seen.append(r.status)
        print("error: nothing was submitted; these cells cannot run yet:\n  - " + "\n  - ".join(seen), file=sys.stderr)
        return 2
    failed = []
    if not ns.collect:
        from submitit import AutoExecutor
        kind = AutoExecutor.which() if ns.executor == "auto" else ns.executor
        wait = (kind != "slurm") if ns.wait is None else ns.wait
        to_run = sum(r.status == "to run" for r in runs)
        if kind != "slurm" and not wait and to_run > ns.max_parallel:
            print(f"error: --no-wait with the {kind} executor would start all {to_run} runs at once (--max-parallel "
                  f"{ns.max_parallel} holds only while this command waits for them); drop --no-wait, or submit to "
                  f"Slurm, where the scheduler queues them", file=sys.stderr)
            return 2
        try:
            outcomes = execute(runs, root, ns.scale, spec.key, cluster=ns.executor, max_parallel=ns.max_parallel,
                               wait=wait, gpus_per_node=ns.gpus_per_node, cpus_per_task=ns.cpus_per_task,
                               timeout_min=ns.time, partition=ns.partition, slurm_args=_slurm_kv(ns.slurm), echo=echo)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # the local runs were stopped (stop_local_jobs said so)
            return 130
        except Exception as exc:  # the scheduler refused (no Slurm controller, a bad partition, ...)
            print(f"error: submitting to {kind} failed: {type(exc).__name__}: {exc}; check the cluster, or run "
                  f"with --executor local", file=sys.stderr)
            return 2
        # a run the guard stopped is an outcome (its cell says "diverged"), not a failure to retry
        failed = [d for d, o in outcomes.items() if o not in ("COMPLETED", "DIVERGED")]
    results = collect_results(spec, runs, numbers)
    echo("")
    echo(format_text(spec, results, numbers, seeds, ns.scale))
    order_text = format_orderings(spec, results)
    if order_text:
        echo("")
        echo(order_text)
    suffix = f"_{'_'.join(sorted({c.dataset for c in spec.cells}))}" if spec.key in ("1", "2", "4", "5", "6") else ""
    name = f"table{spec.key}{suffix}" if spec.key in ("1", "2", "4", "5", "6") else spec.key
    # a part of the table (--rows, other --seeds) gets files of its own instead of replacing the whole one's
    if ns.rows:
        from launch.common import slug
        name += "_rows-" + slug("+".join(rows))[:80]
    if tuple(seeds) != SEEDS:
        name += "_seeds-" + "-".join(map(str, seeds))
    out = Path(ns.out) if ns.out else root / ns.scale / name
    out.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")
    md.write_text(format_markdown(spec, results, numbers, seeds, ns.scale)
                  + (f"\n{order_text}\n" if order_text else ""))
    write_csv(csv_path, spec, results)
    echo(f"wrote {csv_path} and {md}")
    if spec.plot:
        png = plot(spec, results, out.with_name(out.name + ".png"))
        if png:
            echo(f"plot: {png}")
    # runs, not cells (a run of the since-table fills two cells, a figure's line four)
    states = [ended(r.out_dir) for r in runs]
    pending = sum(1 for r, state in zip(runs, states) if state is None and not r.status.startswith("invalid"))
    if pending and not failed:
        again = "the same command without --collect runs them" if ns.collect else "call the same command again later"
        echo(f"{pending} run(s) not finished yet: {again} to fill the table (finished runs are never repeated)")
    if invalid and ns.collect:  # reached only under --collect: without it they stopped the submission above
        reasons = list(dict.fromkeys(r.status for r in invalid))
        # at the CPU scale, what --prepare would build of what the reasons name (not Llama's: no CPU scale)
        missing = scales.missing_cpu_assets() if ns.scale == "cpu" else []
        named = [out for out, command in scales.CPU_PREPARE
                 if command in missing and any(out in why for why in reasons)]
        hint = (" (at --scale cpu, --prepare builds the CPU-sized data and the small base first: "
                + ", ".join(named) + ")") if named else ""
        echo(f"{len(invalid)} run(s) cannot run yet, so running the table would submit nothing until they can{hint}:"
             "\n  - " + "\n  - ".join(reasons))
    mixed = mixed_bases([r.out_dir for r in runs])
    if mixed:
        echo("warning: these runs of one table were made with different bases, so the table compares unlike "
             "runs (rebuild or choose one base and remove the others' run directories):\n  - " + "\n  - ".join(mixed))
    diverged = [r for r, state in zip(runs, states) if state == "diverged"]
    if diverged:
        echo(f"{len(diverged)} run(s) diverged: the guard found non-finite values and ended them (each "
             f"one's stopped.json names the user and round, e.g. {diverged[0].out_dir / STOPPED}); they count as "
             f"outcomes and are not retried: remove a run's directory to run it again")
    if failed:
        echo(f"{len(failed)} run(s) failed; their logs are named above; the same command retries them")
        return 1
    return 0

