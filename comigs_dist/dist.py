"""Process groups and every collective that moves parameters between users.

Owns: reading the launcher's environment (torchrun, srun, submitit), choosing the backend
(NCCL when every rank has a GPU, gloo otherwise), the Topology (rank <-> user, every subgroup,
built once in a fixed order and looked up by name), the shape handshake that precedes the first
collective of a group, flattening a set of tensors into one buffer so a round costs one
collective per group, and counting the bytes each user sends and receives.
Knows nothing of models or methods: it moves lists of tensors.

Bytes are counted as the payload a user puts on the wire and takes off it, in the dtype that
travels: in server mode a user uploads its buffer once and downloads the average once (what a
trusted server would cost), whatever algorithm the backend uses underneath.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def _free_port() -> int:
    import socket
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
        n_threads = threads or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
        torch.set_num_threads(n_threads)

    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                    rank=rank, world_size=world_size)
        else:  # a plain `python -m comigs_dist.main`: a group of one
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    timeout=timeout, rank=0, world_size=1)
    return Topology(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    local_world_size=local_world_size, device=dev, backend=backend, timeout_s=timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------

def check_shapes(topo: Topology, group_name: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Handshake before the first collective of a group: every member must hold the same
    parameter names, shapes and dtypes, else a ValueError names the user and the parameter."""
    if not topo.in_group(group_name):
        return
    mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in named]
    members = topo.members(group_name)
    gathered: list = [None] * len(members)
    dist.all_gather_object(gathered, mine, group=topo.group(group_name))
    ref_user = members[0]
    ref = gathered[0]
    problems = []
    for user, theirs in zip(members, gathered):
        if theirs == ref:
            continue
        ref_map = {n: (s, d) for n, s, d in ref}
        their_map = {n: (s, d) for n, s, d in theirs}
        for n in sorted(set(ref_map) | set(their_map)):
            a, b = ref_map.get(n), their_map.get(n)
            if a is None:
                problems.append(f"user {user} shares {n} {b[0]} which user {ref_user} does not hold")
            elif b is None:
                problems.append(f"user {user} lacks {n}, which user {ref_user} shares with shape {a[0]}")
            elif a != b:
                problems.append(f"user {user} holds {n} with shape {b[0]} ({b[1]}) but user {ref_user} "
                                f"holds {a[0]} ({a[1]})")
        if not problems:
            problems.append(f"user {user} lists its shared parameters in another order than user {ref_user}")
    if problems:
        raise ValueError(f"shared parameters of group {group_name!r} differ between users, so they cannot be "
                         f"averaged: " + "; ".join(problems[:8])
                         + ("" if len(problems) <= 8 else f"; ... ({len(problems)} differences)")
                         + ". Give these users the same shapes for their shared experts (moe.*, lora.*).")
    topo._checked.add(group_name)


def _flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


@torch.no_grad()
def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


@torch.no_grad()
def sync_mean(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor], mode: str = "server",
              dtype: str = "fp32") -> int:
    """Replace each tensor, on every member of the group, by its mean over the members.

    One collective for the whole list. 'server' = all_reduce(SUM) then divide (what a trusted
    server does); 'all2all' = every member gathers everyone's buffer and averages it itself
    (serverless, N times the traffic). Returns the payload size in bytes.
    Ranks outside the group return at once and keep their tensors.
    """
    if not topo.in_group(group_name) or not tensors:
        return 0
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    pg = topo.group(group_name)
    n = len(topo.members(group_name))
    wire = _DTYPES[dtype]
    start = time.perf_counter()
    flat = _flatten(tensors, wire)
    size = flat.numel() * flat.element_size()
    if mode == "server":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
        mean = flat.to(torch.float32).div_(n)
        sent, received = size, size
    elif mode == "all2all":
        parts = [torch.empty_like(flat) for _ in range(n)]
        dist.all_gather(parts, flat, group=pg)
        mean = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        for p in parts:  # fixed member order: every rank computes the same sum
            mean.add_(p.to(torch.float32))
        mean.div_(n)
        # each member sends its buffer to the n - 1 others and receives theirs
        sent, received = size * (n - 1), size * (n - 1)
    else:
        raise ValueError(f"comm.mode ({mode!r}) must be 'server' or 'all2all'")
    _unflatten_into(mean, tensors)
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
    dist.broadcast(flat, src=src, group=topo.group(group_name))
    if topo.rank != src:
        _unflatten_into(flat, tensors)


def all_gather_objects(obj, group=None) -> list:
    """Gather one picklable object from every rank (every rank gets the list, in rank order)."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(topo: Topology) -> None:
    if topo.backend == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=topo.timeout_s))
    else:
        dist.barrier()


def sum_scalars(values: Iterable[float], device: torch.device | str = "cpu") -> list[float]:
    """All-reduce a few floats (sum over ranks)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# collectives for methods with an aggregation of their own (Centralized, PCL, HetLoRA, FlexLoRA)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def sync_sum(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor], dtype: str = "fp32") -> int:
    """Replace each tensor, on every member of the group, by its sum over the members: one
    all_reduce for the whole list (weighted averages: each member scales its own term first).
    Counted like a server round trip: the buffer up once, the sum down once. Returns its bytes."""
    if not topo.in_group(group_name) or not tensors:
        return 0
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    start = time.perf_counter()
    flat = _flatten(tensors, _DTYPES[dtype])
    size = flat.numel() * flat.element_size()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=topo.group(group_name))
    _unflatten_into(flat.to(torch.float32), tensors)
    topo.stats.add(group_name, size, size, time.perf_counter() - start)
    return size


@torch.no_grad()
def mean_gradients(topo: Topology, group_name: str, params: Sequence[torch.Tensor]) -> int:
    """Data parallelism: replace every parameter's gradient by its mean over the members (one
    all_reduce in fp32, so that the step equals one step on the union of the members' batches)."""
    grads = [p.grad for p in params if p.grad is not None]
    return sync_mean(topo, group_name, grads, "server", "fp32")


@torch.no_grad()
def gather_flat(topo: Topology, group_name: str, tensors: Sequence[torch.Tensor],
                dtype: str = "fp32") -> list[torch.Tensor]:
    """Every member's tensors, flattened into one fp32 vector per member, in member order (one
    all_gather). Counted as an exchange between peers: each member sends its buffer to the n - 1
    others and receives theirs. Ranks outside the group get an empty list."""
    if not topo.in_group(group_name) or not tensors:
        return []
    if group_name not in topo._checked:
        check_shapes(topo, group_name, [(f"#{i}", t) for i, t in enumerate(tensors)])
    start = time.perf_counter()
    flat = _flatten(tensors, _DTYPES[dtype])
    n = len(topo.members(group_name))
    parts = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(parts, flat, group=topo.group(group_name))
    size = flat.numel() * flat.element_size()
    topo.stats.add(group_name, size * (n - 1), size * (n - 1), time.perf_counter() - start)
    return [p.to(torch.float32) for p in parts]


def sync_sum_scalars(topo: Topology, group_name: str, values: Iterable[float]) -> list[float]:
    """Sum a few floats over the members of a group (float64; too small to count as traffic)."""
    values = list(values)
    if not topo.in_group(group_name):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=topo.device)
    dist.all_reduce(t, group=topo.group(group_name))
    return t.tolist()


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of a flat vector into the tensors (the inverse of one buffer)."""
    _unflatten_into(flat, tensors)
