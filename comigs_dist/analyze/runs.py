"""Tables and curves over many runs, read from their results.json files.

Owns finding results.json files (a run directory, a file, or a sweep directory searched
recursively), grouping runs by keys of results.json, the Table 1/2/4/5-style table (mean (std)
over seeds) as Markdown and CSV, and the test-perplexity curves (PNG, with the plotted points as
CSV). Knows nothing of models or training; only the results.json contract.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from comigs_dist import tables
from comigs_dist.analyze import AnalysisError

BASE_ROW = "pretrained base"   # the --pretrained row (a method may itself be called "pretrained")
REQUIRED = ("method", "dataset", "seed", "mean_test_ppl", "mean_base_test_ppl", "users")


@dataclass
class Run:
    path: Path            # the results.json file
    results: dict

    @property
    def seed(self):
        return self.results["seed"]


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def find_results(paths: list[str | Path]) -> list[Path]:
    """results.json files: each path is one, a run directory holding one, or a directory searched
    recursively (a sweep). Order: as given, sweeps in sorted path order; duplicates dropped."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            if p.name != "results.json":
                raise AnalysisError(f"--runs {p}: expected a results.json file or a directory")
            files = [p]
        elif (p / "results.json").is_file():
            files = [p / "results.json"]
        elif p.is_dir():
            files = sorted(p.rglob("results.json"))
            if not files:
                raise AnalysisError(f"--runs {p}: no results.json under this directory; pass run directories "
                                    f"written by `python -m comigs_dist.main` (or a sweep directory holding them)")
        else:
            raise AnalysisError(f"--runs {p}: no such file or directory")
        for f in files:
            if f.resolve() not in {x.resolve() for x in found}:
                found.append(f)
    return found


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = []
    for f in find_results(paths):
        try:
            results = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{f} is not valid JSON ({exc}); the run did not finish writing it") from None
        missing = [k for k in REQUIRED if k not in results]
        if missing:
            raise AnalysisError(f"{f} lacks {', '.join(missing)}: not a comigs_dist results.json")
        runs.append(Run(f, results))
    return runs


def get_key(results: dict, key: str, where: Path | None = None):
    """A dotted key of results.json (``method``, ``config.moe.n_experts``, ...)."""
    obj = results
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            known = ", ".join(sorted(k for k in results if k != "users"))
            raise AnalysisError(f"key {key!r} is not in {where or 'results.json'}; top-level keys: {known} "
                                f"(nested ones are dotted, e.g. config.moe.n_experts)")
        obj = obj[part]
    return obj


def format_value(value) -> str:
    """A cell label: lists as the paper writes expert counts, (4,2,2,2)."""
    if isinstance(value, list):
        return "(" + ",".join(format_value(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def mean_std(values: list[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (ddof=1: the sample std; nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n - ddof <= 0:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - ddof))


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------

@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    seeds: list = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)  # each value's results.json (to name what tells two apart)
    mean: float = float("nan")
    std: float = float("nan")


@dataclass
class Table:
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], Cell]
    row_key: str
    col_key: str
    metric: str


def _telling_apart(a: dict, b: dict) -> str:
    """', e.g. --cols config.model.name (embedded / tiny)': the options two runs' configs differ in, if any."""
    from comigs_dist.checkpoint import RESUME_MAY_DIFFER, flatten_keys
    fa, fb = flatten_keys(a.get("config") or {}), flatten_keys(b.get("config") or {})
    # options that change no result (paths, logging, checkpointing, threads...) tell no run apart
    keys = [k for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and (not k.startswith(RESUME_MAY_DIFFER) or k == "train.rounds")]
    if not keys:
        return ""
    shown = ", ".join(f"config.{k} ({format_value(fa.get(k))} / {format_value(fb.get(k))})" for k in keys[:3])
    return f"; their configs differ in {shown}{' and more' if len(keys) > 3 else ''}, e.g. --cols config.{keys[0]}"


def build_table(runs: list[Run], rows: str = "method", cols: str = "dataset", metric: str = "mean_test_ppl",
                pretrained: bool = False, ddof: int = 1) -> Table:
    """One cell per (row value, column value): the metric of every seed, its mean and std.
    Rows and columns keep the order in which they first appear among the runs."""
    if not runs:
        raise AnalysisError("no runs to tabulate")
    row_names: list[str] = []
    col_names: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}

    def add(row: str, col: str, value: float, run: Run) -> None:
        if row not in row_names:
            row_names.append(row)
        if col not in col_names:
            col_names.append(col)
        cell = cells.setdefault((row, col), Cell())
        if run.seed in cell.seeds:
            index = cell.seeds.index(run.seed)
            raise AnalysisError(f"{run.path} and {cell.paths[index]} are both {rows}={row}, {cols}={col}, seed "
                                f"{run.seed}: pass only one of them (or tell them apart with --rows/--cols"
                                f"{_telling_apart(run.results, cell.results[index])})")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AnalysisError(f"{run.path}: {metric} is {value!r}, not a finite number")
        cell.values.append(float(value))
        cell.seeds.append(run.seed)
        cell.paths.append(run.path)
        cell.results.append(run.results)

    if pretrained:
        row_names.append(BASE_ROW)
    for run in runs:
        col = format_value(get_key(run.results, cols, run.path))
        add(format_value(get_key(run.results, rows, run.path)), col, get_key(run.results, metric, run.path), run)
    if pretrained:
        # the base is the same model on the same data for every method: one value per seed
        for run in runs:
            col = format_value(get_key(run.results, cols, run.path))
            cell = cells.setdefault((BASE_ROW, col), Cell())
            if run.seed not in cell.seeds:
                cell.values.append(float(run.results["mean_base_test_ppl"]))
                cell.seeds.append(run.seed)
                cell.paths.append(run.path)
    for cell in cells.values():
        cell.mean, cell.std = mean_std(cell.values, ddof)
    return Table(row_names, col_names, cells, rows, cols, metric)


