"""Where numbers go: per-user TensorBoard writers, results.json and the summary table.

Owns the loggers (a TensorBoard writer under ``<out_dir>/tb/user_XX``, a W&B run from
``wandb_logger``, both through one fan-out, or a no-op), the progress bars (rank 0 only; plain
lines when not on a terminal), the results.json contract that analysis, sweeps and checks read,
and the table rank 0 prints. What is logged under which tag is ``monitor``'s.
Knows nothing of training decisions.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable


class NullLogger:
    """Logs nothing; call sites never check whether logging is on."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def layout(self, layout: dict) -> None:
        """Chart layout for TensorBoard's custom-scalars dashboard (``monitor.scalar_layout``)."""
        pass

    def summary(self, values: dict[str, Any]) -> None:
        """The user's results.json row, once at the end (W&B's run summary)."""
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides the events an interrupted attempt logged at or after it
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def layout(self, layout: dict) -> None:
        self.writer.add_custom_scalars(layout)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class FanOutLogger(NullLogger):
    """Every call to each of several loggers (TensorBoard and W&B), so call sites stay the same."""

    def __init__(self, loggers: list[NullLogger]):
        self.loggers = loggers

    def scalar(self, tag: str, value: float, step: int) -> None:
        for logger in self.loggers:
            logger.scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.scalars(values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        for logger in self.loggers:
            logger.text(tag, text, step)

    def layout(self, layout: dict) -> None:
        for logger in self.loggers:
            logger.layout(layout)

    def summary(self, values: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_logger(out_dir: Path, user_idx: int, enabled: bool, purge_step: int | None = None,
                 wandb=None) -> NullLogger:
    """This user's logger: TensorBoard under ``<out_dir>/tb/user_XX`` when ``enabled``, plus a W&B
    run when ``wandb`` (``wandb_logger.options_for``) is given; a no-op when neither."""
    loggers: list[NullLogger] = []
    if enabled:
        loggers.append(TensorBoardLogger(Path(out_dir) / "tb" / f"user_{user_idx:02d}", purge_step))
    if wandb is not None:
        from comigs_dist.wandb_logger import WandbLogger
        loggers.append(WandbLogger(wandb))
    if not loggers:
        return NullLogger()
    return loggers[0] if len(loggers) == 1 else FanOutLogger(loggers)


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------

class NullProgress:
    """No bars and no lines: what every rank but 0 gets (rank 0 with ``log.progress=false`` gets
    MessagesOnly)."""

    def bar(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
            transient: bool = False, unit: str = "it", unit_scale: bool = False):
        return _NullBar(iterable)

    def write(self, msg: str) -> None:
        pass


class MessagesOnly(NullProgress):
    """No bars, but the run's messages as plain lines: rank 0 with ``log.progress=false`` (a resume,
    a warning, a stale lock taken over must still be said)."""

    def __init__(self, stream=None):
        self.stream = stream

    def write(self, msg: str) -> None:
        print(msg, file=self.stream or sys.stdout, flush=True)


class _NullBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineBar(_NullBar):
    """A progress bar for a file or a pipe: whole lines at a steady pace, never a carriage return.

    With a known total, a line each time the count passes another ``1/lines`` of it, provided
    ``min_interval`` seconds went by since the last line; with no total, a line every
    ``min_interval`` seconds. Closing prints the final count, except for a ``transient`` bar that
    printed nothing (a quick evaluation leaves no trace, as its terminal bar vanishes). Each line
    says the count, the fraction, the time spent and the time left at the pace so far."""

    def __init__(self, stream, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 lines: int = 10, min_interval: float = 10.0, transient: bool = False):
        super().__init__(iterable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.stream, self.total, self.desc = stream, total, desc
        self.unit = "" if unit == "it" else f" {unit}"  # tqdm's default unit says nothing in a line
        self.every = max(1, -(-total // lines)) if total else None
        self.min_interval, self.transient = min_interval, transient
        self.n, self.printed, self.postfix = 0, 0, ""
        self.start = self.last_time = time.perf_counter()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.perf_counter()
        due = self.n // self.every > before // self.every and self.n < self.total if self.every else True
        if due and now - self.last_time >= self.min_interval:
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.printed and not (self.transient and self.printed == 0):
                self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        count = (f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}") + self.unit
        parts = [f"{self.desc}: {count}" if self.desc else count]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and 0 < self.n < self.total:
            parts.append(f"about {_clock(elapsed / self.n * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.printed, self.last_time = self.n, now


class Progress(NullProgress):
    """Progress on one stream, and message lines on another that print above the bars.

    On a terminal: tqdm bars that redraw in place, transient ones (evaluation) vanishing when
    done. On a file or a pipe (Slurm or nohup logs, CI): ``LineBar`` lines, at most about ten per
    bar and four per evaluation, at least ``min_interval`` seconds apart, so a log holds whole
    lines only (no carriage returns) that grep reads."""

    min_interval = 10.0

    def __init__(self, stream=None, lines=None):
        self.stream = stream if stream is not None else sys.stderr
        self.lines = lines if lines is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def bar(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
            transient: bool = False, unit: str = "it", unit_scale: bool = False):
        """``unit_scale``: the terminal bar counts in k/M/G (lines print every digit)."""
        if not self.tty:
            return LineBar(self.stream, iterable, total, desc, unit, lines=4 if transient else 10,
                           min_interval=self.min_interval, transient=transient)
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=not transient, file=self.stream, unit=unit,
                    unit_scale=unit_scale, mininterval=0.2, dynamic_ncols=True)

    def write(self, msg: str) -> None:
        if not self.tty:  # no bar to keep clear of: a plain line
            print(msg, file=self.lines, flush=True)
            return
        from tqdm import tqdm
        tqdm.write(msg, file=self.lines)
        self.lines.flush()


def build_progress(enabled: bool, stream=None, lines=None, messages: bool = False) -> NullProgress:
    """Chosen once per rank, like the logger: bars and lines on rank 0 when ``log.progress``;
    otherwise only the messages when ``messages``, else nothing."""
    if enabled:
        return Progress(stream, lines)
    return MessagesOnly(lines) if messages else NullProgress()


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers (Python would write NaN, which
    strict readers refuse); a diverged user's perplexity reads as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``checkpoint.write_atomic``: a temporary
    file, fsync, rename, the directory fsynced), non-finite floats as null."""
    from comigs_dist.checkpoint import write_atomic
    obj = _finite(obj)
    write_atomic(Path(path), lambda f: json.dump(obj, f, indent=2, default=_json_default, allow_nan=False), text=True)


def _json_default(o):
    if hasattr(o, "item"):
        return _finite(o.item())
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def build_results(cfg_dict: dict, users: list[dict], dataset: str, wall_seconds: float) -> dict:
    """The results.json contract (see docs/monitoring.md): run identity, means over users, per-user rows."""
    users = sorted(users, key=lambda u: u["user"])
    mean = lambda key: sum(u[key] for u in users) / len(users)
    # privacy.*: the run's settings and epsilon (the same in every row; the clipping counts are each user's)
    privacy = {k: v for k, v in users[0]["privacy"].items() if not k.startswith("updates_")} \
        if "privacy" in users[0] else None
    return {
        "method": cfg_dict["method"],
        "dataset": dataset,
        "seed": cfg_dict["seed"],
        "rounds": cfg_dict["train"]["rounds"],
        "world_size": len(users),   # kept for older readers: the number of users, not of ranks
        "n_users": len(users),
        "mean_test_ppl": mean("test_ppl"),
        "test_ppl_quantiles": quantiles([u["test_ppl"] for u in users]),
        "mean_base_test_ppl": mean("base_test_ppl"),
        "wall_seconds": wall_seconds,
        **({"privacy": privacy} if privacy else {}),
        "users": users,
        "config": cfg_dict,
    }


QUANTILES = (0.1, 0.5, 0.9)
TABLE_USERS = 16  # more users than this: the table shows quantiles and the worst users, results.json has them all


def quantiles(values: list[float]) -> dict[str, float]:
    """p10, p50 and p90 of a list (linear interpolation between order statistics)."""
    xs = sorted(values)
    out = {}
    for q in QUANTILES:
        pos = q * (len(xs) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{round(q * 100)}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def format_table(results: dict) -> str:
    from comigs_dist.tables import format_table as table
    users = results["users"]
    shown = users
    note = ""
    if len(users) > TABLE_USERS:  # the worst users by test perplexity, then quantiles over everyone
        shown = sorted(sorted(users, key=lambda u: -u["test_ppl"])[:5], key=lambda u: u["user"])
        note = "\nthe 5 users with the highest test perplexity; every user's row is in results.json"
    rows = [(u["user"], u["n_experts"], f"{u['test_ppl']:.3f}", f"{u['base_test_ppl']:.3f}",
             f"{u['bytes_sent'] / 1e6:.2f}", f"{u['tokens_per_second']:.0f}") for u in shown]
    mean = [("mean", "", f"{results['mean_test_ppl']:.3f}", f"{results['mean_base_test_ppl']:.3f}", "", "")]
    if len(users) > TABLE_USERS:
        q = results.get("test_ppl_quantiles") or quantiles([u["test_ppl"] for u in users])
        mean += [(name, "", f"{value:.3f}", "", "", "") for name, value in q.items()]
    title = (f"{results['method']} on {results['dataset']}, seed {results['seed']}, {results['rounds']} rounds, "
             f"{results['world_size']} users, {results['wall_seconds']:.0f} s")
    privacy = results.get("privacy") or {}
    if privacy.get("dp") == "user":
        eps = privacy.get("epsilon")  # null in JSON when infinite (no noise)
        title += f", user-level DP epsilon {'inf' if eps is None else f'{eps:.3g}'} at delta {privacy['delta']:g}"
    if privacy.get("secure_agg"):
        title += ", secure aggregation"
    return title + "\n" + table(("user", "experts", "test ppl", "base ppl", "sent MB", "tok/s"), rows, ">" * 6,
                                footer=mean) + note


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
