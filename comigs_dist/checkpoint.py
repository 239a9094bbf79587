"""Checkpoint files: layout, atomic writes, validated loads, the manifest, disk checks.

Owns the on-disk layout::

    <out_dir>/checkpoints/manifest.json            newest round every user completed (rank 0 writes it)
    <out_dir>/checkpoints/user_XX/round_XXXX.pt    one user's full state after that round
    <out_dir>/checkpoints/user_XX/final.pt         the state at the end of the run

atomic writes (a temporary file in the same directory, fsync, then rename, so a crash or a full
disk never leaves a file that looks complete), loads with ``weights_only=True`` that reject a
truncated, foreign or mismatched file with a message naming the file and the parameter, the
capture of every random generator a run touches, and the probes that find an unwritable or full
output directory before training. Knows nothing of process groups or of training.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from comigs_dist.dist.env import pid_alive

FORMAT = "comigs-checkpoint/1"
MANIFEST = "manifest.json"
_ROUND_FILE = re.compile(r"^round_(\d{4,})\.pt$")

# keys every checkpoint holds (a file without them was not written by this version)
REQUIRED_KEYS = ("format", "user", "round", "method", "params", "config")
# keys a resume needs on top (final.pt from an older version may lack them)
RESUME_KEYS = ("step", "router_step", "expert_opt", "expert_sched", "router_opt", "train_sampler",
               "router_sampler", "rng", "counters", "history", "base", "comm")
# options that may change between a run and its resume: where and how it runs, what it logs and
# keeps, how far it goes (train.rounds: more rounds continue the run; under the cosine schedule the
# decay then spans the new total), how often it evaluates, and where the data lie (data.path: the
# data fingerprint checks that the tokens are the same). Every other key changes what a run
# computes: a resume with another value is refused, naming the key.
RESUME_MAY_DIFFER = ("resume", "out_dir", "log.", "checkpoint.", "guard.", "comm.timeout_s", "comm.backend",
                     "model.device", "model.share_base", "train.threads", "train.rounds", "eval.every",
                     "data.path", "data.verify")


class CheckpointError(ValueError):
    """A checkpoint or output directory a run cannot use; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------

def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def user_dir(out_dir: Path, user_idx: int) -> Path:
    return checkpoints_dir(out_dir) / f"user_{user_idx:02d}"


def round_file(round_idx: int) -> str:
    return f"round_{round_idx:04d}.pt"


def manifest_path(out_dir: Path) -> Path:
    return checkpoints_dir(out_dir) / MANIFEST


