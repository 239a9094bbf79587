"""launch.reproduce: every table's cells, the paper's numbers as the texts print them, the scales,
the printed comparison, and one table end to end on the debug scale with the local executor."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from comigs_dist.config import load_config
from launch import reproduce
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SEEDS_DIR = ROOT.parent / "shared" / "seeds"
TEXTS = {"002": next(SEEDS_DIR.glob("002_*.txt"), None), "000": next(SEEDS_DIR.glob("000_*.txt"), None)}
NUMBERS = reproduce.paper_numbers()


@pytest.mark.parametrize("key", ["1", "2", "4", "5", "6"])
def test_every_table_cell_has_a_run_and_the_papers_number(key):
    """The cells launch.reproduce runs are exactly the cells of paper_numbers.yaml, and each cell's
    configuration (YAML + the row's overrides) is valid for 4 users."""
    spec = reproduce.build_spec(key)
    cells = {(c.row, c.col) for c in spec.cells}
    assert cells == set(NUMBERS[key]["cells"]), cells ^ set(NUMBERS[key]["cells"])
    assert spec.cols == NUMBERS[key]["columns"] and len(cells) == len(spec.rows) * len(spec.cols)
    for c in spec.cells:
        cfg = load_config(ROOT / c.config, list(c.overrides) + ["data.path=embedded", "data.categories=[]"])
        assert cfg.n_users == 4, c


def _numbers_of(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", line)]


@pytest.mark.skipif(None in TEXTS.values(), reason="the paper's texts are not in ../shared/seeds")
@pytest.mark.parametrize("key", ["1", "2", "4", "5", "6"])
def test_paper_numbers_are_the_ones_the_texts_print(key):
    """Each row of paper_numbers.yaml (mean, std, mean, std, ... in the table's column order) is a run
    of numbers on one line of the paper's text (002; Table 6 from 000)."""
    text = TEXTS["000" if key == "6" else "002"].read_text().splitlines()
    lines = [_numbers_of(l) for l in text]
    table = NUMBERS[key]
    for row in dict.fromkeys(r for r, _ in table["cells"]):
        expected = []
        for col in table["columns"]:
            mean, std = table["cells"][(row, col)]
            expected += [mean] + ([] if std is None else [std])
        found = any(expected == nums[i:i + len(expected)] for nums in lines for i in range(len(nums)))
        assert found, f"table {key}, {row}: {expected} is on no line of {TEXTS['000' if key == '6' else '002'].name}"


def test_figures_and_sweep_cells():
    """Figures 4-6 / 11-13: one line per expert setting, one column per user (low-data users first);
    Figure 7: the tau x s grid; none has paper numbers (figures only)."""
    fig4 = reproduce.build_spec("fig4")
    assert fig4.rows == ["(2,2,2,2)", "(2,2,4,4)", "(2,2,8,8)"]
    assert fig4.cols == ["de (low)", "nl (low)", "fr (high)", "it (high)"]
    assert {c.user for c in fig4.cells} == {0, 1, 2, 3} and fig4.plot == "curves"
    assert reproduce.build_spec("fig13").cells[0].config == "configs/data_quantity/slimpajama.yaml"
    tau_s = reproduce.build_spec("tau_s")
    assert len(tau_s.cells) == 9 and ("tau=30", "s=10") in {(c.row, c.col) for c in tau_s.cells}
    assert not {"fig4", "tau_s"} & set(NUMBERS)


def test_the_privacy_table_runs_each_method_without_dp_and_at_each_target_epsilon(tmp_path):
    """--table privacy: CoMiGS-1G1S and FedAvg on AG News, one column without DP and one per target
    epsilon; every cell is a valid configuration at every scale (the calibration included), planned
    as one run per cell and seed; no paper numbers."""
    spec = reproduce.build_spec("privacy")
    assert spec.rows == ["CoMiGS-1G1S", "FedAvg"] and spec.cols == ["no DP", "eps=64", "eps=16", "eps=4", "eps=1"]
    assert "privacy" not in NUMBERS
    for c in spec.cells:
        cfg = load_config(ROOT / c.config, list(c.overrides) + ["data.path=embedded", "data.categories=[]"])
        assert cfg.method == {"CoMiGS-1G1S": "comigs_1g1s", "FedAvg": "fedavg"}[c.row]
        assert (cfg.privacy.dp, cfg.privacy.target_epsilon) == (
            ("off", None) if c.col == "no DP" else ("user", float(c.col.split("=")[1])))
    runs = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    assert len(runs) == 10 and all(r.status == "to run" for r in runs), [r.status for r in runs]


def test_a_figures_users_share_one_run(tmp_path):
    """The four user columns of a figure's line are one configuration: one run per line and seed,
    never four runs writing into one directory."""
    runs = reproduce.plan_runs(reproduce.build_spec("fig6"), [42, 45], "debug", tmp_path)
    assert len(runs) == 4 * 2 and len({r.out_dir for r in runs}) == 8
    assert all(len(r.cells) == 4 and {c.user for c in r.cells} == {0, 1, 2, 3} for r in runs)


def test_every_run_checkpoints_so_that_an_interrupted_one_resumes(tmp_path):
    """A table's runs are submitted with resume=auto; with checkpoint.every=0 (every YAML's default)
    a killed run would start over from round 1. Each run's command therefore writes a round
    checkpoint every 5 rounds (keeping the newest) unless its YAML sets its own."""
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Centralized", "CoMiGS-1G1S"])
    runs = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    assert len(runs) == 2
    for run in runs:
        assert run.status == "to run" and "--config" in run.argv, run.status
        i = run.argv.index("--config")
        cfg = load_config(run.argv[i + 1], run.argv[i + 2:])
        assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.resume) == (5, 1, "auto"), run.argv


def test_the_cpu_scale_evaluates_only_at_the_end_except_for_the_figures():
    """At --scale cpu a table's runs skip the evaluations between rounds (eval.every=0: the cell
    needs the final perplexity only, and evaluations change nothing else); a figure's runs, whose
    curves are plotted, keep their evaluation points; other scales keep the YAML's."""
    for key, yaml_every, cpu_every in (("1", 5, 0), ("since", 5, 0), ("privacy", 5, 0), ("tau_s", 5, 0),
                                       ("fig4", 1, 1), ("fig12", 1, 1)):
        spec = reproduce.build_spec(key)
        cell = spec.cells[0]
        assert reproduce.read_cell(cell, []).eval.every == yaml_every, key
        for scale in ("cpu", "debug", "paper"):
            extra = reproduce.scale_overrides(cell, scale) if scale == "debug" else []
            cfg = reproduce.read_cell(cell, extra)
            overrides = extra + reproduce.run_extras(spec, scale, cfg)
            want = cpu_every if scale == "cpu" else cfg.eval.every
            assert reproduce.read_cell(cell, overrides).eval.every == want, (key, scale)


def test_planned_cpu_runs_carry_the_final_evaluation_only_and_a_yamls_own_checkpoints_win(tmp_path, monkeypatch):
    """Through plan_runs (the CPU data is stood in for by the debug scale's overrides, since
    data/cpu is not prepared in a fresh checkout): a Table 1 run's command ends with eval.every=0,
    a figure's keeps its YAML's evaluation points; a YAML that checkpoints on its own keeps that."""
    real = reproduce.scale_overrides
    monkeypatch.setattr(reproduce.runs, "scale_overrides", lambda cell, scale: real(cell, "debug"))
    for key, every in (("1", 0), ("fig4", 1)):
        spec = reproduce.select(reproduce.build_spec(key), None, None)
        run = reproduce.plan_runs(spec, [42], "cpu", tmp_path)[0]
        assert run.status == "to run", run.status
        i = run.argv.index("--config")
        assert load_config(run.argv[i + 1], run.argv[i + 2:]).eval.every == every, key
    spec = reproduce.build_spec("1")
    own = reproduce.read_cell(spec.cells[0], ["checkpoint.every=3"])
    assert not set(reproduce.RESUMABLE) & set(reproduce.run_extras(spec, "cpu", own))


def test_ranks_per_node_caps_each_runs_processes_without_moving_its_directory(tmp_path, capsys):
    """--ranks-per-node 1: each debug-scale run (2 users) is one process hosting both users; 4 (more
    than the users) stays at one per user; the run directories do not change; 0 is refused."""
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["FedAvg"])
    plain = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    one = reproduce.plan_runs(spec, [42], "debug", tmp_path, ranks_per_node=1)
    four = reproduce.plan_runs(spec, [42], "debug", tmp_path, ranks_per_node=4)
    assert [r.job["users_per_node"] for r in (plain[0], one[0], four[0])] == [2, 1, 2]
    assert plain[0].out_dir == one[0].out_dir == four[0].out_dir
    assert reproduce.command_line(one[0], one[0].job["users_per_node"]).startswith("torchrun --nproc_per_node=1 ")
    rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--scale", "debug", "--ranks-per-node", "0",
                         "--root", str(tmp_path / "r"), "--dry-run"])
    assert rc == 2 and "--ranks-per-node 0 must be at least 1" in capsys.readouterr().err


