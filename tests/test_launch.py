"""The launchers without a cluster: job planning, sweeps, the results table, submitit's local executor."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comigs_dist.config import ConfigError, load_config
from launch import collect, common, plan, submit
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
FAST = ["log.tensorboard=false", "eval.max_tokens=2048"]


def test_users_per_node_spreads_users_over_nodes():
    """n_users / nodes, else the explicit value, else one per GPU; impossible layouts name the fix."""
    two = load_config(DEBUG)  # n_users: 2
    assert common.users_per_node(two, 1) == 2
    assert common.users_per_node(two, 2) == 1
    with pytest.raises(ConfigError, match=r"n_users \(2\) cannot be spread evenly over 3 nodes"):
        common.users_per_node(two, 3)
    with pytest.raises(ConfigError, match=r"n_users \(2\) is smaller than nodes \(2\) x ranks per node \(2\)"):
        common.users_per_node(two, 2, explicit=2)
    many = load_config(None, ["n_users=1000"])
    assert common.users_per_node(many, 2, explicit=1) == 1  # 1,000 users on 2 ranks: 500 per rank
    assert common.users_per_node(many, 2, gpus_per_node=4) == 4  # one rank per GPU, 125 users each
    free = load_config(None)  # n_users unset: the world size decides
    assert common.users_per_node(free, 2, explicit=3) == 3
    assert common.users_per_node(free, 2, gpus_per_node=4) == 4
    with pytest.raises(ConfigError, match="cannot tell how many users each node runs"):
        common.users_per_node(free, 1)


def test_resume_override_must_set_resume_to_auto_or_off():
    """The resume override must set resume itself, read as the run reads it (YAML: True is true), to
    auto (continue) or false/empty (off, and the note says a requeue then stops): another option
    (train.lr) was once passed as if it were the resume override, a misspelt key turned resuming off
    with a note, and resume=true, which refuses the first start, was accepted."""
    assert common.resume_args() == common.resume_args(common.RESUME_OVERRIDE)
    for other in ("checkpoint.every=2", "train.lr=0.5"):
        with pytest.raises(ConfigError, match=rf"sets {other.split('=')[0]}, not how a requeued job resumes"):
            common.resume_args(other)
    with pytest.raises(ConfigError, match="names 'resum', which is no option of comigs_dist"):
        common.resume_args("resum=auto")  # a typo once turned resuming off with a note
    for true in ("resume=true", "resume=True", "resume=yes"):  # YAML reads all three as true, as the run does
        with pytest.raises(ConfigError, match="would refuse the job's first start"):
            common.resume_args(true)
    for bad in ("resume=", "resume=AUTO"):
        with pytest.raises(ConfigError, match="is not a valid value of resume"):
            common.resume_args(bad)
    for off in ("", "resume=false", "resume=False"):
        note = common.resume_args(off)[1]
        assert note.startswith("resume: off (a requeued job stops with an error") and "starts again" not in note
    # resume=auto without round checkpoints: kept, and the note says a requeued job starts over
    args, note = common.resume_args(common.RESUME_OVERRIDE, checkpoint_every=0)
    assert args == [common.RESUME_OVERRIDE] and "checkpoint.every=0 writes no round checkpoint" in note, note
    assert "continues from its last checkpoint" in common.resume_args(common.RESUME_OVERRIDE, 5)[1]
    args, note = common.resume_args("")
    assert args == [] and note.startswith("resume: off")
    assert common.resume_args("resume=false")[0] == ["resume=false"]
    with pytest.raises(ConfigError, match="must look like key=value"):
        common.resume_args("auto")


def test_plan_pins_out_dir_threads_and_resume(tmp_path, monkeypatch):
    """A job's out_dir depends on its id (stable across requeues); the node's CPUs are shared by its users."""
    monkeypatch.chdir(tmp_path)
    p = plan.plan("123", 2, ["--config", DEBUG, "train.rounds=3"], cpus_per_task=8, resume="resume=auto")
    assert (p["USERS_PER_NODE"], p["WORLD_SIZE"], p["THREADS"]) == (1, 2, 8)
    assert p["OUT_DIR"] == str(tmp_path / "runs" / "slurm-123_comigs_1g1s_s42")
    assert p["MAIN_ARGS"] == ["--config", DEBUG, "train.rounds=3", "train.threads=8",
                              f"out_dir={p['OUT_DIR']}", "resume=auto"]
    # the config's own out_dir and threads win; 4 users share 8 CPUs -> 2 threads each
    p = plan.plan("7", 1, ["--config", DEBUG, f"out_dir={tmp_path}/mine", "train.threads=3", "n_users=4"],
                  cpus_per_task=8, resume="")
    assert p["OUT_DIR"] == str(tmp_path / "mine") and p["THREADS"] == 3 and p["USERS_PER_NODE"] == 4
    assert not [a for a in p["MAIN_ARGS"] if a.startswith("train.threads=") and a != "train.threads=3"]
    assert plan.plan("8", 2, ["n_users=4"], cpus_per_task=8)["THREADS"] == 4
    # sbatch's default resume=auto with checkpoint.every=0 (every YAML's default) would start a
    # requeued job over: the note that the script prints says so, and says how to avoid it
    assert "starts again from round 0" in plan.plan("9", 1, ["--config", DEBUG])["RESUME_NOTE"]
    assert "continues from its last checkpoint" in plan.plan("9", 1, ["--config", DEBUG,
                                                                      "checkpoint.every=2"])["RESUME_NOTE"]


def test_plan_output_round_trips_through_bash(tmp_path):
    """What slurm/comigs.sh evals gives back the exact arguments (spaces and brackets included); bad input exits 2."""
    script = (f'eval "$({sys.executable} -m launch.plan --job-id 5 --nodes 1 --resume "" -- --config {DEBUG} '
              f'"moe.n_experts=[2, 3]" seed=7)" && printf "%s\\n" "$USERS_PER_NODE" "${{MAIN_ARGS[@]}}"')
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=subprocess_env(one_thread=False),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["2", "--config", DEBUG, "moe.n_experts=[2, 3]", "seed=7",
                                        f"out_dir={tmp_path}/runs/slurm-5_comigs_1g1s_s7"]
    bad = subprocess.run([sys.executable, "-m", "launch.plan", "--job-id", "5", "--nodes", "1", "--",
                          "--config", DEBUG, "train.rounds=0"], cwd=tmp_path, env=subprocess_env(one_thread=False),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "train.rounds (0) must be > 0" in bad.stderr


def test_sbatch_script_refuses_to_run_outside_slurm(tmp_path):
    """bash slurm/comigs.sh without an allocation says how to submit it instead of starting anything."""
    env = {k: v for k, v in subprocess_env(one_thread=False).items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "comigs.sh"), DEBUG], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "sbatch slurm/comigs.sh" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_expand_sweep_is_a_cartesian_product():
    """One override list per combination, last key fastest; commas inside brackets stay in a value."""
    assert submit.expand_sweep(["seed=42,45", "method=local,fedavg"]) == [
        ["seed=42", "method=local"], ["seed=42", "method=fedavg"],
        ["seed=45", "method=local"], ["seed=45", "method=fedavg"]]
    assert submit.expand_sweep(["moe.n_experts=[2,3],[3,3]"]) == [["moe.n_experts=[2,3]"], ["moe.n_experts=[3,3]"]]
    assert submit.expand_sweep([]) == [[]]
    for bad, message in [("seed", "must look like key=value1,value2"), ("seed=1,", "empty key or value")]:
        with pytest.raises(ConfigError, match=message):
            submit.expand_sweep([bad])
    with pytest.raises(ConfigError, match="names 'seed' twice"):
        submit.expand_sweep(["seed=1", "seed=2"])


def test_plan_jobs_validates_every_combination_before_submitting(tmp_path):
    """Every bad combination is reported at once and nothing is created; good ones get their own out_dir."""
    with pytest.raises(ConfigError) as err:
        submit.submit(["--config", DEBUG], ["train.rounds=2,0", "method=local,nope"], root=tmp_path, cluster="local")
    text = str(err.value)
    assert text.startswith("nothing was submitted")
    assert "train.rounds=0 method=local: invalid configuration: train.rounds (0) must be > 0" in text
    assert "train.rounds=2 method=nope" in text and "train.rounds=0 method=nope" in text
    assert "train.rounds=2 method=local:" not in text
    assert list(tmp_path.iterdir()) == []

    jobs, _ = submit.plan_jobs(["--config", DEBUG, "train.rounds=1"], ["seed=42,45", "method=local,fedavg"],
                               tmp_path / "sw", cpus_per_task=2, resume="")
    assert [j["label"] for j in jobs] == ["seed-42_method-local", "seed-42_method-fedavg",
                                          "seed-45_method-local", "seed-45_method-fedavg"]
    assert jobs[3]["argv"] == ["--config", DEBUG, "train.rounds=1", "seed=45", "method=fedavg", "train.threads=2",
                               f"out_dir={tmp_path / 'sw' / 'seed-45_method-fedavg'}"]
    assert {j["users_per_node"] for j in jobs} == {2}
    with pytest.raises(ConfigError, match="different numbers of users per node"):
        submit.plan_jobs([], ["n_users=2,4"], tmp_path / "x")


def test_experiment_is_requeued_with_the_same_arguments():
    """On timeout or preemption submitit resubmits the callable with its out_dir and resume override intact."""
    exp = submit.Experiment(["--config", DEBUG, "out_dir=/x", "resume=auto"], "/x")
    again = exp.checkpoint()
    assert again.function is exp and again.args == () and exp.argv[-2:] == ["out_dir=/x", "resume=auto"]


def test_failure_reason_is_the_exception_line():
    """The launcher reports the exception itself, not submitit's advice about logs."""
    message = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent "
               "call last):\n  File \"x.py\", line 1\nOSError: no such model\n\n----------------------\nYou can "
               "check full logs with 'job.stderr(0)'\n  - /a/16_0_log.err")
    assert submit.failure_reason(message) == "OSError: no such model"


