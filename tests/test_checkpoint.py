"""Checkpoints and resume: atomic files, validated loads, disk checks, bit-identical resume."""
import errno
import os
import re
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist

from comigs_dist import checkpoint, resume, train
from comigs_dist.config import ConfigError, check_world_size
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config, without_timing


# --------------------------------------------------------------------------------------------
# files (no process group)
# --------------------------------------------------------------------------------------------

def _state(params: dict, user: int = 0, method: str = "comigs_1g1s", config: dict | None = None) -> dict:
    state = {"format": checkpoint.FORMAT, "user": user, "round": 2, "method": method, "params": params,
             "config": config or {"seed": 42, "train": {"lr": 0.005}, "out_dir": "a"}}
    state.update({k: None for k in checkpoint.RESUME_KEYS})
    return state


def test_an_option_added_since_the_checkpoint_is_no_difference_at_its_default():
    """A checkpoint's config that lacks an option (written before the option existed: a method
    option, a schema key) resumes when this run leaves the option at its default, and is refused,
    naming it, when this run sets it otherwise; a changed or removed option still counts."""
    import copy

    from comigs_dist.config import load_config
    current = load_config(None, ["method=comigs_learned"]).to_dict()
    saved = copy.deepcopy(current)
    del saved["method_options"]["warmup_rounds"], saved["train"]["users_per_round"]
    assert checkpoint.config_differences(saved, current) == []
    moved = load_config(None, ["method=comigs_learned", "method_options.warmup_rounds=2",
                               "train.users_per_round=3"]).to_dict()
    diffs = checkpoint.config_differences(saved, moved)
    assert [d.split("=")[0] for d in diffs] == ["method_options.warmup_rounds", "train.users_per_round"], diffs
    assert "method_options.warmup_rounds=None but this run has method_options.warmup_rounds=2" in diffs[0]
    changed = copy.deepcopy(current)
    changed["moe"]["lb_weight"] = 0.5
    assert [d.split("=")[0] for d in checkpoint.config_differences(changed, current)] == ["moe.lb_weight"]
    removed = copy.deepcopy(current)
    removed["method_options"]["gone"] = 1  # an option this code no longer knows
    assert [d.split("=")[0] for d in checkpoint.config_differences(removed, current)] == ["method_options.gone"]