def _ranks(table: Table, col: str) -> dict[str, int]:
    """1 = lowest mean in the column (perplexity: lower is better); the base row is not ranked."""
    means = sorted((table.cells[(r, col)].mean, r) for r in table.rows if (r, col) in table.cells and r != BASE_ROW)
    return {r: i + 1 for i, (_, r) in enumerate(means)}


def format_markdown(table: Table, digits: int = 2) -> str:
    counts = Counter(len(c.values) for (r, _), c in table.cells.items() if r != BASE_ROW)
    usual = counts.most_common(1)[0][0] if counts else 1
    header = [table.row_key] + table.cols
    body = []
    for row in table.rows:
        out = [row]
        for col in table.cols:
            cell = table.cells.get((row, col))
            if cell is None:
                out.append("")
                continue
            text = f"{cell.mean:.{digits}f}"
            if not math.isnan(cell.std):
                text += f" ({cell.std:.{digits}f})"
            if _ranks(table, col).get(row) == 1 and len(_ranks(table, col)) > 1:
                text = f"**{text}**"
            if len(cell.values) != usual and row != BASE_ROW:
                text += f" [{len(cell.values)} seeds]"
            out.append(text)
        body.append(out)
    caption = (f"{table.metric}: mean (std) over {usual} seed{'s' if usual != 1 else ''} per cell; "
               f"bold = lowest in its column.")
    return tables.format_markdown(header, body, "<" + ">" * len(table.cols)) + "\n\n" + caption + "\n"


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([table.row_key, table.col_key, "mean", "std", "n_seeds", "seeds", "rank"])
        for row in table.rows:
            for col in table.cols:
                cell = table.cells.get((row, col))
                if cell is None:
                    continue
                w.writerow([row, col, repr(cell.mean), "" if math.isnan(cell.std) else repr(cell.std),
                            len(cell.values), " ".join(map(str, cell.seeds)), _ranks(table, col).get(row, "")])


