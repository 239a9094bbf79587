"""Where numbers go: per-user TensorBoard writers, results.json and the summary table.

Owns the logger chosen once per rank (a TensorBoard writer under ``<out_dir>/tb/user_XX``, or a
no-op), the results.json contract that analysis, sweeps and checks read, and the table rank 0
prints. Knows nothing of training decisions.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing; call sites never check whether logging is on."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
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

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_logger(out_dir: Path, user_idx: int, enabled: bool, purge_step: int | None = None) -> NullLogger:
    if not enabled:
        return NullLogger()
    return TensorBoardLogger(Path(out_dir) / "tb" / f"user_{user_idx:02d}", purge_step)


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
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
