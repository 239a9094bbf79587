"""One-host launcher that imports once and forks one process per user.

    python -m comigs_dist.forkrun --nproc_per_node=4 [--config FILE] [key=value ...]

Takes the arguments of ``python -m comigs_dist.main`` and starts the same run that
``torchrun --standalone --nproc_per_node=4 -m comigs_dist.main ...`` starts, with one difference:
the parent imports torch, transformers' model classes and comigs_dist once, then ``os.fork()``s
one child per rank. The children share the parent's imported state copy-on-write. That state is
about 280 MiB of heap per interpreter, more than a GPT-2 124M user's own state, so with many users
per host it decides how many fit (docs/performance.md, "Many users per host").

The parent stays safe to fork: it runs no tensor operation (so the intra-op thread pool is never
started and CUDA is never initialised), starts no thread of its own, and freezes the garbage
collector's view of the imported objects (``gc.freeze``). Without that freeze, each child's first
collection would write to every imported object's header and dirty, and so copy, the pages that
are meant to stay shared. Each child takes the environment torchrun would give it
(``dist.export_rank_env``), calls ``comigs_dist.main.main`` and exits with its return code.
``init_distributed`` then sets the child's own intra-op threads.

Like torchrun, the parent watches its children:
  * it exits 0 only when every rank exits 0;
  * when one rank fails, it names that rank and its exit code, stops the others (SIGTERM, then
    SIGKILL after a grace period) and exits with that code;
  * SIGINT and SIGTERM reach every rank;
  * a child whose parent dies is sent SIGTERM by the kernel (Linux ``PR_SET_PDEATHSIG``), so no
    rank is left running alone.
The configuration is validated once, in the parent, before any fork, so a bad key gets one
message. Single host only, and no restarts: for several hosts, ``--max-restarts`` or elastic
jobs, use torchrun or srun.

Owns: forking, the children's lifetime and exit codes. Knows nothing of training: ``main`` runs
in each child. It writes the environment only through ``dist.export_rank_env``.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import importlib
import os
import signal
import sys
import time
import traceback
from typing import Callable, Sequence

GRACE_S = 10.0  # how long a stopped rank may take to exit before SIGKILL
_PR_SET_PDEATHSIG = 1

# what a child imports in any run; imported once in the parent so the pages are shared.
# tensorboard and dataset libraries are left out: they load only in runs that use them.
PRELOAD = ("torch", "torch.distributed", "comigs_dist.main", "comigs_dist.train",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.modeling_auto")


class _Stop(Exception):
    """The parent received SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def preload(modules: Sequence[str] = PRELOAD) -> None:
    """Import once what every rank needs, then freeze it for the garbage collector so that the
    children's collections leave those pages unwritten and shared."""
    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGTERM when the parent dies (no orphan ranks)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the parent's own SIGTERM forwarding still applies
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_STOPPING: list[int] = []  # in a child: the signal that is already ending it


def _exit_on_signal(signum, _frame):
    """In a child: the first SIGINT or SIGTERM unwinds the rank; later ones are ignored, so that
    a second Ctrl-C cannot interrupt the unwinding (a child must never return into the
    parent's code)."""
    if _STOPPING:
        return
    _STOPPING.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def _child(rank: int, world_size: int, port: int, parent: int, target: Callable, args: tuple) -> None:
    """Runs in the forked child and never returns: the parent's stack must not unwind here."""
    code = 1
    try:
        # SIGINT and SIGTERM (from the terminal, the launcher, or the kernel when the launcher
        # died) unwind the rank like an error would: main closes the process group and the exit
        # handlers remove the rank's files; a rank stuck in native code is SIGKILLed after GRACE_S
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _exit_on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # held by _fork
        _die_with_parent(parent)
        from comigs_dist import dist
        dist.export_rank_env(rank, world_size, port)
        result = target(*args)
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # os._exit skips them; shared-base clean-up is one
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def start_ranks(world_size: int, target: Callable, *args) -> list[int]:
    """Fork ``world_size`` children, each running ``target(*args)`` with the environment of its
    rank; returns their pids in rank order. Call ``preload`` first."""
    from comigs_dist import dist
    port = dist.free_port()
    parent = os.getpid()
    pids = []
    for rank in range(world_size):
        sys.stdout.flush()  # a child would print the parent's buffered output again
        sys.stderr.flush()
        pid = _fork()
        if pid == 0:
            _child(rank, world_size, port, parent, target, args)
        pids.append(pid)
    return pids


