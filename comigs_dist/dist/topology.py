"""Who is where: ranks, the users each rank simulates, and every process group of the run.

Owns joining the process group the launcher set up (NCCL when every rank has a GPU, gloo
otherwise), the placement of users on ranks (contiguous blocks, spread evenly), and the sharing
groups, each built once on every rank in a fixed (sorted) order over the ranks that host its
members and looked up by name, as torchtitan builds its device mesh. Knows nothing of models or
methods: groups are given as names and member users.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as tdist

from comigs_dist.dist import env
from comigs_dist.dist.failures import FailureWatch, collective


def place_users(n_users: int, world_size: int) -> tuple[int, ...]:
    """The rank of every user: contiguous blocks, as even as they can be (the first
    ``n_users % world_size`` ranks hold one user more)."""
    if n_users < world_size:
        raise ValueError(f"{n_users} users cannot be spread over {world_size} ranks: every rank needs a user; "
                         f"start at most {n_users} ranks")
    return tuple(r for r in range(world_size) for _ in range(n_users // world_size + (r < n_users % world_size)))


@dataclass
class Topology:
    """Ranks, the users on them, the device, and every process group of the run (built once)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float
    user_ranks: tuple[int, ...] = ()      # user -> the rank that simulates it
    watch: FailureWatch = field(default_factory=FailureWatch)
    groups: dict[str, tuple[object, tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.user_ranks:
            self.user_ranks = tuple(range(self.world_size))  # one user per rank

    @property
    def n_users(self) -> int:
        return len(self.user_ranks)

    @property
    def local_users(self) -> list[int]:
        """The users this rank simulates, in order."""
        return [u for u, r in enumerate(self.user_ranks) if r == self.rank]

    @property
    def user_idx(self) -> int:
        """The one user of this rank (one user per rank)."""
        users = self.local_users
        if len(users) != 1:
            raise RuntimeError(f"rank {self.rank} simulates users {users}, not exactly one")
        return users[0]

    def set_phase(self, where: str) -> None:
        """Name the place in the run that a failed collective reports from now on."""
        self.watch.set_phase(where)

    # -- groups ------------------------------------------------------------------------------
    def build_groups(self, members: dict[str, Sequence[int]]) -> None:
        """Create every sharing group on every rank, in one fixed (sorted) order: at set-up, and
        again only for groups decided during the run (learned sharing groups, at a round boundary,
        every rank with the same groups). ``members``: group name -> its users; the process group
        spans the ranks hosting them. A name is built once."""
        again = sorted(set(members) & set(self.groups))
        if again:
            raise RuntimeError(f"Topology.build_groups(): groups {again} were already built")
        for name in sorted(members):
            users = tuple(sorted(set(int(u) for u in members[name])))
            bad = [u for u in users if not 0 <= u < self.n_users]
            if bad:
                raise ValueError(f"group {name!r} names users {bad} outside 0..{self.n_users - 1}")
            ranks = tuple(sorted({self.user_ranks[u] for u in users}))
            if ranks == tuple(range(self.world_size)):
                pg = tdist.group.WORLD
            else:
                # every rank must call new_group for every group, members or not
                pg = tdist.new_group(ranks=list(ranks), timeout=datetime.timedelta(seconds=self.timeout_s))
            self.groups[name] = (pg, users, ranks)

    def group(self, name: str):
        """The process group of a sharing group."""
        if name not in self.groups:
            raise ValueError(f"unknown process group {name!r}; known groups: {', '.join(sorted(self.groups)) or '(none)'}")
        return self.groups[name][0]

    def members(self, name: str) -> tuple[int, ...]:
        """The users of a group, sorted."""
        self.group(name)
        return self.groups[name][1]

    def ranks_of(self, name: str) -> tuple[int, ...]:
        """The ranks that host a member of a group, sorted."""
        self.group(name)
        return self.groups[name][2]

    def in_group(self, name: str) -> bool:
        """Whether this rank hosts a member of the group (and so takes part in its collectives)."""
        return self.rank in self.ranks_of(name)


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0,
                     threads: int = 0, n_users: int | None = None) -> Topology:
    """Join the process group the launcher set up (or a group of one for a plain python run)."""
    env.export_slurm_env()
    world_size = env.env_world_size()
    rank = env.env_rank()
    local_rank = env.env_local_rank()
    local_world_size = env.env_local_world_size(world_size)

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
        n_threads = threads or max(1, env.usable_cpus() // max(1, local_world_size))
        torch.set_num_threads(n_threads)

    timeout = datetime.timedelta(seconds=timeout_s)
    if not tdist.is_initialized():
        agent = env.agent_store_address()
        if agent is not None:
            # torchrun shares its rendezvous store with the workers, so the keys a failed attempt
            # left there (gloo's addresses) would be read by the next attempt, which then cannot
            # connect (pytorch/pytorch#135712): each attempt gets a namespace of its own
            store = tdist.TCPStore(agent[0], agent[1], world_size, is_master=False, timeout=timeout)
            store = tdist.PrefixStore(f"comigs/attempt_{env.restart_count()}", store)
            tdist.init_process_group(backend=backend, store=store, timeout=timeout, rank=rank, world_size=world_size)
        elif env.has_rendezvous():
            tdist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                     rank=rank, world_size=world_size)
        else:  # a plain `python -m comigs_dist.main`: a group of one
            tdist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{env.free_port()}",
                                     timeout=timeout, rank=0, world_size=1)
    world = tdist.get_world_size()
    topo = Topology(rank=tdist.get_rank(), world_size=world, local_rank=local_rank,
                    local_world_size=local_world_size, device=dev, backend=backend, timeout_s=timeout_s,
                    user_ranks=place_users(n_users if n_users is not None else world, world),
                    watch=FailureWatch(timeout_s))
    _record_peers(topo)
    return topo


def _record_peers(topo: Topology) -> None:
    """(host, pid) of every rank, gathered once when the group forms: lets a survivor tell which
    rank on its own host is gone when a collective fails."""
    import os
    import socket
    me = (socket.gethostname(), os.getpid())
    if topo.world_size == 1:
        topo.watch.peers = [me]
        return
    out: list = [None] * topo.world_size
    with collective(topo.watch, "all_gather_object", "world"):
        tdist.all_gather_object(out, me)
    topo.watch.peers = out


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
