"""Process groups and every collective that moves parameters between users.

Owns: reading the launcher's environment (torchrun, srun, submitit), choosing the backend
(NCCL when every rank has a GPU, gloo otherwise), the Topology (rank <-> user, every subgroup,
built once in a fixed order and looked up by name), the shape handshake that precedes the first
collective of a group, flattening a set of tensors into one buffer so a round costs one
collective per group, counting the bytes each user sends and receives, and explaining a failed
collective (which user died or hung) instead of surfacing a bare backend error.
Knows nothing of models or methods: it moves lists of tensors.

Bytes are counted as *delivered payload*, per user, in ``comm.dtype`` (what a deployment sends;
the contributor count of guard.nan=skip, one element, included), whatever algorithm the backend
uses underneath. With S the bytes of a group's flattened buffer and N its members, one mean costs
  server   S sent (the upload) and S received (the mean, downloaded once): a trusted server;
  all2all  N*S sent (the buffer delivered to each of the N members, the sender's own copy
           included, as all_gather materialises it) and N*S received (the N buffers): section
           3.3's "N times the bytes". Between distinct peers that is (N - 1)*S each way.
``round_bytes`` is that formula; ``analyze overhead`` and results.json use it for the analytic
figure. The round-0 broadcast (one common start) is set-up and not counted.

Means are exact by default (``comm.exact``): what travelled (fp32 or bf16) is summed in float64,
and a float64 sum of N float32 (bf16) values is exact, so independent of the order the backend
adds them in, whenever the nonzero values of one element span less than a factor 2^(29 - log2 N)
(2^(45 - log2 N) for bf16). Server (a float64 all_reduce, ring order) and all2all (the gathered
payloads added in member order) then give the same float64 sum and so bit-identical parameters:
round_fp32(sum / N). Beyond that span the two can differ only where the sum lies within one
float64 rounding of an fp32 rounding boundary. The server all_reduce then carries float64 on the
backend (2x the fp32 payload); the counted bytes stay what a deployment would send, the payload
in comm.dtype (a real server adds the received payloads in float64 itself). ``comm.exact=false``
reduces in the wire dtype instead (NCCL and gloo ring orders, bf16 partial sums for bf16).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("server", "all2all")


def payload_bytes(numel: int, dtype: str) -> int:
    """Bytes of ``numel`` elements in the wire dtype (comm.dtype)."""
    return numel * _DTYPES[dtype].itemsize


def round_bytes(payload: int, mode: str, n_members: int) -> tuple[int, int]:
    """(sent, received) bytes one user is counted for one mean of a ``payload``-byte buffer over a
    group of ``n_members`` (the definition in the module docstring)."""
    if mode == "server":
        return payload, payload
    if mode == "all2all":
        return payload * n_members, payload * n_members
    raise ValueError(f"comm.mode ({mode!r}) must be 'server' or 'all2all'")


# --------------------------------------------------------------------------------------------
# environment (the only place that reads os.environ)
# --------------------------------------------------------------------------------------------

def env_world_size() -> int:
    """World size the launcher announced (1 when started as a plain python process)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def env_get(name: str, default: str | None = None) -> str | None:
    """Read one environment variable (kept here so that only this module touches os.environ)."""
    return os.environ.get(name, default)


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


