"""slurm/comigs.sh and the submitit launcher on a real Slurm cluster (../shared/tools/local-slurm.sh up).

Two nodes (127.0.0.2 and 127.0.0.3) on this machine, with accounting. Without `sbatch` the tests
skip and say why; with COMIGS_REQUIRE_SLURM=1 (CI) a missing cluster is a failure instead.
Jobs inherit this environment (--export=ALL), so PYTHONPATH points them at this checkout.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "comigs.sh"
DEBUG = ROOT / "configs" / "debug.yaml"
CHECK = ROOT.parent / "shared" / "tools" / "check-results.py"
# small and quick: the local nodes declare 2 CPUs each, so every task asks for 1
FAST = ["log.tensorboard=false", "eval.max_tokens=2048"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1200)]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no Slurm here: sbatch is not on PATH (start one with ../shared/tools/local-slurm.sh up, as root)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    states = probe.stdout.split()
    if probe.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"Slurm is installed but no node is up (sinfo: {probe.stdout.strip() or probe.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    """The cluster, or a skip with the reason (a failure when COMIGS_REQUIRE_SLURM=1, as in CI)."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("COMIGS_REQUIRE_SLURM") == "1":
            pytest.fail(f"COMIGS_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def _sacct_states(job_id: str) -> list[str]:
    """Every record of the job in accounting (-D: a requeued job has one per start)."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return [s.split()[0] for s in out if s]


def _poll(predicate, timeout: float, what, every: float = 0.2) -> None:
    """Wait until ``predicate()`` holds; a bound on the wait (the test fails with ``what()`` when it
    passes), not a measurement: nothing here asserts how long anything took."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(what())
        time.sleep(every)


def _wait(job_id: str, timeout: float = 150) -> str:
    """Poll accounting every half second until the job ends (sbatch --wait polls ever more rarely)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _sacct_states(job_id)
        if states and states[-1].startswith(TERMINAL):
            return states[-1]
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not end within {timeout} s")


def _log_of(tmp_path: Path, job_id: str) -> str:
    logs = list(tmp_path.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no log)"


def _results(out_dir: Path) -> dict:
    results = json.loads((out_dir / "results.json").read_text())
    if CHECK.exists():
        check = subprocess.run([sys.executable, str(CHECK), str(out_dir / "results.json")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    return results


def _sbatch(tmp_path: Path, *args: str, env: dict | None = None) -> str:
    """Submit slurm/comigs.sh from tmp_path (runs and logs land there); returns the job id.

    The tests wait on accounting every half second rather than with `sbatch --wait`, which is
    equivalent but sleeps 2, 8, then 32 s between its checks: 30 s lost per job.
    """
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--output={tmp_path}/%x-%j.out", *args],
                          cwd=tmp_path, env={**subprocess_env(one_thread=False), **(env or {})},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _requeue_after_checkpoint(tmp_path: Path, job_id: str, out_dir: Path, timeout: float = 150) -> None:
    """Once every user has checkpointed a round, send USR1 to the batch script, as --signal does
    before the time limit; then release the requeued job (Slurm holds one for about 2 minutes)."""
    manifest = out_dir / "checkpoints" / "manifest.json"
    _poll(manifest.is_file, timeout, lambda: f"job {job_id} wrote no checkpoint: {_log_of(tmp_path, job_id)[-2000:]}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

    def released() -> bool:  # once the job is pending again (and held), move its start time to now
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"],
                               capture_output=True, text=True).stdout.strip()
        if "REQUEUED" in _sacct_states(job_id) and state == "PENDING":
            update = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                    capture_output=True, text=True)
            return update.returncode == 0
        return False
    _poll(released, 30, lambda: f"job {job_id} was not requeued: {_sacct_states(job_id)}", every=0.3)


def test_sbatch_one_node_and_two_nodes_requeued_agree(slurm, tmp_path):
    """slurm/comigs.sh on 1 node with one rank simulating both users (COMIGS_RANKS_PER_NODE=1) and
    on --nodes=2 (1 user per node: a real rendezvous). The 2-node job is requeued by USR1 after its
    first checkpoint and resumes on its second start from the same out_dir; both end with the same
    numbers, bit for bit."""
    run = [str(SCRIPT), str(DEBUG), *FAST, "train.rounds=16", "checkpoint.every=1"]
    id_one = _sbatch(tmp_path, "--job-name=one", "--cpus-per-task=1", *run, f"out_dir={tmp_path}/one",
                     env={"COMIGS_RANKS_PER_NODE": "1"})
    id_two = _sbatch(tmp_path, "--job-name=two", "--nodes=2", "--cpus-per-task=1", *run)
    out_two = tmp_path / "runs" / f"slurm-{id_two}_comigs_1g1s_s42"
    _requeue_after_checkpoint(tmp_path, id_two, out_two)
    state_one, state_two = _wait(id_one), _wait(id_two)
    log_one, log_two = _log_of(tmp_path, id_one), _log_of(tmp_path, id_two)
    assert state_one == "COMPLETED", log_one[-3000:]
    assert state_two == "COMPLETED", log_two[-3000:]
    assert "2 users on 1 ranks = 1 node(s) x 1" in log_one
    assert f"results: {tmp_path / 'one'}/results.json" in log_one

    # requeued once; the log of both starts is kept, and both used the job's stable out_dir
    assert _sacct_states(id_two) == ["REQUEUED", "COMPLETED"]
    assert f"job {id_two} start 1 " in log_two and f"job {id_two} start 2 " in log_two, log_two[-3000:]
    assert "time limit near, requeueing" in log_two
    assert log_two.count(f"out_dir: {out_two}") == 2
    assert log_two.count("resume: resume=auto") == 2
    # the second start ran one torchrun on each node, which met in one rendezvous, and resumed
    last = log_two[log_two.index(f"job {id_two} start 2 "):]
    assert "2 users on 2 ranks = 2 node(s) x 1" in last
    assert "node 127.0.0.2 (node rank 0): torchrun for 1 ranks" in last
    assert "node 127.0.0.3 (node rank 1): torchrun for 1 ranks" in last
    resumed = re.search(r"resuming from round (\d+)", last)
    assert resumed and 1 <= int(resumed.group(1)) <= 16, last[-3000:]
    nodes = subprocess.run(["sacct", "-j", f"{id_two}.0", "-n", "-P", "-o", "NNodes,NTasks,State"],
                           capture_output=True, text=True).stdout.split()
    assert "2|2|COMPLETED" in nodes, nodes

    r1, r2 = _results(tmp_path / "one"), _results(out_two)
    assert r1["world_size"] == r2["world_size"] == 2 and r1["rounds"] == r2["rounds"] == 16
    # two users on one rank compute what one user per rank does, and a resumed run what an
    # uninterrupted one does
    for u1, u2 in zip(r1["users"], r2["users"]):
        assert u1["user"] == u2["user"]
        assert u1["test_ppl"] == u2["test_ppl"]
        assert u1["bytes_sent"] == u2["bytes_sent"] > 0


def test_submitit_sweep_completes_and_collects(slurm, tmp_path):
    """A 2-job seed sweep through submitit on Slurm completes; collect builds mean/std over the two seeds."""
    from launch import collect, submit
    lines = []
    manifest = submit.submit(["--config", str(DEBUG), *FAST], ["seed=42,45"], root=tmp_path, name="sweep",
                             cluster="slurm", cpus_per_task=1, timeout_min=10, wait=True, echo=lines.append)
    text = "\n".join(lines)
    assert manifest["cluster"] == "slurm" and len(manifest["jobs"]) == 2, text
    assert list(manifest["outcomes"].values()) == ["COMPLETED", "COMPLETED"], text
    for rec in manifest["jobs"]:
        assert f"job {rec['job_id']}" in text and rec["out_dir"] in text
    folder = Path(manifest["folder"])
    seeds = [_results(Path(rec["out_dir"]))["seed"] for rec in manifest["jobs"]]
    assert seeds == [42, 45]
    ppl = [_results(Path(rec["out_dir"]))["mean_test_ppl"] for rec in manifest["jobs"]]

    csv_path = tmp_path / "table.csv"
    proc = subprocess.run([sys.executable, "-m", "launch.collect", str(folder), "--csv", str(csv_path)],
                          cwd=tmp_path, env=subprocess_env(one_thread=False), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    mean, std = collect.mean_std(ppl)
    assert f"{mean:.3f} ± {std:.3f}" in proc.stdout and "42,45" in proc.stdout, proc.stdout
    assert "no results.json" not in proc.stdout
    assert csv_path.read_text().splitlines()[1].startswith("comigs_1g1s,42 45,2,")


def test_submitit_failed_and_killed_jobs_are_reported_not_waited_on(slurm, tmp_path):
    """Two failures, neither waited on forever: users that raise (reported with the exception) and a
    job killed while running, which leaves no result (noticed through sacct); exit code 1. The
    launcher runs 500 rounds: only noticing the kill ends it within the test's bound. (The failing
    users load a base whose config.json names no model type: a missing base directory is refused
    before anything is submitted.)"""
    from launch.common import slug
    broken = tmp_path / "brokenbase"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, "-m", "launch.submit", "--config", str(DEBUG), *FAST, "train.rounds=500",
                             "--sweep", f"model.name={broken},tiny", "--executor", "slurm",
                             "--cpus-per-task", "1", "--time", "10", "--root", str(tmp_path), "--wait"],
                            cwd=tmp_path, env=subprocess_env(one_thread=False, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while len([ln for ln in lines if ln.startswith("  job ")]) < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    ids = {ln.split()[2]: ln.split()[1] for ln in lines if ln.startswith("  job ")}
    bad_label = slug(f"model.name={broken}")
    bad, killed = ids[bad_label], ids["model.name-tiny"]
    _poll(lambda: "RUNNING" in _sacct_states(killed), 120, lambda: f"job {killed} never ran: {_sacct_states(killed)}",
          every=0.5)
    subprocess.run(["scancel", "--signal=KILL", killed], check=True)  # as the OOM killer would
    out, _ = proc.communicate(timeout=150)
    out = "".join(lines) + out
    assert proc.returncode == 1, out
    assert f"job {bad} {bad_label}: FAILED: ValueError" in out and f"Unrecognized model in {broken}" in out, out
    assert f"job {killed} model.name-tiny: FAILED: ended without a result (scheduler state" in out, out
    assert f"{bad}_0_log.out" in out and "0 completed, 2 failed" in out
