"""One read-only copy of the frozen base per host, memory-mapped by every rank of that host.

Every user holds the same frozen base; only adapters, routers, optimiser state and activations
differ. With sharing on, the first rank of a host to take the run's lock materialises the base's
tensors once into a file in a node-local directory (``/dev/shm`` by default), and every rank of
the host, that one included, maps the same file read-only (``PROT_READ``, ``MAP_SHARED``) and
points its model's frozen parameters at the mapped pages. The kernel keeps one copy of those
pages however many ranks map them, and a write to a frozen weight faults (SIGSEGV) instead of
silently giving one rank a private, diverging copy.

Owns: the decision (``plan_sharing``), the file format (a JSON header and page-aligned raw
tensors, so tensors are views of the mapping with no copy), building the model without
materialising weights on the ranks that only read (a meta-device skeleton), the locks, and the
lifetime of the files:
  * the run's directory holds one pid file per rank; the base file is unlinked as soon as every
    local rank has mapped it (mappings outlive the name), so a crash after set-up leaves no data;
  * at exit each rank removes its pid file, and the last one out removes the directory;
  * at start-up, directories whose ranks are all dead (a killed run) are removed.
Knows nothing of model families or Hugging Face: the caller hands in two builders, one for the
real model and one for its skeleton. Reads the environment only through ``dist.env_get``.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import faulthandler
import gc
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

SHM_DIR_ENV = "COMIGS_SHM_DIR"
MAGIC = b"CMGSBASE"
FORMAT_VERSION = 1
ALIGN = 4096          # every tensor starts on a page: mappings and copies stay aligned
_HEADER = struct.Struct("<8sQQ")  # magic, format version, header length


# --------------------------------------------------------------------------------------------
# the decision
# --------------------------------------------------------------------------------------------

def should_share(setting: str, local_world_size: int, device_type: str) -> bool:
    """'true'/'false' as given; 'auto' shares when several ranks run on this host and the model
    stays in host memory (CPU). On CUDA each process copies the base into its own GPU memory, so a
    shared host copy only lowers host memory while loading: opt in with 'true'."""
    if setting == "true":
        return True
    if setting == "false":
        return False
    return local_world_size > 1 and device_type == "cpu"


@dataclass(frozen=True)
class SharePlan:
    """Where and how this rank shares its base. ``token`` names the run (equal on every rank)."""
    token: str
    n_local: int          # ranks on this host expected to map the file (then its name is removed)
    timeout_s: float      # how long a rank waits for the one writing the file
    required: bool        # True: model.share_base=true, a failure is an error; False: fall back
    root: Path


def share_root() -> Path:
    """The node-local directory for shared bases: $COMIGS_SHM_DIR, else /dev/shm (memory, not
    disk), else the temporary directory; one subdirectory per OS user."""
    from comigs_dist.dist import env_get
    configured = env_get(SHM_DIR_ENV)
    if configured:
        base = Path(configured)
    elif os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = Path("/dev/shm")
    else:
        base = Path(tempfile.gettempdir())
    return base / f"comigs-shared-base-{os.getuid()}"


def plan_sharing(setting: str, timeout_s: float, topo) -> SharePlan | None:
    """This rank's plan, or None for a private base. Called on every rank: with more than one
    rank, rank 0 draws the run's token and broadcasts it (one small collective)."""
    if setting == "false":
        return None
    from comigs_dist import dist
    if topo.world_size > 1:
        token = dist.broadcast_object(topo, uuid.uuid4().hex[:16] if topo.rank == 0 else None)
    else:
        token = uuid.uuid4().hex[:16]
    if not should_share(setting, topo.local_world_size, topo.device.type):
        return None
    if os.name != "posix":  # mmap protections, flock and /proc are POSIX
        if setting == "true":
            raise ValueError(f"model.share_base=true needs a POSIX host (Linux, macOS), not {os.name!r}; "
                             f"set model.share_base=auto or false")
        return None
    return SharePlan(token=token, n_local=max(1, topo.local_world_size), timeout_s=timeout_s,
                     required=setting == "true", root=share_root())