def _export_slurm_env() -> None:
    """Under `srun python -m comigs_dist.main` (one task per user), map Slurm's variables onto
    the ones `init_process_group("env://")` reads. torchrun and submitit set them already."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_PORT", "29500")


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------

@dataclass
class CommStats:
    """What one user moved, in bytes of the dtype that travels, and how long it waited."""
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    seconds: float = 0.0
    by_group: dict = field(default_factory=dict)

    def add(self, group: str, sent: int, received: int, seconds: float) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.collectives += 1
        self.seconds += seconds
        g = self.by_group.setdefault(group, {"bytes_sent": 0, "bytes_received": 0, "collectives": 0})
        g["bytes_sent"] += sent
        g["bytes_received"] += received
        g["collectives"] += 1


# --------------------------------------------------------------------------------------------
# topology
# --------------------------------------------------------------------------------------------

@dataclass
class Topology:
    """Who is who, on which device, and every process group of the run (built once)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float
    groups: dict[str, tuple[object, tuple[int, ...]]] = field(default_factory=dict)
    stats: CommStats = field(default_factory=CommStats)
    _checked: set = field(default_factory=set)
    _scratch: dict = field(default_factory=dict)  # reused flat buffers of the collectives, by (group, dtype, numel)

    def scratch(self, group_name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of this group, dtype and size kept between rounds, so that a round's
        collective allocates (and page-faults) nothing; its contents are garbage on return."""
        key = (group_name, dtype, numel)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf

    @property
    def user_idx(self) -> int:
        """One rank simulates one user: user index == global rank."""
        return self.rank

    def build_groups(self, members: dict[str, Sequence[int]]) -> None:
        """Create every subgroup on every rank in one fixed (sorted) order; call once."""
        if self.groups:
            raise RuntimeError("Topology.build_groups() was already called")
        for name in sorted(members):
            ranks = tuple(sorted(set(int(r) for r in members[name])))
            bad = [r for r in ranks if not 0 <= r < self.world_size]
            if bad:
                raise ValueError(f"group {name!r} names ranks {bad} outside 0..{self.world_size - 1}")
            if ranks == tuple(range(self.world_size)):
                pg = dist.group.WORLD
            else:
                # every rank must call new_group for every group, members or not
                pg = dist.new_group(ranks=list(ranks), timeout=datetime.timedelta(seconds=self.timeout_s))
            self.groups[name] = (pg, ranks)

    def group(self, name: str):
        if name not in self.groups:
            raise ValueError(f"unknown process group {name!r}; known groups: {', '.join(sorted(self.groups)) or '(none)'}")
        return self.groups[name][0]

    def members(self, name: str) -> tuple[int, ...]:
        self.group(name)
        return self.groups[name][1]

    def in_group(self, name: str) -> bool:
        return self.rank in self.members(name)


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


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0,
                     threads: int = 0) -> Topology:
    """Join the process group the launcher set up (or a group of one for a plain python run)."""
    _export_slurm_env()
    world_size = env_world_size()
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but CUDA is not available on this host; use model.device=auto")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError("comm.backend=nccl needs a GPU on every rank; use comm.backend=auto or gloo")

    if dev.type == "cpu":
        n_threads = threads or max(1, usable_cpus() // max(1, local_world_size))
        torch.set_num_threads(n_threads)

    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ:
            # torchrun shares its rendezvous store with the workers, so the keys a failed attempt
            # left there (gloo's addresses) would be read by the next attempt, which then cannot
            # connect (pytorch/pytorch#135712): each attempt gets a namespace of its own
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"comigs/attempt_{restart_count()}", store)
            dist.init_process_group(backend=backend, store=store, timeout=timeout, rank=rank, world_size=world_size)
        elif "MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                    rank=rank, world_size=world_size)
        else:  # a plain `python -m comigs_dist.main`: a group of one
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    timeout=timeout, rank=0, world_size=1)
    topo = Topology(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    local_world_size=local_world_size, device=dev, backend=backend, timeout_s=timeout_s)
    _record_peers(topo)
    return topo


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------

def _shape_list(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple, str]]:
    return [(n, tuple(t.shape), str(t.dtype)) for n, t in named]


def _shape_problems(members: Sequence[int], lists: Sequence[list]) -> list[str]:
    """What differs between the members' (name, shape, dtype) lists, against the first member's."""
    ref_user, ref = members[0], lists[0]
    problems = []
    for user, theirs in zip(members, lists):
        if theirs == ref:
            continue
        ref_map = {n: (s, d) for n, s, d in ref}
        their_map = {n: (s, d) for n, s, d in theirs}
        found = []
        for n in sorted(set(ref_map) | set(their_map)):
            a, b = ref_map.get(n), their_map.get(n)
            if a is None:
                found.append(f"user {user} shares {n} {b[0]} which user {ref_user} does not hold")
            elif b is None:
                found.append(f"user {user} lacks {n}, which user {ref_user} shares with shape {a[0]}")
            elif a != b:
                found.append(f"user {user} holds {n} with shape {b[0]} ({b[1]}) but user {ref_user} "
                             f"holds {a[0]} ({a[1]})")
        problems += found or [f"user {user} lists its shared parameters in another order than user {ref_user}"]
    return problems


def _raise_shape_problems(by_group: dict[str, list[str]]) -> None:
    if not by_group:
        return
    parts = []
    for group, problems in by_group.items():
        parts.append(f"shared parameters of group {group!r} differ between users, so they cannot be averaged: "
                     + "; ".join(problems[:8]) + ("" if len(problems) <= 8 else f"; ... ({len(problems)} differences)"))
    raise ValueError(". ".join(parts) + ". Give these users the same shapes for their shared experts (moe.*, lora.*).")


def check_shapes(topo: Topology, group_name: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Handshake before the first collective of a group: every member must hold the same
    parameter names, shapes and dtypes, else a ValueError names the user and the parameter."""
    if not topo.in_group(group_name):
        return
    members = topo.members(group_name)
    gathered: list = [None] * len(members)
    with _collective("the shape handshake", group_name):
        dist.all_gather_object(gathered, _shape_list(named), group=topo.group(group_name))
    problems = _shape_problems(members, gathered)
    _raise_shape_problems({group_name: problems} if problems else {})
    topo._checked.add(group_name)


def check_group_shapes(topo: Topology, shared: dict[str, Sequence[tuple[str, torch.Tensor]]]) -> None:
    """The handshake of every group at once, before any of them communicates: one gather over all
    ranks, every group checked by every rank, so every rank raises the same ValueError (naming the
    group, user and parameter), a member of a sound group included: no rank is left waiting in a
    collective that a failed member never joins. ``shared``: this rank's tensors per group."""
    mine = {g: _shape_list(shared.get(g, [])) for g in topo.groups if topo.in_group(g)}
    everyone = all_gather_objects(mine) if topo.world_size > 1 else [mine]
    problems = {}
    for group in sorted(topo.groups):
        members = topo.members(group)
        found = _shape_problems(members, [everyone[u].get(group, []) for u in members])
        if found:
            problems[group] = found
    _raise_shape_problems(problems)
    topo._checked.update(topo.groups)


def _flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    parts = [t.detach().reshape(-1).to(dtype) for t in tensors]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


@torch.no_grad()
def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor], divisor: int = 1) -> None:
    """Write ``flat / divisor`` back into the tensors: one pass, one rounding to each tensor's dtype."""
    offset = 0
    for t in tensors:
        n = t.numel()
        src = flat[offset:offset + n].view_as(t)
        if divisor == 1:
            t.copy_(src)
        else:
            torch.div(src, divisor, out=t)
        offset += n


