"""Which run makes each cell of the paper's tables and figures (a YAML of ``configs/`` and the row's
overrides, as the YAML's header lists them), and the paper's own numbers. Knows nothing of scales,
submission or printing."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from comigs_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]          # the checkout: configs/ live here
PAPER_NUMBERS = Path(__file__).resolve().parents[1] / "paper_numbers.yaml"
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
