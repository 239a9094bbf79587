"""Entry point: ``python -m comigs_dist.main [--config FILE] [key=value ...]``.

Under torchrun (or srun, or submitit) every process is one simulated user. The configuration is
read and validated before any process group exists; then each rank runs its user, rank 0 gathers
the users' rows, writes results.json and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from comigs_dist.config import ConfigError, RunConfig, check_world_size, describe_options, load_config, to_yaml
from comigs_dist import tables


def _help_text() -> str:
    lines = ["usage: [torchrun --nproc_per_node=N] python -m comigs_dist.main [--config FILE] [key=value ...]",
             "",
             "Runs one experiment: one process per simulated user. Options (key=value overrides the",
             "config file; nested keys are dotted):", ""]
    rows = [(f"{key}={default}", text) for key, default, text in describe_options()]
    lines.append(tables.format_table(None, rows, "<<", indent="  "))
    lines += _method_option_lines()
    lines += ["", "other flags:", "  --config FILE   a YAML file (see configs/)",
              "  --methods       list the methods and exit", "  --print-config  print the resolved config and exit",
              "  -h, --help      this text"]
    return "\n".join(lines)


def _method_option_lines() -> list[str]:
    """Each method's own options (method_options.<key>=value), listed under the method."""
    from comigs_dist.methods import known_methods, method_class, option_rows
    rows = [(f"[{name}] {key}={default}", text) for name in known_methods()
            for key, default, text in option_rows(method_class(name))]
    return ["", "method options (method_options.<key>=value, accepted only by the method named):",
            tables.format_table(None, rows, "<<", indent="  ")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--methods", action="store_true")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if "=" not in u]
    if bad:
        raise ConfigError(f"unknown flag(s) {' '.join(bad)}; options are set as key=value (see --help)")
    args.overrides = list(args.overrides) + [u.lstrip("-") for u in unknown]
    return args


OUT_DIR_KEY = "out_dir"  # in torchrun's agent store: the directory a job without a name writes to


def default_out_dir(cfg: RunConfig, stamp: str | None = None) -> tuple[Path, bool]:
    """(directory, created): with resume=auto under Slurm or torchrun, one named after the job, so
    that a requeued or restarted job finds its own checkpoints again; otherwise a fresh directory,
    created here, named by the time, the method, the seed and a digest of the options that change
    results (runs of a sweep differ in it), with -2, -3, ... for runs that start in the same second
    with the same options (claimed with an atomic mkdir)."""
    from comigs_dist import dist
    from comigs_dist.checkpoint import config_fingerprint, fresh_run_dir
    tag = dist.job_tag() if cfg.resume == "auto" else None
    if tag:
        return Path("runs") / f"{tag}_{cfg.method}_s{cfg.seed}", False
    if cfg.resume == "auto" and dist.restart_count() > 0:
        # torchrun without --standalone or --rdzv-id names no job (run id "none"): the first attempt
        # left its directory's name in torchrun's agent store, which outlives the attempts
        kept = dist.agent_store_value(OUT_DIR_KEY)
        if kept:
            return Path(kept), False
    stamp = stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}_{cfg.method}_s{cfg.seed}_{config_fingerprint(cfg.to_dict())[:8]}"
    chosen = fresh_run_dir(Path("runs"), stem)
    if cfg.resume == "auto":
        dist.agent_store_value(OUT_DIR_KEY, str(chosen.resolve()))
    return chosen, True


def claim_out_dir(cfg: RunConfig):
    """Rank 0: the run's out_dir, locked and checked (checkpoint.claim_out_dir) before anything is
    written. Returns (out_dir, lock or None, notes, problem or None, finished or None): finished
    says that out_dir holds this very run, finished, so there is nothing to do."""
    from comigs_dist import dist
    from comigs_dist.checkpoint import CheckpointError, check_writable, claim_out_dir as claim, finished_run
    created = False
    try:
        if cfg.out_dir:
            chosen = Path(cfg.out_dir)
        else:
            chosen, created = default_out_dir(cfg)
    except OSError as exc:
        return Path("runs"), None, [], check_writable(Path("runs")) or f"cannot create a run directory: {exc}", None
    if not created and (verdict := finished_run(chosen, cfg.resume, cfg.to_dict())):  # read-only
        kind, message = verdict
        return chosen, None, [], (message if kind == "refused" else None), (message if kind == "done" else None)
    try:
        lock, notes = claim(chosen, cfg.resume, cfg.to_dict(), dist.job_tag(), dist.restart_count(), created)
    except CheckpointError as exc:
        return chosen, None, [], str(exc), None
    if created and cfg.resume == "auto" and dist.restart_count() > 0:
        notes.append(f"warning: this is restart {dist.restart_count()} of the job, but the job has no name that "
                     f"survives restarts (a Slurm job id, torchrun's --rdzv-id or --standalone) and left no "
                     f"directory in torchrun's agent store, so it starts over in {chosen}; pass out_dir=<dir> to "
                     f"let a restart find its checkpoints")
    return chosen, lock, notes, None, None


