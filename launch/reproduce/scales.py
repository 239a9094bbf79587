"""What a scale (paper, cpu, debug) changes in every run of a table, and the CPU scale's assets (the
CPU-sized data and the small base) with the commands that build them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from comigs_dist.config import PER_USER_KEYS, ConfigError, get_dotted, load_config
from launch.reproduce.tables import ROOT, SCALES, Cell, Spec

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


def read_cell(cell: Cell, extra: list[str]):
    """The cell's configuration with its data path pointed at the embedded corpus (only to read it)."""
    return load_config(ROOT / cell.config, list(cell.overrides) + extra + ["data.path=embedded",
                                                                         "data.categories=[]"])


def scale_overrides(cell: Cell, scale: str) -> list[str]:
    """Overrides appended to every run of ``cell`` at ``scale``."""
    if scale == "paper":
        return []
    cfg = read_cell(cell, [])
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


def run_extras(spec: Spec, scale: str, cfg) -> list[str]:
    """Overrides every run of ``spec`` takes after its scale's: round checkpoints unless its YAML
    sets its own (``RESUMABLE``), and at the CPU scale only the final evaluation unless the table is
    a figure of curves (``FINAL_EVAL_ONLY``)."""
    out = [] if cfg.checkpoint.every else list(RESUMABLE)
    if scale == "cpu" and spec.plot != "curves":
        out += FINAL_EVAL_ONLY
    return out


def prepare_cpu(echo) -> None:
    for out, command in CPU_PREPARE:
        if Path(out).exists():
            echo(f"prepare: {out} exists")
            continue
        echo(f"prepare: {command}")
        subprocess.run(command, shell=True, check=True)


def missing_cpu_assets() -> list[str]:
    return [command for out, command in CPU_PREPARE if not Path(out).exists()]