def run_table(args) -> None:
    table = build_table(load_runs(args.runs), args.rows, args.cols, args.metric, args.pretrained, args.ddof)
    md = format_markdown(table, args.digits)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")
    md_path.write_text(md)
    write_csv(table, csv_path)
    print(md)
    print(f"wrote {md_path} and {csv_path}")


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), or a clear error."""
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError("PNG output needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Curve:
    dataset: str
    user: int
    label: str
    steps: list[int]
    mean: list[float]
    std: list[float]
    n_seeds: int


def build_curves(runs: list[Run], label: str = "method", from_base: bool = False) -> list[Curve]:
    """Per (dataset, user, label): test perplexity at each evaluated iteration, mean and std over
    seeds, on the iterations every seed evaluated."""
    groups: dict[tuple[str, int, str], list[dict[int, float]]] = {}
    for run in runs:
        name = format_value(get_key(run.results, label, run.path))
        for row in run.results["users"]:
            curve = row.get("test_curve")
            if not curve:
                raise AnalysisError(f"{run.path}: user {row['user']} has no test_curve")
            points = {int(p["step"]): float(p["test_ppl"]) for p in curve}
            if from_base:
                points[0] = float(row["base_test_ppl"])
            groups.setdefault((run.results["dataset"], int(row["user"]), name), []).append(points)
    curves = []
    for (dataset, user, name), seeds in groups.items():
        steps = sorted(set.intersection(*(set(s) for s in seeds)))
        stats = [mean_std([s[step] for s in seeds]) for step in steps]
        curves.append(Curve(dataset, user, name, steps, [m for m, _ in stats], [s for _, s in stats], len(seeds)))
    return curves


def plot_curves(curves: list[Curve], out: Path, label_key: str, log_y: bool = False,
                user_names: dict[int, str] | None = None) -> None:
    """One panel per (dataset, user), titled with ``user_names`` where given (e.g. 'de (low)')."""
    plt = pyplot()
    datasets = list(dict.fromkeys(c.dataset for c in curves))
    users = sorted({c.user for c in curves})
    labels = list(dict.fromkeys(c.label for c in curves))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(labels)}
    fig, axes = plt.subplots(len(datasets), len(users), figsize=(3.6 * len(users), 2.9 * len(datasets)),
                             squeeze=False, sharex=True)
    for c in curves:
        ax = axes[datasets.index(c.dataset)][users.index(c.user)]
        ax.plot(c.steps, c.mean, marker="o", markersize=3, color=colours[c.label], label=c.label)
        if c.n_seeds > 1:
            lo = [m - s for m, s in zip(c.mean, c.std)]
            hi = [m + s for m, s in zip(c.mean, c.std)]
            ax.fill_between(c.steps, lo, hi, color=colours[c.label], alpha=0.2, linewidth=0)
    for i, dataset in enumerate(datasets):
        for j, user in enumerate(users):
            ax = axes[i][j]
            ax.set_title(f"{dataset}: {(user_names or {}).get(user, f'user {user}')}", fontsize=9)
            ax.grid(alpha=0.3)
            if log_y:
                ax.set_yscale("log")
            if i == len(datasets) - 1:
                ax.set_xlabel("iterations")
            if j == 0:
                ax.set_ylabel("test perplexity")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, title=label_key, loc="upper center", ncol=min(len(labels), 6), fontsize=8,
               title_fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.9 if len(datasets) == 1 else 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_curves_csv(curves: list[Curve], path: Path, label_key: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "user", label_key, "step", "test_ppl_mean", "test_ppl_std", "n_seeds"])
        for c in curves:
            for step, m, s in zip(c.steps, c.mean, c.std):
                w.writerow([c.dataset, c.user, c.label, step, repr(m), "" if math.isnan(s) else repr(s), c.n_seeds])


def run_curves(args) -> None:
    curves = build_curves(load_runs(args.runs), args.label, args.from_base)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise AnalysisError(f"--out {out}: the curves are written as PNG; give a path ending in .png")
    names = dict(enumerate(n.strip() for n in args.user_names.split(","))) if args.user_names else None
    plot_curves(curves, out, args.label, args.log_y, names)
    csv_path = out.with_suffix(".csv")
    write_curves_csv(curves, csv_path, args.label)
    print(f"wrote {out} ({len(curves)} curves) and {csv_path}")


# --------------------------------------------------------------------------------------------
# sweep: the final metric against one option, one line per another (Figure 7: tau and s)
# --------------------------------------------------------------------------------------------

def build_sweep(runs: list[Run], x: str, label: str, metric: str = "mean_test_ppl") -> dict[str, list[tuple]]:
    """label value -> [(x value, mean, std, n_seeds)] sorted by x, mean and sample std over seeds."""
    groups: dict[tuple[str, float], list[float]] = {}
    for run in runs:
        x_value = get_key(run.results, x, run.path)
        if not isinstance(x_value, (int, float)):
            raise AnalysisError(f"{run.path}: {x} is {x_value!r}; the sweep's x axis must be a number")
        value = get_key(run.results, metric, run.path)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AnalysisError(f"{run.path}: {metric} is {value!r}, not a finite number")
        groups.setdefault((format_value(get_key(run.results, label, run.path)), float(x_value)), []).append(value)
    out: dict[str, list[tuple]] = {}
    for (name, x_value), values in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(name, []).append((x_value, *mean_std(values), len(values)))
    return out


def plot_sweep(runs: list[Run], out: Path, x: str, label: str, metric: str = "mean_test_ppl",
               x_name: str | None = None, label_name: str | None = None) -> dict[str, list[tuple]]:
    """The final ``metric`` against ``x``, one line per ``label`` value (mean +- std over seeds); the
    points also go to OUT.csv."""
    plt = pyplot()
    lines = build_sweep(runs, x, label, metric)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, (name, points) in enumerate(lines.items()):
        xs, means, stds = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot(xs, means, marker="o", color=colour, label=name)
        if any(not math.isnan(sd) for sd in stds):
            ax.fill_between(xs, [m - (0 if math.isnan(sd) else sd) for m, sd in zip(means, stds)],
                            [m + (0 if math.isnan(sd) else sd) for m, sd in zip(means, stds)], color=colour,
                            alpha=0.2, linewidth=0)
    ax.set_xlabel(x_name or x)
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(title=label_name or label, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([label, x, f"{metric}_mean", f"{metric}_std", "n_seeds"])
        for name, points in lines.items():
            for x_value, m, sd, n in points:
                w.writerow([name, x_value, repr(m), "" if math.isnan(sd) else repr(sd), n])
    return lines


def run_sweep(args) -> None:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise AnalysisError(f"--out {out}: the sweep is written as PNG; give a path ending in .png")
    lines = plot_sweep(load_runs(args.runs), out, args.x, args.label, args.metric)
    print(f"wrote {out} ({len(lines)} lines) and {out.with_suffix('.csv')}")
