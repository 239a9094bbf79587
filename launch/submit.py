"""Submit one job per combination of a sweep through submitit, to Slurm or to local processes.

    python -m launch.submit --config configs/debug.yaml [key=value ...] \
        --sweep seed=42,45,47 method=local,fedavg,comigs_1g1s [--nodes 1] [--gpus-per-node 4] [--wait]

Every job is one experiment: ``nodes x users-per-node`` Slurm tasks, one per user, each exporting
the distributed environment through submitit (``TorchDistributedEnvironment``) so that
``comigs_dist.main`` joins with ``init_process_group("env://")`` exactly as under torchrun or srun.
Every combination is validated before the first job is submitted. The sweep folder holds
``jobs.json`` (what was submitted, where each run writes), ``logs/`` (submitit's per-job logs)
and one run directory per combination; ``python -m launch.collect FOLDER`` gathers the table.

A job near its time limit or preempted is requeued by submitit (the callable is Checkpointable)
and resumes from the checkpoints under its fixed out_dir (see ``launch.common``).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import submitit

from comigs_dist import tables
from comigs_dist.checkpoint import fresh_run_dir
from comigs_dist.config import ConfigError, check_world_size, load_config
from comigs_dist.config.validation import local_model_problem
from comigs_dist.guard import STOPPED, read_stopped
from comigs_dist.main import parse_args

from launch.common import resume_args, slug, users_per_node

MANIFEST = "jobs.json"


class Experiment(submitit.helpers.Checkpointable):
    """One comigs_dist run as a submitit callable; every task of the job is one user.

    Checkpointable: when Slurm signals a timeout or preemption, submitit resubmits this same
    object, whose arguments already hold the fixed out_dir and the resume override.
    """

    def __init__(self, argv: list[str], out_dir: str):
        self.argv = list(argv)
        self.out_dir = out_dir

    def __call__(self) -> str:
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from Slurm's (or the local executor's)
        # task variables; dist.init_distributed then takes its env:// path. Device selection stays
        # with dist.py (LOCAL_RANK), as under torchrun.
        # A MASTER_PORT inherited from the submitting shell would give every job of a sweep the same
        # port, and two jobs sharing a node would collide; without it submitit derives the port
        # from the job id (the same on every task of the job).
        os.environ.pop("MASTER_PORT", None)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from comigs_dist.main import main
        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"python -m comigs_dist.main {' '.join(self.argv)} exited with code {code}; "
                               f"its message is above in this log")
        return str(Path(self.out_dir) / "results.json")


# --------------------------------------------------------------------------------------------
# planning (no submission): pure, testable without a cluster
# --------------------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """'a,b,[1,2]' -> ['a', 'b', '[1,2]']: commas inside brackets belong to a value."""
    values, depth, current = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
    values.append("".join(current))
    return [v.strip() for v in values]


def expand_sweep(sweep: list[str]) -> list[list[str]]:
    """['seed=1,2', 'method=a,b'] -> one override list per combination (the last key varies fastest)."""
    axes = []
    for item in sweep:
        if "=" not in item:
            raise ConfigError(f"--sweep item {item!r} must look like key=value1,value2 (e.g. seed=42,45,47)")
        key, values = item.split("=", 1)
        key = key.strip()
        parts = split_values(values)
        if not key or any(not v for v in parts):
            raise ConfigError(f"--sweep item {item!r} has an empty key or value; write key=value1,value2")
        if key in [a[0] for a in axes]:
            raise ConfigError(f"--sweep names {key!r} twice; give all its values in one item: {key}=a,b,c")
        axes.append((key, parts))
    return [[f"{k}={v}" for k, v in zip([a[0] for a in axes], combo)]
            for combo in itertools.product(*[a[1] for a in axes])] or [[]]


def plan_jobs(job_argv: list[str], sweep: list[str], folder: Path, nodes: int = 1,
              explicit_per_node: int | None = None, gpus_per_node: int = 0, cpus_per_task: int = 0,
              resume: str | None = None) -> tuple[list[dict], str]:
    """One dict per job (label, argv for comigs_dist.main, out_dir, users per node), every
    combination validated first; all problems are reported together."""
    base = parse_args(job_argv)
    extra_resume, note = resume_args(resume)
    jobs, errors, labels, without_checkpoints = [], [], set(), 0
    for combo in expand_sweep(sweep):
        label = slug(" ".join(combo)) if combo else "run"
        if label in labels:
            label = f"{label}_{len(jobs)}"
        labels.add(label)
        overrides = list(base.overrides) + combo
        try:
            cfg = load_config(base.config, overrides)
            if (problem := local_model_problem(cfg.model.name)) is not None:
                raise ConfigError(problem)
            per_node = users_per_node(cfg, nodes, explicit_per_node, gpus_per_node)
            check_world_size(cfg, per_node * nodes)
            without_checkpoints += cfg.checkpoint.every == 0
        except ConfigError as exc:
            errors.append(f"{' '.join(combo) or 'the run'}: {exc}")
            continue
        out_dir = (folder / label).resolve()
        argv = ([] if base.config is None else ["--config", base.config]) + overrides
        if not cfg.train.threads:
            # one task per user: its threads are its task's CPUs (Slurm's default is 1), not the
            # whole machine's cores, which the users of a node would oversubscribe
            argv.append(f"train.threads={max(1, cpus_per_task or 1)}")
        argv += [f"out_dir={out_dir}"] + extra_resume
        jobs.append({"label": label, "sweep": combo, "argv": argv, "out_dir": str(out_dir),
                     "users_per_node": per_node, "method": cfg.method, "seed": cfg.seed})
    if errors:
        raise ConfigError("nothing was submitted; fix these first:\n  - " + "\n  - ".join(errors))
    if len({j["users_per_node"] for j in jobs}) > 1:
        raise ConfigError("the sweep's combinations need different numbers of users per node "
                          f"({sorted({j['users_per_node'] for j in jobs})}); sweep n_users in separate submissions")
    if without_checkpoints:  # the same override; the note says that such a job starts over
        note = resume_args(resume, 0)[1]
        if without_checkpoints < len(jobs):
            note += f" (the {without_checkpoints} of {len(jobs)} jobs with checkpoint.every=0)"
    return jobs, note


# --------------------------------------------------------------------------------------------
# submission and waiting
# --------------------------------------------------------------------------------------------

def make_executor(folder: Path, cluster: str, *, nodes: int, tasks_per_node: int, gpus_per_node: int,
                  cpus_per_task: int, timeout_min: int, partition: str | None, slurm_args: dict):
    executor = submitit.AutoExecutor(folder=folder / "logs", cluster=None if cluster == "auto" else cluster)
    params = {"nodes": nodes, "tasks_per_node": tasks_per_node, "timeout_min": timeout_min}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if executor.cluster == "slurm":
        # a user that fails ends the job's other users at once instead of leaving them in a collective
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if partition:
            params["slurm_partition"] = partition
        if slurm_args:
            params["slurm_additional_parameters"] = slurm_args
    executor.update_parameters(**params)
    return executor


def job_for(record: dict, folder: Path, cluster: str, n_tasks: int):
    """A submitit Job object for a job listed in a manifest (to poll it later)."""
    tasks = tuple(range(n_tasks))
    if cluster == "slurm":
        return submitit.SlurmJob(folder / "logs", record["job_id"], tasks=tasks)
    return submitit.LocalJob(folder / "logs", record["job_id"], tasks=tasks)


def failure_reason(message: str) -> str:
    """The last line of the traceback in submitit's FailedJobError message (the exception itself)."""
    parts = message.split("----------------------")
    body = parts[1] if len(parts) >= 3 else message
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message.strip()


def wait_for(jobs: list, records: list[dict], poll_s: float = 1.0, force_every_s: float = 5.0,
             echo=lambda line: print(line, flush=True), first: bool = False) -> dict[str, str]:
    """Wait until every job ends (``first``: until at least one has); print each outcome as it
    arrives. Returns job id -> outcome of the ended jobs ('COMPLETED', 'DIVERGED' when
    guard.nan=stop ended it and left its stopped.json, an outcome rather than a failure, or
    'FAILED: ...'). A job that dies without a result is noticed through the scheduler's accounting
    (forced every few seconds), so a failure is never waited on forever."""
    outcomes: dict[str, str] = {}
    last_force = 0.0
    while len(outcomes) < len(jobs):
        force = time.monotonic() - last_force >= force_every_s
        if force:
            last_force = time.monotonic()
        for job, rec in zip(jobs, records):
            if rec["job_id"] in outcomes or not job.done(force_check=force):
                continue
            exc = job.exception()
            results = Path(rec["out_dir"]) / "results.json"
            if exc is None and results.is_file():
                ppl = json.loads(results.read_text()).get("mean_test_ppl")
                outcomes[rec["job_id"]] = "COMPLETED"
                echo(f"job {rec['job_id']} {rec['label']}: COMPLETED, mean test ppl {ppl:.3f}, {results}")
                continue
            if (stop := read_stopped(rec["out_dir"])) is not None:
                outcomes[rec["job_id"]] = "DIVERGED"
                echo(f"job {rec['job_id']} {rec['label']}: DIVERGED: guard.nan=stop found a non-finite value (user "
                     f"{stop.get('user')}, round {stop.get('round')}): {Path(rec['out_dir']) / STOPPED}")
                continue
            if isinstance(exc, submitit.core.utils.FailedJobError):
                why = failure_reason(str(exc))
            elif exc is not None:  # ended without a result: killed, out of memory, time limit, node failure
                why = f"ended without a result (scheduler state {job.state})"
            else:
                why = f"finished but wrote no {results}"
            outcomes[rec["job_id"]] = f"FAILED: {why}"
            echo(f"job {rec['job_id']} {rec['label']}: FAILED: {why}\n"
                 f"    log: {job.paths.stdout} and {job.paths.stderr}")
        if first and outcomes:
            break
        if len(outcomes) < len(jobs):
            time.sleep(poll_s)
    return outcomes


