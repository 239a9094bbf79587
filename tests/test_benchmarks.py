"""The benchmark scripts run and end with their target lines (no timing is asserted here).

The step-cost script runs in this process in its --quick mode (a tiny GPT-2); the memory, sync
and communication scripts run as the commands of docs/performance.md with --quick (fresh
processes and a process group of tiny users, marked slow). The default run keeps the two whose
targets are byte equalities (comm, privacy); the timing scripts' --quick runs are `extended`
(`pytest -m extended`). Their full runs are by hand (docs/performance.md).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TARGET_LINE = re.compile(r"^(\w+): (\d+\.\d+) \(target (<=|>=|<|>|==) (\d+\.\d+)\)$")


def test_step_cost_quick_runs_and_prints_one_target_line_per_target(capsys):
    """step_cost.py --quick checks fused == naive loss, times every variant and prints both target lines."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()
    try:
        import step_cost
        ratios = step_cost.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(ROOT / "benchmarks"))
    lines = capsys.readouterr().out.strip().splitlines()
    targets = [TARGET_LINE.match(line) for line in lines[-2:]]
    assert all(targets), lines[-2:]
    assert [m.group(1) for m in targets] == ["step_cost_1g1s_over_one_lora", "step_cost_8x_top2_over_one_lora"]
    assert [m.group(3, 4) for m in targets] == [("<=", "1.10"), ("<=", "1.20")]
    assert set(ratios) == {label for label, *_ in step_cost.VARIANTS}
    assert all(r > 0 for r in ratios.values())


@pytest.mark.slow
@pytest.mark.parametrize("script,names", [
    pytest.param("memory.py", ["peak_memory_8_over_2_experts"], marks=pytest.mark.extended),
    pytest.param("sync_overhead.py", ["sync_exact_over_bare_f64_all_reduce"], marks=pytest.mark.extended),
    ("comm.py", ["comm_bytes_all2all_over_server_2_ranks", "comm_bytes_at_collective_over_analytic_worst_2_ranks"]),
    pytest.param("cpu_split.py", ["round_kernel_share"], marks=pytest.mark.extended),
    pytest.param("packed_users.py", ["packed_over_sequential_embedded"], marks=pytest.mark.extended),
    pytest.param("many_users.py", ["seconds_per_participating_user_round", "peak_rss_gib_40_users"],
                 marks=pytest.mark.extended),
    ("privacy.py", ["privacy_secure_agg_bytes_over_fp32_at_collective", "privacy_counted_over_collective_worst",
                    "privacy_dp_round_over_plain", "privacy_secure_agg_round_over_plain"]),
])
def test_quick_benchmarks_run_and_end_with_their_target_lines(script, names):
    """`python benchmarks/<script> --quick` exits 0 and its last lines are its targets, in the
    `<name>: <ratio> (target <op> <value>)` form, with a positive ratio; equality targets (bytes,
    not time) hold: what the collectives were handed matches the analytic formula."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-len(names):]
    matches = [TARGET_LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [m.group(1) for m in matches] == names
    assert all(float(m.group(2)) > 0 for m in matches)
    assert all(m.group(2) == m.group(4) for m in matches if m.group(3) == "=="), lines


def _crash_after_measuring(rank, n_ranks, port, crash, out_path):
    """A spawned benchmark rank without a process group: rank 0 writes the rows; then, per
    ``crash``, rank 0 aborts after its done marker (a teardown crash) or before it (a real failure)."""
    import json
    import os
    if rank == 0:
        Path(out_path).write_text(json.dumps([{"rank": 0}, {"rank": 1}]))
    if crash == "before" and rank == 0:
        os.abort()
    Path(f"{out_path}.done.{rank}").touch()
    if crash == "after" and rank == 0:
        os.abort()


def test_a_rank_crashing_in_teardown_after_measuring_keeps_the_numbers_a_failure_does_not(capsys):
    """CI once lost benchmarks/comm.py --quick to rank 0 aborting in gloo's process-group teardown
    after every rank had measured and passed the last barrier. spawn_ranks now keeps such a run's
    numbers with a note, and still stops on a rank that fails before it is done."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from comm import spawn_ranks
        assert spawn_ranks(_crash_after_measuring, 2, "after") == [{"rank": 0}, {"rank": 1}]
        assert "crashed while its process group shut down, after the measurement" in capsys.readouterr().err
        with pytest.raises(RuntimeError, match=r"a rank failed \(exit codes \[-6, 0\]\)"):
            spawn_ranks(_crash_after_measuring, 2, "before")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
