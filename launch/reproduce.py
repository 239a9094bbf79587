"""Reproduce one table or figure of the paper and print it beside the paper's numbers.

    python -m launch.reproduce --table 1 --dataset agnews [--seeds 42,45,47] [--executor slurm|local]
        [--scale paper|cpu|debug] [--rows Local,FedAvg] [--quirks] [--dry-run | --collect]

``--table`` takes 1, 2, 4, 5, 6 (the tables), fig4, fig5, fig6 (section 4.3.2, Multilingual),
fig11, fig12, fig13 (appendix D, SlimPajama), tau_s (Figure 7), since (the methods published since the
paper beside CoMiGS, with the megabytes each user sent) and privacy (not in the paper: test perplexity
against user-level DP's privacy.target_epsilon, docs/privacy.md). Every cell of the table is one
configuration (a YAML of ``configs/`` and its row's overrides, as the YAML's header lists them) run
once per seed through the sweep machinery (``launch.submit``: submitit, to Slurm or to local
processes). Each run has a fixed directory, ``<root>/<scale>/<config>/<overrides>/seed-<s>``, so a
run that left its results.json is never run again and a later call only fills what is missing
(an interrupted run resumes from its checkpoints); ``--collect`` submits nothing and prints the
table of the runs finished so far (while the others run on Slurm, say). The table is then printed in the paper's layout,
each cell with the paper's number (``launch/paper_numbers.yaml``, with its source), ours (mean
(sample std) over the seeds found) and the difference, and written as CSV and Markdown; the figures
also get their plot (``comigs_dist.analyze``).

Scales: ``paper`` runs the configs as they are (GPT-2 124M or Llama 3.2 1B, data/<dataset>);
``cpu`` the same rows on the small GPT-2 pretrained here and the CPU-sized copies of the local text
(data/cpu/<dataset>; ``--prepare`` builds them, see README "Reproducing the paper on a CPU");
``debug`` on a tiny random model and the embedded corpus, two users, two rounds (tests).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from comigs_dist.checkpoint import fresh_run_dir
from comigs_dist.config import PER_USER_KEYS, ConfigError, get_dotted, inferred_n_users, load_config
from comigs_dist.guard import STOPPED  # what a run the guard stopped leaves in its out_dir
from launch.collect import mean_std

ROOT = Path(__file__).resolve().parents[1]          # the checkout: configs/ live here
PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
SCALES = ("paper", "cpu", "debug")
SEEDS = (42, 45, 47)
NAMES = {"agnews": "AG News", "multilingual": "Multilingual", "slimpajama": "SlimPajama",
         "common_corpus": "Common-Corpus"}
PAPER_DATASETS = ("multilingual", "slimpajama", "agnews")   # the column order of Tables 1 and 4


@dataclass(frozen=True)
class Cell:
    """One cell of a table: the configuration whose runs (one per seed) give its number."""
    row: str
    col: str
    config: str                      # relative to the checkout
    overrides: tuple[str, ...]
    dataset: str
    user: int | None = None          # None: the mean over users (the tables); a user: its own ppl (figures)
    metric: str = "ppl"              # "ppl": test perplexity; "mb": megabytes sent per user over the run


@dataclass
class Spec:
    key: str
    title: str
    rows: list[str]
    cols: list[str]
    cells: list[Cell]
    col_names: dict[str, str] = field(default_factory=dict)   # column key -> printed name
    plot: str = ""                   # "" | "curves" (figures 4-6, 11-13) | "sweep" (tau/s)
    note: str = ""


# --------------------------------------------------------------------------------------------
# the tables: which configuration makes each cell (the rows the YAML headers list)
# --------------------------------------------------------------------------------------------

_GROUP = {"i": "table4_i_no_routing", "ii": "table4_ii_joint", "iii": "table4_iii_alternating_train",
          "iv": "table4_iv_alternating_valid"}
TABLE4_ROWS = [("i", "Pretrained", "pretrained"), ("i", "Centralized", "centralized"), ("i", "Local", "local"),
               ("i", "FedAvg", "fedavg"), ("i", "FFA-LoRA", "ffa_lora"), ("i", "PCL", "pcl"),
               ("ii", "Local-MoE", "local_moe"), ("ii", "FedAvg-MoE", "fedavg_moe"), ("ii", "pFedMoE", "pfedmoe"),
               ("iii", "Local-MoE-tr", "local_moe_tr"), ("iii", "FedAvg-MoE-tr", "fedavg_moe_tr"),
               ("iii", "CoMiGS-tr", "comigs_tr"), ("iv", "CoMiGS-2S", "comigs_2s"), ("iv", "CoMiGS-2G", "comigs_2g"),
               ("iv", "CoMiGS-1G1S", "comigs_1g1s")]
TABLE1_ROWS = ["Pretrained", "Centralized", "Local", "FedAvg", "PCL", "pFedMoE", "CoMiGS-2S", "CoMiGS-2G",
               "CoMiGS-1G1S"]
TABLE2_SETTINGS = {"multilingual": ("2244", "4422"), "slimpajama": ("2442", "4224"), "agnews": ("4222", "2444")}
TABLE2_COLS = {"CoMiGS-1GXS": ("method=comigs_1gxs",),
               "HetLoRA Active": ("method=hetlora", "method_options.match=active"),
               "HetLoRA Full": ("method=hetlora", "method_options.match=full"),
               "FlexLoRA Active": ("method=flexlora", "method_options.match=active"),
               "FlexLoRA Full": ("method=flexlora", "method_options.match=full")}
TABLE5_DATASETS = (("agnews", "AG News"), ("multilingual", "Multi-Wiki"), ("slimpajama", "SlimPajama"))
TABLE5_COLS = {"No LB": "none", "LB (uniform)": "uniform", "LB (generalist-favoured)": "generalist"}
TABLE6_ROWS = {"Pretrained": "pretrained", "Centralized": "centralized", "Local": "local", "FedAvg": "fedavg",
               "CoMiGS-2S": "comigs_2s", "CoMiGS-2G": "comigs_2g", "CoMiGS-1G1S": "comigs_1g1s"}
TABLE6_COLS = {"common_corpus": ("data.path=data/common-corpus-llama32",),
               "agnews": ("data.path=data/agnews-llama32",),
               "slimpajama": ("data.path=data/slimpajama-llama32", "train.rounds=50"),
               "multilingual": ("data.path=data/multilingual-llama32",)}
# Figures 4-6 and 11-13: the lines (experts per user; users 0, 1 hold little data, 2, 3 much)
FIGURE_LINES = {"more_specialists": ((2, 2, 2, 2), (2, 2, 4, 4), (2, 2, 8, 8)),
                "no_overfitting": ((2, 2, 2, 2), (4, 4, 2, 2), (8, 8, 2, 2)),
                "one_expert": ((1, 1, 1, 1), (1, 1, 2, 2), (1, 1, 4, 4), (1, 1, 8, 8))}
FIGURES = {"fig4": ("multilingual", "more_specialists",
                    "Figure 4: more specialists help the high-data users (French, Italian)"),
           "fig5": ("multilingual", "no_overfitting",
                    "Figure 5: low-data users (German, Dutch) with more experts do not overfit"),
           "fig6": ("multilingual", "one_expert",
                    "Figure 6: one-expert low-data users gain from collaborators with more experts"),
           "fig11": ("slimpajama", "more_specialists",
                     "Figure 11: more specialists help the high-data users (ArXiv, Book)"),
           "fig12": ("slimpajama", "no_overfitting",
                     "Figure 12: low-data users (StackExchange, GitHub) with more experts"),
           "fig13": ("slimpajama", "one_expert",
                     "Figure 13: one-expert low-data users gain from collaborators with more experts")}
USERS = {"multilingual": ("de", "nl", "fr", "it"), "slimpajama": ("stackexchange", "github", "arxiv", "book")}
TAU_S = ((10, 30, 50), (5, 10, 20))
# the methods published since the paper (issue 19) beside CoMiGS, Local and FedAvg: the Table 4 settings
# (AG News out of distribution, Multilingual and SlimPajama in distribution); FedDPA's second phase
# (the global adapter) takes as many steps as its first, once per round
SINCE_ROWS = {"CoMiGS-1G1S": ("method=comigs_1g1s",), "Local": ("method=local",), "FedAvg": ("method=fedavg",),
              "FedALT": ("method=fedalt",), "FedSA-LoRA": ("method=fedsa_lora",),
              "FedDPA": ("method=feddpa", "train.router_every=10", "train.router_steps=10"),
              "CoMiGS-learned": ("method=comigs_learned",),
              # variants: FedALT mixing whole MLP outputs; FedDPA-F (global adapter only in the rounds,
              # then each local adapter fine-tuned from it for train.local_steps steps)
              "FedALT-MLP": ("method=fedalt", "method_options.mixer=mlp"),
              "FedDPA-F": ("method=feddpa", "method_options.variant=F")}
# the rows without routing come from the YAML whose header lists them (Table 1's): its body is Table 4
# iv's, so the runs are the same and the two tables share their directories (computed once)
SINCE_CONFIG = {"Local": "table4_i_no_routing", "FedAvg": "table4_i_no_routing"}
# perplexity against epsilon (docs/privacy.md): row -> (config, method); columns: no DP, then privacy.target_epsilon
PRIVACY_ROWS = {"CoMiGS-1G1S": ("configs/agnews/table4_iv_alternating_valid.yaml", "comigs_1g1s"),
                "FedAvg": ("configs/agnews/table4_i_no_routing.yaml", "fedavg")}
PRIVACY_EPSILONS = (64, 16, 4, 1)
TABLE_KEYS = ("1", "2", "4", "5", "6", *FIGURES, "tau_s", "since", "privacy")


def _fmt_list(values) -> str:
    return "(" + ",".join(str(v) for v in values) + ")"


def build_spec(key: str) -> Spec:
    """The cells of table ``key`` and where each comes from."""
    if key in ("1", "4"):
        chosen = [r for r in TABLE4_ROWS if key == "4" or r[1] in TABLE1_ROWS]
        label = (lambda g, name: name) if key == "1" else (lambda g, name: f"{g}) {name}")
        cells = [Cell(label(g, name), ds, f"configs/{ds}/{_GROUP[g]}.yaml", (f"method={m}",), ds)
                 for g, name, m in chosen for ds in PAPER_DATASETS]
        title = ("Table 1: homogeneous models" if key == "1" else
                 "Table 4: homogeneous models, extended (i no routing, ii joint, iii alternating on training "
                 "batches, iv alternating on validation)")
        return Spec(key, title, [label(g, n) for g, n, _ in chosen], list(PAPER_DATASETS), cells, dict(NAMES))
    if key == "2":
        rows, cells = [], []
        for ds in PAPER_DATASETS:
            for digits in TABLE2_SETTINGS[ds]:
                row = f"{NAMES[ds]} {_fmt_list(digits)}"
                rows.append(row)
                cells += [Cell(row, col, f"configs/{ds}/table2_{digits}.yaml", ov, ds)
                          for col, ov in TABLE2_COLS.items()]
        return Spec(key, "Table 2: heterogeneous models (experts per user; HetLoRA/FlexLoRA match active or full "
                         "parameters)", rows, list(TABLE2_COLS), cells)
    if key == "5":
        rows, cells = [], []
        for ds, name in TABLE5_DATASETS:
            for kind in ("homo", "hetero"):
                row = f"{name} ({kind})"
                rows.append(row)
                cells += [Cell(row, col, f"configs/{ds}/table5_{kind}.yaml", (f"moe.load_balancing={lb}",), ds)
                          for col, lb in TABLE5_COLS.items()]
        return Spec(key, "Table 5: load balancing without (homo) and with (hetero) system heterogeneity", rows,
                    list(TABLE5_COLS), cells)
    if key == "6":
        cells = [Cell(row, ds, f"configs/llama32_1b/{m}.yaml", ov, ds)
                 for row, m in TABLE6_ROWS.items() for ds, ov in TABLE6_COLS.items()]
        return Spec(key, "Table 6: homogeneous models, Llama 3.2 1B", list(TABLE6_ROWS), list(TABLE6_COLS), cells,
                    dict(NAMES))
    if key in FIGURES:
        ds, lines, title = FIGURES[key]
        users = USERS[ds]
        cols = [f"{c} ({'low' if u < 2 else 'high'})" for u, c in enumerate(users)]
        cells = [Cell(_fmt_list(n), col, f"configs/data_quantity/{ds}.yaml",
                      (f"moe.n_experts=[{','.join(map(str, n))}]",), ds, user=u)
                 for n in FIGURE_LINES[lines] for u, col in enumerate(cols)]
        return Spec(key, title + " (final test perplexity per user; the paper plots the curves)",
                    [_fmt_list(n) for n in FIGURE_LINES[lines]], cols, cells, plot="curves",
                    note="the paper shows this as a figure only: no numbers to compare")
    if key == "tau_s":
        taus, steps = TAU_S
        cells = [Cell(f"tau={t}", f"s={s}", "configs/sensitivity/tau_s.yaml",
                      (f"train.router_every={t}", f"train.router_steps={s}"), "slimpajama")
                 for t in taus for s in steps]
        return Spec(key, "Figure 7: router period tau and router steps s, CoMiGS-1G1S on SlimPajama",
                    [f"tau={t}" for t in taus], [f"s={s}" for s in steps], cells, plot="sweep",
                    note="the paper shows this as a figure only: no numbers to compare")
    if key == "since":
        cols, names, cells = [], {}, []
        for ds in ("agnews", "multilingual", "slimpajama"):
            cols += [ds, f"{ds}_mb"]
            names.update({ds: f"{NAMES[ds]} ppl", f"{ds}_mb": f"{NAMES[ds]} MB/user"})
            cells += [Cell(row, col, f"configs/{ds}/{SINCE_CONFIG.get(row, 'table4_iv_alternating_valid')}.yaml", ov,
                           ds, metric=metric)
                      for row, ov in SINCE_ROWS.items() for col, metric in ((ds, "ppl"), (f"{ds}_mb", "mb"))]
        return Spec(key, "Methods since the paper: FedALT, FedSA-LoRA, FedDPA and learned sharing groups beside "
                         "CoMiGS-1G1S, Local and FedAvg (Table 4's settings)", list(SINCE_ROWS), cols, cells, names,
                    note="not in the paper: no numbers to compare")
    if key == "privacy":
        cols = {"no DP": ()} | {f"eps={e}": ("privacy.dp=user", f"privacy.target_epsilon={e}")
                                for e in PRIVACY_EPSILONS}
        cells = [Cell(row, col, config, (f"method={method}", *ov), "agnews")
                 for row, (config, method) in PRIVACY_ROWS.items() for col, ov in cols.items()]
        return Spec(key, "Privacy: user-level DP on the shared parameters, AG News (not in the paper)",
                    list(PRIVACY_ROWS), list(cols), cells,
                    note="not in the paper; each eps column calibrates the noise multiplier so that epsilon at "
                         "privacy.delta=1e-5 after the run's rounds is at most eps (privacy.clip=1.0; "
                         "docs/privacy.md)")
    raise ConfigError(f"--table {key!r} is not known; choose one of: {', '.join(TABLE_KEYS)}")


def select(spec: Spec, datasets: list[str] | None, rows: list[str] | None) -> Spec:
    """The spec restricted to some datasets and rows (labels as printed); unknown names are errors."""
    cells = spec.cells
    if datasets:
        known = sorted({c.dataset for c in spec.cells})
        bad = [d for d in datasets if d not in known]
        if bad:
            raise ConfigError(f"--dataset {','.join(bad)}: table {spec.key} has {', '.join(known)}")
        cells = [c for c in cells if c.dataset in datasets]
    if rows:
        bad = [r for r in rows if r not in spec.rows]
        if bad:
            raise ConfigError(f"--rows {','.join(bad)}: table {spec.key} has rows {', '.join(spec.rows)}")
        cells = [c for c in cells if c.row in rows]
    keep_rows = [r for r in spec.rows if any(c.row == r for c in cells)]
    keep_cols = [k for k in spec.cols if any(c.col == k for c in cells)]
    return Spec(spec.key, spec.title, keep_rows, keep_cols, cells, spec.col_names, spec.plot, spec.note)


# --------------------------------------------------------------------------------------------
# the paper's numbers
# --------------------------------------------------------------------------------------------

def paper_numbers(path: Path = PAPER_NUMBERS) -> dict:
    """{table key: {"source", "title", "cells": {(row, col): (mean, std or None)}}}."""
    raw = yaml.safe_load(path.read_text())["tables"]
    out = {}
    for key, t in raw.items():
        cells = {}
        for row, by_col in t["rows"].items():
            for col, value in by_col.items():
                mean, std = (value, None) if isinstance(value, (int, float)) else (value[0], value[1])
                cells[(row, col)] = (float(mean), None if std is None else float(std))
        out[str(key)] = {"source": t["source"], "title": t["title"], "columns": list(t["columns"]), "cells": cells}
    return out


# --------------------------------------------------------------------------------------------
# scales: what changes in every run
# --------------------------------------------------------------------------------------------

CPU_MODEL = "models/small-gpt2"
CPU_LOCAL_STEPS = 5
# a run's round checkpoints, unless its YAML sets its own: what lets an interrupted run resume
# (the newest only: older ones go once every user has written a newer one)
RESUMABLE = ("checkpoint.every=5", "checkpoint.keep=1")
# at the CPU scale a table cell needs only the final test perplexity: the evaluations between rounds
# (every 5 rounds in the YAMLs) change nothing else (tests/test_train.py) and cost up to a third of a
# SlimPajama run; the figures, which plot the curves, keep them
FINAL_EVAL_ONLY = ("eval.every=0",)
CPU_PREPARE = [  # what --scale cpu needs, in order (each skipped when its output exists)
    ("data/cpu/agnews", "python -m comigs_dist.data prepare --dataset agnews --source ../shared/data/ag_news "
                        "--out data/cpu/agnews"),
    ("data/cpu/multilingual", "python -m comigs_dist.data prepare --dataset multilingual --source "
                              "../shared/data/multilingual --budget-scale 0.1 --out data/cpu/multilingual"),
    ("data/cpu/slimpajama", "python -m comigs_dist.data prepare --dataset slimpajama --source ../shared/data/domains "
                            "--budget-scale 0.1 --out data/cpu/slimpajama"),
    ("data/cpu/slimpajama-lowdata", "python -m comigs_dist.data prepare --dataset slimpajama --source "
                                    "../shared/data/domains --budget-scale 0.1 --low-data stackexchange,github "
                                    "--data-ratio 4 --out data/cpu/slimpajama-lowdata"),
    (CPU_MODEL, "python -m comigs_dist.pretrain --source ../shared/data/domains/books.txt "
                "../shared/data/domains/stackexchange.txt ../shared/data/domains/arxiv.txt "
                "../shared/data/domains/code.txt --config small --max-tokens 2000000 --out models/small-gpt2 "
                "--exclude data/cpu/agnews data/cpu/slimpajama data/cpu/slimpajama-lowdata --drop-excluded"),
]


def _read(cell: Cell, extra: list[str]):
    """The cell's configuration with its data path pointed at the embedded corpus (only to read it)."""
    return load_config(ROOT / cell.config, list(cell.overrides) + extra + ["data.path=embedded",
                                                                         "data.categories=[]"])


