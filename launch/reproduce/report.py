"""A table from its finished runs: ours (mean and sample std over seeds) beside the paper's number,
the paper's orderings checked against ours, text, Markdown, CSV and the figures' plots, and a
warning when a table's runs were made with different bases."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from launch.collect import mean_std
from launch.reproduce.runs import Run, ended
from launch.reproduce.tables import Cell, Spec

BASE_TOLERANCE = 1e-4  # relative; one base evaluated by two layouts of users differs by float rounding only


def mixed_bases(out_dirs: list[Path]) -> list[str]:
    """Finished runs that evaluated different untrained bases on the same test data, one line per
    such data. Every results.json holds the base's mean test perplexity before training, which is
    the same for every method and seed made with one base on one test split; two builds of a base
    (or two bases) show there, and a table mixing their runs compares unlike runs."""
    groups: dict[tuple[str, str], list[tuple[float, list[Path]]]] = {}  # (data path, setting) -> bases seen
    for out_dir in out_dirs:
        f = Path(out_dir) / "results.json"
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        base = res.get("mean_base_test_ppl")
        if base is None or not math.isfinite(base):
            continue
        cfg = res.get("config") or {}
        data = {k: v for k, v in (cfg.get("data") or {}).items() if k != "verify"}
        setting = json.dumps([data, (cfg.get("model") or {}).get("name"), (cfg.get("train") or {}).get("seq_len"),
                              (cfg.get("eval") or {}).get("max_tokens"), res.get("n_users")], sort_keys=True)
        found = groups.setdefault((str(data.get("path") or res.get("dataset") or "?"), setting), [])
        for value, dirs in found:
            if abs(value - base) <= BASE_TOLERANCE * abs(value):
                dirs.append(Path(out_dir))
                break
        else:
            found.append((base, [Path(out_dir)]))
    return [f"{path}: " + "; ".join(f"base perplexity {value:.2f} in {len(dirs)} run(s) (e.g. {dirs[0]})"
                                    for value, dirs in found)
            for (path, _), found in groups.items() if len(found) > 1]


@dataclass
class Result:
    cell: Cell
    paper: tuple[float, float | None] | None
    values: list[float]
    seeds: list[int]
    dirs: list[str]
    pending: int
    diverged: int = 0                # runs the guard stopped (a non-finite value): outcomes, not values

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0] if self.values else math.nan

    @property
    def std(self) -> float:
        return mean_std(self.values)[1] if self.values else math.nan  # sample std (n - 1), as launch.collect

    @property
    def diff(self) -> float:
        return self.mean - self.paper[0] if self.paper and self.values else math.nan


def collect_results(spec: Spec, runs: list[Run], numbers: dict) -> list[Result]:
    paper = numbers.get(spec.key, {}).get("cells", {})
    out = []
    for cell in spec.cells:
        mine = [r for r in runs if cell in r.cells]
        values, seeds, dirs = [], [], []
        for r in mine:
            f = r.out_dir / "results.json"
            if not f.is_file() or r.status.startswith("stale"):
                continue
            res = json.loads(f.read_text())
            if cell.user is not None and cell.user >= len(res["users"]):
                continue  # the debug scale runs two users only
            if cell.metric == "mb":  # bytes each user sent over the run, in MB, the mean over users
                value = sum(u["bytes_sent"] for u in res["users"]) / len(res["users"]) / 1e6
            else:
                value = res["mean_test_ppl"] if cell.user is None else res["users"][cell.user]["test_ppl"]
            if value is None:  # a diverged run (guard.nan=skip) writes null
                value = math.nan
            values.append(float(value))
            seeds.append(r.seed)
            dirs.append(str(r.out_dir))
        states = [ended(r.out_dir) for r in mine]
        out.append(Result(cell, paper.get((cell.row, cell.col)), values, seeds, dirs, states.count(None),
                          states.count("diverged")))
    return out


def _num(mean: float, std: float | None, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" ({std:.{digits}f})")


def cell_texts(r: Result, n_seeds: int) -> tuple[str, str, str]:
    paper = _num(*r.paper) if r.paper else "-"
    stopped = f"; {r.diverged} diverged" if r.diverged else ""
    if r.values:
        ours = _num(r.mean, r.std) + (f" [{len(r.values)}/{n_seeds}{stopped}]" if len(r.values) < n_seeds else "")
    elif r.diverged:
        ours = f"pending [0/{n_seeds}{stopped}]" if r.pending else f"diverged [{r.diverged}/{n_seeds}]"
    else:
        ours = "pending" if r.pending else "-"
    diff = f"{r.diff:+.2f}" if not math.isnan(r.diff) else "-"
    return paper, ours, diff


def _parts(spec: Spec, numbers: dict) -> tuple[str, ...]:
    """The sub-columns of a column: the paper's number, ours and the difference; ours alone for the
    figures, which have no numbers in the paper's text."""
    return ("paper", "ours", "diff") if spec.key in numbers else ("ours",)


