"""1,000 users on 2 ranks with 10% participation, against 4 users on 4 ranks.

Runs ``comigs_dist.main`` twice through torchrun on this host, on the embedded default model:
  * many: n_users=1000, train.participation=0.1 (100 users take part per round), 2 ranks;
  * few:  n_users=4 (everyone takes part), 4 ranks.
Both with the same steps per round; the evaluation is cut to a few windows per user
(eval.max_tokens, data.test_tokens) so that the set-up of 1,000 users stays short, and its time
is not part of the figure.

Targets (the issue "Many users per rank"):
  seconds_per_participating_user_round: (many round time / 100) / (few round time / 4), <= 1.10.
      Round times are rank 0's "round i/T ... (x s)" lines, the median over rounds after the first.
      On a host with fewer cores than ranks the few run's 4 ranks share them: both figures are
      wall time per user-round on the same cores.
  peak_rss_gib_1000_users: the largest resident memory of the many run's processes together
      (torchrun and its ranks, sampled every 0.2 s), <= 3 GiB, as PSS: a page that several
      processes share (torch's libraries, the shared base) counts once in total. The plain sum of
      RSS, which counts such pages once per process, is printed beside it.

    python benchmarks/many_users.py [--users 1000] [--participation 0.1] [--rounds 4] [--quick]
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, base_parser, machine_line, target_line

GIB = 2 ** 30
COMMON = ["log.tensorboard=false", "log.progress=true", "checkpoint.final=false", "eval.every=0",
          "eval.max_tokens=256", "data.test_tokens=512", "data.valid_tokens=1024"]


def _pss(pid: int) -> int:
    """Proportional set size: resident bytes with each shared page split among its sharers."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+)", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def _tree_memory(root_pid: int) -> tuple[int, int]:
    """Resident bytes of a process and all its descendants, summed (shared pages counted in each
    process) and as PSS (shared pages split: the memory the run really holds), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid = re.search(r"PPid:\s+(\d+)", status)
        mem = re.search(r"VmRSS:\s+(\d+)", status)
        pid = int(entry)
        if ppid:
            children.setdefault(int(ppid.group(1)), []).append(pid)
        rss[pid] = int(mem.group(1)) * 1024 if mem else 0
    total, pss, stack = 0, 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        pss += _pss(pid)
        stack.extend(children.get(pid, []))
    return total, pss


def run(label: str, ranks: int, overrides: list[str], out: Path) -> tuple[list[float], list[int], str]:
    """One torchrun; returns the per-round seconds rank 0 printed, the process tree's peak memory
    as [summed RSS, PSS] and the output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "comigs_dist.main", *COMMON, *overrides, f"out_dir={out / label}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    text, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{label} run failed ({proc.returncode}):\n{text[-4000:]}")
    rounds = [float(m.group(1)) for m in re.finditer(r"round \d+/\d+: .*\((\d+\.\d+)s\)", text)]
    return rounds, peak, text


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--participation", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    steps = ["train.local_steps=2", "train.batch_size=4", "train.seq_len=64"] if args.quick else []
    users = 40 if args.quick else args.users
    rounds = 3 if args.quick else args.rounds
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        many, peak, _ = run("many", 2, [f"n_users={users}", f"train.participation={args.participation}",
                                        f"train.rounds={rounds}", *steps], out)
        few, _, _ = run("few", 4, ["n_users=4", f"train.rounds={rounds}", *steps], out)
    participants = max(1, round(args.participation * users))
    per_many = statistics.median(many[1:]) / participants
    per_few = statistics.median(few[1:]) / 4
    print(f"many: {users} users, {participants} per round, 2 ranks: round seconds {[round(x, 2) for x in many]}")
    print(f"few: 4 users, 4 ranks: round seconds {[round(x, 2) for x in few]}")
    print(f"seconds per participating user-round: many {per_many:.4f}, few {per_few:.4f}")
    print(f"peak of the summed RSS of every process (shared library pages counted once per process): "
          f"{peak[0] / GIB:.2f} GiB")
    print(target_line("seconds_per_participating_user_round", per_many / per_few, "<=", 1.10))
    print(target_line(f"peak_rss_gib_{users}_users", peak[1] / GIB, "<=", 3.0))


if __name__ == "__main__":
    main()