def scale_overrides(cell: Cell, scale: str) -> list[str]:
    """Overrides appended to every run of ``cell`` at ``scale``."""
    if scale == "paper":
        return []
    cfg = _read(cell, [])
    llama = "llama" in cfg.model.name.lower()
    if scale == "cpu":
        if llama:
            raise ConfigError(f"table cell {cell.row} / {cell.col} runs Llama 3.2 1B, which has no CPU scale; "
                              f"use --scale paper (a GPU) or --scale debug")
        # the dataset's CPU-sized copy: data/<name> -> data/cpu/<name> (the YAML's path may not exist here)
        raw_path = (yaml.safe_load((ROOT / cell.config).read_text()).get("data") or {}).get("path", "")
        raw_path = next((o.split("=", 1)[1] for o in cell.overrides if o.startswith("data.path=")), raw_path)
        ratio = CPU_LOCAL_STEPS / cfg.train.local_steps
        t = cfg.train
        # Algorithm 1's proportions kept: tau and s in local iterations shrink with the round
        return [f"model.name={CPU_MODEL}", f"data.path=data/cpu/{Path(raw_path).name}", "train.batch_size=8",
                "train.micro_batch_size=0", f"train.local_steps={CPU_LOCAL_STEPS}",
                f"train.router_every={max(1, round(t.router_every * ratio))}",
                f"train.router_steps={max(1, round(t.router_steps * ratio)) if t.router_steps else 0}",
                "train.lr=5e-3", "log.tensorboard=false"]
    if scale == "debug":
        out = [f"model.name={'llama-tiny' if llama else 'tiny'}", "data.path=embedded", "data.categories=[]",
               "n_users=2", "train.rounds=2", "train.local_steps=2", "train.router_every=2", "train.router_steps=1",
               "train.batch_size=4", "train.micro_batch_size=0", "train.seq_len=32", "eval.max_tokens=1024",
               "eval.every=1", "log.tensorboard=false", "log.progress=false", "checkpoint.final=false"]
        if "warmup_rounds" in cfg.method_options:  # learned groups: warm up for one of the two rounds
            out.append("method_options.warmup_rounds=1")
        for key in PER_USER_KEYS:  # the first two users of every per-user list
            value = get_dotted(cfg, key)
            if isinstance(value, list) and value and key != "data.categories":
                out.append(f"{key}=[{','.join(str(v) for v in value[:2])}]")
        return out
    raise ConfigError(f"--scale {scale!r} must be one of {', '.join(SCALES)}")