def available_rounds(directory: Path) -> list[int]:
    """Rounds with a complete checkpoint in one user's directory (atomic writes: a file that
    exists under its final name is complete)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    rounds = [int(m.group(1)) for f in directory.iterdir() if (m := _ROUND_FILE.match(f.name))]
    return sorted(rounds)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it portably; set straight back
    os.umask(mask)
    return mask


def publish_mode(directory: Path) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (0700) the mode a plain mkdir would have
    (0777 minus the umask) before it is renamed into place, so that the user's group can read it."""
    os.chmod(directory, 0o777 & ~_umask())


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the directory entry, not only the file's data);
    a file system that cannot fsync a directory is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, write, text: bool = False, before_publish=None) -> None:
    """Write a file under ``path`` so that it is complete or absent: ``write(f)`` fills a temporary
    file in the same directory, which is fsynced, given the mode a plain ``open`` would give it
    (0666 minus the umask: mkstemp's 0600 would hide results from the user's group), renamed into
    place, and the directory fsynced. ``before_publish()`` runs between the write and the rename
    (the fault injection of a checkpoint write). On any failure nothing partial is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_publish is not None:
            before_publish()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # never leave a partial file behind
        raise
    fsync_dir(path.parent)


def save_atomic(obj, path: Path, before_publish=None) -> None:
    path = Path(path)
    try:
        write_atomic(path, lambda f: torch.save(obj, f), before_publish=before_publish)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            raise _disk_error(path, exc) from exc
        raise


def _disk_error(path: Path, exc: OSError) -> OSError:
    what = _DISK_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
    free = _free_bytes(path.parent)
    free_text = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
    return OSError(exc.errno, f"cannot write checkpoint {path}: {what}{free_text}. Nothing partial was left; "
                              f"the previous checkpoints are intact. Free space (or point out_dir at a writable "
                              f"disk with room) and continue with resume=true out_dir=<this run's directory>")


def write_manifest(out_dir: Path, manifest: dict) -> None:
    from comigs_dist.metrics import write_json_atomic  # the one atomic JSON writer
    write_json_atomic(manifest_path(out_dir), manifest)


def read_manifest(out_dir: Path) -> dict | None:
    path = manifest_path(out_dir)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); delete it (the per-user files are enough to "
                              f"resume) or restore it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a comigs_dist checkpoint manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}); choose another out_dir")
    return manifest


_PARTIAL_FILE = re.compile(r"^\.(round_\d{4,}|final)\.pt\.[A-Za-z0-9_]+$")


def remove_partial(directory: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in one user's directory (never a file under
    its final name: those are complete); returns what went."""
    directory = Path(directory)
    gone = [f for f in directory.iterdir() if _PARTIAL_FILE.match(f.name)] if directory.is_dir() else []
    for f in gone:
        f.unlink(missing_ok=True)
    return gone


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest round checkpoints of one user; returns what went."""
    if keep <= 0:
        return []
    gone = []
    for r in available_rounds(directory)[:-keep]:
        f = Path(directory) / round_file(r)
        f.unlink(missing_ok=True)
        gone.append(f)
    return gone


# --------------------------------------------------------------------------------------------
# reading and validating
# --------------------------------------------------------------------------------------------

def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or tampered files all land here
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}); it is truncated or not a comigs_dist "
                              f"checkpoint. Delete it to resume from an earlier round, or start a new run "
                              f"in another out_dir") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a comigs_dist checkpoint; "
                              f"choose another out_dir")
    return state


def validate(state: dict, path: Path, user_idx: int, method: str, params: dict[str, torch.Tensor],
             config: dict | None = None, for_resume: bool = True, data: dict | None = None) -> list[str]:
    """Everything that keeps ``state`` from being loaded into this user's model, each problem
    naming the file and the key or parameter (empty when it fits)."""
    where = f"checkpoint {path}"
    if state.get("format") != FORMAT:
        return [f"{where} is not a comigs_dist checkpoint (format {state.get('format')!r}, expected {FORMAT!r}): "
                f"it was written by another program or version; choose another out_dir"]
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if for_resume else ()) if k not in state]
    if missing:
        return [f"{where} lacks {', '.join(missing)}; it cannot be resumed from: delete it to resume from an "
                f"earlier round"]
    problems = []
    if state["user"] != user_idx:
        problems.append(f"{where} holds user {state['user']}'s state but sits in user {user_idx}'s directory; "
                        f"files were moved between users: put each back under checkpoints/user_XX")
    if state["method"] != method:
        problems.append(f"{where} was written by method {state['method']!r} but this run is {method!r}; resume with "
                        f"method={state['method']} or start a new run in another out_dir")
    saved = state["params"]
    if not isinstance(saved, dict):
        return problems + [f"{where}: 'params' is not a mapping of tensors"]
    for name in sorted(set(params) - set(saved))[:5]:
        problems.append(f"{where} lacks parameter {name} {tuple(params[name].shape)} that this model holds")
    for name in sorted(set(saved) - set(params))[:5]:
        problems.append(f"{where} holds parameter {name} {tuple(saved[name].shape)} that this model does not have")
    for name in sorted(set(saved) & set(params)):
        ours, theirs = params[name], saved[name]
        if not isinstance(theirs, torch.Tensor):
            problems.append(f"{where}: parameter {name} is a {type(theirs).__name__}, not a tensor")
        elif tuple(theirs.shape) != tuple(ours.shape):
            problems.append(f"{where}: parameter {name} has shape {tuple(theirs.shape)} but this model's is "
                            f"{tuple(ours.shape)}; the model settings (moe.*, lora.*, model.name) differ from the "
                            f"run that wrote it")
        elif not torch.is_floating_point(theirs):
            problems.append(f"{where}: parameter {name} has dtype {theirs.dtype}, not a floating point type")
    if config is not None and isinstance(state.get("config"), dict):
        problems += [f"{where} was written with {d}" for d in config_differences(state["config"], config)]
    if data is not None and isinstance(state.get("data"), dict):
        from comigs_dist.data.shards import fingerprint_differences
        diffs = fingerprint_differences(state["data"], data)
        if diffs:
            problems.append(f"{where} was written on other data than this run reads ({'; '.join(diffs)}): the "
                            f"dataset was prepared again or data.path points elsewhere; resume on the data the run "
                            f"started with, or start a new run in another out_dir")
    return problems


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def result_keys(config: dict) -> dict:
    """The options of a config (dotted keys) that change what a run computes."""
    return {k: v for k, v in flatten_keys(config).items() if not k.startswith(RESUME_MAY_DIFFER)}


def config_fingerprint(config: dict) -> str:
    """A short digest of the options that change what a run computes (equal for a run and its resume)."""
    text = json.dumps(result_keys(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def option_defaults(config: dict) -> dict:
    """Every option's default, dotted: the schema's, and the options of ``config``'s method."""
    import dataclasses

    from comigs_dist.config.schema import RunConfig
    from comigs_dist.methods import known_methods, method_class
    out = flatten_keys(RunConfig().to_dict())
    if config.get("method") in known_methods():
        out.update(flatten_keys(dataclasses.asdict(method_class(config["method"]).Options()), "method_options."))
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Options that changed since the checkpoint was written and would change what the run
    computes (paths, logging, checkpointing, timeouts and devices may change). An option the
    saved config lacks counts only if this run sets it away from its default: options added to
    the project since keep, at their default, what the code did before them."""
    a, b = flatten_keys(saved), flatten_keys(current)
    defaults = None
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_MAY_DIFFER) or a.get(key) == b.get(key):
            continue
        if key not in a:
            defaults = option_defaults(current) if defaults is None else defaults
            if key in defaults and defaults[key] == b[key]:
                continue
        diffs.append(f"{key}={a.get(key)!r} but this run has {key}={b.get(key)!r}; resume with the same "
                     f"setting or start a new run in another out_dir")
    return diffs


# --------------------------------------------------------------------------------------------
# random generators
# --------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """The global generators of python, numpy and torch (and CUDA's), in types a
    ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# the output directory
# --------------------------------------------------------------------------------------------

def _free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_writable(directory: Path, need_bytes: int = 0, what: str = "out_dir") -> str | None:
    """Create ``directory``, write and remove a probe file in it, and check that ``need_bytes``
    fit; returns a problem naming the path and the fix, or None."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".comigs-probe-", dir=directory)
        try:
            os.write(fd, b"comigs")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = _DISK_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
        return (f"{what} {directory} is not writable ({reason}: {exc.filename or directory}); set out_dir to a "
                f"directory you can write to")
    free = _free_bytes(directory)
    if need_bytes and free is not None and free < need_bytes:
        return (f"{what} {directory} has {free / 2**20:.1f} MiB free but one round of checkpoints needs about "
                f"{need_bytes / 2**20:.1f} MiB; free space, point out_dir at a larger disk, or set "
                f"checkpoint.every=0 checkpoint.final=false to write none")
    return None


@dataclass
class Holdings:
    """What earlier runs left in an output directory (temporary files aside)."""
    config: bool = False
    results: bool = False
    tensorboard: bool = False
    manifest: list[int] = field(default_factory=list)          # rounds the manifest records
    rounds: dict[int, list[int]] = field(default_factory=dict)   # user -> complete round checkpoints
    finals: list[int] = field(default_factory=list)              # users with final.pt
    final_round: int | None = None                               # the manifest's: every user wrote final.pt

    def __bool__(self) -> bool:
        return bool(self.config or self.results or self.tensorboard or self.manifest or self.rounds or self.finals)

    def describe(self) -> str:
        parts = []
        if self.results:
            parts.append("results.json (a finished run)")
        if self.rounds:
            listed = "; ".join(f"user {u}: rounds {r}" for u, r in sorted(self.rounds.items()))
            parts.append("round checkpoints (" + listed + ")")
        if self.finals:
            parts.append(f"final checkpoints of users {self.finals}")
        if self.manifest:
            parts.append(f"checkpoints/manifest.json (rounds {self.manifest})" if self.manifest != [-1]
                         else "an unreadable checkpoints/manifest.json")
        if self.config:
            parts.append("config.yaml")
        if self.tensorboard:
            parts.append("TensorBoard events (tb/)")
        return ", ".join(parts)


def holdings(out_dir: Path) -> Holdings:
    """Read-only: what ``out_dir`` holds of earlier runs."""
    out_dir = Path(out_dir)
    h = Holdings(config=(out_dir / "config.yaml").is_file(), results=(out_dir / "results.json").is_file(),
                 tensorboard=(out_dir / "tb").is_dir() and any(p.is_file() for p in (out_dir / "tb").rglob("*")))
    try:
        manifest = read_manifest(out_dir) or {}
        h.manifest, h.final_round = list(manifest.get("rounds") or []), manifest.get("final_round")
    except CheckpointError:
        h.manifest = [-1]  # unreadable: restore_user names it
    ckpt = checkpoints_dir(out_dir)
    if ckpt.is_dir():
        for d in sorted(ckpt.glob("user_*")):
            m = re.fullmatch(r"user_(\d+)", d.name)
            if not m or not d.is_dir():
                continue
            if rounds := available_rounds(d):
                h.rounds[int(m.group(1))] = rounds
            if (d / "final.pt").is_file():
                h.finals.append(int(m.group(1)))
    return h


def out_dir_problem(out_dir: Path, resume: str, config: dict) -> str | None:
    """Whether a run (``resume``, resolved ``config``) may write into ``out_dir``, judged on what it
    holds: nothing, or round checkpoints to resume from (restore_user then checks them), or, with
    resume=auto, the unfinished first attempt of this very run that checkpointed nothing yet (same
    config.yaml). Anything else belongs to another run: the problem names what it holds and the ways out."""
    h = holdings(out_dir)
    if not h:
        return None
    if h.rounds or h.manifest:
        ways = "start this run in another out_dir, or continue that run with resume=true"
    else:  # nothing to continue from: resume=true would only say so
        ways = "start this run in another out_dir (that run holds no round checkpoint, so it cannot be continued)"
    if resume == "false":
        return (f"out_dir {out_dir} already holds another run's files: {h.describe()}; resume=false would overwrite "
                f"them. Nothing was written; {ways}")
    if h.rounds or h.manifest:
        return None  # every user's files decide where to resume (resume.restore_user)
    if h.results:
        return (f"out_dir {out_dir} holds a finished run ({h.describe()}) with no round checkpoint to continue from, "
                f"and resume={resume} would start it over and overwrite its results. Nothing was written; {ways}")
    if resume == "auto" and h.config:
        try:
            import yaml
            saved = yaml.safe_load((out_dir / "config.yaml").read_text())
        except (OSError, ValueError) as exc:
            return f"out_dir {out_dir} holds a config.yaml that cannot be read ({exc}); {ways}"
        diffs = config_differences(saved, config) if isinstance(saved, dict) else ["config.yaml is not a mapping"]
        if diffs:
            return (f"out_dir {out_dir} holds another run ({h.describe()}) configured differently: "
                    f"{'; '.join(diffs[:5])}. Nothing was written; {ways}")
    return None


FINISHED_BEFORE = "results.round_{rounds}.json"  # a finished run's results, once a resume trains it further


def finished_run(out_dir: Path, resume: str, config: dict) -> tuple[str, str] | None:
    """What resuming into an ``out_dir`` that holds a finished run (results.json and round
    checkpoints) means, judged before anything is written: ("done", message) for the same run with
    the same number of rounds (nothing to do), ("refused", message) for fewer rounds (a run cannot
    be shortened), None otherwise (nothing finished there; more rounds, which continue the run and
    keep the finished one's results as FINISHED_BEFORE; or another configuration, which restore refuses)."""
    out_dir = Path(out_dir)
    if resume == "false" or not (out_dir / "results.json").is_file():
        return None
    try:
        results = json.loads((out_dir / "results.json").read_text())
        finished, saved = int(results["rounds"]), results["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not one this project wrote: the checkpoints decide, as without it
    if config_differences(saved, config):
        return None
    planned = int(config["train"]["rounds"])
    if planned == finished:
        ppl = results.get("mean_test_ppl")
        return "done", (f"out_dir {out_dir} holds this run, finished ({finished} rounds"
                        + (f", mean test ppl {ppl:.3f}" if isinstance(ppl, (int, float)) else "")
                        + f"): nothing to do, its results are in {out_dir / 'results.json'}. Raise train.rounds to "
                          f"train it further, or start it again in another out_dir")
    if planned < finished:
        return "refused", (f"out_dir {out_dir} holds this run finished after {finished} rounds, and train.rounds="
                           f"{planned} would shorten it, which a resume cannot do. Nothing was written; pass "
                           f"train.rounds={finished} (nothing to do) or more (to train further), or start a "
                           f"{planned}-round run in another out_dir")
    return None


def keep_finished_results(out_dir: Path) -> Path | None:
    """Before a resumed run writes results.json: move the results of the shorter run it continued
    aside (FINISHED_BEFORE), so that no run's results are overwritten. Returns the new path, or None."""
    path = Path(out_dir) / "results.json"
    try:
        rounds = int(json.loads(path.read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kept = path.with_name(FINISHED_BEFORE.format(rounds=rounds))
    os.replace(path, kept)
    return kept


def fresh_run_dir(parent: Path, stem: str) -> Path:
    """Create and return ``parent/stem``, or ``stem-2``, ``stem-3``, ... if taken: mkdir is atomic,
    so two runs started at the same moment never get one directory."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"no free directory name for {parent / stem} after 9999 tries")


LOCK_FILE = ".comigs.lock"


class OutDirLock:
    """One live run per output directory: an exclusive flock on ``<out_dir>/.comigs.lock``, held by
    rank 0 while the run lives, with the holder's pid, host and job recorded inside. The kernel
    drops the flock of a process that dies, so a lock file whose flock is free is stale (taken over
    with a note); a restarted job (a later attempt of the same Slurm or torchrun job) also takes
    over a lock its earlier attempt still appears to hold (a dead node's lease on a shared disk)."""

    def __init__(self, out_dir: Path, job: str | None = None, attempt: int = 0):
        self.path = Path(out_dir) / LOCK_FILE
        self.job, self.attempt = job, attempt
        self.fd: int | None = None

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "job": self.job, "attempt": self.attempt,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _read(self, fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _holder(rec: dict) -> str:
        job = f", job {rec['job']} attempt {rec.get('attempt', 0)}" if rec.get("job") else ""
        return (f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')}{job}, since {rec.get('started', '?')}")

    def acquire(self) -> list[str]:
        """Take the lock or raise CheckpointError naming the holder; returns notes (a stale lock taken over)."""
        import fcntl
        for _ in range(20):  # the file may be replaced under us by a holder leaving: retry on the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            except OSError:  # a file system without flock: judge by the record alone
                held = None
            previous = self._read(fd)
            if held is False or held is None:
                same_job = (bool(self.job) and previous.get("job") == self.job
                            and previous.get("attempt", 0) < self.attempt)
                dead = (held is None and previous.get("host") == socket.gethostname()
                        and not pid_alive(int(previous.get("pid", 0) or 0)))
                if previous and not same_job and not dead:
                    os.close(fd)
                    raise CheckpointError(
                        f"out_dir {self.path.parent} is in use by another run: {self._holder(previous)} holds its "
                        f"lock ({self.path}). Two runs in one out_dir would mix their files: wait for that run to "
                        f"end, or give this one another out_dir")
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._record()).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            if previous and previous.get("pid") != os.getpid():
                why = ("an earlier attempt of this job" if held is not True and self.job
                       and previous.get("job") == self.job else "no longer running")
                return [f"took over the stale lock of {self._holder(previous)} ({why}) on out_dir {self.path.parent}"]
            return []
        raise CheckpointError(f"could not lock out_dir {self.path.parent}: its lock file keeps changing")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still ours: we hold its flock
        finally:
            os.close(self.fd)
            self.fd = None


def claim_out_dir(out_dir: Path, resume: str, config: dict, job: str | None = None, attempt: int = 0,
                  created: bool = False) -> tuple[OutDirLock, list[str]]:
    """Rank 0, before anything of the run is written: check that the run may write into ``out_dir``
    (``out_dir_problem``), lock it against a second live run, check that it is writable, and return
    the held lock with notes to print. On any problem, raise CheckpointError and leave the
    directory as it was (a directory this call or ``created`` made is removed again)."""
    out_dir = Path(out_dir)
    if resume == "true" and not (out_dir.is_dir() and holdings(out_dir)):  # nothing to continue: most likely a typo
        what = "does not exist" if not out_dir.exists() else "holds nothing of a run"
        raise CheckpointError(f"resume=true, but out_dir {out_dir} {what}, so there is no run to continue. Nothing "
                              f"was written; check the path, or start a fresh run there with resume=false (resume=auto "
                              f"continues a run when there is one and starts fresh otherwise)")
    made = [] if out_dir.exists() else [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    if created:
        made.append(out_dir)
    problem = out_dir_problem(out_dir, resume, config) if out_dir.is_dir() else None  # read-only, before any write
    if problem:
        raise CheckpointError(problem)
    lock = OutDirLock(out_dir, job, attempt)
    try:
        problem = check_writable(out_dir)  # creates it; a probe file, removed again
        if problem:
            raise CheckpointError(problem)
        notes = lock.acquire()
        problem = out_dir_problem(out_dir, resume, config)  # again under the lock: another run may have started
        if problem:
            raise CheckpointError(problem)
        h = holdings(out_dir)
        # its own unfinished first attempt (one that ended after final.pt is resumed from it: restore says so)
        if (resume == "auto" and h and not h.rounds and not h.manifest
                and h.final_round != config.get("train", {}).get("rounds")):
            notes.append(f"out_dir {out_dir} holds an earlier attempt of this run that checkpointed no round "
                         f"({h.describe()}): it starts over (resume={resume})")
        return lock, notes
    except BaseException:
        lock.release()
        for p in made:  # deepest first; only what is still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise

