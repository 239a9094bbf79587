"""Plan one Slurm job for ``slurm/comigs.sh``: validate the config, choose the users per node,
the job's stable out_dir and the resume override, and print them as bash assignments.

    python -m launch.plan --job-id 123 --nodes 2 [--users-per-node 4] [--gpus-per-node 4] \
        [--cpus-per-task 16] [--resume resume=auto] -- [--config FILE] [key=value ...]

Runs once on the first node of the allocation, before torchrun, so a bad config ends the job at
once with the message in the job's log (exit 2) instead of after every node has started.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from comigs_dist.config import ConfigError, check_world_size, load_config
from comigs_dist.main import parse_args

from launch.common import job_out_dir, resume_args, users_per_node


def plan(job_id: str, n_nodes: int, job_argv: list[str], explicit_per_node: int | None = None,
         gpus_per_node: int = 0, cpus_per_task: int = 0, resume: str | None = None) -> dict:
    """Everything the sbatch script needs, as a dict (raises ConfigError on bad input)."""
    args = parse_args(job_argv)
    cfg = load_config(args.config, args.overrides)
    per_node = users_per_node(cfg, n_nodes, explicit_per_node, gpus_per_node)
    check_world_size(cfg, per_node * n_nodes)
    out_dir = job_out_dir(cfg, job_id).resolve()
    extra, note = resume_args(resume, cfg.checkpoint.every)
    main_args = ([] if args.config is None else ["--config", args.config]) + list(args.overrides)
    threads = cfg.train.threads
    if not threads and cpus_per_task:
        # the node's users share the CPUs Slurm gave its task; without this each would size its
        # thread pool by the whole machine's cores and they would oversubscribe them
        threads = max(1, cpus_per_task // per_node)
        main_args.append(f"train.threads={threads}")
    # last wins: the job's out_dir is pinned so that a requeued start finds the first one's checkpoints
    main_args += [f"out_dir={out_dir}"] + extra
    return {"USERS_PER_NODE": per_node, "WORLD_SIZE": per_node * n_nodes, "N_USERS": cfg.n_users,
            "OUT_DIR": str(out_dir),
            "METHOD": cfg.method, "THREADS": threads, "RESUME_NOTE": note, "MAIN_ARGS": main_args}


def to_bash(values: dict) -> str:
    lines = []
    for name, value in values.items():
        if isinstance(value, list):
            lines.append(f"{name}=(" + " ".join(shlex.quote(str(v)) for v in value) + ")")
        else:
            lines.append(f"{name}={shlex.quote(str(value))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, job_argv = argv[:split], argv[split + 1:]
    else:
        own, job_argv = argv, []
    parser = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--ranks-per-node", "--users-per-node", dest="users_per_node", type=int, default=None,
                        help="processes per node (default: n_users / nodes, or GPUs per node when users "
                             "outnumber them)")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--cpus-per-task", type=int, default=0, help="CPUs of each node's task (its users share them)")
    parser.add_argument("--resume", default=None, help="the resume override; '' turns resuming off")
    ns = parser.parse_args(own)
    try:
        values = plan(ns.job_id, ns.nodes, job_argv, ns.users_per_node, ns.gpus_per_node, ns.cpus_per_task, ns.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_bash(values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