def _cell(by: dict, row: str, col: str, seeds: list[int], parts: tuple[str, ...]) -> list[str]:
    if (row, col) not in by:
        return [""] * len(parts)
    texts = dict(zip(("paper", "ours", "diff"), cell_texts(by[(row, col)], len(seeds))))
    return [texts[p] for p in parts]


def format_text(spec: Spec, results: list[Result], numbers: dict, seeds: list[int], scale: str) -> str:
    by = {(r.cell.row, r.cell.col): r for r in results}
    head1, head2 = [""], [_row_header(spec)]
    for col in spec.cols:
        name = spec.col_names.get(col, col)
        parts = _parts(spec, numbers)
        head1 += [name] + [""] * (len(parts) - 1)
        head2 += list(parts)
    body = []
    for row in spec.rows:
        line = [row]
        for col in spec.cols:
            line += _cell(by, row, col, seeds, _parts(spec, numbers))
        body.append(line)
    widths = [max(len(x[i]) for x in [head1, head2] + body) for i in range(len(head2))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    source = numbers.get(spec.key, {}).get("source", spec.note or "no numbers in the paper's text")
    lines = [f"{spec.title}",
             f"{_metric_text(spec)}; ours: mean (sample std) over seeds {','.join(map(str, seeds))}, scale {scale}"
             + ("; diff = ours - paper" if "diff" in _parts(spec, numbers) else ""),
             f"paper: {source}", fmt(head1), fmt(head2), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(b) for b in body])


def _row_header(spec: Spec) -> str:
    default = "experts" if spec.plot == "curves" else "method"
    return {"2": "setting", "5": "dataset", "tau_s": "tau"}.get(spec.key, default)


def _metric_text(spec: Spec) -> str:
    if spec.key == "since":
        return "mean test perplexity over users (ppl) and megabytes each user sent over the run (MB/user, mean)"
    return ("final test perplexity of each user" if spec.plot == "curves"
            else "mean test perplexity over users")


