"""This project's CoMiGS-1G1S round against the reference implementation's, side by side.

    python benchmarks/vs_reference.py --reference DIR [--quick] [--models small,124m] [--rounds 3]
                                      [--local-steps 10] [--ref-threads 1,2] [--ref-passes auto]

DIR is a checkout of https://github.com/epfml/CoMiGS that the user provides; nothing of it is
copied here. Its own collab_run.py runs through benchmarks/_reference_driver.py, which swaps only
its hub loading (our base checkpoint and dataset instead of GPT-2 from the hub) and its logger
(wandb and the progress bars; the bar over its rounds is where it waits for its turn). The same
configuration runs on both sides: 4 users, CoMiGS-1G1S (expert 0 shared, expert 1 and the router
local, top-2, rank 8, attention LoRA shared), batch 8 x 128 in one micro-batch, lr 2e-3, expert
steps only (the reference's router phases are pushed past the run with -update_router_every;
this project's benchmark rounds leave router phases out, benchmarks/_rounds.py). A round is the
sync and --local-steps expert steps of every user: here 4 ranks of one thread each, in the
reference one process stepping its clients in turn with --ref-threads threads (each count a
separate process). Bases, with seeded random weights unless --base-small / --base-124m name
checkpoints: the small GPT-2 of `python -m comigs_dist.pretrain --config small` (4 layers,
d = 128) and GPT-2 124M's shapes; data: random GPT-2 token ids unless --data names a dataset.

The set-ups stay alive side by side and run one round each in turn, in a rotating order; after
--warmup rounds, a ratio is the median over rounds of project / reference within the round. On
GPT-2 124M's shapes each reference thread count gets a pass of its own beside the project
(--ref-passes): one reference process there holds about 8 GB, and two beside the project's ranks
were killed for memory on a 24 GB machine.
Round wall time: the slowest rank's; round CPU-seconds: user + system, summed over the ranks
(the reference: its process, every thread). Each ratio is against the reference at its best
thread count for that clock (the lowest median). Targets (GPT-2 124M's shapes):
round_cpu_over_reference_gpt2_124m <= 0.75 and round_wall_over_reference_gpt2_124m <= 0.6; the
small model's ratios are printed beside them.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (puts the checkout on sys.path)

import json
import multiprocessing as mp
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _rounds as R
from _reference_driver import check_reference

DRIVER = Path(__file__).resolve().parent / "_reference_driver.py"
MODELS = {"small": "small GPT-2 (4 layers, d = 128, vocabulary 50,257)", "124m": "GPT-2 124M shapes",
          "tiny": "tiny GPT-2 (quick smoke check)"}


def reference_args(n_users: int, rounds: int, local_steps: int, batch: int, seed: int, out_dir: str) -> list[str]:
    """collab_run.py's arguments for CoMiGS-1G1S as its runscript (collab_runscripts/table1/
    comigs_1g1s.sh) sets it, with one micro-batch of ``batch`` sequences, no wandb and no
    router phase within the run."""
    return ["-gr", str(rounds), "-num_steps", str(local_steps), "-nc", str(n_users), "-device", "cpu",
            "-el", str([8] * n_users), "-en", str([2] * n_users), "-k", "2", "-as", "expert_0",
            "-bs", str(batch), "-micro_bs", str(batch), "-lr", "2e-3", "-seed", str(seed), "-out_dir", out_dir,
            "-is_alter", "-gating_update_iters", "10", "-update_router_every", str(10 ** 9),
            "-exp0_importance", "0.5", "-lb_lam", "0.01"]


def project_overrides(base: str, data: str, n_users: int, local_steps: int, batch: int, seed: int) -> list[str]:
    return ["method=comigs_1g1s", f"model.name={base}", f"data.path={data}", f"n_users={n_users}",
            f"train.batch_size={batch}", "train.seq_len=128", f"train.local_steps={local_steps}", "train.lr=2e-3",
            "moe.lb_weight=0.01", "lora.rank=8", "lora.attn_rank=8", "train.threads=1", f"seed={seed}"]


class ReferenceRun:
    """The reference's collab_run.py in a driver process, one round per ``round()``."""

    def __init__(self, reference: Path, base: str, data: str, threads: int, args: list[str], log: Path):
        to_r, to_w = os.pipe()       # benchmark -> driver
        from_r, from_w = os.pipe()   # driver -> benchmark
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = log
        self.threads = threads
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(DRIVER), "run", "--reference", str(reference), "--base", base, "--data", data,
                 "--threads", str(threads), "--control-fds", f"{to_r},{from_w}", "--", *args],
                pass_fds=(to_r, from_w), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(reference))
        os.close(to_r)
        os.close(from_w)
        self.commands = os.fdopen(to_w, "w")
        self.events = from_r
        self._pending = b""

    def _event(self, timeout_s: float) -> dict:
        # raw reads: a buffered reader could hold a second line that select() no longer sees
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.events], [], [], 5)
            data = os.read(self.events, 65536) if ready else b""
            self._pending += data
            if (ready and not data) or (not ready and (self.proc.poll() is not None or time.monotonic() > deadline)):
                tail = self.log.read_text()[-3000:] if self.log.exists() else ""
                raise RuntimeError(f"the reference driver ({self.threads} threads) stopped or hung "
                                   f"(exit code {self.proc.poll()}); the end of {self.log}:\n{tail}")
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def ready(self, timeout_s: float = 1800) -> None:
        event = self._event(timeout_s)
        assert event["event"] == "ready", event

    def round(self, timeout_s: float = 3600) -> dict:
        """Run one round (the driver must be ready); its usage. Then wait until it is ready for
        the next one, or done, so that its between-round work is not in another set-up's turn."""
        self.commands.write("go\n")
        self.commands.flush()
        event = self._event(timeout_s)
        assert event["event"] == "round", event
        self.next_event = self._event(timeout_s)
        return event

    def close(self, timeout_s: float = 120) -> None:
        self.commands.close()  # a driver still waiting for its turn reads the end and stops
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.events)