def test_scales_rewrite_every_run():
    """cpu: the small base on data/cpu/<dataset>, batch 8, 5 local steps with tau and s halved (the
    row's own tau/s too); debug: a tiny model, 2 users, per-user lists cut to their first two."""
    spec = reproduce.build_spec("2")
    cell = next(c for c in spec.cells if c.row == "AG News (4,2,2,2)" and c.col == "HetLoRA Full")
    cpu = reproduce.scale_overrides(cell, "cpu")
    assert {"model.name=models/small-gpt2", "data.path=data/cpu/agnews", "train.batch_size=8",
            "train.local_steps=5", "train.router_every=15", "train.router_steps=5"} <= set(cpu)
    debug = reproduce.scale_overrides(cell, "debug")
    assert {"model.name=tiny", "n_users=2", "moe.n_experts=[4,2]", "data.path=embedded"} <= set(debug)
    cfg = load_config(ROOT / cell.config, list(cell.overrides) + debug)
    assert cfg.n_users == 2 and cfg.method_options["match"] == "full"
    tau = next(c for c in reproduce.build_spec("tau_s").cells if c.row == "tau=50" and c.col == "s=20")
    assert {"train.router_every=25", "train.router_steps=10"} <= set(reproduce.scale_overrides(tau, "cpu"))
    fig = reproduce.build_spec("fig12").cells[0]
    assert "data.path=data/cpu/slimpajama-lowdata" in reproduce.scale_overrides(fig, "cpu")
    llama = reproduce.build_spec("6").cells[0]
    assert "model.name=llama-tiny" in reproduce.scale_overrides(llama, "debug")
    with pytest.raises(Exception, match="Llama 3.2 1B, which has no CPU scale"):
        reproduce.scale_overrides(llama, "cpu")


