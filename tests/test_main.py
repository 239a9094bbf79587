"""The command line end to end: torchrun with 2 processes on configs/debug.yaml."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT.parent / "shared" / "tools" / "check-results.py"


def _torchrun(nproc: int, *args: str, cwd=ROOT, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "comigs_dist.main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_end_to_end_with_two_processes(tmp_path):
    """configs/debug.yaml on 2 ranks: a table, results.json following the contract, TensorBoard per user."""
    out = tmp_path / "run"
    proc = _torchrun(2, "--config", "configs/debug.yaml", f"out_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mean" in proc.stdout and str(out / "results.json") in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "comigs_1g1s" and results["world_size"] == 2 and results["rounds"] == 2
    assert [u["user"] for u in results["users"]] == [0, 1]
    for u in results["users"]:
        assert u["bytes_sent"] > 0 and u["tokens_per_second"] > 0 and u["test_ppl"] < u["base_test_ppl"]
    assert results["config"]["model"]["name"] == "tiny"
    if CHECK.exists():
        check = subprocess.run([sys.executable, str(CHECK), str(out / "results.json")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    for user in (0, 1):
        assert list((out / "tb" / f"user_{user:02d}").glob("events.out.tfevents.*")), f"no event file for user {user}"
        assert (out / "checkpoints" / f"user_{user:02d}" / "final.pt").is_file()
    assert (out / "config.yaml").is_file()


def test_cli_refuses_more_users_than_ranks(tmp_path):
    """n_users=3 on 2 ranks: a clear message and a non-zero exit, before any group forms."""
    proc = _torchrun(2, "--config", "configs/debug.yaml", "n_users=3", f"out_dir={tmp_path}/x", timeout=120)
    assert proc.returncode != 0
    assert "n_users (3) must equal the number of ranks (2)" in proc.stderr
    assert not (tmp_path / "x").exists()