def format_markdown(spec: Spec, results: list[Result], numbers: dict, seeds: list[int], scale: str) -> str:
    by = {(r.cell.row, r.cell.col): r for r in results}
    header = [_row_header(spec)] + [f"{spec.col_names.get(c, c)} {part}" for c in spec.cols
                                    for part in _parts(spec, numbers)]
    lines = [f"**{spec.title}**", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in spec.rows:
        cells = [row]
        for col in spec.cols:
            cells += _cell(by, row, col, seeds, _parts(spec, numbers))
        lines.append("| " + " | ".join(cells) + " |")
    source = numbers.get(spec.key, {}).get("source", spec.note or "no numbers in the paper's text")
    diff = "; diff = ours - paper" if "diff" in _parts(spec, numbers) else ""
    lines += ["", f"{_metric_text(spec)}; ours: mean (sample std) over seeds {','.join(map(str, seeds))}, scale "
                  f"{scale}{diff}. Paper: {source}."]
    return "\n".join(lines) + "\n"


@dataclass
class Ordering:
    """One of the paper's orderings within a column: ``better`` has the lower number in the paper
    than ``worse``; ``verdict`` says how our means order them: "holds", "flips", or "within
    spread" (our difference is no larger than the spread of one run's difference over seeds,
    sqrt(std_better^2 + std_worse^2), so the seeds cannot order them)."""
    col: str
    better: str
    worse: str
    paper: tuple[float, float]
    ours: tuple[float, float]
    verdict: str


def orderings(spec: Spec, results: list[Result]) -> list[Ordering]:
    """Every pair of rows of a column that the paper orders (its numbers differ), checked against
    our means; cells without a paper number or without a finished run are left out, and so are cells
    with a diverged seed (the mean of the seeds that survived is biased towards the easy ones)."""
    by = {(r.cell.row, r.cell.col): r for r in results}
    out = []
    for col in spec.cols:
        rows = [row for row in spec.rows if (row, col) in by and by[(row, col)].paper and by[(row, col)].values
                and not math.isnan(by[(row, col)].mean) and not by[(row, col)].diverged]
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                ra, rb = by[(a, col)], by[(b, col)]
                if ra.paper[0] == rb.paper[0]:
                    continue  # the paper ties them
                good, bad = (ra, rb) if ra.paper[0] < rb.paper[0] else (rb, ra)
                spread = math.hypot(*(0.0 if math.isnan(r.std) else r.std for r in (good, bad)))
                gap = bad.mean - good.mean
                verdict = "within spread" if abs(gap) <= spread else ("holds" if gap > 0 else "flips")
                out.append(Ordering(col, good.cell.row, bad.cell.row, (good.paper[0], bad.paper[0]),
                                    (good.mean, bad.mean), verdict))
    return out


def format_orderings(spec: Spec, results: list[Result]) -> str:
    """Per column: how many of the paper's orderings hold, flip or fall within the seeds' spread,
    and each that does not hold. Empty for a table without the paper's numbers."""
    found = orderings(spec, results)
    if not found:
        return ""
    lines = ["The paper's orderings (lower is better) against ours: holds / flips / within the seeds' spread"]
    for col in spec.cols:
        mine = [o for o in found if o.col == col]
        if not mine:
            continue
        count = {v: sum(o.verdict == v for o in mine) for v in ("holds", "flips", "within spread")}
        lines.append(f"- {spec.col_names.get(col, col)}: {count['holds']} of {len(mine)} hold, {count['flips']} "
                     f"flip, {count['within spread']} within spread")
        for o in mine:
            if o.verdict != "holds":
                lines.append(f"  - {o.verdict}: {o.better} < {o.worse} in the paper ({o.paper[0]:.2f} < "
                             f"{o.paper[1]:.2f}); ours {o.ours[0]:.2f} vs {o.ours[1]:.2f}")
    return "\n".join(lines)


def write_csv(path: Path, spec: Spec, results: list[Result]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "row", "col", "paper_mean", "paper_std", "ours_mean", "ours_std", "n_seeds", "seeds",
                    "diff", "relative_diff", "n_diverged", "runs"])
        for r in results:
            pm, ps = r.paper if r.paper else ("", "")
            rel = r.diff / r.paper[0] if r.paper and not math.isnan(r.diff) else ""
            nan = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)
            w.writerow([spec.key, r.cell.row, r.cell.col, nan(pm) if pm != "" else "", nan(ps) if ps != "" else "",
                        nan(r.mean), nan(r.std), len(r.values), " ".join(map(str, r.seeds)),
                        nan(r.diff), nan(rel) if rel != "" else "", r.diverged, " ".join(r.dirs)])


def plot(spec: Spec, results: list[Result], path: Path) -> Path | None:
    """The figure from the runs found: test perplexity curves per user (Figures 4-6, 11-13) or the
    final mean perplexity against tau, one line per s (Figure 7)."""
    from comigs_dist.analyze.runs import build_curves, load_runs, plot_curves, plot_sweep, write_curves_csv
    dirs = sorted({d for r in results for d in r.dirs})
    if not dirs:
        return None
    runs = load_runs(dirs)
    if spec.plot == "curves":
        curves = build_curves(runs, "config.moe.n_experts", from_base=True)
        plot_curves(curves, path, "experts per user", user_names=dict(enumerate(spec.cols)))
        write_curves_csv(curves, path.with_suffix(".curves.csv"), "config.moe.n_experts")
    else:
        plot_sweep(runs, path, x="config.train.router_every", label="config.train.router_steps",
                   x_name="tau (router period, local iterations)", label_name="s (router steps)")
    return path