def test_dry_run_lists_every_run_and_creates_nothing(tmp_path, capsys):
    """--dry-run: one line per (cell, seed) with its fixed directory and command; nothing is written."""
    rc = reproduce.main(["--table", "5", "--dataset", "agnews", "--scale", "debug", "--seeds", "42,45,47",
                         "--root", str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "table 5, scale debug: 18 run(s): 0 done, 0 running, 18 to run" in out
    assert out.count("[to run]") == 18 and "moe.load_balancing=uniform" in out
    assert "/debug/agnews/table5_hetero/moe.load_balancing-none/seed-47" in out
    assert not (tmp_path / "r").exists()


def _fake_results(out_dir: Path, ppl: float, users=(1.0, 2.0)) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "results.json").write_text(json.dumps({"mean_test_ppl": ppl, "users": [{"test_ppl": u} for u in users]}))


def test_finished_runs_are_read_not_rerun_and_the_table_shows_paper_ours_diff(tmp_path, capsys):
    """With every run's results.json in place nothing is submitted; each cell holds the paper's
    number, ours (mean (sample std) over seeds, by hand) and ours - paper; CSV and Markdown agree."""
    root = tmp_path / "r"
    args = ["--table", "1", "--dataset", "agnews", "--rows", "Local,CoMiGS-1G1S", "--scale", "debug",
            "--seeds", "42,45", "--root", str(root), "--executor", "local"]
    runs = reproduce.plan_runs(reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Local", "CoMiGS-1G1S"]),
                               [42, 45], "debug", root)
    values = {("Local", 42): 40.0, ("Local", 45): 42.0, ("CoMiGS-1G1S", 42): 33.0, ("CoMiGS-1G1S", 45): 34.0}
    for r in runs:
        _fake_results(r.out_dir, values[(r.cells[0].row, r.seed)])
    rc = reproduce.main(args)
    out = capsys.readouterr().out
    assert rc == 0 and "4 run(s): 4 done, 0 running, 0 to run" in out and "submitted" not in out
    assert not (root / "debug" / "launches").exists()
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith(("Local ", "CoMiGS-1G1S "))}
    # Local: paper 41.46 (0.06); ours mean 41, sample std sqrt(2) = 1.41; diff -0.46
    assert re.search(r"41\.46 \(0\.06\)\s+41\.00 \(1\.41\)\s+-0\.46$", lines["Local"])
    # CoMiGS-1G1S: paper 33.53 (0.03); ours 33.50 (0.71); diff -0.03
    assert re.search(r"33\.53 \(0\.03\)\s+33\.50 \(0\.71\)\s+-0\.03$", lines["CoMiGS-1G1S"])
    assert "paper  ours  diff" in re.sub(r" +", "  ", out)
    table = root / "debug" / "table1_agnews_rows-Local+CoMiGS-1G1S_seeds-42-45"
    rows = (table.with_suffix(".csv")).read_text().splitlines()
    assert rows[0].startswith("table,row,col,paper_mean,paper_std,ours_mean,ours_std,n_seeds")
    assert rows[1].startswith("1,Local,agnews,41.46,0.06,41.0,1.414") and ",2,42 45," in rows[1]
    md = table.with_suffix(".md").read_text()
    assert "| method | AG News paper | AG News ours | AG News diff |" in md
    assert "| Local | 41.46 (0.06) | 41.00 (1.41) | -0.46 |" in md


def test_collect_prints_the_finished_runs_table_and_submits_nothing(tmp_path, capsys):
    """--collect with 3 of 4 runs finished (CoMiGS-1G1S seed 45 missing): nothing is submitted or
    created for the missing run, the exit code is 0, Local's cell is complete (41.00 (1.41)) and
    CoMiGS-1G1S's says 1 of 2 seeds; the files are written and the closing line names the missing run."""
    root = tmp_path / "r"
    rows = ["Local", "CoMiGS-1G1S"]
    runs = reproduce.plan_runs(reproduce.select(reproduce.build_spec("1"), ["agnews"], rows), [42, 45], "debug", root)
    values = {("Local", 42): 40.0, ("Local", 45): 42.0, ("CoMiGS-1G1S", 42): 33.0}
    for r in runs:
        if (r.cells[0].row, r.seed) in values:
            _fake_results(r.out_dir, values[(r.cells[0].row, r.seed)])
    missing = next(r.out_dir for r in runs if (r.cells[0].row, r.seed) == ("CoMiGS-1G1S", 45))
    rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", ",".join(rows), "--scale", "debug",
                         "--seeds", "42,45", "--root", str(root), "--executor", "local", "--collect"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 run(s): 3 done, 0 running, 1 to run" in out and "submitted" not in out, out
    assert not missing.exists() and not (root / "debug" / "launches").exists()
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith(("Local ", "CoMiGS-1G1S "))}
    assert "41.00 (1.41)" in lines["Local"] and "33.00 [1/2]" in lines["CoMiGS-1G1S"], lines
    table = root / "debug" / "table1_agnews_rows-Local+CoMiGS-1G1S_seeds-42-45.md"
    assert "| Local | 41.46 (0.06) | 41.00 (1.41) | -0.46 |" in table.read_text()
    assert "1 run(s) not finished yet: the same command without --collect runs them" in out
    with pytest.raises(SystemExit):  # one or the other
        reproduce.parse(["--table", "1", "--dry-run", "--collect"])


