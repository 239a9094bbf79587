"""What the sbatch script and the submitit launcher share: the resume override, how users are
spread over nodes, and a stable output directory per job.

A requeued job must find the checkpoints of its first attempt, so its out_dir may not depend on
the clock (the default of ``comigs_dist.main``): it is derived from the Slurm job id or chosen at
submission time, and the resume override is passed on every start (a first start finds no
checkpoint and begins at round 0).
"""
from __future__ import annotations

import re
from pathlib import Path

from comigs_dist.config import ConfigError, RunConfig, describe_options, inferred_n_users

# The override that makes a run continue from the last full-state checkpoint under its out_dir,
# or start fresh when there is none. The one place to change it (sbatch: COMIGS_RESUME=...,
# submitit: --resume ...).
RESUME_OVERRIDE = "resume=auto"


def known_keys() -> set[str]:
    """Every dotted option of RunConfig."""
    return {key for key, _, _ in describe_options()}


def resume_args(override: str | None = None, checkpoint_every: int | None = None) -> tuple[list[str], str]:
    """The override that makes a restarted job resume, and a line that says what happens.

    It sets the option ``resume``, read as the run reads it (YAML: ``True`` is true): ``auto``
    continues a requeued job; ``false`` or an empty override turn resuming off (a requeued job then
    stops with an error rather than write over the first attempt). Anything else (another option,
    a misspelt key, ``resume=true``, which refuses the first start) is a ConfigError before any job
    starts. ``checkpoint_every`` (the job's checkpoint.every) 0: the note says that a requeued job
    starts over, since the run writes no round checkpoint to continue from.
    """
    override = RESUME_OVERRIDE if override is None else override.strip()
    off = ("resume: off (a requeued job stops with an error: its out_dir holds the first attempt's files, which a run "
           "with resume=false never writes over; pass resume=auto to let it continue)")
    if not override:
        return [], off
    if "=" not in override:
        raise ConfigError(f"resume override {override!r} must look like key=value (e.g. {RESUME_OVERRIDE})")
    key = override.split("=", 1)[0].strip()
    if key != "resume":
        what = f"sets {key}" if key in known_keys() else f"names {key!r}, which is no option of comigs_dist"
        raise ConfigError(f"the resume override ({override}) {what}, not how a requeued job resumes: it takes "
                          f"{RESUME_OVERRIDE} (the default), resume=false or an empty value (off)"
                          + (f"; pass {key} with the run's other overrides instead" if key in known_keys() else ""))
    from comigs_dist.config import load_config
    try:
        value = load_config(None, ["out_dir=runs/x", override]).resume  # as the run reads it (a job has out_dir)
    except ConfigError as exc:
        raise ConfigError(f"the resume override ({override}) is not a valid value of resume: {exc}") from None
    if value == "false":
        return [override], off
    if value == "true":
        raise ConfigError(f"the resume override ({override}) would refuse the job's first start, which has no run to "
                          f"continue yet; pass {RESUME_OVERRIDE}, which continues a requeued job and starts the "
                          f"first one fresh")
    if checkpoint_every == 0:
        return [override], (f"resume: {override}, but checkpoint.every=0 writes no round checkpoint, so a requeued "
                            f"job starts again from round 0; add checkpoint.every=K (e.g. 5) to continue from the "
                            f"last multiple of K")
    return [override], f"resume: {override} (a requeued job continues from its last checkpoint)"


def users_per_node(cfg: RunConfig, n_nodes: int, explicit: int | None = None, gpus_per_node: int = 0) -> int:
    """How many ranks (processes) each node runs; the job's world size is n_nodes times this, and
    the run's n_users users are spread evenly over all of its ranks (several per rank when n_users
    is larger).

    An explicit value wins; else one rank per GPU when there are more users than GPUs; else one
    user per rank (n_users spread evenly over the nodes); else one rank per GPU.
    """
    n_users = inferred_n_users(cfg)
    if n_nodes < 1:
        raise ConfigError(f"the job has {n_nodes} nodes; it needs at least 1")
    if explicit:
        if explicit < 1:
            raise ConfigError(f"ranks per node ({explicit}) must be >= 1")
        if n_users is not None and n_users < explicit * n_nodes:
            raise ConfigError(f"n_users ({n_users}) is smaller than nodes ({n_nodes}) x ranks per node ({explicit}): "
                              f"every rank simulates at least one user; lower the ranks per node or raise n_users")
        return explicit
    if n_users is not None and gpus_per_node > 0 and n_users > gpus_per_node * n_nodes:
        return gpus_per_node  # users share a rank (and its frozen base) rather than a GPU between processes
    if n_users is not None:
        if n_users % n_nodes:
            raise ConfigError(f"n_users ({n_users}) cannot be spread evenly over {n_nodes} nodes; use a number of "
                              f"nodes that divides it (e.g. --nodes=1), or set the ranks per node "
                              f"(COMIGS_RANKS_PER_NODE for sbatch, --ranks-per-node for submit)")
        return n_users // n_nodes
    if gpus_per_node > 0:
        return gpus_per_node
    raise ConfigError("cannot tell how many users each node runs: set n_users=N in the config or as an override, "
                      "or the ranks per node (COMIGS_RANKS_PER_NODE for sbatch, --ranks-per-node for submit)")


def slug(text: str) -> str:
    """A file-name-safe version of an override list such as 'method=local seed=42'."""
    text = re.sub(r"\s+", "_", text.strip())
    text = text.replace("=", "-")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "run"


def job_out_dir(cfg: RunConfig, job_id: str, root: str | Path = "runs") -> Path:
    """The config's out_dir when it sets one, else runs/slurm-<job id>_<method>_s<seed>."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(root) / f"slurm-{slug(job_id)}_{cfg.method}_s{cfg.seed}"
