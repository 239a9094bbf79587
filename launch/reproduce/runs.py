"""A table's runs: one per configuration and seed, each in a fixed directory; which are done, stale,
diverged or running; submission of the rest through ``launch.submit`` (Slurm, or local processes a
few at a time)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from comigs_dist.checkpoint import fresh_run_dir
from comigs_dist.config import ConfigError, inferred_n_users, load_config
from comigs_dist.guard import STOPPED  # what a run the guard stopped leaves in its out_dir
from launch.reproduce.scales import read_cell, run_extras, scale_overrides
from launch.reproduce.tables import ROOT, Cell, Spec


@dataclass
class Run:
    cells: list[Cell]                # every cell this run fills (a figure's line: one per user)
    seed: int
    out_dir: Path
    argv: list[str]
    status: str = "to run"           # "done" | "stale: ..." | "diverged" | "running" | "to run" | "invalid: ..."
    job: dict | None = None          # the planned job (launch.submit.plan_jobs)

    @property
    def label(self) -> str:
        c = self.cells[0]
        return f"{c.row} / {c.col}" if len(self.cells) == 1 else f"{c.row} / {len(self.cells)} columns"


def cell_dir(root: Path, scale: str, cell: Cell, extra: list[str]) -> Path:
    from launch.common import slug
    config = Path(cell.config).with_suffix("")
    parts = config.parts[1:] if config.parts[0] == "configs" else config.parts
    return root / scale / Path(*parts) / slug(" ".join(list(cell.overrides) + extra) or "defaults")


def ended(out_dir: Path) -> str | None:
    """How the run in ``out_dir`` ended, read from its files: "done" (results.json), "diverged"
    (guard.nan=stop left stopped.json and no results), or None (not yet)."""
    if (out_dir / "results.json").is_file():
        return "done"
    return "diverged" if (out_dir / STOPPED).is_file() else None


def plan_runs(spec: Spec, seeds: list[int], scale: str, root: Path, quirks: bool = False, cpus_per_task: int = 0,
              gpus_per_node: int = 0, ranks_per_node: int | None = None) -> list[Run]:
    """One Run per configuration and seed (cells made by one configuration, such as the users of a
    figure's line, share it), each with its fixed out_dir and its state; a configuration that is
    invalid (e.g. a dataset not prepared yet) is marked, not raised. A run that the guard stopped
    (guard.nan=stop left ``stopped.json`` and no results.json) is "diverged": an outcome, never
    resubmitted, since the same seed would stop the same way. ``ranks_per_node`` caps a run's
    processes (its users then share ranks; the results are the same, bit for bit)."""
    from launch.submit import plan_jobs
    by_folder: dict[Path, list[Cell]] = {}
    extras: dict[Path, list[str]] = {}
    for cell in spec.cells:
        extra = []
        if quirks and "reference_quirks" in read_cell(cell, []).method_options:
            extra.append("method_options.reference_quirks=true")
        folder = cell_dir(root, scale, cell, extra)
        by_folder.setdefault(folder, []).append(cell)
        extras[folder] = extra
    runs = []
    for folder, cells in by_folder.items():
        cell = cells[0]
        try:
            scaled = scale_overrides(cell, scale)
            cfg = read_cell(cell, extras[folder] + scaled)
            job_argv = ["--config", str(ROOT / cell.config), *cell.overrides, *extras[folder], *scaled,
                        *run_extras(spec, scale, cfg)]
            ranks = min(ranks_per_node, inferred_n_users(cfg) or ranks_per_node) if ranks_per_node else None
            jobs, _ = plan_jobs(job_argv, [f"seed={','.join(map(str, seeds))}"], folder, 1, ranks, gpus_per_node,
                                cpus_per_task, None)
            for seed, job in zip(seeds, jobs):
                runs.append(Run(cells, seed, Path(job["out_dir"]), job["argv"], job=job))
        except ConfigError as exc:
            # one reason per problem: the same problem of every seed's run is said once, without its "seed=N: "
            parts = str(exc).split("fix these first:\n  - ")[-1].split("\n  - ")
            why = "; ".join(dict.fromkeys(re.sub(r"^seed=\d+: ", "", part) for part in parts))
            runs += [Run(cells, seed, folder / f"seed-{seed}", [], f"invalid: {why}") for seed in seeds]
    launches = root / scale / "launches"
    running = in_flight(launches)
    for run in runs:
        if (state := ended(run.out_dir)) is not None:
            run.status = state
            if state == "done" and run.argv and (why := stale(run)):
                run.status = f"stale: {why}"
        elif run.status == "to run" and str(run.out_dir) in running:
            run.status = f"running (job {running[str(run.out_dir)]})"
        elif run.status == "to run" and (pid := live_local_run(run.out_dir)):
            run.status = f"running (pid {pid})"
    return runs


def stale(run: Run) -> str | None:
    """How the finished run in ``run.out_dir`` was configured differently from what the table plans
    for it today (an edited YAML, another default since), or None: its saved config against its
    planned command, on the options that change results (checkpoint.config_differences) and the
    number of rounds. A stale run is left out of the table and never rerun over: the user moves it
    aside. Results without a config (not written by comigs_dist.main) are taken as they are."""
    from comigs_dist.checkpoint import config_differences
    from comigs_dist.main import parse_args
    try:
        saved = json.loads((run.out_dir / "results.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(saved, dict):
        return None
    args = parse_args(run.argv)
    planned = load_config(args.config, args.overrides).to_dict()
    diffs = [d.split("; resume with")[0] for d in config_differences(saved, planned)]
    rounds = (saved.get("train") or {}).get("rounds")
    if rounds != planned["train"]["rounds"]:
        diffs.append(f"train.rounds={rounds} but this run has train.rounds={planned['train']['rounds']}")
    return "; ".join(diffs[:3]) + (f"; ... ({len(diffs)} options)" if len(diffs) > 3 else "") if diffs else None


def live_local_run(out_dir: Path) -> int | None:
    """The pid of a run alive on this host that holds ``out_dir``'s lock (a local run another call
    started: local jobs are not in any scheduler's accounting), read from the lock's record without
    touching the lock itself; None when there is none or its process is gone."""
    import socket

    from comigs_dist.checkpoint import LOCK_FILE
    from comigs_dist.dist import pid_alive
    try:
        record = json.loads((Path(out_dir) / LOCK_FILE).read_text() or "{}")
        pid = int(record.get("pid") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return pid if pid > 0 and record.get("host") == socket.gethostname() and pid_alive(pid) else None


ACTIVE = {"RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def in_flight(launches: Path) -> dict[str, str]:
    """out_dir -> job id of the jobs an earlier call submitted that the scheduler still runs (so a
    second call does not start a second run writing into the same directory). Slurm answers for
    its jobs; local jobs belong to the call that started them, which waits for them."""
    from launch.collect import _scheduler_state
    out = {}
    for manifest_path in sorted(launches.glob("*/jobs.json")) if launches.is_dir() else []:
        manifest = {**json.loads(manifest_path.read_text()), "folder": str(manifest_path.parent)}
        for rec in manifest.get("jobs", []):
            if (Path(rec["out_dir"]) / "results.json").is_file():
                continue
            state = _scheduler_state(manifest, rec)
            if state.split(" ")[0].upper() in ACTIVE:
                out[rec["out_dir"]] = str(rec.get("job_id"))
    return out


def command_line(run: Run, n_users: int) -> str:
    """The run as one torchrun command (paths under the current directory shown relative to it)."""
    import os
    import shlex
    here = Path.cwd()
    show = lambda a: os.path.relpath(a, here) if Path(a).is_absolute() and Path(a).is_relative_to(here) else a
    args = " ".join(shlex.quote(show(a)) for a in run.argv)
    return f"torchrun --nproc_per_node={n_users} -m comigs_dist.main {args}"


def execute(runs: list[Run], root: Path, scale: str, key: str, *, cluster: str, max_parallel: int, wait: bool,
            gpus_per_node: int, cpus_per_task: int, timeout_min: int, partition: str | None, slurm_args: dict,
            echo) -> dict[str, str]:
    """Submit every run still to run and wait for them when ``wait``. On Slurm all at once; on the
    local executor ``max_parallel`` at a time, the next starting as soon as one ends (runs of one
    table differ in length several times over, e.g. 20 rounds against 50, so waiting for a whole
    batch would leave cores idle). Returns out_dir -> outcome for the runs waited on."""
    from launch.submit import launch_jobs, local_pool, wait_for
    todo = [r for r in runs if r.status == "to run"]
    if not todo:
        return {}
    from submitit import AutoExecutor
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = AutoExecutor.which() if cluster == "auto" else cluster
    index = 0

    def submit(chunk: list[Run]) -> tuple[list, list[dict]]:  # one executor serves jobs of one size
        nonlocal index
        folder = fresh_run_dir(root / scale / "launches", f"{stamp}_table{key}_{index:03d}")
        index += 1
        jobs = [dict(r.job, label=f"{slug_of(r)}") for r in chunk]
        _, submitted = launch_jobs(jobs, folder, cluster=cluster, gpus_per_node=gpus_per_node,
                                   cpus_per_task=cpus_per_task, timeout_min=timeout_min, partition=partition,
                                   slurm_args=slurm_args, echo=echo, manifest_extra={"table": key, "scale": scale})
        return submitted, jobs

    outcomes: dict[str, str] = {}
    if kind == "slurm" or not wait:  # the scheduler queues them (or nobody waits): everything now
        by_users: dict[int, list[Run]] = {}
        for r in todo:
            by_users.setdefault(r.job["users_per_node"], []).append(r)
        for group in by_users.values():
            submitted, jobs = submit(group)
            if wait:
                by_id = wait_for(submitted, jobs, echo=echo)
                outcomes.update({rec["out_dir"]: by_id[rec["job_id"]] for rec in jobs})
        return outcomes
    def start(run: Run) -> list:
        # A local queue can wait hours for its turn: another call may have finished or taken a run
        # since this one planned (its lock would refuse a second start, counted as a failure here).
        state, pid = ended(run.out_dir), live_local_run(run.out_dir)
        if state is None and pid is None:
            return list(zip(*submit([run])))
        why = f"{state} by another call" if state else f"running in pid {pid}, started by another call"
        echo(f"  {slug_of(run)}: not started, {why} since this one planned")
        return []
    return local_pool(todo, start, max_parallel, echo)


def slug_of(run: Run) -> str:
    from launch.common import slug
    c = run.cells[0]
    return slug(f"{c.row} {c.col if len(run.cells) == 1 else ''} seed {run.seed}")[:60]