# --------------------------------------------------------------------------------------------
# the file: header + page-aligned raw tensors
# --------------------------------------------------------------------------------------------

def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"shared base file names an unknown dtype {name!r}")
    return dtype


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> int:
    """Write the tensors (any dtype, CPU) to ``path`` atomically (a temporary name, then rename),
    read-only. Returns the file size in bytes."""
    entries, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "offset": offset,
                        "nbytes": nbytes})
        offset = _align(offset + nbytes)
    header = json.dumps({"tensors": entries, "meta": meta or {}}).encode()
    data_start = _align(_HEADER.size + len(header))
    total = data_start + offset
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(header)))
            f.write(header)
            for entry, t in zip(entries, tensors.values()):
                f.seek(data_start + entry["offset"])
                if entry["nbytes"]:
                    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(flat.numpy()))
            f.truncate(total)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return total


@dataclass(frozen=True)
class MappedFile:
    """Tensors viewing one read-only mapping, and the file they came from."""
    tensors: dict[str, torch.Tensor]
    meta: dict
    path: Path
    inode: int
    device: int
    nbytes: int


def map_tensor_file(path: Path) -> MappedFile:
    """Map ``path`` read-only and shared; every tensor is a view of the mapping (no copy). The
    mapping lives as long as any of the tensors does, also after the file is unlinked."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size < _HEADER.size:
            raise ValueError(f"shared base file {path} is truncated ({st.st_size} bytes)")
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    magic, version, header_len = _HEADER.unpack_from(mm, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise ValueError(f"{path} is not a comigs shared base file of format {FORMAT_VERSION}")
    header = json.loads(bytes(mm[_HEADER.size:_HEADER.size + header_len]))
    data_start = _align(_HEADER.size + header_len)
    tensors = {}
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: that is the point (writes fault)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for e in header["tensors"]:
            dtype, shape = _dtype(e["dtype"]), tuple(e["shape"])
            if data_start + e["offset"] + e["nbytes"] > st.st_size:
                raise ValueError(f"shared base file {path} is truncated at tensor {e['name']}")
            if e["nbytes"] == 0:
                tensors[e["name"]] = torch.empty(shape, dtype=dtype)
                continue
            n = e["nbytes"] // dtype.itemsize
            tensors[e["name"]] = torch.frombuffer(mm, dtype=dtype, count=n,
                                                  offset=data_start + e["offset"]).view(shape)
    return MappedFile(tensors, header.get("meta", {}), Path(path), st.st_ino, st.st_dev, st.st_size)


# --------------------------------------------------------------------------------------------
# putting mapped tensors into a model
# --------------------------------------------------------------------------------------------

def _slots(model: nn.Module, kind: str) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(tensor) -> every (module, attribute) holding it; tied weights appear under one id."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, t in getattr(module, kind).items():
            if t is not None:
                out.setdefault(id(t), []).append((module, attr))
    return out


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every distinct parameter and buffer (non-persistent ones included) by its first name.
    Buffers are prefixed 'buffer:' since a model may use one name for both kinds."""
    out = {name: p.detach() for name, p in model.named_parameters()}
    out.update({f"buffer:{name}": b for name, b in model.named_buffers()})
    return out


def assign_base_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace every parameter of ``model`` (a skeleton, typically on the meta device) by a frozen
    parameter over the given tensor, in every module that holds it, so tied weights stay one
    object; buffers get private copies (they are small and some models update them)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    expected = set(params) | {f"buffer:{n}" for n in buffers}
    if expected != set(tensors):
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"the shared base does not match the model: missing {missing[:5]}, unexpected {extra[:5]}; "
                         f"a stale file from another model? remove {share_root()}")
    slots = _slots(model, "_parameters")
    for name, p in params.items():
        t = tensors[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"shared base tensor {name} is {tuple(t.shape)} {t.dtype} but the model expects "
                             f"{tuple(p.shape)} {p.dtype}")
        new = nn.Parameter(t, requires_grad=False)
        for module, attr in slots[id(p)]:
            module._parameters[attr] = new
    slots = _slots(model, "_buffers")
    for name, b in buffers.items():
        new = tensors[f"buffer:{name}"].clone()
        for module, attr in slots[id(b)]:
            module._buffers[attr] = new
    for module in model.modules():  # a plain tensor attribute built on the skeleton's device
        for attr, value in vars(module).items():
            if torch.is_tensor(value) and value.is_meta:
                raise ValueError(f"{type(module).__name__}.{attr} is a tensor outside parameters and buffers; "
                                 f"the shared base cannot fill it: set model.share_base=false")