def test_truncated_and_foreign_files_are_rejected_with_the_file_named(tmp_path):
    """A truncated checkpoint and a plain tensor file both give a CheckpointError naming the file."""
    good = tmp_path / "round_0002.pt"
    checkpoint.save_atomic(_state({"a": torch.randn(4, 3)}), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint .*cut\.pt cannot be read .*truncated"):
        checkpoint.load(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    problems = checkpoint.validate(checkpoint.load(foreign), foreign, 0, "comigs_1g1s", {"a": torch.zeros(4, 3)})
    assert len(problems) == 1 and "foreign.pt is not a comigs_dist checkpoint" in problems[0]
    # a pickled object outside the weights_only allow-list never gets executed
    torch.save({"format": checkpoint.FORMAT, "evil": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(checkpoint.CheckpointError, match="obj.pt cannot be read"):
        checkpoint.load(tmp_path / "obj.pt")


def test_wrong_shape_user_method_and_config_are_each_named():
    """Every mismatch names the file and the parameter or key; a fitting state has no problem."""
    ours = {"lm.h.0.mlp.experts.0.lora_A": torch.zeros(8, 32), "lm.h.0.attn.lora_B": torch.zeros(32, 8)}
    cfg = {"seed": 42, "train": {"lr": 0.005}, "out_dir": "b", "log": {"every": 5}}
    assert checkpoint.validate(_state({k: v.clone() for k, v in ours.items()}), Path("f.pt"), 0, "comigs_1g1s",
                               ours, cfg) == []
    wrong = _state({"lm.h.0.mlp.experts.0.lora_A": torch.zeros(4, 32), "lm.h.0.attn.lora_B": torch.zeros(32, 8),
                    "lm.h.0.extra": torch.zeros(1)}, user=1, method="fedavg",
                   config={"seed": 43, "train": {"lr": 0.005}, "out_dir": "a", "log": {"every": 1}})
    text = " | ".join(checkpoint.validate(wrong, Path("f.pt"), 0, "comigs_1g1s", ours, cfg))
    assert "parameter lm.h.0.mlp.experts.0.lora_A has shape (4, 32) but this model's is (8, 32)" in text
    assert "holds parameter lm.h.0.extra (1,) that this model does not have" in text
    assert "holds user 1's state but sits in user 0's directory" in text
    assert "written by method 'fedavg' but this run is 'comigs_1g1s'" in text
    assert "seed=43 but this run has seed=42" in text
    assert "out_dir=" not in text and "log.every" not in text  # allowed to change on resume
    incomplete = _state(ours)
    del incomplete["rng"]
    assert "lacks rng" in checkpoint.validate(incomplete, Path("f.pt"), 0, "comigs_1g1s", ours)[0]


def test_a_full_disk_leaves_no_partial_file_and_says_so(tmp_path, monkeypatch):
    """ENOSPC during a write: an OSError naming the path and the cause; neither the file nor a temp remains."""
    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    target = tmp_path / "user_00" / "round_0001.pt"
    with pytest.raises(OSError, match=r"cannot write checkpoint .*round_0001\.pt: "
                                      r"no space left on device.*resume=true"):
        checkpoint.save_atomic({"a": 1}, target)
    assert list(target.parent.iterdir()) == []


def test_unwritable_or_full_output_directories_are_found_before_training(tmp_path, monkeypatch):
    """A path under a regular file is not writable; too little free space names both sizes and the fix."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    problem = checkpoint.check_writable(blocker / "run")
    assert problem and f"out_dir {blocker / 'run'} is not writable" in problem and "set out_dir" in problem
    assert checkpoint.check_writable(tmp_path / "ok", 1024) is None and (tmp_path / "ok").is_dir()
    assert list((tmp_path / "ok").iterdir()) == []  # the probe is gone
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 512 * 1024))
    problem = checkpoint.check_writable(tmp_path / "ok", 3 * 2**20)
    assert "has 0.5 MiB free but one round of checkpoints needs about 3.0 MiB" in problem


def test_json_is_written_atomically_and_strictly_with_non_finite_numbers_as_null(tmp_path):
    """results.json and the manifest: a diverged user's NaN or inf perplexity becomes null (valid
    JSON for any reader), tensors become numbers, and nothing but the final file is left behind."""
    import json
    from comigs_dist.metrics import write_json_atomic
    path = tmp_path / "out" / "results.json"
    write_json_atomic(path, {"mean_test_ppl": float("nan"), "users": [{"test_ppl": float("inf"), "n": 3}],
                             "loss": torch.tensor(2.5), "bad": torch.tensor(float("-inf"))})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"mean_test_ppl": None, "users": [{"test_ppl": None, "n": 3}], "loss": 2.5, "bad": None}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_umask_mode_and_fsync_the_directory_after_the_rename(tmp_path, monkeypatch, umask):
    """Checkpoints, JSON files and a dataset directory get 0666 (0777) minus the umask, not
    mkstemp's 0600 (mkdtemp's 0700); every atomic rename is followed by an fsync of its directory."""
    import stat
    from comigs_dist.data import write_dataset
    from comigs_dist.metrics import write_json_atomic
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync_dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync_file", fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(umask)
    try:
        checkpoint.save_atomic({"a": torch.zeros(2)}, tmp_path / "c" / "round_0001.pt")
        write_json_atomic(tmp_path / "c" / "results.json", {"x": 1})
        write_dataset(tmp_path / "data", [{s: np.arange(40) for s in ("train", "valid", "test")}], vocab_size=64)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c" / "round_0001.pt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "c" / "results.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "data" / "meta.json").stat().st_mode) == 0o666 & ~umask
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 3, events
    for i in renames:  # the file's data before the rename, its directory entry right after
        assert events[i - 1][0] == "fsync_file" or events[i][1].endswith("data"), events
        assert events[i + 1][0] == "fsync_dir", events


def test_generators_round_trip_through_a_weights_only_file(tmp_path):
    """python, numpy and torch generators restored from a checkpoint draw the same numbers again."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    checkpoint.save_atomic({"rng": checkpoint.capture_rng()}, tmp_path / "rng.pt")
    first = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    checkpoint.restore_rng(checkpoint.load(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == first


def test_rounds_are_listed_and_pruned_per_user(tmp_path):
    """available_rounds reads only complete round files; prune keeps the newest `keep`."""
    d = tmp_path / "user_00"
    for r in (1, 2, 3, 10):
        checkpoint.save_atomic({"r": r}, d / checkpoint.round_file(r))
    (d / ".round_0011.pt.tmp").write_bytes(b"partial")
    (d / "final.pt").write_bytes(b"")
    assert checkpoint.available_rounds(d) == [1, 2, 3, 10]
    assert [p.name for p in checkpoint.prune(d, 2)] == ["round_0001.pt", "round_0002.pt"]
    assert checkpoint.available_rounds(d) == [3, 10]


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    """A process that took out_dir's lock and was SIGKILLed leaves its lock file (pid and host inside)
    but not its flock: the next run takes it over and says whose it was; release removes the file."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    from helpers import subprocess_env
    out = tmp_path / "run"
    out.mkdir()
    script = ("import os, signal, sys; from pathlib import Path; from comigs_dist.checkpoint import OutDirLock; "
              "OutDirLock(Path(sys.argv[1])).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=subprocess_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    record = json.loads((out / checkpoint.LOCK_FILE).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] != os.getpid()
    dead_pid = record["pid"]
    cfg = tiny_config().to_dict()
    lock, notes = checkpoint.claim_out_dir(out, "false", cfg)
    try:
        assert notes == [f"took over the stale lock of pid {dead_pid} on host {socket.gethostname()}, since "
                         f"{record['started']} (no longer running) on out_dir {out}"], notes
        assert json.loads((out / checkpoint.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert list(out.iterdir()) == []


def test_resume_auto_starts_over_only_its_own_first_attempt(tmp_path):
    """resume=auto in an out_dir where an attempt of the same run left config.yaml and events but no
    checkpoint: it starts over and says so; with another learning rate in config.yaml it is another
    run's directory: refused naming the key, and left untouched."""
    from comigs_dist.config import to_yaml
    out = tmp_path / "run"
    (out / "tb" / "user_00").mkdir(parents=True)
    (out / "tb" / "user_00" / "events.out.tfevents.1").write_bytes(b"x")
    (out / "config.yaml").write_text(to_yaml(tiny_config(**{"train.lr": 0.01})))
    lock, notes = checkpoint.claim_out_dir(out, "auto", tiny_config(**{"train.lr": 0.01, "log.every": 3}).to_dict())
    lock.release()
    assert notes == [f"out_dir {out} holds an earlier attempt of this run that checkpointed no round (config.yaml, "
                     f"TensorBoard events (tb/)): it starts over (resume=auto)"], notes
    with pytest.raises(checkpoint.CheckpointError, match=r"holds another run \(config.yaml, TensorBoard events "
                                                         r"\(tb/\)\) configured differently: train.lr=0.01 but this "
                                                         r"run has train.lr=0.005.*another out_dir"
                                                         r".*cannot be continued"):
        checkpoint.claim_out_dir(out, "auto", tiny_config().to_dict())
    assert sorted(p.name for p in out.rglob("*")) == ["config.yaml", "events.out.tfevents.1", "tb", "user_00"]


def test_resume_agreement_never_starts_over_silently():
    """Users disagreeing about their rounds stop any resume naming every user, also under
    resume=auto (it once started over and deleted the manifest); a manifest whose rounds no user
    holds is an error, not a fresh start; a common round is resumed from."""
    cfg = lambda mode: tiny_config(resume=mode, out_dir="x")
    lost = [{"rounds": [1, 2]}, {"rounds": []}]
    for mode in ("auto", "true"):
        start, problem = resume._choose_round(cfg(mode), lost, Path("x"), 2)
        assert start == 0 and "the users disagree about the rounds they checkpointed" in problem, problem
        assert "(user 0: rounds [1, 2]; user 1: none)" in problem, problem
        start, problem = resume._choose_round(cfg(mode), [{"rounds": [2]}, {"rounds": [1]}], Path("x"), 2)
        assert start == 0 and "(user 0: rounds [2]; user 1: rounds [1])" in problem
        start, problem = resume._choose_round(cfg(mode), [{"rounds": []}, {"rounds": []}], Path("x"), 3)
        assert start == 0 and "records round 3 as complete but no user finds any round checkpoint" in problem
        assert resume._choose_round(cfg(mode), [{"rounds": [1, 2]}, {"rounds": [1]}], Path("x"), 1) == (1, None)
    assert resume._choose_round(cfg("auto"), [{"rounds": []}, {"rounds": []}], Path("x"), None) == (0, None)


def test_a_resume_with_another_number_of_users_or_fewer_rounds_than_checkpointed_is_refused_naming_it():
    """The manifest records 2 users and this run has 4 (the two new users hold no rounds): the
    refusal names both numbers and n_users (it once blamed missing files); a resume from round 3 of
    a run now given train.rounds=2 is refused instead of finishing with a wrong round count."""
    cfg = lambda **kw: tiny_config(resume="auto", out_dir="x", **kw)
    four = [{"rounds": [1, 2]}, {"rounds": [1, 2]}, {"rounds": []}, {"rounds": []}]
    start, problem = resume._choose_round(cfg(), four, Path("x"), 2, manifest_users=2)
    assert start == 0 and "checkpoints of a run of 2 users" in problem and "this run has 4" in problem, problem
    assert "Resume with n_users=2" in problem and "disagree" not in problem, problem
    two = [{"rounds": [1, 2, 3]}, {"rounds": [1, 2, 3]}]
    assert resume._choose_round(cfg(**{"train.rounds": 3}), two, Path("x"), 3, manifest_users=2) == (3, None)
    start, problem = resume._choose_round(cfg(**{"train.rounds": 2}), two, Path("x"), 3, manifest_users=2)
    assert start == 0 and "checkpointed after round 3" in problem and "train.rounds=2 would end it" in problem
    assert "pass train.rounds=3 or more" in problem, problem


# --------------------------------------------------------------------------------------------
# resume on real process groups
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _final(out_dir: Path, user: int) -> dict:
    return checkpoint.load(checkpoint.user_dir(out_dir, user) / "final.pt")


def _resume_worker(rank, world_size, tmp_path):
    settings = {"train.rounds": 4, "checkpoint.every": 1, "checkpoint.final": True, "eval.every": 1}
    a, b = tmp_path / "uninterrupted", tmp_path / "interrupted"

    def go(out_dir, **extra):
        cfg = tiny_config(**{**settings, "out_dir": str(out_dir), **extra})
        check_world_size(cfg, world_size)
        [row] = train.run(cfg, init_topology(), out_dir)
        return row

    row_a = go(a, **{"checkpoint.keep": 2})
    assert checkpoint.available_rounds(checkpoint.user_dir(a, rank)) == [3, 4]
    assert checkpoint.read_manifest(a)["rounds"] == [3, 4]

    # the same run, stopped by a crash on every user halfway through round 3
    real = train.faults.during_round

    def crash(run, round_idx, local_idx):
        if round_idx == 2 and local_idx == 1:
            raise _Stop()
    train.faults.during_round = crash
    with pytest.raises(_Stop):
        go(b)
    train.faults.during_round = real
    assert checkpoint.available_rounds(checkpoint.user_dir(b, rank)) == [1, 2]
    manifest = checkpoint.read_manifest(b)
    assert manifest["round"] == 2 and manifest["rounds"] == [1, 2] and manifest["n_users"] == world_size

    # starting again without resume would mix two runs: refused on every rank
    with pytest.raises(ConfigError, match=r"already holds round checkpoints \(user 0: rounds \[1, 2\]; user 1"):
        go(b)

    row_b = go(b, resume="true")
    fa, fb = _final(a, rank), _final(b, rank)
    assert fa["params"].keys() == fb["params"].keys()
    for name in fa["params"]:  # bit-identical parameters
        assert torch.equal(fa["params"][name], fb["params"][name]), name
    for key in ("exp_avg", "exp_avg_sq"):
        for i, s in fa["expert_opt"]["state"].items():
            assert torch.equal(s[key], fb["expert_opt"]["state"][i][key])
    assert without_timing(row_a) == without_timing(row_b)
    assert [h["round"] for h in row_b["test_curve"]] == [1, 2, 3, 4]
    assert row_b["bytes_sent"] > 0 and checkpoint.read_manifest(b)["round"] == 4

    # a truncated checkpoint of one user stops every user with the file named (the run is
    # trained: a resume reads every user's final.pt, then with final.pt gone, round 4)
    for name in ("final.pt", "round_0004.pt"):
        tdist.barrier()
        if rank == 1:
            f = checkpoint.user_dir(b, 1) / name
            f.write_bytes(f.read_bytes()[:5000])
        tdist.barrier()
        with pytest.raises(ConfigError, match=rf"user_01/{re.escape(name)} cannot be read .*truncated"):
            go(b, resume="true")
        tdist.barrier()
        if rank == 1 and name == "final.pt":
            f.unlink()

    # resuming a run with different adapter shapes: the parameter and both shapes are named
    with pytest.raises(ConfigError, match=r"parameter \S+lora_A has shape \(8, 32\) but this model's is \(4, 32\)"):
        go(a, resume="true", **{"lora.rank": 4})


@pytest.mark.slow
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """4 rounds straight vs. a crash in round 3 and resume=true: same parameters, optimiser moments,
    metrics and test curve, bit for bit; restarting without resume, a truncated file and a
    different model shape are refused on every user with the file or parameter named."""
    run_on_ranks(_resume_worker, 2, tmp_path)


def _full_disk_worker(rank, world_size, tmp_path):
    cfg = tiny_config(**{"checkpoint.every": 1})
    check_world_size(cfg, world_size)
    topo = init_topology()
    r = train.build_rank(cfg, topo)
    assert resume.restore(r, tmp_path) == 0
    if rank == 1:
        def full_disk(obj, f):
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        checkpoint.torch.save = full_disk
    with pytest.raises(checkpoint.CheckpointError, match=r"user 1: cannot write checkpoint .*user_01/round_0001\.pt: "
                                                          r"no space left on device"):
        resume.save(r, tmp_path, checkpoint.round_file(1), 1)
    assert os.listdir(checkpoint.user_dir(tmp_path, 1)) == [] if rank == 1 else True
    assert checkpoint.read_manifest(tmp_path) is None  # the round was not recorded as complete


def test_a_full_disk_during_a_checkpoint_stops_every_user_with_one_message(tmp_path):
    """ENOSPC on one user: every user raises the same CheckpointError, no partial file, no manifest."""
    run_on_ranks(_full_disk_worker, 2, tmp_path)


def _fingerprint_worker(rank, world_size, tmp_path):
    from comigs_dist.data import write_dataset
    data, out = tmp_path / "data", tmp_path / "run"
    init_topology()  # the group, for the barriers below; each run builds a topology of its own

    def prepare(seed):  # the same shapes, other tokens for another seed: a dataset prepared again
        if rank == 0:
            rng = np.random.default_rng(seed)
            write_dataset(data, [{s: rng.integers(0, 100, 500) for s in ("train", "valid", "test")} for _ in range(2)],
                          100)
        tdist.barrier()

    def go(**extra):
        cfg = tiny_config(**{"data.path": str(data), "train.rounds": 2, "checkpoint.every": 1, "out_dir": str(out),
                             **extra})
        check_world_size(cfg, world_size)
        [row] = train.run(cfg, init_topology(), out)
        return row

    prepare(0)
    go()
    # a key that changes results is refused, naming it and both values
    with pytest.raises(ConfigError, match=r"train.lr=0.005 but this run has train.lr=0.001"):
        go(resume="true", **{"train.lr": 1e-3})
    # keys safe to change on resume: more rounds, logging, evaluation points
    row = go(resume="true", **{"train.rounds": 3, "log.every": 2, "eval.every": 1})
    assert checkpoint.available_rounds(checkpoint.user_dir(out, rank)) == [1, 2, 3] and row["local_steps"] == 9
    # the dataset prepared again under the same path: the checkpoints' data fingerprint names the shards
    prepare(1)
    with pytest.raises(ConfigError, match=r"checkpoints \S+user_00/round_0003\.pt, \S+user_01/round_0003\.pt were "
                                          r"written on other data than this run reads \(shard user_00/test\.bin: 500 "
                                          r"tokens, sha256 \w{12} then, 500 tokens, sha256 \w{12} now; shard "
                                          r"user_00/train\.bin"):
        go(resume="true", **{"train.rounds": 3})
    prepare(0)  # the original tokens again: accepted
    go(resume="true", **{"train.rounds": 3})
    # user 1 loses every round checkpoint: resume=auto stops naming each user, the manifest stays
    tdist.barrier()
    if rank == 1:
        for f in checkpoint.user_dir(out, 1).glob("round_*.pt"):
            f.unlink()
    tdist.barrier()
    with pytest.raises(ConfigError, match=r"the users disagree about the rounds they checkpointed .*\(user 0: rounds "
                                          r"\[1, 2, 3\]; user 1: none\)"):
        go(resume="auto", **{"train.rounds": 3})
    assert checkpoint.read_manifest(out)["rounds"] == [1, 2, 3]


@pytest.mark.slow
def test_a_resume_checks_the_data_and_the_keys_that_change_results(tmp_path):
    """2 users: a resume changing train.lr is refused naming it; train.rounds, log.every and eval.every
    may change; a dataset prepared again at the same path is refused naming its shards and both
    checksums; after user 1 loses its checkpoints resume=auto stops, naming every user's rounds,
    and the manifest is kept."""
    run_on_ranks(_fingerprint_worker, 2, tmp_path, timeout_s=600)
