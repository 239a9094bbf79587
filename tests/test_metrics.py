"""Where a run's numbers and progress go (comigs_dist.metrics): a real 2-process run of
configs/debug.yaml with stdout and stderr redirected to files, as under Slurm or nohup, writing
TensorBoard and (when the client is installed) an offline W&B run per user; the progress lines;
the fan-out logger."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import DEBUG_CONFIG, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def redirected_run(tmp_path_factory):
    """2 ranks (forkrun: one import for both), 3 rounds, progress on, stdout and stderr to files;
    log.wandb=offline when wandb is installed (W&B's own files kept under the test's directory)."""
    tmp = tmp_path_factory.mktemp("redirected")
    out = tmp / "run"
    wandb = "offline" if _has_wandb() else "off"
    cmd = [sys.executable, "-m", "comigs_dist.forkrun", "--nproc_per_node=2", "--config", DEBUG_CONFIG,
           f"out_dir={out}", "train.rounds=3", "eval.every=2", "log.progress=true", f"log.wandb={wandb}"]
    env = subprocess_env(WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
                         WANDB_DATA_DIR=str(tmp / "wandb_data"))
    with open(tmp / "stdout.log", "wb") as stdout, open(tmp / "stderr.log", "wb") as stderr:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, env=env, timeout=300)
    logs = {name: (tmp / f"{name}.log").read_bytes() for name in ("stdout", "stderr")}
    assert proc.returncode == 0, logs["stdout"][-3000:] + logs["stderr"][-3000:]
    return out, logs, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_a_run_logged_to_files_has_no_carriage_returns(redirected_run):
    """Progress written to a file is whole lines: no carriage return anywhere, one final line of
    the rounds bar on stderr (rank 0 only), the round lines and the table on stdout."""
    _, logs, _ = redirected_run
    assert b"\r" not in logs["stdout"] and b"\r" not in logs["stderr"]
    err, out = logs["stderr"].decode(), logs["stdout"].decode()
    assert len(re.findall(r"^rounds: 3/3 \(100%\), \d\d:\d\d elapsed$", err, re.M)) == 1, err[-2000:]
    assert out.count("[comigs] round 3/3") == 1 and re.search(r"^mean +\d+\.\d{3} +\d+\.\d{3}$", out, re.M)


@pytest.mark.slow
@pytest.mark.skipif(not _has_wandb(), reason="the wandb client is not installed (pip install -e \".[dev]\" installs "
                                              "it); the offline W&B run cannot be written")
def test_offline_wandb_run_holds_what_tensorboard_holds(redirected_run):
    """One offline W&B run per user (read from its .wandb file): named user_XX in the out_dir's group,
    job type the method, config attached, the same scalar tags as TensorBoard with the same steps
    and values, the user's results.json row as summary, and the run id stored for a resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_records import offline_runs, read_run
    out, _, results = redirected_run
    runs = {r.name: r for r in map(read_run, offline_runs(out / "wandb"))}
    assert sorted(runs) == ["user_00", "user_01"]
    for row in results["users"]:
        user = row["user"]
        run = runs[f"user_{user:02d}"]
        assert run.group == "run" and run.job_type == "comigs_1g1s"
        assert run.config["user"] == user and run.config["method"] == "comigs_1g1s"
        assert run.config["train"]["rounds"] == 3 and run.config["log"]["wandb"] == "offline"
        assert json.loads((out / "wandb" / f"user_{user:02d}.id.json").read_text())["id"] == run.id
        acc = EventAccumulator(str(out / "tb" / f"user_{user:02d}"), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert len(tags) > 30 and sorted(run.history) == sorted(tags)
        for tag in tags:
            tb = [(e.step, e.value) for e in acc.Scalars(tag)]
            # TensorBoard stores float32: W&B's float64 rounds to exactly TensorBoard's number
            wb = [(step, float(np.float32(value))) for step, value in run.history[tag]]
            assert wb == tb, tag
        assert [s for s, _ in run.history["test/ppl"]] == [p["step"] for p in row["test_curve"]]
        for key, value in row.items():  # the summary is the row, nested values included
            assert run.summary[key] == json.loads(json.dumps(value)), key


# --------------------------------------------------------------------------------------------
# progress lines and loggers, in this process
# --------------------------------------------------------------------------------------------

def test_line_bar_prints_whole_lines_at_a_steady_pace():
    """25 steps: a line every 3 (a tenth, rounded up) and the last one; counts, percentages and
    the postfix in each line; never a carriage return."""
    from comigs_dist.metrics import LineBar
    stream = io.StringIO()
    bar = LineBar(stream, total=25, desc="rounds", min_interval=0)
    for i in range(25):
        bar.set_postfix(loss=f"{i:.1f}")
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = stream.getvalue().splitlines()
    assert [re.match(r"rounds: (\d+)/25", line).group(1) for line in lines] == ["3", "6", "9", "12", "15", "18", "21",
                                                                                "24", "25"]
    assert lines[0].startswith("rounds: 3/25 (12%), 00:00 elapsed, about 00:00 left, loss 2.0")
    assert lines[-1] == "rounds: 25/25 (100%), 00:00 elapsed, loss 24.0"
    assert "\r" not in stream.getvalue()


def test_line_bar_throttles_and_keeps_quick_transient_bars_silent():
    """Lines closer than min_interval are skipped; a transient bar (evaluation) that printed nothing
    before it closed stays silent, a persistent one prints its final count; no total: by time."""
    from comigs_dist.metrics import LineBar
    stream = io.StringIO()
    assert list(LineBar(stream, range(8), desc="evaluation", min_interval=3600, transient=True)) == list(range(8))
    assert stream.getvalue() == ""
    bar = LineBar(stream, total=8, desc="tokens drawn", unit="tok", min_interval=3600)
    bar.update(8)
    bar.close()
    assert stream.getvalue() == "tokens drawn: 8/8 tok (100%), 00:00 elapsed\n"
    stream = io.StringIO()
    bar = LineBar(stream, desc="steps", min_interval=0)
    bar.update(2)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == "steps: 2, 00:00 elapsed\nsteps: 5, 00:00 elapsed\n"


def test_progress_chooses_bars_on_a_terminal_and_lines_elsewhere():
    """A terminal stream gets tqdm bars, a file gets LineBars; messages print as plain lines on a file."""
    from tqdm import tqdm

    from comigs_dist.metrics import LineBar, Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term_bar = Progress(Terminal(), io.StringIO()).bar(total=3, desc="rounds")
    assert isinstance(term_bar, tqdm)
    term_bar.close()
    stream, lines = io.StringIO(), io.StringIO()
    progress = Progress(stream, lines)
    assert isinstance(progress.bar(total=3, desc="rounds"), LineBar)
    progress.write("[comigs] hello")
    assert lines.getvalue() == "[comigs] hello\n"


def test_fan_out_logger_sends_every_call_to_every_logger(tmp_path):
    """build_logger: TensorBoard alone when W&B is off, nothing when both are off; the fan-out
    forwards scalars, text, layout, the summary and close to each logger."""
    from comigs_dist.metrics import FanOutLogger, NullLogger, TensorBoardLogger, build_logger

    class Recorder(NullLogger):
        def __init__(self):
            self.calls = []

        def scalar(self, tag, value, step):
            self.calls.append(("scalar", tag, value, step))

        def summary(self, values):
            self.calls.append(("summary", values))

        def close(self):
            self.calls.append(("close",))
    assert type(build_logger(tmp_path, 0, False)) is NullLogger
    tb = build_logger(tmp_path, 3, True)
    assert isinstance(tb, TensorBoardLogger) and (tmp_path / "tb" / "user_03").is_dir()
    tb.close()
    a, b = Recorder(), Recorder()
    fan = FanOutLogger([a, b])
    fan.scalars({"train/loss": 1.5, "lr/expert": 0.1}, 7)
    fan.text("config", "x")
    fan.layout({})
    fan.summary({"test_ppl": 3.0})
    fan.close()
    assert a.calls == b.calls == [("scalar", "train/loss", 1.5, 7), ("scalar", "lr/expert", 0.1, 7),
                                  ("summary", {"test_ppl": 3.0}), ("close",)]


def test_a_resumed_rounds_bar_names_the_rounds_it_counts():
    """The rounds bar of a resumed run says which rounds it counts (rounds 3-4 of 4 after 2 done);
    a fresh run, or one with no round left (resumed after its last round), just says rounds."""
    from comigs_dist.monitor import Monitor

    class Recorder:
        def bar(self, total=None, desc=""):
            self.seen = (total, desc)
            return self
    monitor = Monitor.silent([0])
    monitor.progress = Recorder()
    for total, done, expected in ((2, 2, (2, "rounds 3-4")), (4, 0, (4, "rounds")), (0, 2, (0, "rounds"))):
        monitor.rounds_started(total, done)
        assert monitor.progress.seen == expected