def main(argv: list[str] | None = None) -> int:
    from comigs_dist import dist
    argv = sys.argv[1:] if argv is None else argv
    is_rank0 = dist.env_rank() == 0
    try:
        args = parse_args(argv)
        if args.help:
            print(_help_text())
            return 0
        if args.methods:
            from comigs_dist.methods import known_methods, method_class, option_rows
            rows = []
            for name in known_methods():
                cls = method_class(name)
                rows.append((name, cls.description))
                rows += [("", f"  {key}={default}") for key, default, _ in option_rows(cls)]
            print(tables.format_table(None, rows, "<<"))
            return 0
        cfg = load_config(args.config, args.overrides)
        check_world_size(cfg, dist.env_world_size())
        if args.print_config:
            print(to_yaml(cfg))
            return 0
    except ConfigError as exc:
        if is_rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        # build cached assets (embedded corpus and base) before any process group exists: one
        # process per host builds under a file lock while the others wait, outside any collective
        from comigs_dist import faults
        from comigs_dist.train import prepare_assets
        faults.check(faults.from_env(), cfg)  # a malformed or unreachable COMIGS_FAULT: an error before anything starts
        prepare_assets(cfg, cfg.n_users, progress=is_rank0 and cfg.log.progress,
                       say=lambda msg: print(f"[comigs] {msg}", flush=True) if is_rank0 else None)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()  # wall_seconds: the run, not the embedded base built once on first use
    topo = dist.init_distributed(cfg.comm.backend, cfg.model.device, cfg.comm.timeout_s, cfg.train.threads,
                                 n_users=cfg.n_users)
    # every process group of the run, built once on every rank from (config, method, users)
    from comigs_dist.config import resolve_users
    from comigs_dist.methods import get_method
    method = get_method(cfg.method, cfg, resolve_users(cfg, topo.n_users))
    topo.build_groups(method.sharing_groups(topo.n_users))
    from comigs_dist.metrics import build_progress
    # the run's messages: above rank 0's bars, plain lines on rank 0 without bars, nothing elsewhere
    lines = build_progress(topo.rank == 0 and cfg.log.progress, messages=topo.rank == 0)
    say = lambda msg: lines.write(f"[comigs] {msg}")
    from comigs_dist import guard
    from comigs_dist.checkpoint import CheckpointError
    lock = out_dir = None
    try:
        # rank 0 picks out_dir, locks it and checks that this run may write there; every rank learns
        # the verdict at once, so a refusal stops every rank with one message before anything is
        # written (config.yaml included: train.run writes it once the resume is agreed)
        choice = None
        if topo.rank == 0:
            out_dir, lock, notes, problem, finished = claim_out_dir(cfg)
            choice = (str(out_dir), problem, notes, finished)
        out_dir, problem, notes, finished = dist.broadcast_object(topo, choice)
        out_dir = Path(out_dir)
        if problem:
            raise ConfigError(problem)
        if finished:  # rerunning a finished run (a requeue after its end, a repeated command) is a no-op
            if topo.rank == 0:
                print(f"[comigs] {finished}", flush=True)
            dist.barrier(topo)
            return 0
        for note in notes:
            say(note)
        say(f"{cfg.method}: {topo.n_users} users on {topo.device.type} ({topo.backend}), writing to {out_dir}")
        if dist.restart_count() > 0 and cfg.resume == "false":
            say(f"warning: this is restart {dist.restart_count()} of the job, and resume=false starts it over from "
                f"round 1; pass resume=auto (with checkpoint.every) to continue from the last checkpoint instead")
        from comigs_dist import train
        from comigs_dist.checkpoint import keep_finished_results
        from comigs_dist.metrics import build_results, format_table, write_json_atomic
        mine = train.run(cfg, topo, out_dir, say)
        topo.set_phase("gathering the results")
        rows = sorted((row for part in dist.all_gather_objects(topo, mine) for row in part), key=lambda r: r["user"])
        if topo.rank == 0:
            dataset = cfg.data.path if cfg.data.path != "embedded" else f"embedded-{cfg.data.scenario}"
            results = build_results(cfg.to_dict(), rows, dataset, time.perf_counter() - start)
            if (kept := keep_finished_results(out_dir)) is not None:  # this run continued a shorter finished one
                say(f"the results of the shorter run this one continued are kept as {kept}")
            write_json_atomic(out_dir / "results.json", results)
            print(format_table(results))
            print(f"results: {out_dir / 'results.json'}")
            print(f"tensorboard --logdir {out_dir / 'tb'}")
            if cfg.log.wandb == "offline":
                print(f"wandb sync {out_dir / 'wandb'}/offline-run-*   # uploads the offline W&B runs")
        # leave together: a rank that tears gloo down while another still talks to it aborts
        topo.set_phase("the end of the run")
        dist.barrier(topo)
        return 0
    except (ConfigError, CheckpointError) as exc:
        # raised on every rank together (decided on gathered facts): said once
        if topo.rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        users = topo.local_users
        who = f"user {users[0]}" if len(users) == 1 else f"users {users[0]}-{users[-1]}"
        print(f"[comigs] {who} (rank {topo.rank}) failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, dist.PeerFailure):
            return 1  # a consequence of another user's failure; the message says which
        dist.report_failure(f"{type(exc).__name__}: {exc}")  # so the other users can name the cause
        if isinstance(exc, guard.Stopped) and out_dir is not None:
            try:  # an outcome a launcher reads (launch.reproduce: "diverged"), not only a log line
                print(f"[comigs] recorded in {guard.write_stopped(out_dir, exc)}", file=sys.stderr, flush=True)
            except OSError as err:
                print(f"[comigs] could not record the stop in {out_dir / guard.STOPPED}: {err}", file=sys.stderr)
        if isinstance(exc, FloatingPointError):
            return 1  # the message names the user, round and parameter: a traceback adds nothing
        raise
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