@torch.no_grad()
def pack_flat(tensors: Sequence[torch.Tensor]) -> bool:
    """Move the tensors into one new contiguous buffer, each becoming the view of its own slice
    (``.data`` swapped, values and identities unchanged), so that ``sync_mean`` reduces that buffer
    itself: nothing to flatten before the collective, nothing to write back after it. Tensors of
    mixed dtypes or devices are left as they are (False)."""
    if not tensors or any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
        return False
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        view = flat[offset:offset + t.numel()].view_as(t)
        view.copy_(t)
        t.data = view
        offset += t.numel()
    return True


def _packed(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat buffer that ``tensors`` are consecutive contiguous views of, in order (as
    ``pack_flat`` leaves them), or None."""
    first = tensors[0]
    ptr, start = first.untyped_storage().data_ptr(), first.storage_offset()
    offset = start
    for t in tensors:
        if (t.untyped_storage().data_ptr() != ptr or t.dtype != first.dtype or t.storage_offset() != offset
                or not t.is_contiguous()):
            return None
        offset += t.numel()
    return first.new_empty(0).set_(first.untyped_storage(), start, (offset - start,))


@torch.no_grad()
def sync_mean(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor], mode: str = "server",
              dtype: str = "fp32", count: bool = False, contribute: bool = True, exact: bool = True) -> int:
    """Replace each tensor, on every member of the group, by its mean over the members.

    One collective for the whole list. 'server' = all_reduce(SUM) then divide (what a trusted
    server does); 'all2all' = every member gathers everyone's buffer and averages it itself
    (serverless, N times the traffic). ``exact``: the sum runs in float64 over the values as they
    travelled (comm.dtype), so both modes give bit-identical results (module docstring).
    Returns the payload size in bytes. Ranks outside the group return at once and keep their tensors.

    ``count=True`` (every member must pass the same) appends one element to the buffer: 1 from a
    member that contributes, 0 from one that sits this collective out (``contribute=False``, its
    payload zeroed, so a non-finite value never travels). The mean is then over the contributors
    only and a member that sat out receives their average, still in one collective.
    """
    if mode not in MODES:
        raise ValueError(f"comm.mode ({mode!r}) must be 'server' or 'all2all'")
    if not topo.in_group(group_name) or not tensors:
        return 0
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    pg = topo.group(group_name)
    n = len(topo.members(group_name))
    wire = _DTYPES[dtype]
    if count and wire == torch.bfloat16 and n > 256 and mode == "server" and not exact:
        raise ValueError(f"group {group_name!r} has {n} members: a contributor count above 256 is not exact in "
                         f"bf16; use comm.dtype=fp32 or comm.exact=true with guard.nan=skip")
    start = time.perf_counter()
    numel = sum(t.numel() for t in tensors)
    # the payload, what a deployment would send: the parameters' own buffer where they are packed
    # in the wire dtype (pack_flat; the contributor count needs a copy), else a flat copy
    flat = _packed(tensors) if not count and tensors[0].dtype == wire else None
    in_place = flat is not None
    if not in_place:
        flat = topo.scratch(group_name, numel + int(count), wire)
        _flatten(tensors, wire, out=flat[:numel])
    if count:
        if not contribute:
            flat.zero_()
        flat[numel] = 1.0 if contribute else 0.0
    size = flat.numel() * flat.element_size()
    acc = torch.float64 if exact else torch.float32
    if mode == "server":
        # float64 on the backend: its ring adds in an order of its own, which an exact sum ignores
        if exact:
            buf = topo.scratch(group_name, flat.numel(), torch.float64)
            buf.copy_(flat)
        else:
            buf = flat
        with _collective("all_reduce", group_name):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg)
        total = buf if buf.dtype == acc else buf.to(acc)
    else:
        parts = [torch.empty_like(flat) for _ in range(n)]
        with _collective("all_gather", group_name):
            dist.all_gather(parts, flat, group=pg)
        total = torch.zeros(flat.numel(), dtype=acc, device=flat.device)
        for p in parts:  # fixed member order: every rank computes the same sum
            total.add_(p.to(acc))
    sent, received = round_bytes(size, mode, n)
    divisor = n
    if count:
        divisor = int(round(float(total[-1])))
        total = total[:-1]
        if divisor == 0:
            raise FloatingPointError(f"every member of group {group_name!r} ({', '.join(map(str, topo.members(group_name)))}) "
                                     f"sat this round out with non-finite shared parameters (guard.nan=skip): there is "
                                     f"nothing left to average; lower train.lr or check the data, then resume")
    if in_place and total.data_ptr() == flat.data_ptr():
        total.div_(divisor)  # the sum landed in the parameters themselves
    elif in_place:
        torch.div(total, divisor, out=flat)
    else:
        _unflatten_into(total, tensors, divisor)  # the mean, rounded once to the parameters' dtype
    topo.stats.add(group_name, sent, received, time.perf_counter() - start)
    return size


@torch.no_grad()
def broadcast_from(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor], src_user: int | None = None) -> None:
    """Copy the tensors of one member (the first by default) to every member of the group."""
    if not topo.in_group(group_name) or not tensors:
        return
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    members = topo.members(group_name)
    src = members[0] if src_user is None else src_user
    flat = _flatten(tensors, tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float32)
    with _collective("broadcast", group_name):
        dist.broadcast(flat, src=src, group=topo.group(group_name))
    if topo.rank != src:
        _unflatten_into(flat, tensors)


def all_gather_objects(obj, group=None) -> list:
    """Gather one picklable object from every rank (every rank gets the list, in rank order)."""
    out: list = [None] * dist.get_world_size(group)
    with _collective("all_gather_object", "world" if group is None else str(group)):
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    with _collective("broadcast_object", "world"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(topo: Topology) -> None:
    with _collective("barrier", "world"):
        if topo.backend == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=topo.timeout_s))
        else:
            dist.barrier()


def sum_scalars(values: Iterable[float], device: torch.device | str = "cpu") -> list[float]:
    """All-reduce a few floats (sum over ranks)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    with _collective("all_reduce", "world"):
        dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# failures: a dead or hung peer becomes a message naming the user, never a silent hang
# --------------------------------------------------------------------------------------------

class PeerFailure(RuntimeError):
    """A collective failed because another user's process died, hung or became unreachable.

    The message names this user, the collective and its group, where in the run it happened
    (the phase last named with ``set_phase``), what is known of the other users (a process on this
    host that is gone, or a cause a failing user left behind) and how to continue the run."""

    def __init__(self, user: int, op: str, group: str, diagnosis: str, backend_error: str):
        super().__init__(diagnosis)
        self.user, self.op, self.group = user, op, group
        self.diagnosis, self.backend_error = diagnosis, backend_error
        self.where = _PHASE[0]

    def __str__(self) -> str:
        where = f" in {self.where}" if self.where else ""
        return (f"user {self.user} lost contact with the other users{where}, during {self.op} on group "
                f"{self.group!r}: {self.diagnosis}. The run stops here; if checkpoints were written "
                f"(checkpoint.every), continue with resume=true and the same out_dir (under torchrun "
                f"--max-restarts or a Slurm requeue, resume=auto does it by itself). "
                f"[backend: {self.backend_error}]")


# (host, pid) of every rank, gathered once when the group forms: lets a survivor tell which user
# on its own host is gone when a collective fails; and the timeout the group was built with
_PEERS: list[tuple[str, int]] = []
_TIMEOUT_S = [300.0]
_PHASE: list[str | None] = [None]
_FAILURE_PREFIX = "comigs/failed"


def _record_peers(topo: Topology) -> None:
    me = (socket.gethostname(), os.getpid())
    _TIMEOUT_S[0] = topo.timeout_s
    _PEERS[:] = all_gather_objects(me) if topo.world_size > 1 else [me]


def _store():
    try:
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    except Exception:  # no group, or a torch without the helper: notes are a courtesy
        return None


def _note_key(rank: int) -> str:
    # restarts reuse torchrun's store: a note from an earlier attempt must not be read again
    return f"{_FAILURE_PREFIX}/{restart_count()}/{rank}"


def report_failure(cause: str) -> None:
    """Leave this user's cause of failure where the other users can read it (the rendezvous
    store), so their messages name it; best effort, silent when the store is gone."""
    store = _store() if dist.is_initialized() else None
    if store is None:
        return
    try:
        store.set(_note_key(dist.get_rank()), cause[:2000])
    except Exception:
        pass


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


def _read_notes(skip_store: bool) -> dict[int, str]:
    store = None if skip_store else _store()
    notes: dict[int, str] = {}
    if store is None:
        return notes
    me = dist.get_rank()
    for rank in range(len(_PEERS)):
        if rank == me:
            continue
        key = _note_key(rank)
        try:
            if store.check([key]):
                notes[rank] = store.get(key).decode(errors="replace")
        except Exception:
            break  # the store itself is gone (its host died): pid checks must do
    return notes


def _diagnose(timeout_s: float, grace_s: float = 3.0) -> str:
    """What is known of the other users after a failed collective."""
    if not _PEERS or not dist.is_initialized():
        return "another user's process stopped answering"
    me, host = dist.get_rank(), socket.gethostname()
    local = [r for r, (h, _) in enumerate(_PEERS) if h == host and r != me]
    remote = [r for r, (h, _) in enumerate(_PEERS) if h != host]
    # the store lives in torchrun's agent, or else in rank 0's process: do not ask a dead host
    agent_store = env_get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    notes = _read_notes(skip_store=not agent_store and 0 in local and not pid_alive(_PEERS[0][1]))
    dead: list[int] = []
    deadline = time.monotonic() + grace_s
    while not notes and local:  # a peer that just failed may still be tearing down
        dead = [r for r in local if not pid_alive(_PEERS[r][1])]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not dead:
        dead = [r for r in local if not pid_alive(_PEERS[r][1])]
    parts = [f"user {r} failed: {note}" for r, note in sorted(notes.items())]
    parts += [f"user {r} (pid {_PEERS[r][1]} on {host}) is no longer running: it was killed (a signal or the "
              f"out-of-memory killer) or it crashed; its own output, or the launcher's report of its exit code, "
              f"gives the cause" for r in dead if r not in notes]
    if not parts:
        if remote:
            parts.append(f"users {', '.join(map(str, remote))} run on other hosts and cannot be checked from here; "
                         f"their output names the cause")
        else:
            parts.append(f"every other user on this host is still running, so one of them is stuck or slower than "
                         f"comm.timeout_s ({timeout_s:g} s); raise comm.timeout_s if a round legitimately takes longer")
    return "; ".join(parts)


@contextlib.contextmanager
def _collective(op: str, group_name: str):
    """Turn a backend error in a collective (a peer closed its connection, a timeout) into a
    PeerFailure that says which user is gone, instead of a bare gloo/NCCL message."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's errors are RuntimeErrors
        backend = " ".join(str(exc).split())[:400]
        raise PeerFailure(dist.get_rank() if dist.is_initialized() else env_rank(), op, group_name,
                          _diagnose(_TIMEOUT_S[0]), backend) from exc


def set_phase(where: str) -> None:
    """Name the place in the run (``round 3``) that a PeerFailure raised from now on reports."""
    _PHASE[0] = where


# --------------------------------------------------------------------------------------------
# collectives for methods with an aggregation of their own (Centralized, PCL, HetLoRA, FlexLoRA)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def sync_sum(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor], dtype: str = "fp32",
             exact: bool = True) -> int:
    """Replace each tensor, on every member of the group, by its sum over the members: one
    all_reduce for the whole list (weighted averages: each member scales its own term first).
    ``exact``: summed in float64, as ``sync_mean``. Counted like a server round trip: the buffer
    up once, the sum down once. Returns its bytes."""
    if not topo.in_group(group_name) or not tensors:
        return 0
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    start = time.perf_counter()
    flat = _flatten(tensors, _DTYPES[dtype])
    size = flat.numel() * flat.element_size()
    buf = flat.to(torch.float64) if exact else flat
    with _collective("all_reduce", group_name):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=topo.group(group_name))
    _unflatten_into(buf, tensors)
    topo.stats.add(group_name, size, size, time.perf_counter() - start)
    return size


@torch.no_grad()
def mean_gradients(topo: Topology, group_name: str, params: Sequence[torch.Tensor], count: bool = False,
                   contribute: bool = True, exact: bool = True) -> int:
    """Data parallelism: replace every parameter's gradient by its mean over the members (one
    all_reduce in fp32, so that the step equals one step on the union of the members' batches).
    ``count``/``contribute`` as in ``sync_mean``: a member with a non-finite loss sits the step out."""
    grads = [p.grad for p in params if p.grad is not None]
    return sync_mean(topo, group_name, grads, "server", "fp32", count, contribute, exact)


@torch.no_grad()
def gather_flat(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor],
                dtype: str = "fp32") -> list[torch.Tensor]:
    """Every member's tensors, flattened into one fp32 vector per member, in member order (one
    all_gather). Counted as all2all's mean is: the buffer delivered to each of the n members and n
    buffers received (module docstring). Ranks outside the group get an empty list."""
    if not topo.in_group(group_name) or not tensors:
        return []
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    start = time.perf_counter()
    flat = _flatten(tensors, _DTYPES[dtype])
    n = len(topo.members(group_name))
    parts = [torch.empty_like(flat) for _ in range(n)]
    with _collective("all_gather", group_name):
        dist.all_gather(parts, flat, group=topo.group(group_name))
    sent, received = round_bytes(flat.numel() * flat.element_size(), "all2all", n)
    topo.stats.add(group_name, sent, received, time.perf_counter() - start)
    return [p.to(torch.float32) for p in parts]


def sync_sum_scalars(topo: Topology, group_name: str, values: Iterable[float]) -> list[float]:
    """Sum a few floats over the members of a group (float64; too small to count as traffic)."""
    values = list(values)
    if not topo.in_group(group_name):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=topo.device)
    with _collective("all_reduce", group_name):
        dist.all_reduce(t, group=topo.group(group_name))
    return t.tolist()


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of a flat vector into the tensors (the inverse of one buffer)."""
    _unflatten_into(flat, tensors)