def test_collect_warns_when_a_tables_runs_were_made_with_different_bases(tmp_path, capsys):
    """Four finished runs on one test split: three evaluated the untrained base at 100.0 (one of
    them at 100.003, float rounding of another layout), one at 120.0 (another build of the base):
    --collect names the data and both groups with their counts; with the odd one at 100.0 too,
    nothing is said. A run on other test data (data.path) is never compared with these."""
    root = tmp_path / "r"
    rows = ["Local", "CoMiGS-1G1S"]
    runs = reproduce.plan_runs(reproduce.select(reproduce.build_spec("1"), ["agnews"], rows), [42, 45], "debug", root)
    config = {"data": {"path": "data/cpu/agnews", "test_tokens": 100, "verify": True}, "model": {"name": "small"},
              "train": {"seq_len": 128}, "eval": {"max_tokens": 0}}
    bases = [100.0, 100.003, 100.0, 120.0]
    for r, base in zip(runs, bases):
        _fake_results(r.out_dir, 50.0)
        res = json.loads((r.out_dir / "results.json").read_text())
        res.update(mean_base_test_ppl=base, n_users=2, config=config)
        (r.out_dir / "results.json").write_text(json.dumps(res))
    args = ["--table", "1", "--dataset", "agnews", "--rows", ",".join(rows), "--scale", "debug", "--seeds", "42,45",
            "--root", str(root), "--collect"]
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert "were made with different bases" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("- data/cpu/agnews:"))
    assert "base perplexity 100.00 in 3 run(s)" in line and "base perplexity 120.00 in 1 run(s)" in line, line
    odd = runs[3].out_dir / "results.json"
    res = json.loads(odd.read_text())
    res["config"] = {**config, "data": {**config["data"], "path": "data/cpu/other"}}  # other test data
    odd.write_text(json.dumps(res))
    assert reproduce.main(args) == 0
    assert "different bases" not in capsys.readouterr().out
    assert reproduce.mixed_bases([r.out_dir for r in runs]) == []


def test_collect_names_runs_that_cannot_run_instead_of_counting_them_as_pending(tmp_path, capsys, monkeypatch):
    """--collect with Local's two runs finished and CoMiGS-1G1S's configuration invalid (as when its
    dataset is not prepared): the closing lines do not promise that running the table fills those
    cells (that command would refuse to submit anything); they name the reason instead."""
    from comigs_dist.config import ConfigError
    root = tmp_path / "r"
    rows = ["Local", "CoMiGS-1G1S"]
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], rows)
    for r in reproduce.plan_runs(spec, [42, 45], "debug", root):
        if r.cells[0].row == "Local":
            _fake_results(r.out_dir, 40.0 + r.seed % 2)
    scale = reproduce.scale_overrides

    def refuse(cell, scale_name):
        if cell.row == "CoMiGS-1G1S":
            raise ConfigError("fix these first:\n  - seed=42: data.path ('nowhere') holds no prepared dataset\n"
                              "  - seed=45: data.path ('nowhere') holds no prepared dataset\n  - seed=45: lr is odd")
        return scale(cell, scale_name)
    monkeypatch.setattr(reproduce.runs, "scale_overrides", refuse)
    rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", ",".join(rows), "--scale", "debug",
                         "--seeds", "42,45", "--root", str(root), "--executor", "local", "--collect"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 run(s): 2 done, 0 running, 0 to run, 2 invalid" in out, out
    assert "not finished yet" not in out, out
    # each problem once, not once per seed
    assert ("2 run(s) cannot run yet, so running the table would submit nothing until they can:\n"
            "  - invalid: data.path ('nowhere') holds no prepared dataset; lr is odd\n") in out, out
    # at the CPU scale the closing line names what --prepare would build of what the reasons name,
    # and nothing for a reason --prepare cannot fix (Llama has no CPU scale)
    monkeypatch.setattr(reproduce.scales, "missing_cpu_assets", lambda: [c for _, c in reproduce.CPU_PREPARE[:2]])
    for reason, hint in (("data.path (data/cpu/multilingual) does not exist", True),
                         ("runs Llama 3.2 1B, which has no CPU scale", False)):
        def cannot(cell, scale_name, reason=reason):
            raise ConfigError(f"fix these first:\n  - seed=42: {reason}")
        monkeypatch.setattr(reproduce.runs, "scale_overrides", cannot)
        rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", "Local", "--scale", "cpu",
                             "--seeds", "42", "--root", str(root), "--collect"])
        out = capsys.readouterr().out
        said = ("until they can (at --scale cpu, --prepare builds the CPU-sized data and the small base first: "
                "data/cpu/multilingual):")
        assert rc == 0 and (said in out) == hint and f"  - invalid: {reason}" in out, out


def test_the_papers_orderings_are_checked_against_ours(tmp_path, capsys):
    """Table 1, AG News, paper FedAvg 31.84 < CoMiGS-1G1S 33.53 < Local 41.46. Ours (two seeds):
    FedAvg 36, 36; CoMiGS 33, 34; Local 35.5, 37.5. CoMiGS < Local holds (gap 3 > spread
    sqrt(0.71^2 + 1.41^2) = 1.58); FedAvg < CoMiGS flips (gap -2.5, spread 0.71); FedAvg < Local
    is within spread (gap 0.5 <= 1.41). Printed and in the Markdown file."""
    root = tmp_path / "r"
    rows = ["FedAvg", "CoMiGS-1G1S", "Local"]
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], rows)
    runs = reproduce.plan_runs(spec, [42, 45], "debug", root)
    values = {("FedAvg", 42): 36.0, ("FedAvg", 45): 36.0, ("CoMiGS-1G1S", 42): 33.0, ("CoMiGS-1G1S", 45): 34.0,
              ("Local", 42): 35.5, ("Local", 45): 37.5}
    for r in runs:
        _fake_results(r.out_dir, values[(r.cells[0].row, r.seed)])
    rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", ",".join(rows), "--scale", "debug",
                         "--seeds", "42,45", "--root", str(root), "--executor", "local"])
    out = capsys.readouterr().out
    assert rc == 0
    found = {(o.better, o.worse): o.verdict
             for o in reproduce.orderings(spec, reproduce.collect_results(spec, runs, NUMBERS))}
    assert found == {("CoMiGS-1G1S", "Local"): "holds", ("FedAvg", "CoMiGS-1G1S"): "flips",
                     ("FedAvg", "Local"): "within spread"}
    expected = ["- AG News: 1 of 3 hold, 1 flip, 1 within spread",
                "  - flips: FedAvg < CoMiGS-1G1S in the paper (31.84 < 33.53); ours 36.00 vs 33.50",
                "  - within spread: FedAvg < Local in the paper (31.84 < 41.46); ours 36.00 vs 36.50"]
    for line in expected:
        assert line in out.splitlines(), line
        assert line in (root / "debug" / "table1_agnews_rows-FedAvg+CoMiGS-1G1S+Local_seeds-42-45.md").read_text(
            ).splitlines()


