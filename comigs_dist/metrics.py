"""Where numbers go: per-user TensorBoard writers, results.json and the summary table.

Owns the logger chosen once per rank (a TensorBoard writer under ``<out_dir>/tb/user_XX``, or a
no-op), the TensorBoard chart layout (custom scalars), the progress bars (rank 0 only), the
results.json contract that analysis, sweeps and checks read, and the table rank 0 prints.
Knows nothing of training decisions.
"""
from __future__ import annotations

import json
import math
import sys
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
        """Chart layout for TensorBoard's custom-scalars dashboard (see ``scalar_layout``)."""
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


def build_logger(out_dir: Path, user_idx: int, enabled: bool, purge_step: int | None = None) -> NullLogger:
    if not enabled:
        return NullLogger()
    return TensorBoardLogger(Path(out_dir) / "tb" / f"user_{user_idx:02d}", purge_step)


def scalar_layout(n_layers: int, n_experts: int, n_generalists: int) -> dict:
    """Custom-scalars charts for one user, over the tags train.py logs.

    The paper's Figures 3 and 10 plot, per user, the expert score (mean router probability) of
    the generalist and of the specialist against iterations, one curve per layer; here they are
    two charts (generalists, specialists) with one curve per layer, plus one chart per layer
    with every expert of that layer. Figures 4-6 and 9 plot test perplexity against iterations.
    Charts match tags by regular expression (anchored at the start), so the layout is the same
    for every user with the same expert counts and TensorBoard shows it once.
    """
    def experts_regex(ids: list[int]) -> str:
        return rf"router/prob/layer_\d+/expert_({'|'.join(map(str, ids))})$"
    generalists, specialists = list(range(n_generalists)), list(range(n_generalists, n_experts))
    scores = {}
    for name, ids in (("generalist", generalists), ("specialist", specialists)):
        if ids:
            label = f"expert {ids[0]}" if len(ids) == 1 else f"experts {ids[0]}-{ids[-1]}"
            scores[f"{name} expert score ({label}), one curve per layer"] = ["Multiline", [experts_regex(ids)]]
    layers = {f"layer {layer:02d}: every expert": ["Multiline", [rf"router/prob/layer_{layer:02d}/expert_\d+$"]]
              for layer in range(n_layers)}
    return {
        "expert scores (paper Fig. 3, 10)": scores,
        "expert scores by layer": layers,
        "perplexity (paper Fig. 4-6, 9)": {
            "test perplexity": ["Multiline", [r"test/ppl$", r"base/ppl$"]],
            "losses": ["Multiline", [r"train/loss$", r"train/ce$", r"train/router_loss$", r"valid/loss$", r"test/loss$"]],
        },
        "communication": {"bytes": ["Multiline", [r"comm/bytes_sent$", r"comm/bytes_received$"]],
                          "bytes per round, counted and analytic": [
                              "Multiline", [r"comm/round_bytes_sent$", r"comm/round_bytes_received$",
                                            r"comm/analytic_round_bytes$"]],
                          "seconds in collectives per round": ["Multiline", [r"comm/round_seconds$"]]},
    }


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------

class NullProgress:
    """No bars and no lines: what every rank but 0 gets, and rank 0 with ``log.progress=false``."""

    def bar(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
            transient: bool = False):
        return _NullBar(iterable)

    def write(self, msg: str) -> None:
        pass


class _NullBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress(NullProgress):
    """tqdm bars on one stream, and message lines that print above them instead of through them.

    On a terminal, bars redraw in place and transient ones (evaluation) vanish when done. On a file
    or a pipe (Slurm logs, CI) transient bars are skipped and the others redraw at most every
    30 s, so a log gets a few updates rather than one per step."""

    def __init__(self, stream=None, lines=None):
        self.stream = stream if stream is not None else sys.stderr
        self.lines = lines if lines is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def bar(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
            transient: bool = False):
        if transient and not self.tty:
            return _NullBar(iterable)
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=not transient, file=self.stream,
                    mininterval=0.2 if self.tty else 30.0, dynamic_ncols=self.tty)

    def write(self, msg: str) -> None:
        from tqdm import tqdm
        tqdm.write(msg, file=self.lines)
        self.lines.flush()


def build_progress(enabled: bool, stream=None, lines=None) -> NullProgress:
    """Chosen once per rank, like the logger: bars and lines on rank 0 when ``log.progress``."""
    return Progress(stream, lines) if enabled else NullProgress()


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
    """The results.json contract (see the README): run identity, means over users, per-user rows."""
    users = sorted(users, key=lambda u: u["user"])
    mean = lambda key: sum(u[key] for u in users) / len(users)
    return {
        "method": cfg_dict["method"],
        "dataset": dataset,
        "seed": cfg_dict["seed"],
        "rounds": cfg_dict["train"]["rounds"],
        "world_size": len(users),
        "mean_test_ppl": mean("test_ppl"),
        "mean_base_test_ppl": mean("base_test_ppl"),
        "wall_seconds": wall_seconds,
        "users": users,
        "config": cfg_dict,
    }


def format_table(results: dict) -> str:
    rows = [("user", "experts", "test ppl", "base ppl", "sent MB", "tok/s")]
    for u in results["users"]:
        rows.append((f"{u['user']}", f"{u['n_experts']}", f"{u['test_ppl']:.3f}", f"{u['base_test_ppl']:.3f}",
                     f"{u['bytes_sent'] / 1e6:.2f}", f"{u['tokens_per_second']:.0f}"))
    rows.append(("mean", "", f"{results['mean_test_ppl']:.3f}", f"{results['mean_base_test_ppl']:.3f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    sep = "  ".join("-" * w for w in widths)
    out = [f"{results['method']} on {results['dataset']}, seed {results['seed']}, {results['rounds']} rounds, "
           f"{results['world_size']} users, {results['wall_seconds']:.0f} s", line(rows[0]), sep]
    out += [line(r) for r in rows[1:-1]] + [sep, line(rows[-1])]
    return "\n".join(out)


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