# --------------------------------------------------------------------------------------------
# runs: plan, find what is done or running, submit the rest
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    cells: list[Cell]                # every cell this run fills (a figure's line: one per user)
    seed: int
    out_dir: Path
    argv: list[str]
    status: str = "to run"           # "done" | "stale: ..." | "diverged" | "running" | "to run" | "invalid: ..."
    job: dict | None = None          # the planned job (launch.submit.plan_jobs)

    @property
    def label(self) -> str:
        c = self.cells[0]
        return f"{c.row} / {c.col}" if len(self.cells) == 1 else f"{c.row} / {len(self.cells)} columns"


def cell_dir(root: Path, scale: str, cell: Cell, extra: list[str]) -> Path:
    from launch.common import slug
    config = Path(cell.config).with_suffix("")
    parts = config.parts[1:] if config.parts[0] == "configs" else config.parts
    return root / scale / Path(*parts) / slug(" ".join(list(cell.overrides) + extra) or "defaults")


def ended(out_dir: Path) -> str | None:
    """How the run in ``out_dir`` ended, read from its files: "done" (results.json), "diverged"
    (guard.nan=stop left stopped.json and no results), or None (not yet)."""
    if (out_dir / "results.json").is_file():
        return "done"
    return "diverged" if (out_dir / STOPPED).is_file() else None


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


