"""The launcher's environment and the host's processes: the only reader of ``os.environ``.

Owns what torchrun, srun and submitit announce (world size, rank, restarts, the job's name), the
export of the same variables for the ranks ``forkrun`` forks, the CPUs a process may use, a free
port, and whether a process still runs. Knows nothing of process groups.
"""
from __future__ import annotations

import os
import socket


def env_world_size() -> int:
    """World size the launcher announced (1 when started as a plain python process)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_local_world_size(default: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(default)))


def env_get(name: str, default: str | None = None) -> str | None:
    """Read one environment variable (kept here so that only this module touches os.environ)."""
    return os.environ.get(name, default)


def has_rendezvous() -> bool:
    """Whether a launcher set up a rendezvous (torchrun, srun with MASTER_ADDR, submitit)."""
    return "MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def agent_store_address() -> tuple[str, int] | None:
    """(host, port) of torchrun's agent store when the workers share it, else None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return None


def agent_store_value(key: str, value: str | None = None, timeout_s: float = 60.0) -> str | None:
    """Under torchrun, its agent store outlives the workers, so one attempt can leave a value there
    for the next: with ``value``, set ``key``; without, return the value an earlier attempt set
    (None if none did). None and nothing set when there is no agent store (not under torchrun)."""
    address = agent_store_address()
    if address is None:
        return None
    import datetime

    import torch.distributed as tdist
    store = tdist.TCPStore(address[0], address[1], is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    key = f"comigs/kept/{key}"
    if value is not None:
        store.set(key, value)
        return value
    return store.get(key).decode() if store.check([key]) else None


def restart_count() -> int:
    """How often the launcher has restarted this job: torchrun's restarts (``--max-restarts``) or
    Slurm's requeues, whichever is larger; 0 on a first attempt."""
    counts = [os.environ.get("TORCHELASTIC_RESTART_COUNT", ""), os.environ.get("SLURM_RESTART_COUNT", "")]
    return max((int(c) for c in counts if c.strip().isdigit()), default=0)


def job_tag() -> str | None:
    """A name for this job that survives restarts and requeues: the Slurm job id, else torchrun's
    run id (``--rdzv-id``, a fresh uuid per ``torchrun --standalone``); None for other launches."""
    slurm = os.environ.get("SLURM_JOB_ID", "").strip()
    if slurm:
        return f"slurm-{slurm}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    if run_id and run_id.lower() != "none":
        return f"torchrun-{run_id}"
    return None


def export_rank_env(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1") -> None:
    """Give this process the variables torchrun gives rank ``rank`` of a one-host job of
    ``world_size`` ranks, so that ``init_distributed`` joins the group the same way (used by
    ``comigs_dist.forkrun`` in each child it forks, before the child calls ``main``)."""
    for key in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        del os.environ[key]  # no torchrun agent (and its store) stands behind this process
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
                       "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for several ranks per host


def export_slurm_env() -> None:
    """Under `srun python -m comigs_dist.main` (one task per rank), map Slurm's variables onto
    the ones `init_process_group("env://")` reads. torchrun and submitit set them already."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_PORT", "29500")


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm or cgroup allocation, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def free_port() -> int:
    """A TCP port on this host that was free a moment ago (the rendezvous of a one-host job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not; another user's does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child its parent has not reaped yet still answers kill(0): a zombie
        stat = open(f"/proc/{pid}/stat").read()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