def _fake_results(folder: Path, method: str, seed: int, ppl: float, **overrides) -> Path:
    cfg = load_config(DEBUG, [f"method={method}", f"seed={seed}", *[f"{k}={v}" for k, v in overrides.items()]])
    out = folder / f"{method}_{seed}_{len(list(folder.glob('*')))}"
    out.mkdir(parents=True)
    results = {"method": method, "dataset": "embedded-in", "seed": seed, "world_size": 2, "mean_test_ppl": ppl,
               "mean_base_test_ppl": 100.0 + seed, "config": cfg.to_dict(),
               "users": [{"user": 0, "bytes_sent": 1_000_000}, {"user": 1, "bytes_sent": 3_000_000}]}
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_collect_groups_seeds_and_computes_mean_and_std(tmp_path):
    """Seeds of one configuration form a row: mean and sample std by hand; options that differ become columns."""
    _fake_results(tmp_path, "comigs_1g1s", 42, 10.0)
    _fake_results(tmp_path, "comigs_1g1s", 45, 12.0, **{"train.threads": 3})  # threads do not split a group
    _fake_results(tmp_path, "comigs_1g1s", 47, 14.0, **{"eval.every": 0})  # nor do evaluation points
    _fake_results(tmp_path, "local", 42, 20.0)
    _fake_results(tmp_path, "local", 42, 30.0, **{"train.rounds": 5})
    files, _ = collect.find_results([tmp_path])
    columns, rows = collect.summarize(collect.load_runs(files))
    assert columns == ["method", "train.rounds"]
    by = {(r["method"], r["train.rounds"]): r for r in rows}
    comigs = by[("comigs_1g1s", 2)]
    assert comigs["seeds"] == [42, 45, 47] and comigs["n"] == 3
    assert comigs["test_ppl_mean"] == pytest.approx(12.0) and comigs["test_ppl_std"] == pytest.approx(2.0)
    assert comigs["base_ppl_mean"] == pytest.approx(100 + (42 + 45 + 47) / 3)
    assert comigs["mb_sent_per_user"] == pytest.approx(2.0)
    assert math.isnan(by[("local", 2)]["test_ppl_std"]) and by[("local", 5)]["test_ppl_mean"] == 30.0
    table = collect.format_table(columns, rows)
    assert "12.000 ± 2.000" in table and "20.000 ± -" in table
    # the same configuration and seed twice (a run beside its copy) was counted twice, shrinking the std
    twice = _fake_results(tmp_path, "comigs_1g1s", 45, 12.5)
    with pytest.raises(ValueError, match=r"are the same configuration with the same seed \(45\).*pass only one"):
        collect.summarize(collect.load_runs(collect.find_results([tmp_path])[0]))
    with pytest.raises(ValueError, match=str(twice)):
        collect.summarize(collect.load_runs(collect.find_results([tmp_path])[0]))
    assert collect.main([str(tmp_path)]) == 2