def run_extras(spec: Spec, scale: str, cfg) -> list[str]:
    """Overrides every run of ``spec`` takes after its scale's: round checkpoints unless its YAML
    sets its own (``RESUMABLE``), and at the CPU scale only the final evaluation unless the table is
    a figure of curves (``FINAL_EVAL_ONLY``)."""
    out = [] if cfg.checkpoint.every else list(RESUMABLE)
    if scale == "cpu" and spec.plot != "curves":
        out += FINAL_EVAL_ONLY
    return out


def plan_runs(spec: Spec, seeds: list[int], scale: str, root: Path, quirks: bool = False, cpus_per_task: int = 0,
              gpus_per_node: int = 0, ranks_per_node: int | None = None) -> list[Run]:
    """One Run per configuration and seed (cells made by one configuration, such as the users of a
    figure's line, share it), each with its fixed out_dir and its state; a configuration that is
    invalid (e.g. a dataset not prepared yet) is marked, not raised. A run that the guard stopped
    (guard.nan=stop left ``stopped.json`` and no results.json) is "diverged": an outcome, never
    resubmitted, since the same seed would stop the same way. ``ranks_per_node`` caps a run's
    processes (its users then share ranks; the results are the same, bit for bit)."""
    from launch.submit import plan_jobs
    by_folder: dict[Path, list[Cell]] = {}
    extras: dict[Path, list[str]] = {}
    for cell in spec.cells:
        extra = []
        if quirks and "reference_quirks" in _read(cell, []).method_options:
            extra.append("method_options.reference_quirks=true")
        folder = cell_dir(root, scale, cell, extra)
        by_folder.setdefault(folder, []).append(cell)
        extras[folder] = extra
    runs = []
    for folder, cells in by_folder.items():
        cell = cells[0]
        try:
            scaled = scale_overrides(cell, scale)
            cfg = _read(cell, extras[folder] + scaled)
            job_argv = ["--config", str(ROOT / cell.config), *cell.overrides, *extras[folder], *scaled,
                        *run_extras(spec, scale, cfg)]
            ranks = min(ranks_per_node, inferred_n_users(cfg) or ranks_per_node) if ranks_per_node else None
            jobs, _ = plan_jobs(job_argv, [f"seed={','.join(map(str, seeds))}"], folder, 1, ranks, gpus_per_node,
                                cpus_per_task, None)
            for seed, job in zip(seeds, jobs):
                runs.append(Run(cells, seed, Path(job["out_dir"]), job["argv"], job=job))
        except ConfigError as exc:
            # one reason per problem: the same problem of every seed's run is said once, without its "seed=N: "
            parts = str(exc).split("fix these first:\n  - ")[-1].split("\n  - ")
            why = "; ".join(dict.fromkeys(re.sub(r"^seed=\d+: ", "", part) for part in parts))
            runs += [Run(cells, seed, folder / f"seed-{seed}", [], f"invalid: {why}") for seed in seeds]
    launches = root / scale / "launches"
    running = in_flight(launches)
    for run in runs:
        if (state := ended(run.out_dir)) is not None:
            run.status = state
            if state == "done" and run.argv and (why := stale(run)):
                run.status = f"stale: {why}"
        elif run.status == "to run" and str(run.out_dir) in running:
            run.status = f"running (job {running[str(run.out_dir)]})"
        elif run.status == "to run" and (pid := live_local_run(run.out_dir)):
            run.status = f"running (pid {pid})"
    return runs


