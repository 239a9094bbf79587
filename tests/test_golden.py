"""Golden numbers: what three methods compute on the debug config, pinned across refactors.

configs/debug.yaml (2 users, the tiny GPT-2, 2 rounds) runs on 2 ranks for comigs_1g1s, fedavg and
hetlora; the per-round mean over users of the round's mean expert-step loss and every user's final
test perplexity must equal ``tests/golden/debug.txt`` to a relative 2e-5 (on one machine the runs
are bit-identical; the margin covers CPUs whose kernels round differently). Relational tests
(resume == straight, server == all2all) cannot catch a change that shifts every mode alike; these
numbers can. An intended change of numbers regenerates the file in a commit of its own that says
why::

    python tests/test_golden.py --regenerate
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEBUG_CONFIG, subprocess_env

GOLDEN = Path(__file__).resolve().parent / "golden" / "debug.txt"
METHODS = ("comigs_1g1s", "fedavg", "hetlora")
RTOL = 2e-5


def _run(method: str, out_dir: Path) -> dict:
    """One run of the debug config on 2 ranks; returns its results.json."""
    cmd = [sys.executable, "-m", "comigs_dist.forkrun", "--nproc_per_node=2", "--config", DEBUG_CONFIG,
           f"method={method}", f"out_dir={out_dir}", "log.progress=false", "log.tensorboard=false"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out_dir / "results.json").read_text())


def numbers(results: dict) -> list[tuple[str, float]]:
    """(key, value) lines of one run: the per-round mean training loss and each user's test ppl."""
    users = sorted(results["users"], key=lambda u: u["user"])
    out = []
    for r, _ in enumerate(users[0]["train_curve"]):
        losses = [u["train_curve"][r]["loss"] for u in users]
        out.append((f"round {users[0]['train_curve'][r]['round']} mean_train_loss", sum(losses) / len(losses)))
    out += [(f"user {u['user']} test_ppl", u["test_ppl"]) for u in users]
    return out


def read_golden() -> dict[tuple[str, str], float]:
    table = {}
    for line in GOLDEN.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        method, *key, value = line.split()
        table[(method, " ".join(key))] = float(value)
    return table


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_debug_config_reproduces_the_golden_numbers(method, tmp_path):
    """Per-round mean training loss and per-user test perplexity equal tests/golden/debug.txt."""
    golden = read_golden()
    got = numbers(_run(method, tmp_path / method))
    expected = {k: v for (m, k), v in golden.items() if m == method}
    assert {k for k, _ in got} == set(expected), f"{method}: the golden file has other rows; regenerate on purpose"
    for key, value in got:
        assert value == pytest.approx(expected[key], rel=RTOL), f"{method} {key}: {value!r} != golden {expected[key]!r}"


def regenerate() -> None:
    import tempfile
    lines = ["# Golden numbers of configs/debug.yaml on 2 ranks (tests/test_golden.py); regenerate only for an",
             "# intended change of numbers, in a commit of its own:  python tests/test_golden.py --regenerate",
             "# method  key  value"]
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            for key, value in numbers(_run(method, Path(tmp) / method)):
                lines.append(f"{method} {key} {value!r}")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text("\n".join(lines) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_golden.py --regenerate")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    regenerate()
