"""The embedded default: CoMiGS-1G1S beats the untrained base and Local training (a fast size)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.train_tokens=2000", "train.rounds=10", "data.test_tokens=4096", "eval.every=0",
        "log.tensorboard=false", "checkpoint.final=false", "log.progress=false"]


def _run(method: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "comigs_dist.main", f"method={method}", f"out_dir={out}", *FAST]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_comigs_beats_base_and_local_on_the_embedded_default(tmp_path):
    """Mean test perplexity: CoMiGS-1G1S < Local < the pretrained base, on every user."""
    comigs = _run("comigs_1g1s", tmp_path / "comigs")
    local = _run("local", tmp_path / "local")
    assert comigs["mean_base_test_ppl"] == pytest.approx(local["mean_base_test_ppl"])
    assert comigs["mean_test_ppl"] < 0.95 * local["mean_test_ppl"] < 0.95 * local["mean_base_test_ppl"]
    for c, l in zip(comigs["users"], local["users"]):
        assert c["test_ppl"] < l["test_ppl"] < c["base_test_ppl"]
