"""The benchmark scripts run and end with their target lines (no timing is asserted here).

Only the step-cost script is fast enough for the suite in its --quick mode (in this process, on a
tiny GPT-2); the others start fresh processes or process groups and are run by hand
(README, Performance).
"""
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TARGET_LINE = re.compile(r"^(\w+): (\d+\.\d+) \(target (<=|>=|<|>) (\d+\.\d+)\)$")


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