def measure(model: str, base: str, data: str, reference: Path, args, workdir: Path, ref_threads: list[int]) -> dict:
    """The project's set-up and the reference at each of ``ref_threads`` alive side by side, one
    round each in turn: every set-up's round wall and CPU seconds after the warm-up."""
    n_users, batch, seed = args.users, args.batch, 42
    total_rounds = args.warmup + args.rounds
    ov = project_overrides(base, data, n_users, args.local_steps, batch, seed)
    R.prepare(R.bench_config(ov), n_users)
    group = R.RankGroup(n_users, ov, mp.get_context("spawn"))
    refs = {}
    try:
        for threads in ref_threads:
            out = workdir / f"{model}-ref-{threads}t"
            out.mkdir(parents=True, exist_ok=True)
            refs[threads] = ReferenceRun(reference, base, data, threads,
                                         reference_args(n_users, total_rounds, args.local_steps, batch, seed, str(out)),
                                         workdir / f"{model}-reference-{threads}t.log")
        group.ready()
        for ref in refs.values():
            ref.ready()
        setups = {"project": None, **{f"reference, {t} thread{'s' if t > 1 else ''}": t for t in refs}}
        names = list(setups)
        got = {n: {"wall": [], "cpu": []} for n in names}
        for r in range(total_rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if setups[name] is None:
                    per_rank = group.run_rounds(1)
                    wall = max(rounds[0]["wall"] for rounds in per_rank.values())
                    cpu = sum(rounds[0]["user"] + rounds[0]["sys"] for rounds in per_rank.values())
                else:
                    event = refs[setups[name]].round()
                    wall, cpu = event["wall"], event["user"] + event["sys"]
                if r >= args.warmup:
                    got[name]["wall"].append(wall)
                    got[name]["cpu"].append(cpu)
            print(f"  {model}: round {r + 1}/{total_rounds}" + (" (warm-up)" if r < args.warmup else ""), flush=True)
    finally:
        group.stop()
        for ref in refs.values():
            ref.close()
    return got


def measure_passes(model: str, base: str, data: str, reference: Path, args, workdir: Path) -> list[dict]:
    """``measure`` for every reference thread count: all side by side, or (``--ref-passes``, the
    default for GPT-2 124M's shapes) one thread count per pass beside the project: a 124M
    reference process holds four clients' models and optimisers, about 8 GB, so two of them and
    the project's four ranks do not fit in 24 GB."""
    if args.ref_passes == "one" or (args.ref_passes == "auto" and model != "124m"):
        return [measure(model, base, data, reference, args, workdir, args.ref_threads)]
    return [measure(model, base, data, reference, args, workdir / f"pass-{t}", [t]) for t in args.ref_threads]


def report(model: str, passes: list[dict], local_steps: int) -> dict[str, float]:
    """Prints each set-up's medians and, per clock, project / reference against the reference
    at its best thread count (each ratio paired within the rounds of the pass it was measured in)."""
    print(f"\n{MODELS[model]}: a round = sync + {local_steps} expert steps of every user")
    print(f"{'set-up':32s} {'round wall s':>13s} {'spread':>7s} {'round CPU s':>12s} {'spread':>7s}")
    pairs = {}  # reference set-up -> (its times, the project's times of the same pass)
    for i, got in enumerate(passes):
        for name, g in got.items():
            label = name if len(passes) == 1 else f"{name} (pass {i + 1})"
            print(f"{label:32s} {C.median(g['wall']):13.2f} {C.spread(g['wall']):6.1%} {C.median(g['cpu']):12.2f} "
                  f"{C.spread(g['cpu']):6.1%}")
            if name != "project":
                pairs[name] = (g, got["project"])
    out = {}
    for clock in ("wall", "cpu"):
        ratios = {n: C.paired_ratio(project[clock], ref[clock]) for n, (ref, project) in pairs.items()}
        best = min(pairs, key=lambda n: C.median(pairs[n][0][clock]))
        out[clock], out[f"{clock}_best"] = ratios[best], best
        print(f"project / reference ({clock}): {out[clock]:.3f} against the {best} "
              + ", ".join(f"[{n}: {r:.3f}]" for n, r in ratios.items()))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--reference", default=os.environ.get("COMIGS_REFERENCE_DIR", ""),
                        help="a checkout of epfml/CoMiGS (default: $COMIGS_REFERENCE_DIR)")
    parser.add_argument("--models", default="small,124m", help="comma-separated: small and/or 124m")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per set-up")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and dropped")
    parser.add_argument("--local-steps", type=int, default=10, help="expert steps per user per round (paper: 10)")
    parser.add_argument("--ref-threads", default="1,2", help="thread counts of the reference, one process each")
    parser.add_argument("--ref-passes", choices=("auto", "one", "each"), default="auto",
                        help="the reference thread counts side by side in one pass (one), or one per pass beside "
                             "the project (each); auto: each for 124m (memory), one otherwise")
    parser.add_argument("--base-small", default="", help="checkpoint for the small model (default: seeded random)")
    parser.add_argument("--base-124m", default="", help="checkpoint with GPT-2 124M's shapes (default: seeded random)")
    parser.add_argument("--data", default="", help="a prepared dataset of GPT-2 BPE ids, uint16 (default: random)")
    args = parser.parse_args(argv)
    if not args.reference:
        parser.error("--reference DIR (or $COMIGS_REFERENCE_DIR): a checkout of https://github.com/epfml/CoMiGS")
    reference = check_reference(args.reference)
    args.users, args.batch = 4, 8
    args.ref_threads = [int(t) for t in args.ref_threads.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    vocab = 50257
    if args.quick:
        models, args.users, args.batch, args.rounds, args.warmup, args.local_steps = ["tiny"], 2, 2, 1, 1, 1
        args.ref_threads, vocab = [1], 4096
    unknown = [m for m in models if m not in MODELS or (m == "tiny" and not args.quick)]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from small, 124m")
    data = args.data or str(C.random_token_dataset(args.users, vocab))
    print(f"project vs reference ({reference}): {args.users} users, CoMiGS-1G1S, batch {args.batch} x 128, "
          f"{args.local_steps} expert steps per round, {args.rounds} rounds after {args.warmup} warm-up, "
          f"reference threads {args.ref_threads}")
    print(C.machine_line())
    results = {}
    with tempfile.TemporaryDirectory(prefix="vs-reference-") as tmp:
        for model in models:
            base = ({"small": args.base_small, "124m": args.base_124m}.get(model)
                    or str(C.random_gpt2_base(model, vocab)))
            passes = measure_passes(model, base, data, reference, args, Path(tmp))
            results[model] = report(model, passes, args.local_steps)
    print()
    main_model = "124m" if "124m" in results else models[-1]
    for model in models:
        if model != main_model:
            print(f"{MODELS[model]}, for comparison: round_cpu_over_reference {results[model]['cpu']:.3f}, "
                  f"round_wall_over_reference {results[model]['wall']:.3f}")
    suffix = "gpt2_124m" if main_model == "124m" else main_model
    print(C.target_line(f"round_cpu_over_reference_{suffix}", results[main_model]["cpu"], "<=", 0.75))
    print(C.target_line(f"round_wall_over_reference_{suffix}", results[main_model]["wall"], "<=", 0.6))
    return results


if __name__ == "__main__":
    main()