def test_a_run_the_guard_stopped_is_diverged_shown_in_its_cell_and_never_resubmitted(tmp_path, capsys):
    """Privacy table, CoMiGS-1G1S, seeds 42, 45, 47: at eps=4 seed 42 finished (ppl 100) and seeds
    45, 47 left stopped.json (guard.write_stopped, as main writes it); at eps=1 all three stopped.
    Every other run finished. Nothing is submitted, the exit code is 0 (an outcome, not a failure),
    the cells read "100.00 [1/3; 2 diverged]" and "diverged [3/3]", and the CSV counts them."""
    from comigs_dist import guard
    root = tmp_path / "r"
    spec = reproduce.select(reproduce.build_spec("privacy"), None, ["CoMiGS-1G1S"])
    runs = reproduce.plan_runs(spec, [42, 45, 47], "debug", root)
    stopped = {("eps=4", 45), ("eps=4", 47), ("eps=1", 42), ("eps=1", 45), ("eps=1", 47)}
    for r in runs:
        if (r.cells[0].col, r.seed) in stopped:
            r.out_dir.mkdir(parents=True)
            guard.write_stopped(r.out_dir, guard.Stopped("user 1: the expert loss is nan", 1, 19))
        else:
            _fake_results(r.out_dir, 100.0)
    replanned = reproduce.plan_runs(spec, [42, 45, 47], "debug", root)
    assert sorted((r.cells[0].col, r.seed) for r in replanned if r.status == "diverged") == sorted(stopped)
    rc = reproduce.main(["--table", "privacy", "--rows", "CoMiGS-1G1S", "--scale", "debug", "--seeds", "42,45,47",
                         "--root", str(root), "--executor", "local"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "15 run(s): 10 done, 5 diverged, 0 running, 0 to run" in out and "submitted" not in out
    assert not (root / "debug" / "launches").exists()
    line = next(l for l in out.splitlines() if l.startswith("CoMiGS-1G1S "))
    assert re.split(r"\s{2,}", line.strip())[1:] == ["100.00 (0.00)", "100.00 (0.00)", "100.00 (0.00)",
                                                     "100.00 [1/3; 2 diverged]", "diverged [3/3]"], line
    assert "5 run(s) diverged" in out and "not retried" in out
    rows = list(csv.DictReader((root / "debug" / "privacy_rows-CoMiGS-1G1S.csv").open()))
    assert [(r["col"], r["n_seeds"], r["n_diverged"]) for r in rows][-2:] == [("eps=4", "1", "2"), ("eps=1", "0", "3")]
    # a cell with one diverged seed and two still to run is pending, not "diverged"
    cell = spec.cells[0]
    half = reproduce.Result(cell, None, [], [], [], pending=2, diverged=1)
    assert reproduce.cell_texts(half, 3)[1] == "pending [0/3; 1 diverged]"


def test_an_interrupted_local_pool_stops_the_runs_it_started(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while the local pool waits: the two running jobs are cancelled, the one
    not started yet is never started, and the interruption goes on to the caller (main returns 130)."""
    import launch.submit as submit_mod
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Local", "FedAvg", "CoMiGS-1G1S"])
    runs = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    started, cancelled, said = [], [], []

    class FakeJob:
        def __init__(self, label):
            self.label, self.ended = label, False

        def cancel(self, check=True):
            cancelled.append(self.label)
            self.ended = True

        def done(self, force_check=False):
            return self.ended

    def fake_launch(jobs, folder, **kw):
        for rec in jobs:
            rec["job_id"] = rec["label"]
            started.append(rec["label"])
        return {}, [FakeJob(rec["label"]) for rec in jobs]

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit_mod, "launch_jobs", fake_launch)
    monkeypatch.setattr(submit_mod, "wait_for", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reproduce.execute(runs, tmp_path, "debug", "1", cluster="local", max_parallel=2, wait=True, gpus_per_node=0,
                          cpus_per_task=0, timeout_min=5, partition=None, slurm_args={}, echo=said.append)
    assert len(started) == 2 and sorted(cancelled) == sorted(started), (started, cancelled)
    assert said[-1].startswith("interrupted: stopped 2 running run(s); the same command resumes them"), said
    rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", "Local", "--scale", "debug", "--seeds", "42",
                         "--root", str(tmp_path / "r"), "--executor", "local"])
    assert rc == 130


def test_sigterm_interrupts_the_local_pool_and_a_real_local_job_is_stopped(tmp_path):
    """SIGTERM to the launcher inside the pool's guard raises KeyboardInterrupt (and the previous
    handler is back afterwards); stop_local_jobs ends a real submitit local job (a 120 s sleep)
    within its wait, although such jobs ignore SIGTERM."""
    import os
    import signal
    import time

    import submitit
    before = signal.getsignal(signal.SIGTERM)
    from launch.submit import stop_local_jobs, stopping_local_jobs
    with pytest.raises(KeyboardInterrupt):
        with stopping_local_jobs(lambda: [], print):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) == before
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="local")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(time.sleep, 120)
    for _ in range(300):  # until the controller has started its task (at most a minute)
        if job.state == "RUNNING":
            break
        time.sleep(0.2)
    assert job.state == "RUNNING", job.state
    said = []
    stop_local_jobs([(job, {"out_dir": str(tmp_path / "run")})], said.append, wait_s=30)
    assert job.done() and said == ["interrupted: stopped 1 running run(s); the same command resumes them from "
                                   "their last round checkpoints"], said


def test_no_wait_on_the_local_executor_is_refused_when_it_would_start_more_than_max_parallel(tmp_path, capsys):
    """Without waiting, nothing would hold the local executor to --max-parallel: four debug runs
    with --max-parallel 2 --no-wait are refused before anything starts (no launch record is made)."""
    args = ["--table", "1", "--dataset", "agnews", "--rows", "Local,FedAvg", "--scale", "debug", "--seeds", "42,45",
            "--root", str(tmp_path / "r"), "--executor", "local", "--no-wait"]
    assert reproduce.main(args + ["--max-parallel", "2"]) == 2
    err = capsys.readouterr().err
    assert "--no-wait with the local executor would start all 4 runs at once" in err, err
    assert not (tmp_path / "r" / "debug" / "launches").exists()


def test_a_local_run_another_call_started_counts_as_running_and_is_not_started_twice(tmp_path, capsys):
    """A run whose out_dir lock names a live process on this host (here the test itself) is
    "running (pid ...)", so a second call neither counts it as to run nor starts it; a lock left
    by a process that is gone (or by another host) does not count."""
    import os
    import socket
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Local", "FedAvg"])
    runs = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    records = [{"pid": os.getpid(), "host": socket.gethostname()},
               {"pid": 2 ** 22 + 12345, "host": socket.gethostname()}]  # above Linux's pid_max: never alive
    for r, record in zip(runs, records):
        r.out_dir.mkdir(parents=True)
        (r.out_dir / ".comigs.lock").write_text(json.dumps(record))
    states = [r.status for r in reproduce.plan_runs(spec, [42], "debug", tmp_path)]
    assert states == [f"running (pid {os.getpid()})", "to run"], states
    (runs[1].out_dir / ".comigs.lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    assert reproduce.plan_runs(spec, [42], "debug", tmp_path)[1].status == "to run"
    rc = reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", "Local,FedAvg", "--scale", "debug",
                         "--seeds", "42", "--root", str(tmp_path), "--dry-run"])
    assert rc == 0 and "2 run(s): 0 done, 1 running, 1 to run" in capsys.readouterr().out


def test_the_local_executor_starts_the_next_run_as_soon_as_one_ends(tmp_path, monkeypatch):
    """--max-parallel 2 on the local executor with three runs, the first the longest (as a 50-round
    SlimPajama run beside 20-round ones): the third starts when the second ends, not when the
    first does (a batch of two would leave a core idle for the rest of the long run). The
    scheduler is stood in for: runs end in the scripted order B, C, A."""
    import launch.submit as submit_mod
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Local", "FedAvg", "CoMiGS-1G1S"])
    runs = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    names = {reproduce.slug_of(r): name for r, name in zip(runs, "ABC")}
    events, ends_in_order = [], ["B", "C", "A"]

    class FakeJob:
        def __init__(self, label):
            self.label = label

    def fake_launch(jobs, folder, **kw):
        for rec in jobs:
            rec["job_id"] = names[rec["label"]]
            events.append(f"start {rec['job_id']}")
        return {}, [FakeJob(rec["label"]) for rec in jobs]

    def fake_wait(jobs, records, echo=None, first=False, **kw):
        live = [rec["job_id"] for rec in records]
        ending = [j for j in ends_in_order if j in live][:1 if first else None]
        for j in ending:
            ends_in_order.remove(j)
            events.append(f"end {j}")
        return {j: "COMPLETED" for j in ending}

    monkeypatch.setattr(submit_mod, "launch_jobs", fake_launch)
    monkeypatch.setattr(submit_mod, "wait_for", fake_wait)
    outcomes = reproduce.execute(runs, tmp_path, "debug", "1", cluster="local", max_parallel=2, wait=True,
                                 gpus_per_node=0, cpus_per_task=0, timeout_min=5, partition=None, slurm_args={},
                                 echo=lambda line: None)
    assert events == ["start A", "start B", "end B", "start C", "end C", "end A"], events
    assert outcomes == {str(r.out_dir): "COMPLETED" for r in runs}


def test_the_local_queue_skips_runs_another_call_took_or_finished_while_it_waited(tmp_path, monkeypatch):
    """--max-parallel 1, three runs planned to run: while the first runs, another call starts the
    second (its lock names a live process on this host, here the test) and finishes the third
    (results.json). When their turns come neither is started (a start would meet the lock and be
    counted as failed); each is said once; the outcome is the first run's only."""
    import os
    import socket

    import launch.submit as submit_mod
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Local", "FedAvg", "CoMiGS-1G1S"])
    runs = reproduce.plan_runs(spec, [42], "debug", tmp_path)
    assert [r.status for r in runs] == ["to run"] * 3
    started, said = [], []

    class FakeJob:
        pass

    def fake_launch(jobs, folder, **kw):
        for rec in jobs:
            rec["job_id"] = rec["label"]
            started.append(rec["label"])
        return {}, [FakeJob() for _ in jobs]

    def fake_wait(jobs, records, echo=None, first=False, **kw):
        for r in runs[1:]:  # meanwhile, another call
            r.out_dir.mkdir(parents=True, exist_ok=True)
        (runs[1].out_dir / ".comigs.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        (runs[2].out_dir / "results.json").write_text("{}")
        return {rec["job_id"]: "COMPLETED" for rec in records}

    monkeypatch.setattr(submit_mod, "launch_jobs", fake_launch)
    monkeypatch.setattr(submit_mod, "wait_for", fake_wait)
    outcomes = reproduce.execute(runs, tmp_path, "debug", "1", cluster="local", max_parallel=1, wait=True,
                                 gpus_per_node=0, cpus_per_task=0, timeout_min=5, partition=None, slurm_args={},
                                 echo=said.append)
    assert started == [reproduce.slug_of(runs[0])] and outcomes == {str(runs[0].out_dir): "COMPLETED"}
    assert said == [f"  {reproduce.slug_of(runs[1])}: not started, running in pid {os.getpid()}, started by another "
                    "call since this one planned",
                    f"  {reproduce.slug_of(runs[2])}: not started, done by another call since this one planned"], said


@pytest.mark.slow
def test_reproduce_end_to_end_on_the_debug_scale(tmp_path):
    """Two rows, two seeds, the local executor: four real runs, the printed table holds both rows
    with the paper's column and the difference; a second call finds them done and runs nothing."""
    root = tmp_path / "r"
    cmd = [sys.executable, "-m", "launch.reproduce", "--table", "1", "--dataset", "agnews", "--rows", "Local,FedAvg",
           "--seeds", "42,45", "--scale", "debug", "--executor", "local", "--max-parallel", "2", "--root", str(root)]
    first = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "4 run(s): 0 done, 0 running, 4 to run" in out and out.count(": COMPLETED") == 4
    header = next(l for l in out.splitlines() if l.startswith("method "))
    assert header.split() == ["method", "paper", "ours", "diff"]
    for row, paper in (("Local", "41.46 (0.06)"), ("FedAvg", "31.84 (0.02)")):
        line = next(l for l in out.splitlines() if l.startswith(row + " "))
        cells = re.split(r"\s{2,}", line.strip())
        assert cells[1] == paper and re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d\)", cells[2]) and \
            re.fullmatch(r"[+-]\d+\.\d\d", cells[3]), line
        ours = float(cells[2].split()[0])
        assert float(cells[3]) == pytest.approx(ours - float(paper.split()[0]), abs=0.011)
    results = sorted(root.rglob("results.json"))
    assert len(results) == 4
    stamps = [p.stat().st_mtime_ns for p in results]
    again = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "4 run(s): 4 done, 0 running, 0 to run" in again.stdout and "submitted" not in again.stdout
    assert [p.stat().st_mtime_ns for p in sorted(root.rglob("results.json"))] == stamps
    table = root / "debug" / "table1_agnews_rows-Local+FedAvg_seeds-42-45"  # a part of Table 1: files of its own
    assert table.with_name(table.name + ".csv").is_file() and table.with_name(table.name + ".md").is_file()


def test_the_since_table_runs_each_method_once_per_dataset_and_reads_its_bytes(tmp_path):
    """--table since: 9 rows (7 methods, 2 variants) x 3 datasets, a perplexity and a MB/user column each, both from one
    run per configuration and seed; every cell's configuration is valid at the paper scale (4
    users) and at the debug scale (learned groups warm up for 1 of its 2 rounds; FedDPA's second
    phase once per round); the MB column is the mean over users of bytes_sent / 1e6."""
    spec = reproduce.build_spec("since")
    assert spec.rows == ["CoMiGS-1G1S", "Local", "FedAvg", "FedALT", "FedSA-LoRA", "FedDPA", "CoMiGS-learned",
                         "FedALT-MLP", "FedDPA-F"]
    assert len(spec.cells) == 9 * 3 * 2 and "since" not in NUMBERS
    for c in spec.cells:
        for scale in ("paper", "debug"):
            extra = reproduce.scale_overrides(c, scale) if scale == "debug" else []
            cfg = load_config(ROOT / c.config, list(c.overrides) + extra + ["data.path=embedded",
                                                                             "data.categories=[]"])
            assert cfg.n_users == (4 if scale == "paper" else 2), c
            if cfg.method == "feddpa" and cfg.method_options.get("variant", "T") == "T":
                assert cfg.train.router_every == cfg.train.local_steps
    runs = reproduce.plan_runs(reproduce.select(spec, ["agnews"], ["FedALT"]), [42], "debug", tmp_path)
    [run] = runs
    assert {c.metric for c in run.cells} == {"ppl", "mb"}
    run.out_dir.mkdir(parents=True)
    (run.out_dir / "results.json").write_text(json.dumps({"mean_test_ppl": 12.5, "users": [
        {"test_ppl": 12.0, "bytes_sent": 3_000_000}, {"test_ppl": 13.0, "bytes_sent": 1_000_000}]}))
    by = {r.cell.metric: r.mean for r in reproduce.collect_results(reproduce.select(spec, ["agnews"], ["FedALT"]),
                                                                   runs, NUMBERS)}
    assert by == {"ppl": 12.5, "mb": 2.0}
    # Local, FedAvg and CoMiGS-1G1S are Table 1's runs (same configuration): the same directories
    shared = ["Local", "FedAvg", "CoMiGS-1G1S"]
    since_dirs = {r.out_dir for r in reproduce.plan_runs(reproduce.select(spec, None, shared), [42], "debug", tmp_path)}
    table1 = reproduce.select(reproduce.build_spec("1"), None, shared)
    assert since_dirs == {r.out_dir for r in reproduce.plan_runs(table1, [42], "debug", tmp_path)}
    assert len(since_dirs) == 9


KEPT = ROOT / "results" / "reproduce"   # the runs behind the README's CPU-scale tables (results/README.md)


def _kept_files() -> list[Path]:
    """The files under results/reproduce/cpu that the repository holds (git's index), or every file
    there outside a git checkout: runs a user adds locally (other seeds, --quirks) are theirs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", str(KEPT / "cpu")], cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [p for p in (KEPT / "cpu").rglob("*") if p.is_file()]
    return [ROOT / name for name in listed.split("\0") if name]


def test_the_kept_cpu_runs_are_the_runs_the_tables_make_today():
    """Every run kept under results/reproduce/cpu is one that launch.reproduce plans today at the
    CPU scale (the same directory, so that the reproduction continues from it and --collect reads
    it) and was configured as that plan would configure it now (the resume rule of
    checkpoint.config_differences, plus the number of rounds and the data), all with one base (the
    same untrained perplexity on each test split: reproduce.mixed_bases). A change of a YAML, of
    the CPU scale's overrides or of a default that would change these runs fails here, instead of
    leaving the README quoting runs the command no longer makes."""
    from comigs_dist.checkpoint import config_differences
    kept = sorted({p.parent for p in _kept_files() if p.name in ("results.json", "stopped.json")})
    assert kept, "results/reproduce/cpu keeps no run: the README's CPU-scale tables have nothing behind them"
    planned = {}
    for key in ("1", "since", "privacy"):
        spec = reproduce.build_spec(key)
        for cell in spec.cells:
            scaled = reproduce.scale_overrides(cell, "cpu")
            extras = reproduce.run_extras(spec, "cpu", reproduce.read_cell(cell, scaled))
            folder = reproduce.cell_dir(KEPT, "cpu", cell, [])
            for seed in reproduce.SEEDS:
                planned[folder / f"seed-{seed}"] = (cell, [*scaled, *extras, f"seed={seed}"])
    problems = []
    for out_dir in kept:
        where = out_dir.relative_to(ROOT)
        if out_dir not in planned:
            problems.append(f"{where}: no table plans this run any more")
            continue
        cell, overrides = planned[out_dir]
        record = json.loads(next(f for f in (out_dir / "results.json", out_dir / "stopped.json") if f.is_file())
                            .read_text())
        saved = record.get("config")
        if saved is None:  # stopped.json: nothing to compare beyond the directory
            continue
        now = reproduce.read_cell(cell, overrides)  # read with the embedded corpus: data.path and categories aside
        data_path = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.path="))
        categories = (yaml.safe_load((ROOT / cell.config).read_text()).get("data") or {}).get("categories", [])
        categories = next((yaml.safe_load(o.split("=", 1)[1]) for o in cell.overrides
                           if o.startswith("data.categories=")), categories)
        now_dict = now.to_dict()
        now_dict["data"]["categories"] = categories  # the YAML's user order, which the run checked against the data
        diffs = config_differences(saved, now_dict)
        diffs += [f"train.rounds={saved['train']['rounds']} but the plan has {now.train.rounds}"
                  for _ in [0] if saved["train"]["rounds"] != now.train.rounds]
        diffs += [f"data.path={saved['data']['path']} but the plan has {data_path}"
                  for _ in [0] if saved["data"]["path"] != data_path]
        problems += [f"{where}: {d}" for d in diffs]
    problems += [f"made with different bases: {line}" for line in reproduce.mixed_bases(kept)]
    assert not problems, "\n".join(problems[:20])


def test_a_finished_run_made_with_another_configuration_is_stale_left_out_and_named(tmp_path, capsys):
    """A finished run whose saved config differs from what the table plans for it today (the YAML's
    learning rate edited since) was counted as done and its numbers printed under today's row. It is
    now "stale": left out of the table, never run over, and --collect names its directory, the
    option that differs and how to redo it; a run saved with the planned config stays done."""
    from comigs_dist.main import parse_args
    root = tmp_path / "r"
    spec = reproduce.select(reproduce.build_spec("1"), ["agnews"], ["Local"])
    runs = reproduce.plan_runs(spec, [42, 45], "debug", root)
    for r, lr in zip(runs, (None, 0.5)):
        args = parse_args(r.argv)
        config = load_config(args.config, args.overrides).to_dict()
        if lr is not None:
            config["train"]["lr"] = lr
        _fake_results(r.out_dir, 50.0 if lr is None else 10.0)
        res = json.loads((r.out_dir / "results.json").read_text())
        (r.out_dir / "results.json").write_text(json.dumps({**res, "config": config}))
    runs = reproduce.plan_runs(spec, [42, 45], "debug", root)
    assert runs[0].status == "done", runs[0].status
    assert runs[1].status.startswith("stale: train.lr=0.5 but this run has train.lr="), runs[1].status
    (result,) = reproduce.collect_results(spec, runs, {})
    assert result.values == [50.0] and result.seeds == [42]
    assert reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", "Local", "--scale", "debug",
                           "--seeds", "42,45", "--root", str(root), "--collect"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s): 1 done, 1 stale, 0 running, 0 to run" in out, out
    assert f"  - {runs[1].out_dir}: train.lr=0.5 but this run has train.lr=" in out and "mv DIR DIR.old" in out, out
    # --dry-run gives every planned run's command, a finished one's too (methods.md sends readers there)
    assert reproduce.main(["--table", "1", "--dataset", "agnews", "--rows", "Local", "--scale", "debug",
                           "--seeds", "42,45", "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("-m comigs_dist.main --config") == 2 and f"out_dir={runs[0].out_dir}" in out, out