STOP_WAIT_S = 30.0


def stop_local_jobs(running: list, echo, wait_s: float = STOP_WAIT_S) -> None:
    """The launcher was interrupted (Ctrl-C) or terminated: stop the local runs it started, which
    would otherwise go on without it (submitit's local jobs outlive their launcher and ignore
    SIGTERM) and hold their out_dirs' locks against the next call. Each gets SIGINT, then SIGKILL;
    a run resumes from its last round checkpoint when the command runs again."""
    running = [(job, rec) for job, rec in running if not job.done()]
    for job, _ in running:
        job.cancel(check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(job.done() for job, _ in running):
        time.sleep(0.2)
    left = [rec["out_dir"] for job, rec in running if not job.done()]
    echo(f"interrupted: stopped {len(running) - len(left)} running run(s); the same command resumes them from their "
         f"last round checkpoints" + (f" ({len(left)} still ending: {', '.join(left)})" if left else ""))


@contextlib.contextmanager
def stopping_local_jobs(running, echo):
    """While local runs are waited on: SIGTERM (kill, a batch system ending the launcher) raises
    KeyboardInterrupt as Ctrl-C does, and an interruption stops the runs ``running()`` returns
    (stop_local_jobs) before it goes on to the caller."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def raise_interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        if jobs := running():
            stop_local_jobs(jobs, echo)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interruptible_children():
    """Local jobs are stopped with SIGINT (submitit's LocalJob.cancel), which a launcher started in
    the background by a shell (``nohup ... &``, a queue script) ignores, and an ignored signal stays
    ignored in every process it starts: its jobs could then not be stopped. While the jobs start,
    SIGINT has a do-nothing handler instead, which the launcher keeps ignoring in effect but which
    its children do not inherit (they start with SIGINT at its default, KeyboardInterrupt)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class Launch:
    """One launch folder: its executor (logs in ``folder/logs``) and its manifest
    (``folder/jobs.json``, every planned job; a job gets its ``job_id`` and ``log`` when it starts,
    at once or later in a local pool, and the manifest is rewritten each time)."""

    def __init__(self, jobs: list[dict], folder: Path, *, cluster: str = "auto", nodes: int = 1,
                 gpus_per_node: int = 0, cpus_per_task: int = 0, timeout_min: int = 240, partition: str | None = None,
                 slurm_args: dict | None = None, manifest_extra: dict | None = None):
        per_node = jobs[0]["users_per_node"]  # every job the same users per node
        folder.mkdir(parents=True, exist_ok=True)  # the caller claimed it (fresh_run_dir), or nobody has
        if any(folder.iterdir()):
            raise ConfigError(f"launch folder {folder} is not empty: it holds another launch; nothing was submitted")
        self.folder = folder
        self.executor = make_executor(folder, cluster, nodes=nodes, tasks_per_node=per_node,
                                      gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                                      timeout_min=timeout_min, partition=partition, slurm_args=slurm_args or {})
        self.manifest = {"created": folder.name, "cluster": self.executor.cluster, "nodes": nodes,
                         "users_per_node": per_node, "n_tasks": nodes * per_node, **(manifest_extra or {}),
                         "jobs": jobs}
        self.write()

    def write(self) -> None:
        (self.folder / MANIFEST).write_text(json.dumps(self.manifest, indent=1))

    def start(self, rec: dict, save: bool = True):
        """Submit one of the manifest's jobs and (``save``) rewrite the manifest; returns its submitit job."""
        self.executor.update_parameters(name=f"comigs_{rec['label']}"[:64])
        with interruptible_children():
            job = self.executor.submit(Experiment(rec["argv"], rec["out_dir"]))
        rec["job_id"] = str(job.job_id)
        rec["log"] = str(job.paths.stdout)
        if save:
            self.write()
        return job


def launch_jobs(jobs: list[dict], folder: Path, *, cluster: str = "auto", nodes: int = 1, gpus_per_node: int = 0,
                cpus_per_task: int = 0, timeout_min: int = 240, partition: str | None = None,
                slurm_args: dict | None = None, manifest_extra: dict | None = None, echo=None) -> tuple[dict, list]:
    """Submit planned jobs (``plan_jobs``; every job the same users per node) at once through one
    ``Launch``. Returns (manifest, submitit jobs)."""
    echo = echo or (lambda line: print(line, flush=True))
    launch = Launch(jobs, folder, cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node,
                    cpus_per_task=cpus_per_task, timeout_min=timeout_min, partition=partition,
                    slurm_args=slurm_args, manifest_extra=manifest_extra)
    submitted = [launch.start(rec, save=False) for rec in jobs]
    launch.write()  # once, with every job's id
    m = launch.manifest
    echo(f"submitted {len(jobs)} job(s) to {m['cluster']}: {nodes} node(s) x {m['users_per_node']} users each")
    for line in tables.format_table(None, [(f"job {rec['job_id']}", rec["label"], f"-> {rec['out_dir']}/results.json")
                                           for rec in jobs], "<<<", indent="  ").splitlines():
        echo(line)
    return m, submitted


def local_pool(queue: list, start, max_parallel: int, echo) -> dict[str, str]:
    """Local jobs ``max_parallel`` at a time, the next starting as soon as one ends (nothing else
    queues local jobs; runs of unequal length in batches would leave cores idle). ``start(item)``
    starts one item's jobs and returns their (submitit job, record) pairs. An interruption stops
    the running ones (stopping_local_jobs). Returns out_dir -> outcome (``wait_for``)."""
    queue, running, outcomes = list(queue), [], {}
    with stopping_local_jobs(lambda: running, echo):
        while queue or running:
            while queue and len(running) < max(1, max_parallel):
                running += start(queue.pop(0))
            by_id = wait_for([j for j, _ in running], [rec for _, rec in running], echo=echo, first=True)
            outcomes.update({rec["out_dir"]: by_id[rec["job_id"]] for _, rec in running if rec["job_id"] in by_id})
            running = [(j, rec) for j, rec in running if rec["job_id"] not in by_id]
    return outcomes


def submit(job_argv: list[str], sweep: list[str], *, root: Path = Path("runs/sweeps"), name: str | None = None,
           cluster: str = "auto", nodes: int = 1, users_per_node_: int | None = None, gpus_per_node: int = 0,
           cpus_per_task: int = 0, timeout_min: int = 240, partition: str | None = None,
           slurm_args: dict | None = None, resume: str | None = None, wait: bool = False, max_parallel: int = 0,
           echo=None) -> dict:
    """Validate every combination, submit one job each, write the manifest; optionally wait. With
    the local executor and ``wait``, at most ``max_parallel`` jobs run at once (0: as many as the
    CPUs hold, one process per CPU), the next starting as one ends."""
    echo = echo or (lambda line: print(line, flush=True))
    base = parse_args(job_argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # claimed with an atomic mkdir (-2, -3, ...): two sweeps of one name started in the same second
    folder = fresh_run_dir(Path(root), f"{stamp}_{name or (Path(base.config).stem if base.config else 'default')}")
    folder = folder.resolve()
    try:
        jobs, note = plan_jobs(job_argv, sweep, folder, nodes, users_per_node_, gpus_per_node, cpus_per_task, resume)
    except ConfigError:
        folder.rmdir()  # nothing was submitted: no empty launch folder left behind
        raise
    extra = {"created": stamp, "job_argv": list(job_argv), "sweep": list(sweep)}
    from submitit import AutoExecutor

    from comigs_dist.dist import usable_cpus
    per_job = jobs[0]["users_per_node"] * nodes
    limit = max_parallel or max(1, usable_cpus() // per_job)
    if wait and len(jobs) > limit and (AutoExecutor.which() if cluster == "auto" else cluster) == "local":
        launch = Launch(jobs, folder, cluster="local", nodes=nodes, gpus_per_node=gpus_per_node,
                        cpus_per_task=cpus_per_task, timeout_min=timeout_min, manifest_extra=extra)
        return _pooled(jobs, folder, limit, nodes, echo, launch)
    manifest, submitted = launch_jobs(jobs, folder, cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node,
                                      cpus_per_task=cpus_per_task, timeout_min=timeout_min, partition=partition,
                                      slurm_args=slurm_args, echo=echo, manifest_extra=extra)
    if manifest["cluster"] == "local":
        from comigs_dist.dist import usable_cpus
        processes, cpus = per_job * len(jobs), usable_cpus()
        if processes > cpus:  # without --wait nobody starts the next job: they all start now
            echo(f"warning: the local executor starts all {len(jobs)} job(s) at once, {processes} processes on "
                 f"{cpus} CPU(s): they share the cores, so their timings (wall_seconds, tokens_per_second) mean "
                 f"little; with --wait they run --max-parallel at a time")
    else:
        echo(f"{note}")  # how a requeued job resumes: a scheduler's matter
    echo(f"logs:    {folder / 'logs'}/<job id>_<task>_log.out (.err)")
    echo(f"collect: python -m launch.collect {folder}")
    manifest["folder"] = str(folder)
    if wait:
        # Slurm's jobs are the scheduler's: they go on (scancel)
        with stopping_local_jobs(lambda: list(zip(submitted, jobs)) if manifest["cluster"] == "local" else [], echo):
            manifest["outcomes"] = wait_for(submitted, jobs, echo=echo)
    return manifest


def _pooled(jobs: list[dict], folder: Path, limit: int, nodes: int, echo, launch: "Launch") -> dict:
    """submit's local jobs ``limit`` at a time (local_pool); the manifest lists every job from the
    start and gains each job's id as it starts. Returns the manifest with the outcomes."""
    echo(f"{len(jobs)} job(s) on local, {limit} at a time: {nodes} node(s) x {jobs[0]['users_per_node']} users each")
    echo(f"logs:    {folder / 'logs'}/<job id>_<task>_log.out (.err)")
    echo(f"collect: python -m launch.collect {folder}")

    def start(rec: dict) -> list:
        job = launch.start(rec)
        echo(f"  job {rec['job_id']}  {rec['label']}  -> {rec['out_dir']}/results.json")
        return [(job, rec)]
    outcomes = local_pool(jobs, start, limit, echo)
    manifest = launch.manifest
    manifest["folder"] = str(folder)
    manifest["outcomes"] = {rec["job_id"]: outcomes[rec["out_dir"]] for rec in jobs if rec["out_dir"] in outcomes}
    return manifest


def _slurm_kv(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--slurm {item!r} must look like option=value (e.g. account=myproj, qos=high)")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="the experiment's YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value options shared by every job")
    parser.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="one job per combination; commas inside [...] belong to a value")
    parser.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                        help="slurm, local processes (debugging), or auto: slurm when sbatch is on PATH")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ranks-per-node", "--users-per-node", dest="users_per_node", type=int, default=None,
                        help="processes per node; n_users are spread over all ranks (default: n_users / nodes, or "
                             "--gpus-per-node when users outnumber the GPUs)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request per node (default none)")
    parser.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per user (default: the cluster's, 1)")
    parser.add_argument("--time", type=int, default=240, help="time limit of each job, minutes")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--slurm", nargs="+", default=[], metavar="OPTION=VALUE",
                        help="more sbatch options, e.g. account=myproj qos=high")
    parser.add_argument("--resume", default=None,
                        help="the override that resumes a requeued job (default resume=auto; '' turns it off)")
    parser.add_argument("--root", default="runs/sweeps", help="sweep folders are created under this directory")
    parser.add_argument("--name", default=None, help="the sweep folder's name (default: the config's stem)")
    parser.add_argument("--wait", action="store_true", help="wait for every job; exit 1 if any failed")
    parser.add_argument("--max-parallel", type=int, default=0,
                        help="--executor local with --wait: at most this many jobs at once, the next starting as one "
                             "ends (default 0: as many as the CPUs hold at one process per CPU)")
    ns = parser.parse_args(argv)
    if ns.max_parallel < 0:
        print(f"error: --max-parallel ({ns.max_parallel}) must be >= 0 (0: as many as the CPUs hold)", file=sys.stderr)
        return 2
    job_argv = ([] if ns.config is None else ["--config", ns.config]) + ns.overrides
    try:
        manifest = submit(job_argv, ns.sweep, root=Path(ns.root), name=ns.name, cluster=ns.executor, nodes=ns.nodes,
                          users_per_node_=ns.users_per_node, gpus_per_node=ns.gpus_per_node,
                          cpus_per_task=ns.cpus_per_task, timeout_min=ns.time, partition=ns.partition,
                          slurm_args=_slurm_kv(ns.slurm), resume=ns.resume, wait=ns.wait,
                          max_parallel=ns.max_parallel)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while waiting: local runs were stopped and said so
        return 130
    if ns.wait:
        failed = [k for k, v in manifest["outcomes"].items() if v not in ("COMPLETED", "DIVERGED")]
        diverged = sum(v == "DIVERGED" for v in manifest["outcomes"].values())
        print(f"{len(manifest['outcomes']) - len(failed) - diverged} completed, "
              + (f"{diverged} diverged, " if diverged else "") + f"{len(failed)} failed"
              + (f"; collect: python -m launch.collect {manifest['folder']}"
                 if len(failed) < len(manifest['outcomes']) else ""))
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