def _fork() -> int:
    """os.fork with SIGINT and SIGTERM held back until the child has its own handlers: a signal
    in between would unwind the child into the parent's code."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def _exit_code(status: int) -> int:
    """A shell's convention: the exit code, or 128 + the signal that killed the process."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _describe(code: int) -> str:
    if code > 128:
        try:
            return f"was ended by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def _stop(pids: dict[int, int], signum: int = signal.SIGTERM, grace_s: float = GRACE_S) -> None:
    """Send ``signum`` to every child still running, reap them, SIGKILL the ones that outlive the
    grace period. ``pids`` maps pid -> rank and is emptied."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while pids:
        for pid in list(pids):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                del pids[pid]
        if not pids:
            break
        if time.monotonic() > deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in list(pids):
                os.waitpid(pid, 0)
            pids.clear()
            break
        time.sleep(0.05)


REFUSAL_GRACE_S = 10.0  # how long the other ranks get to end by themselves after one exits 2


def _reap(running: dict, seconds: float) -> dict[int, int]:
    """Collect the ranks of ``running`` that end within ``seconds`` (removed from it); returns
    {rank: exit code} of those."""
    deadline, ended = time.monotonic() + seconds, {}
    while running and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
        elif pid in running:
            ended[running.pop(pid)] = _exit_code(status)
    return ended


def supervise(pids: Sequence[int], say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Wait for the children; the first one that fails stops the others. Returns 0 when every
    rank succeeded, else the failing rank's exit code (128 + signal when it was killed)."""
    running = {pid: rank for rank, pid in enumerate(pids)}

    def on_signal(signum, _frame):
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running:
            pid, status = os.waitpid(-1, 0)
            if pid not in running:
                continue
            rank, code = running.pop(pid), _exit_code(status)
            if code == 0:
                continue
            # a refusal (exit 2: bad input, an out_dir that is not this run's) reaches every rank
            # together: they leave by themselves, and a SIGTERM would only cut their clean-up short
            others = _reap(running, REFUSAL_GRACE_S) if code == 2 else {}
            odd = [f"rank {r} {_describe(c)}" for r, c in sorted(others.items()) if c not in (0, 2)]
            say(f"[forkrun] rank {rank} (pid {pid}) {_describe(code)}"
                + (f" ({'; '.join(odd)})" if odd else "")
                + (f"; stopping the other {len(running)} rank(s)" if running else ""))
            if running:
                _stop(running)
            return code
        return 0
    except _Stop as stop:
        for s in previous:  # a second Ctrl-C during the stop must not interrupt it
            signal.signal(s, signal.SIG_IGN)
        say(f"[forkrun] received {signal.Signals(stop.signum).name}; stopping {len(running)} rank(s)")
        _stop(running, stop.signum)
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m comigs_dist.forkrun", add_help=False,
        description="One host, many users: import once, fork one process per user.")
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=None)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = _parse(argv)
    from comigs_dist import faults
    from comigs_dist import main as cli
    from comigs_dist.config import ConfigError, check_world_size, load_config
    if any(a in ("-h", "--help") for a in rest):
        print("usage: python -m comigs_dist.forkrun --nproc_per_node=N [--config FILE] [key=value ...]\n"
              "One host, many users: imports once and forks one process per user (docs/performance.md,\n"
              "'Many users per host'). Every other argument goes to comigs_dist.main, whose help follows.\n",
              flush=True)
    if any(a in ("-h", "--help", "--methods", "--print-config") for a in rest):
        # information only: one process answers, as rank 0 of N would
        return _run_once(cli.main, rest, ours.nproc_per_node or 1)
    if ours.nproc_per_node is None or ours.nproc_per_node < 1:
        print(f"error: --nproc_per_node ({ours.nproc_per_node}) must be given and >= 1: one process per "
              f"user, so N = n_users", file=sys.stderr)
        return 2
    try:  # once, here: a bad configuration is one message, and no process is forked
        args = cli.parse_args(rest)
        check_world_size(load_config(args.config, args.overrides), ours.nproc_per_node)
        faults.from_env()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preload()
    return supervise(start_ranks(ours.nproc_per_node, cli.main, rest))


def _run_once(fn: Callable, argv: list[str], world_size: int) -> int:
    """Run ``fn(argv)`` in one forked child with rank 0's environment and return its exit code."""
    from comigs_dist import dist
    sys.stdout.flush()
    pid = _fork()
    if pid == 0:
        _child(0, world_size, dist.free_port(), os.getppid(), fn, (argv,))
    return _exit_code(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    sys.exit(main())