# --------------------------------------------------------------------------------------------
# locks and owners
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _flock(path: Path, timeout_s: float, waiting_for: str) -> Iterator[None]:
    """An exclusive flock on ``path``; polls so that a stuck holder ends in an error, not a hang.
    The kernel drops the lock of a process that dies, so a crashed writer never blocks others."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for {waiting_for} (lock {path}); raise "
                                       f"comm.timeout_s, or set model.share_base=false") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    """Whether the process that wrote a pid file (started at ``start``) still runs, not a later reuse of its pid."""
    from comigs_dist.dist import pid_alive
    return pid_alive(pid) and (not start or _start_time(pid) in ("", start))


def _owners_alive(run_dir: Path) -> bool:
    for f in (run_dir / "pids").glob("*"):
        with contextlib.suppress(ValueError, OSError):
            if _alive(int(f.name), f.read_text().strip()):
                return True
    return False


def sweep_stale(root: Path) -> list[Path]:
    """Remove the run directories under ``root`` whose ranks are all dead. Call with the root
    lock held. Returns what was removed."""
    removed = []
    for run_dir in sorted(root.glob("run-*")):
        if run_dir.is_dir() and not _owners_alive(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(run_dir)
    return removed


def check_private_root(root: Path) -> None:
    """Create ``root`` with mode 0700, or accept an existing one only if it is a real directory
    (not a symlink) of this OS user with mode 0700: in a world-writable place such as /dev/shm,
    another user could otherwise have made it first and swap the files ranks map."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700)
        os.chmod(root, 0o700)  # a umask never widens a mode, but say it outright
    except FileExistsError:
        pass
    st = os.lstat(root)
    problem = None
    if not os.path.isdir(root) or os.path.islink(root):
        problem = "is not a directory (a symlink or a file)"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    elif st.st_mode & 0o777 != 0o700:
        problem = f"has mode {st.st_mode & 0o777:04o}, not 0700"
    if problem:
        raise ValueError(f"the shared-base directory {root} {problem}; the frozen base is shared only through a "
                         f"directory of your own that nobody else can write: remove it (if it is yours: chmod 700 "
                         f"{root}), point ${SHM_DIR_ENV} at another directory, or set model.share_base=false")


def _register(plan: SharePlan) -> Path:
    """Sweep dead runs, create this run's directory and enter this process as one of its owners."""
    check_private_root(plan.root)
    run_dir = plan.root / f"run-{plan.token}"
    with _flock(plan.root / ".lock", plan.timeout_s, "another run's shared-base bookkeeping"):
        sweep_stale(plan.root)
        (run_dir / "pids").mkdir(parents=True, exist_ok=True)
        (run_dir / "pids" / str(os.getpid())).write_text(_start_time(os.getpid()))
    atexit.register(_release, plan.root, run_dir, os.getpid())
    return run_dir


def _release(root: Path, run_dir: Path, pid: int) -> None:
    """At exit: leave the run; the last rank out removes its directory."""
    if os.getpid() != pid:  # a forked child inherits atexit handlers; only the owner releases
        return
    with contextlib.suppress(OSError, TimeoutError):
        with _flock(root / ".lock", 10.0, "the shared-base lock at exit"):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / "pids" / str(pid)).unlink()
            if run_dir.is_dir() and not _owners_alive(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the whole protocol
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharedBaseInfo:
    """What a model's frozen weights map: the file (which may be unlinked by now) and its size."""
    path: Path
    inode: int
    device: int
    nbytes: int
    wrote: bool           # this rank materialised the file


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _release_heap() -> None:
    """Hand freed heap pages back to the OS after dropping a private copy (glibc only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fall_back(plan: SharePlan, private: nn.Module, problem: str) -> nn.Module:
    """share_base=true: stop with the problem and its fix; auto: warn and keep the private copy."""
    msg = (f"{problem}; point ${SHM_DIR_ENV} at a larger node-local directory (a tmpfs such as /dev/shm), "
           f"or set model.share_base=false")
    if plan.required:
        raise ValueError(msg)
    warnings.warn(msg + "; using a private copy of the base on this rank")
    return private.eval()


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def load_shared(identity: dict, build_private: Callable[[], nn.Module],
                build_skeleton: Callable[[], nn.Module], plan: SharePlan) -> nn.Module:
    """The frozen base of this rank with every parameter mapped from the host's shared file.

    identity:       what determines the base (name, vocabulary, ...), part of the file name
    build_private:  builds the real model (called on the one rank that writes the file)
    build_skeleton: builds the same model without weights (meta device) on every rank
    When the directory lacks space or the write fails: an error if sharing was 'true', else a
    warning and the private model.
    """
    model = build_skeleton()
    n_bytes = sum(t.numel() * t.element_size() for t in base_tensors(model).values())
    run_dir = _register(plan)
    path = run_dir / f"base-{identity_key(identity)}.bin"
    wrote = False
    with _flock(run_dir / ".lock", plan.timeout_s, "the rank of this host that writes the shared base"):
        if not path.exists():
            free = _free_bytes(run_dir)
            if free < n_bytes + (64 << 20):
                return _fall_back(plan, build_private(), f"model.share_base needs {n_bytes / 2**20:.0f} MiB in "
                                  f"{plan.root.parent} for the shared base but only {free / 2**20:.0f} MiB are free")
            private = build_private()
            try:
                write_tensor_file(path, base_tensors(private), {"identity": identity})
            except OSError as exc:
                return _fall_back(plan, private, f"model.share_base could not write the shared base to {path}: {exc}")
            del private
            _release_heap()
            wrote = True
        mapped = map_tensor_file(path)
        readers = run_dir / f"mapped-{path.stem}"
        readers.mkdir(exist_ok=True)
        (readers / str(os.getpid())).touch()
        if len(list(readers.iterdir())) >= plan.n_local:
            # every rank of the host holds a mapping: the name is no longer needed, and without
            # it a crash leaves nothing behind (the pages go when the last mapping does)
            path.unlink()
    assign_base_tensors(model, mapped.tensors)
    if not faulthandler.is_enabled():
        # a write to a frozen weight now ends the process with SIGSEGV: print the Python line
        faulthandler.enable()
    model.eval()
    model.shared_base = SharedBaseInfo(mapped.path, mapped.inode, mapped.device, mapped.nbytes, wrote)
    return model


# --------------------------------------------------------------------------------------------
# introspection (Linux): tests and the benchmark
# --------------------------------------------------------------------------------------------

def mapping_of(t: torch.Tensor) -> dict | None:
    """The /proc/self/maps line holding a tensor's memory: perms, inode, path; None if anonymous
    or not found."""
    ptr = t.data_ptr()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                inode = int(fields[4])
                if inode == 0:
                    return None
                return {"perms": fields[1], "inode": inode, "path": fields[5] if len(fields) > 5 else ""}
    return None


def pss_bytes(pid: int) -> dict[str, int]:
    """Proportional set size of a process (Linux), in bytes: 'Pss' (private pages plus each shared
    page divided by the number of processes mapping it, so a sum over processes counts every page
    once) and its parts 'Pss_Anon' (heap), 'Pss_File' (libraries), 'Pss_Shmem' (tmpfs mappings)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            out[key] = int(rest.split()[0]) * 1024
    if "Pss" not in out:
        raise ValueError(f"no Pss line in /proc/{pid}/smaps_rollup")
    return out