def test_collect_cli_writes_csv_and_lists_missing_jobs(tmp_path):
    """The command prints the table, writes the CSV, and names jobs of the sweep that left no results."""
    done = _fake_results(tmp_path, "fedavg", 42, 11.0)
    from comigs_dist import guard
    (tmp_path / "seed-47").mkdir()
    guard.write_stopped(tmp_path / "seed-47", guard.Stopped("user 2: the expert loss is nan", 2, 7))
    (tmp_path / "jobs.json").write_text(json.dumps({"cluster": "local", "n_tasks": 2, "jobs": [
        {"job_id": "1", "label": "seed-42", "out_dir": str(done), "log": "l1"},
        {"job_id": "2", "label": "seed-45", "out_dir": str(tmp_path / "seed-45"), "log": "l2"},
        {"job_id": "3", "label": "seed-47", "out_dir": str(tmp_path / "seed-47"), "log": "l3"}]}))
    unstarted = {"cluster": "local", "jobs": [{"label": "seed-48", "out_dir": str(tmp_path / "seed-48")}]}
    assert collect.missing_jobs([unstarted]) == [
        "job - seed-48: never started (its local pool was stopped before it); run the sweep again for it"]
    assert collect.missing_jobs([json.loads((tmp_path / "jobs.json").read_text())]) == [
        "job 2 seed-45: no results.json (state unknown); log: l2",
        f"job 3 seed-47: diverged (guard.nan=stop: a non-finite value, user 2, round 7; "
        f"{tmp_path / 'seed-47' / 'stopped.json'})"]
    proc = subprocess.run([sys.executable, "-m", "launch.collect", str(tmp_path), "--csv", str(tmp_path / "t.csv")],
                          env=subprocess_env(one_thread=False), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fedavg  42     1  11.000 ± -" in proc.stdout and "job 2 seed-45: no results.json" in proc.stdout
    assert (tmp_path / "t.csv").read_text().splitlines()[1].startswith("fedavg,42,1,11.0,nan,142.0,2.0,")
    empty = subprocess.run([sys.executable, "-m", "launch.collect", str(tmp_path / "seed-45")],
                           env=subprocess_env(one_thread=False),
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "does not exist" in empty.stderr


@pytest.mark.slow
def test_local_executor_runs_a_two_user_job(tmp_path, monkeypatch):
    """--executor local (debugging without Slurm): submitit starts 2 processes that form one gloo group."""
    monkeypatch.setenv("PYTHONPATH", subprocess_env(one_thread=False)["PYTHONPATH"])
    lines = []
    manifest = submit.submit(["--config", DEBUG, *FAST], [], root=tmp_path, name="local", cluster="local",
                             timeout_min=5, wait=True, echo=lines.append)
    assert manifest["cluster"] == "local" and list(manifest["outcomes"].values()) == ["COMPLETED"], "\n".join(lines)
    results = json.loads((Path(manifest["jobs"][0]["out_dir"]) / "results.json").read_text())
    assert results["world_size"] == 2 and [u["user"] for u in results["users"]] == [0, 1]
    assert all(u["bytes_sent"] > 0 for u in results["users"])
    # a run that guard.nan=stop ends (a NaN injected into user 1's generalist before round 2) is
    # reported as DIVERGED with its user and round, an outcome and not a failure
    monkeypatch.setenv("COMIGS_FAULT", "nan,user=1,round=2")
    lines.clear()
    manifest = submit.submit(["--config", DEBUG, *FAST, "guard.nan=stop"], [], root=tmp_path, name="nan",
                             cluster="local", timeout_min=5, wait=True, echo=lines.append)
    assert list(manifest["outcomes"].values()) == ["DIVERGED"], "\n".join(lines)
    stopped = Path(manifest["jobs"][0]["out_dir"]) / "stopped.json"
    assert any(f"DIVERGED: guard.nan=stop found a non-finite value (user 1, round 2): {stopped}" in line
               for line in lines), "\n".join(lines)


def kill_local_job(job):
    """SIGKILL a submitit local job's controller and the tasks it started (Linux /proc)."""
    pid = job._process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in (children.read_text().split() if children.exists() else []):
        os.kill(int(child), 9)
    job._process.kill()


@pytest.mark.parametrize("launched_by", ["terminal", "background shell"])
def test_an_interrupted_wait_stops_the_local_job_and_frees_its_out_dir(tmp_path, monkeypatch, capsys, launched_by):
    """Ctrl-C while `launch.submit --wait` waits on a local job (a long debug run): main returns 130,
    the job is stopped rather than left running without its launcher, and its out_dir's lock is
    free for the next call (which resumes it). Also when the launcher was started in the background
    by a shell (`nohup ... &`), which makes it ignore SIGINT, the signal that stops a local job."""
    import signal
    import time

    from comigs_dist.checkpoint import OutDirLock
    monkeypatch.setenv("PYTHONPATH", subprocess_env(one_thread=False)["PYTHONPATH"])
    seen = {}
    real_wait = submit.wait_for

    def wait_then_interrupt(jobs, records, **kw):
        seen["jobs"], seen["out_dir"] = jobs, Path(records[0]["out_dir"])
        for _ in range(600):  # until the run holds its out_dir (at most two minutes)
            if (seen["out_dir"] / "config.yaml").is_file() or jobs[0].done():
                break
            time.sleep(0.2)
        assert not jobs[0].done(), real_wait(jobs, records, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "wait_for", wait_then_interrupt)
    previous = signal.getsignal(signal.SIGINT)
    disposition = signal.SIG_IGN if launched_by == "background shell" else previous
    signal.signal(signal.SIGINT, disposition)
    try:
        rc = submit.main(["--config", DEBUG, *FAST, "train.rounds=500", "--executor", "local", "--wait",
                          "--root", str(tmp_path), "--time", "5"])
        assert signal.getsignal(signal.SIGINT) is disposition, "the launcher's own SIGINT handling changed"
    finally:
        signal.signal(signal.SIGINT, previous)
        if "jobs" in seen and not seen["jobs"][0].done():  # a failing run of this test leaves no ranks behind
            kill_local_job(seen["jobs"][0])
    out = capsys.readouterr().out
    assert rc == 130 and "interrupted: stopped 1 running run(s)" in out, out
    assert seen["jobs"][0].done()
    lock = OutDirLock(seen["out_dir"])
    lock.acquire()  # raises if a live run still held it
    lock.release()


def test_one_srun_task_per_user_maps_slurm_variables_onto_torch_ones(monkeypatch):
    """`srun python -m comigs_dist.main` (docs/cluster.md, one task per user): SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID and SLURM_NTASKS_PER_NODE become RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE; under torchrun or submitit (RANK already set) nothing is touched."""
    from comigs_dist import dist
    # a private copy of the environment: what the function writes must not reach the jobs that
    # later tests submit from this process (they would all inherit MASTER_PORT=29500)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                       "SLURM_NTASKS_PER_NODE": "4(x2)"})  # Slurm's form for 2 nodes of 4 tasks
    dist.env.export_slurm_env()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")] == \
        ["5", "8", "1", "4", "29500"]
    assert (dist.env_rank(), dist.env_world_size()) == (5, 8)

    os.environ.update({"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "7"})  # torchrun's own variables win
    dist.env.export_slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("2", "4")


def test_two_sweeps_of_one_name_in_the_same_second_get_two_folders_and_a_refused_one_none(tmp_path, monkeypatch):
    """Two `launch.submit --name x` in the same second: the second died with a FileExistsError
    traceback; now each claims its own folder (-2). A sweep refused for its config leaves no folder."""
    from datetime import datetime as real_datetime

    class Frozen(real_datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime(2026, 12, 1, 3, 0, 0)

    monkeypatch.setattr(submit, "datetime", Frozen)
    folders = []
    monkeypatch.setattr(submit, "launch_jobs",
                        lambda jobs, folder, **kw: (folders.append(folder), []) and ({"cluster": "local"}, []))
    monkeypatch.setattr(submit, "wait_for", lambda *a, **kw: {})
    lines = []
    for _ in range(2):
        submit.submit(["--config", DEBUG], [], root=tmp_path, name="x", cluster="local", echo=lines.append)
    assert [f.name for f in folders] == ["20261201-030000_x", "20261201-030000_x-2"], folders
    # local jobs all start at once: more processes than CPUs is said (timings then mean little);
    # a requeue note (a scheduler's matter) is not
    from comigs_dist import dist
    monkeypatch.setattr(dist, "usable_cpus", lambda: 3)
    lines.clear()
    submit.submit(["--config", DEBUG], ["seed=1,2"], root=tmp_path, name="z", cluster="local", echo=lines.append)
    assert any(l.startswith("warning: the local executor starts all 2 job(s) at once, 4 processes on 3 CPU(s)")
               for l in lines), lines
    assert not any(l.startswith("resume:") for l in lines), lines
    lines.clear()
    submit.submit(["--config", DEBUG], [], root=tmp_path, name="w", cluster="local", echo=lines.append)
    assert not any("warning" in l for l in lines), lines
    with pytest.raises(ConfigError, match="train.lr"):
        submit.submit(["--config", DEBUG, "train.lr=-1"], [], root=tmp_path, name="y", cluster="local",
                      echo=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20261201-030000_w", "20261201-030000_x",
                                                          "20261201-030000_x-2", "20261201-030000_z"]


def test_a_local_sweep_with_wait_runs_max_parallel_jobs_at_a_time(tmp_path):
    """`launch.submit --executor local --wait --max-parallel 1`, three seeds: every job completes,
    each starts only once the one before has ended (its start line follows that job's COMPLETED
    line), and the manifest lists all three with their ids. (They all started at once before.)"""
    lines = []
    manifest = submit.submit(["--config", DEBUG, *FAST, "train.rounds=2"], ["seed=1,2,3"], root=tmp_path,
                             name="pool", cluster="local", timeout_min=5, wait=True, max_parallel=1,
                             echo=lines.append)
    assert list(manifest["outcomes"].values()) == ["COMPLETED"] * 3, "\n".join(lines)
    assert lines[0] == "3 job(s) on local, 1 at a time: 1 node(s) x 2 users each", lines
    starts = [i for i, line in enumerate(lines) if line.startswith("  job ")]
    ends = [i for i, line in enumerate(lines) if ": COMPLETED" in line]
    assert len(starts) == 3 and starts[1] > ends[0] and starts[2] > ends[1], "\n".join(lines)
    saved = json.loads((Path(manifest["folder"]) / "jobs.json").read_text())
    assert [rec["job_id"] for rec in saved["jobs"]] == list(manifest["outcomes"]), saved
    for rec in saved["jobs"]:
        assert json.loads((Path(rec["out_dir"]) / "results.json").read_text())["seed"] == int(rec["label"][-1])