def stale(run: Run) -> str | None:
    """How the finished run in ``run.out_dir`` was configured differently from what the table plans
    for it today (an edited YAML, another default since), or None: its saved config against its
    planned command, on the options that change results (checkpoint.config_differences) and the
    number of rounds. A stale run is left out of the table and never rerun over: the user moves it
    aside. Results without a config (not written by comigs_dist.main) are taken as they are."""
    from comigs_dist.checkpoint import config_differences
    from comigs_dist.main import parse_args
    try:
        saved = json.loads((run.out_dir / "results.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(saved, dict):
        return None
    args = parse_args(run.argv)
    planned = load_config(args.config, args.overrides).to_dict()
    diffs = [d.split("; resume with")[0] for d in config_differences(saved, planned)]
    rounds = (saved.get("train") or {}).get("rounds")
    if rounds != planned["train"]["rounds"]:
        diffs.append(f"train.rounds={rounds} but this run has train.rounds={planned['train']['rounds']}")
    return "; ".join(diffs[:3]) + (f"; ... ({len(diffs)} options)" if len(diffs) > 3 else "") if diffs else None


def live_local_run(out_dir: Path) -> int | None:
    """The pid of a run alive on this host that holds ``out_dir``'s lock (a local run another call
    started: local jobs are not in any scheduler's accounting), read from the lock's record without
    touching the lock itself; None when there is none or its process is gone."""
    import socket

    from comigs_dist.checkpoint import LOCK_FILE
    from comigs_dist.dist import pid_alive
    try:
        record = json.loads((Path(out_dir) / LOCK_FILE).read_text() or "{}")
        pid = int(record.get("pid") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return pid if pid > 0 and record.get("host") == socket.gethostname() and pid_alive(pid) else None


ACTIVE = {"RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def in_flight(launches: Path) -> dict[str, str]:
    """out_dir -> job id of the jobs an earlier call submitted that the scheduler still runs (so a
    second call does not start a second run writing into the same directory). Slurm answers for
    its jobs; local jobs belong to the call that started them, which waits for them."""
    from launch.collect import _scheduler_state
    out = {}
    for manifest_path in sorted(launches.glob("*/jobs.json")) if launches.is_dir() else []:
        manifest = {**json.loads(manifest_path.read_text()), "folder": str(manifest_path.parent)}
        for rec in manifest.get("jobs", []):
            if (Path(rec["out_dir"]) / "results.json").is_file():
                continue
            state = _scheduler_state(manifest, rec)
            if state.split(" ")[0].upper() in ACTIVE:
                out[rec["out_dir"]] = str(rec.get("job_id"))
    return out


def command_line(run: Run, n_users: int) -> str:
    """The run as one torchrun command (paths under the current directory shown relative to it)."""
    import os
    import shlex
    here = Path.cwd()
    show = lambda a: os.path.relpath(a, here) if Path(a).is_absolute() and Path(a).is_relative_to(here) else a
    args = " ".join(shlex.quote(show(a)) for a in run.argv)
    return f"torchrun --nproc_per_node={n_users} -m comigs_dist.main {args}"


def execute(runs: list[Run], root: Path, scale: str, key: str, *, cluster: str, max_parallel: int, wait: bool,
            gpus_per_node: int, cpus_per_task: int, timeout_min: int, partition: str | None, slurm_args: dict,
            echo) -> dict[str, str]:
    """Submit every run still to run and wait for them when ``wait``. On Slurm all at once; on the
    local executor ``max_parallel`` at a time, the next starting as soon as one ends (runs of one
    table differ in length several times over, e.g. 20 rounds against 50, so waiting for a whole
    batch would leave cores idle). Returns out_dir -> outcome for the runs waited on."""
    from launch.submit import launch_jobs, local_pool, wait_for
    todo = [r for r in runs if r.status == "to run"]
    if not todo:
        return {}
    from submitit import AutoExecutor
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = AutoExecutor.which() if cluster == "auto" else cluster
    index = 0

    def submit(chunk: list[Run]) -> tuple[list, list[dict]]:  # one executor serves jobs of one size
        nonlocal index
        folder = fresh_run_dir(root / scale / "launches", f"{stamp}_table{key}_{index:03d}")
        index += 1
        jobs = [dict(r.job, label=f"{slug_of(r)}") for r in chunk]
        _, submitted = launch_jobs(jobs, folder, cluster=cluster, gpus_per_node=gpus_per_node,
                                   cpus_per_task=cpus_per_task, timeout_min=timeout_min, partition=partition,
                                   slurm_args=slurm_args, echo=echo, manifest_extra={"table": key, "scale": scale})
        return submitted, jobs

    outcomes: dict[str, str] = {}
    if kind == "slurm" or not wait:  # the scheduler queues them (or nobody waits): everything now
        by_users: dict[int, list[Run]] = {}
        for r in todo:
            by_users.setdefault(r.job["users_per_node"], []).append(r)
        for group in by_users.values():
            submitted, jobs = submit(group)
            if wait:
                by_id = wait_for(submitted, jobs, echo=echo)
                outcomes.update({rec["out_dir"]: by_id[rec["job_id"]] for rec in jobs})
        return outcomes
    return local_pool(todo, lambda run: list(zip(*submit([run]))), max_parallel, echo)


def slug_of(run: Run) -> str:
    from launch.common import slug
    c = run.cells[0]
    return slug(f"{c.row} {c.col if len(run.cells) == 1 else ''} seed {run.seed}")[:60]


# --------------------------------------------------------------------------------------------
# the table: ours beside the paper's
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _prepare_cpu(echo) -> None:
    for out, command in CPU_PREPARE:
        if Path(out).exists():
            echo(f"prepare: {out} exists")
            continue
        echo(f"prepare: {command}")
        subprocess.run(command, shell=True, check=True)


def _missing_cpu_assets() -> list[str]:
    return [command for out, command in CPU_PREPARE if not Path(out).exists()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Tables: " + ", ".join(TABLE_KEYS))
    p.add_argument("--table", required=True,
                   help="1, 2, 4, 5, 6, fig4, fig5, fig6, fig11, fig12, fig13, tau_s, since or privacy")
    p.add_argument("--dataset", default=None,
                   help="comma-separated datasets of the table to run (agnews, multilingual, slimpajama; Table 6 "
                        "also common_corpus); default: all of the table's")
    p.add_argument("--rows", default=None, help="comma-separated row labels as printed (default: every row)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (paper: 42,45,47)")
    p.add_argument("--scale", choices=SCALES, default="paper",
                   help="paper (the configs as they are), cpu (small GPT-2 on the local text), debug (tiny, tests)")
    p.add_argument("--quirks", action="store_true",
                   help="method_options.reference_quirks=true wherever a method has it (the reference code's "
                        "behaviour, e.g. its gradient leakage: how the paper's numbers were made)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="slurm, local processes, or auto: slurm when sbatch is on PATH")
    p.add_argument("--max-parallel", type=int, default=1,
                   help="local executor: runs at a time, the next starting when one ends (each runs one process per "
                        "user, or --ranks-per-node); --no-wait cannot hold to it and is refused beyond it")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="at most this many processes per run; its users share them (same results, bit for bit; "
                        "fewer processes than cores avoids oversubscribing a laptop)")
    p.add_argument("--wait", dest="wait", action="store_true", default=None,
                   help="wait for the runs, then print the table (default with the local executor)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return (default on Slurm)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--dry-run", action="store_true", help="list every run, its state and its command; run nothing")
    only.add_argument("--collect", action="store_true",
                      help="print and write the table from the runs finished so far; submit nothing (e.g. while "
                           "the rest still run on Slurm)")
    p.add_argument("--prepare", action="store_true", help="--scale cpu: build the missing data and small base first")
    p.add_argument("--root", default="runs/reproduce", help="runs go to ROOT/<scale>/...")
    p.add_argument("--out", default=None, help="table files OUT.csv, OUT.md (and OUT.png for the figures); default "
                                               "ROOT/<scale>/table<key>[_<datasets>]")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPUs (threads) per user")
    p.add_argument("--time", type=int, default=240, help="time limit of each job, minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--slurm", nargs="+", default=[], metavar="OPTION=VALUE", help="more sbatch options")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    echo = lambda line: print(line, flush=True)
    try:
        from launch.submit import _slurm_kv
        seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
        if not seeds:
            raise ConfigError("--seeds is empty; give e.g. --seeds 42,45,47")
        datasets = [d.strip() for d in ns.dataset.split(",")] if ns.dataset else None
        from launch.submit import split_values
        rows = split_values(ns.rows) if ns.rows else None  # commas inside (4,2,2,2) belong to the label
        spec = select(build_spec(ns.table), datasets, rows)
        numbers = paper_numbers()
        root = Path(ns.root).resolve()
        if ns.scale == "cpu" and not (ns.dry_run or ns.collect):
            if ns.prepare:
                _prepare_cpu(echo)
            missing = _missing_cpu_assets()
            if missing:
                raise ConfigError("--scale cpu needs the CPU-sized data and the small base; run these from the "
                                  "checkout's root (or add --prepare):\n    " + "\n    ".join(missing))
        if ns.ranks_per_node is not None and ns.ranks_per_node < 1:
            raise ConfigError(f"--ranks-per-node {ns.ranks_per_node} must be at least 1 (or left out: one process "
                              f"per user)")
        runs = plan_runs(spec, seeds, ns.scale, root, ns.quirks, ns.cpus_per_task, ns.gpus_per_node,
                         ns.ranks_per_node)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: preparing the CPU scale failed: {exc}", file=sys.stderr)
        return 2

    counts = {s: sum(1 for r in runs if r.status.split(" ")[0].rstrip(":") == s)
              for s in ("done", "stale", "diverged", "running", "to", "invalid")}
    echo(f"table {spec.key}, scale {ns.scale}: {len(runs)} run(s): {counts['done']} done, "
         + (f"{counts['stale']} stale, " if counts["stale"] else "")
         + (f"{counts['diverged']} diverged, " if counts["diverged"] else "")
         + f"{counts['running']} running, {counts['to']} to run"
         + (f", {counts['invalid']} invalid" if counts["invalid"] else ""))
    invalid = [r for r in runs if r.status.startswith("invalid")]
    if stale_runs := [r for r in runs if r.status.startswith("stale")]:
        echo(f"{len(stale_runs)} finished run(s) were made with another configuration than the table has for them "
             f"today, so they are left out of the table and not run again over their results; move each directory "
             f"aside (mv DIR DIR.old) and run the command again to redo them:")
        for r in stale_runs:
            echo(f"  - {r.out_dir}: {r.status.split(': ', 1)[1]}")
    if ns.dry_run:
        for r in runs:
            n_users = r.job["users_per_node"] if r.job else "?"
            echo(f"  [{r.status}] {r.label}, seed {r.seed}: {r.out_dir}")
            if r.argv:  # a finished run's too: its command is how to make it again elsewhere
                echo(f"      {command_line(r, n_users)}")
        return 0
    if invalid and not ns.collect:
        seen = []
        for r in invalid:
            if r.status not in seen:
                seen.append(r.status)
        print("error: nothing was submitted; these cells cannot run yet:\n  - " + "\n  - ".join(seen), file=sys.stderr)
        return 2
    failed = []
    if not ns.collect:
        from submitit import AutoExecutor
        kind = AutoExecutor.which() if ns.executor == "auto" else ns.executor
        wait = (kind != "slurm") if ns.wait is None else ns.wait
        to_run = sum(r.status == "to run" for r in runs)
        if kind != "slurm" and not wait and to_run > ns.max_parallel:
            print(f"error: --no-wait with the {kind} executor would start all {to_run} runs at once (--max-parallel "
                  f"{ns.max_parallel} holds only while this command waits for them); drop --no-wait, or submit to "
                  f"Slurm, where the scheduler queues them", file=sys.stderr)
            return 2
        try:
            outcomes = execute(runs, root, ns.scale, spec.key, cluster=ns.executor, max_parallel=ns.max_parallel,
                               wait=wait, gpus_per_node=ns.gpus_per_node, cpus_per_task=ns.cpus_per_task,
                               timeout_min=ns.time, partition=ns.partition, slurm_args=_slurm_kv(ns.slurm), echo=echo)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # the local runs were stopped (stop_local_jobs said so)
            return 130
        except Exception as exc:  # the scheduler refused (no Slurm controller, a bad partition, ...)
            print(f"error: submitting to {kind} failed: {type(exc).__name__}: {exc}; check the cluster, or run "
                  f"with --executor local", file=sys.stderr)
            return 2
        # a run the guard stopped is an outcome (its cell says "diverged"), not a failure to retry
        failed = [d for d, o in outcomes.items() if o not in ("COMPLETED", "DIVERGED")]
    results = collect_results(spec, runs, numbers)
    echo("")
    echo(format_text(spec, results, numbers, seeds, ns.scale))
    order_text = format_orderings(spec, results)
    if order_text:
        echo("")
        echo(order_text)
    suffix = f"_{'_'.join(sorted({c.dataset for c in spec.cells}))}" if spec.key in ("1", "2", "4", "5", "6") else ""
    name = f"table{spec.key}{suffix}" if spec.key in ("1", "2", "4", "5", "6") else spec.key
    # a part of the table (--rows, other --seeds) gets files of its own instead of replacing the whole one's
    if ns.rows:
        from launch.common import slug
        name += "_rows-" + slug("+".join(rows))[:80]
    if tuple(seeds) != SEEDS:
        name += "_seeds-" + "-".join(map(str, seeds))
    out = Path(ns.out) if ns.out else root / ns.scale / name
    out.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")
    md.write_text(format_markdown(spec, results, numbers, seeds, ns.scale)
                  + (f"\n{order_text}\n" if order_text else ""))
    write_csv(csv_path, spec, results)
    echo(f"wrote {csv_path} and {md}")
    if spec.plot:
        png = plot(spec, results, out.with_name(out.name + ".png"))
        if png:
            echo(f"plot: {png}")
    # runs, not cells (a run of the since-table fills two cells, a figure's line four)
    states = [ended(r.out_dir) for r in runs]
    pending = sum(1 for r, state in zip(runs, states) if state is None and not r.status.startswith("invalid"))
    if pending and not failed:
        again = "the same command without --collect runs them" if ns.collect else "call the same command again later"
        echo(f"{pending} run(s) not finished yet: {again} to fill the table (finished runs are never repeated)")
    if invalid and ns.collect:  # reached only under --collect: without it they stopped the submission above
        reasons = list(dict.fromkeys(r.status for r in invalid))
        # at the CPU scale, what --prepare would build of what the reasons name (not Llama's: no CPU scale)
        missing = _missing_cpu_assets() if ns.scale == "cpu" else []
        named = [out for out, command in CPU_PREPARE if command in missing and any(out in why for why in reasons)]
        hint = (" (at --scale cpu, --prepare builds the CPU-sized data and the small base first: "
                + ", ".join(named) + ")") if named else ""
        echo(f"{len(invalid)} run(s) cannot run yet, so running the table would submit nothing until they can{hint}:"
             "\n  - " + "\n  - ".join(reasons))
    mixed = mixed_bases([r.out_dir for r in runs])
    if mixed:
        echo("warning: these runs of one table were made with different bases, so the table compares unlike "
             "runs (rebuild or choose one base and remove the others' run directories):\n  - " + "\n  - ".join(mixed))
    diverged = [r for r, state in zip(runs, states) if state == "diverged"]
    if diverged:
        echo(f"{len(diverged)} run(s) diverged: the guard found non-finite values and ended them (each "
             f"one's stopped.json names the user and round, e.g. {diverged[0].out_dir / STOPPED}); they count as "
             f"outcomes and are not retried: remove a run's directory to run it again")
    if failed:
        echo(f"{len(failed)} run(s) failed; their logs are named above; the same command retries them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
