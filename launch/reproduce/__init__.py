"""Reproduce one table or figure of the paper and print it beside the paper's numbers
(``python -m launch.reproduce``; usage in ``cli``). One module per concern: ``tables`` (which run
makes each cell, the paper's numbers), ``scales`` (what paper, cpu and debug change in every run),
``runs`` (fixed run directories, their state, submission), ``report`` (ours beside the paper's,
orderings, files) and ``cli``. The names below are the package's interface; a test that patches
one patches it in the module that owns it (``reproduce.runs.scale_overrides``)."""
from launch.reproduce.cli import main, parse
from launch.reproduce.report import (Ordering, Result, cell_texts, collect_results, format_markdown,
                                     format_orderings, format_text, mixed_bases, orderings, plot, write_csv)
from launch.reproduce.runs import Run, cell_dir, command_line, ended, execute, plan_runs, slug_of, stale
from launch.reproduce.scales import (CPU_MODEL, CPU_PREPARE, FINAL_EVAL_ONLY, RESUMABLE, missing_cpu_assets,
                                     prepare_cpu, read_cell, run_extras, scale_overrides)
from launch.reproduce.tables import (NAMES, ROOT, SCALES, SEEDS, TABLE_KEYS, Cell, Spec, build_spec, paper_numbers,
                                     select)

__all__ = ["CPU_MODEL", "CPU_PREPARE", "FINAL_EVAL_ONLY", "NAMES", "RESUMABLE", "ROOT", "SCALES", "SEEDS",
           "TABLE_KEYS", "Cell", "Ordering", "Result", "Run", "Spec", "build_spec", "cell_dir", "cell_texts",
           "collect_results", "command_line", "ended", "execute", "format_markdown", "format_orderings",
           "format_text", "main", "missing_cpu_assets", "mixed_bases", "orderings", "paper_numbers", "parse",
           "plan_runs", "plot", "prepare_cpu", "read_cell", "run_extras", "scale_overrides", "select", "slug_of",
           "stale", "write_csv"]
