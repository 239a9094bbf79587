"""Monitoring and analysis: TensorBoard event files of a real 2-process run, routing pictures,
tables, curves and the overhead report (``python -m comigs_dist.analyze``)."""
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comigs_dist.analyze import main as analyze

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# one real run, shared by the tests that read what a run writes
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """configs/debug.yaml under torchrun with 2 processes: TensorBoard, checkpoints, results.json."""
    out = tmp_path_factory.mktemp("analyze") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "comigs_dist.main", "--config", "configs/debug.yaml", f"out_dir={out}", "train.rounds=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, json.loads((out / "results.json").read_text())


def _events(run_dir: Path, user: int):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb" / f"user_{user:02d}"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_documented_tags(trained_run):
    """Each user's event file, read by TensorBoard's own reader, holds every documented tag, values
    that agree with results.json, expert scores summing to 1 per layer, the config and the layout."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    out, _, results = trained_run
    documented = ["train/loss", "train/ce", "train/lb", "lr/expert", "lr/router", "valid/loss",
                  "perf/tokens_per_second", "comm/bytes_sent", "comm/bytes_received", "test/loss", "test/ppl",
                  "base/loss", "base/ppl", "comm/round_bytes_sent", "comm/round_bytes_received",
                  "comm/analytic_round_bytes", "comm/round_seconds"]
    for layer in range(2):
        for j in range(2):
            documented += [f"router/prob/layer_{layer:02d}/expert_{j}", f"router/share/layer_{layer:02d}/expert_{j}",
                           f"test_router/prob/layer_{layer:02d}/expert_{j}"]
    for row in results["users"]:
        acc = _events(out, row["user"])
        tags = set(acc.Tags()["scalars"])
        assert set(documented) <= tags, sorted(set(documented) - tags)
        last = lambda tag: acc.Scalars(tag)[-1].value
        assert last("test/ppl") == pytest.approx(row["test_ppl"], rel=1e-6)
        assert last("comm/bytes_sent") == row["bytes_sent"] and last("comm/bytes_received") == row["bytes_received"]
        # counted bytes per round equal the analytic size of the shared parameters (server mode)
        # (round 0 only broadcasts the initialisation, which is set-up and not counted)
        rounds = [e.value for e in acc.Scalars("comm/round_bytes_sent")]
        assert len(rounds) == results["rounds"] == 3
        assert rounds[0] == 0 and all(v == row["analytic_bytes_per_round"]["sent"] for v in rounds[1:])
        assert sum(rounds) == row["bytes_sent"]
        assert last("comm/analytic_round_bytes") == row["analytic_bytes_per_round"]["sent"]
        # counted and analytic agree round by round: round 1's sync is the uncounted common start
        assert [e.value for e in acc.Scalars("comm/analytic_round_bytes")] == rounds
        assert [e.step for e in acc.Scalars("test/ppl")] == [p["step"] for p in row["test_curve"]]
        assert len(acc.Scalars("train/loss")) == row["local_steps"] == 3 * 4
        for layer in range(2):  # the expert scores are probabilities: they sum to 1 at every step
            p0, p1 = (acc.Scalars(f"router/prob/layer_{layer:02d}/expert_{j}") for j in range(2))
            assert len(p0) == row["local_steps"]
            assert all(abs(a.value + b.value - 1) < 1e-5 for a, b in zip(p0, p1))
        assert "config/text_summary" in acc.Tags()["tensors"]
        assert b"method: comigs_1g1s" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0]
        layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
        charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
        gen = next(v for k, v in charts.items() if k.startswith("generalist expert score"))
        spec = next(v for k, v in charts.items() if k.startswith("specialist expert score"))
        prob_tags = sorted(t for t in tags if t.startswith("router/prob/"))
        assert ([t for t in prob_tags if re.match(gen[0], t)]
                == [f"router/prob/layer_{l:02d}/expert_0" for l in range(2)])
        assert ([t for t in prob_tags if re.match(spec[0], t)]
                == [f"router/prob/layer_{l:02d}/expert_1" for l in range(2)])


@pytest.mark.slow
def test_progress_bar_on_rank_zero_only(trained_run):
    """One rounds bar in the run's stderr (rank 0's; rank 1 stays quiet), as whole lines on a pipe;
    progress lines on stdout."""
    _, proc, _ = trained_run
    assert len(re.findall(r"^rounds: 3/3 \(100%\)", proc.stderr, re.M)) == 1, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    assert proc.stdout.count("[comigs] round 3/3") == 1


def test_progress_helpers_are_quiet_when_off_and_draw_on_a_terminal():
    """log.progress=false (and ranks > 0) print nothing; a terminal gets transient bars, a pipe no
    line for a quick evaluation."""
    from comigs_dist.metrics import NullProgress, Progress, build_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    quiet = build_progress(False)
    assert type(quiet) is NullProgress and list(quiet.bar(range(3), total=3, desc="x")) == [0, 1, 2]
    term, lines = Terminal(), io.StringIO()
    p = build_progress(True, term, lines)
    assert list(p.bar(range(4), total=4, desc="evaluation", transient=True)) == [0, 1, 2, 3]
    p.write("hello")
    assert "evaluation" in term.getvalue() and lines.getvalue() == "hello\n"
    pipe = io.StringIO()
    assert list(Progress(pipe, io.StringIO()).bar(range(2), total=2, desc="evaluation", transient=True)) == [0, 1]
    assert pipe.getvalue() == ""


def test_scalar_layout_separates_generalists_from_specialists():
    """Two generalists of four experts: the generalist chart takes experts 0-1 of every layer, the
    specialist chart 2-3, and each layer has a chart of its own."""
    from comigs_dist.monitor import scalar_layout
    layout = scalar_layout(n_layers=3, n_experts=4, n_generalists=2)
    tags = ([f"router/prob/layer_{l:02d}/expert_{j}" for l in range(3) for j in range(4)]
            + ["router/prob/layer_00/expert_10"])
    (gen_title, gen), (spec_title, spec) = layout["expert scores (paper Fig. 3, 10)"].items()
    match = lambda chart: [t for t in tags if any(re.match(r, t) for r in chart[1])]
    assert "experts 0-1" in gen_title and "experts 2-3" in spec_title
    assert match(gen) == [t for t in tags[:-1] if t[-1] in "01"]
    assert match(spec) == [t for t in tags[:-1] if t[-1] in "23"]
    assert len(layout["expert scores by layer"]) == 3
    assert match(layout["expert scores by layer"]["layer 01: every expert"]) == tags[4:8]


def test_a_method_without_a_router_logs_no_router_curves():
    """FedAvg, Local and the like average their experts with no router: their users logged a
    constant router probability of 0.5, a load-balancing loss of 0 and an expert-score chart; now
    none of these, while a routed user's curves are unchanged."""
    from types import SimpleNamespace

    from comigs_dist.metrics import NullLogger
    from comigs_dist.monitor import Monitor

    class Recorder(NullLogger):
        def __init__(self):
            self.tags, self.layouts = set(), []

        def scalar(self, tag, value, step):
            self.tags.add(tag)

        def scalars(self, values, step):
            self.tags.update(values)

        def layout(self, layout):
            self.layouts.append(layout)

    logs = {0: Recorder(), 1: Recorder()}
    monitor = Monitor(logs, None)
    stats = [(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))]
    res = SimpleNamespace(loss=1.0, ppl=2.7, routing=[([0.5, 0.5], [0.5, 0.5])])
    for user, routed in ((0, False), (1, True)):
        monitor.start(user, None, 1, 2, 1, routed=routed)
        monitor.expert_step(user, 1, 1.0, 1.0, 0.0, 1e-3, 100.0, stats)
        monitor.evaluation(user, 1, res)
    router = lambda tags: {t for t in tags if "router" in t or t == "train/lb"}
    assert router(logs[0].tags) == set() and {"train/loss", "test/ppl"} <= logs[0].tags
    assert "train/lb" in logs[1].tags and "router/prob/layer_00/expert_1" in logs[1].tags
    assert "test_router/share/layer_00/expert_0" in logs[1].tags
    assert not any(k.startswith("expert scores") for k in logs[0].layouts[0])
    assert "expert scores (paper Fig. 3, 10)" in logs[1].layouts[0]


# --------------------------------------------------------------------------------------------
# routing pictures
# --------------------------------------------------------------------------------------------

def _router_top1_by_hand(cfg, run_dir, user, vocab, ids, seq_len):
    """The top-1 expert of every token, computed from the router weights and the MLP inputs."""
    from comigs_dist import checkpoint
    from comigs_dist.methods import get_method
    from comigs_dist.model import build_user_model, mlp_modules
    from helpers import user_of
    model = build_user_model(cfg, user_of(cfg, user), vocab, get_method(cfg.method).routed)
    state = torch.load(checkpoint.user_dir(run_dir, user) / "final.pt", weights_only=True)["params"]
    with torch.no_grad():
        for name, p in model.report.params.items():
            p.copy_(state[name])
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, l=l: inputs.__setitem__(l, args[0]))
             for l, m in enumerate(mlp_modules(model.lm))]
    top1 = {l: [] for l in range(len(model.moe))}
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            model.logits(torch.tensor([ids[start:start + seq_len]]))
            for l, m in enumerate(model.moe):
                logits = inputs[l].reshape(-1, inputs[l].shape[-1]) @ m.router.weight.t()
                top1[l] += logits.argmax(-1).tolist()
    for h in hooks:
        h.remove()
    return top1


@pytest.mark.slow
def test_routing_page_and_png_match_the_router(trained_run, tmp_path):
    """For each user and layer: token shares sum to 1 and equal the counts of the top-1 experts,
    which equal the router's argmax computed by hand; one coloured span per token; a real PNG."""
    from comigs_dist.analyze.routing import load_run_config
    from comigs_dist.data import read_meta
    from comigs_dist.train import resolve_dataset
    out, _, results = trained_run
    cfg = load_run_config(out)
    data_dir = resolve_dataset(cfg, 2)
    meta = read_meta(data_dir)
    ids = np.fromfile(data_dir / "user_01" / "test.bin", dtype=meta["dtype"])[:150].tolist()  # > 2 windows of 64
    text = tmp_path / "ids.txt"
    text.write_text(" ".join(map(str, ids)) + "\n")
    assert analyze(["routing", "--run", str(out), "--text", str(text), "--layers", "0,1", "--out", str(tmp_path / "r"),
                    "--max-tokens", "150", "--from-split", "test:1"]) == 0
    record = json.loads((tmp_path / "r" / "routing.json").read_text())
    from_split, entry = record["texts"]
    assert entry["ids"] == ids and from_split["ids"] == ids and from_split["users"] == entry["users"]
    for user in (0, 1):
        by_hand = _router_top1_by_hand(cfg, out, user, meta["vocab_size"], ids, cfg.train.seq_len)
        for layer in (0, 1):
            d = entry["users"][str(user)][str(layer)]
            assert d["top1"] == by_hand[layer]
            assert sum(d["shares"]) == pytest.approx(1.0)
            assert d["shares"] == pytest.approx([d["top1"].count(j) / len(ids) for j in range(2)])
            assert 0 < d["shares"][0] < 1          # trained routers: both experts are chosen somewhere
            assert all(0.5 <= p <= 1 for p in d["prob"])   # the first choice of two has probability >= 1/2
    page = (tmp_path / "r" / "routing.html").read_text()
    assert page.count("class='tok'") == 2 * 2 * 2 * len(ids)        # 2 texts, 2 users, 2 layers
    assert page.count("background:#f5a04a' title") == 2 * sum(entry["users"][u][l]["top1"].count(0)
                                                            for u in "01" for l in "01")
    import matplotlib.image
    png = tmp_path / "r" / "routing_1_ids.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 300           # a 2 x 2 grid of panels


def test_routing_with_gpt2_bpe_text(tmp_path):
    """A prepared dataset whose meta.json names GPT-2's BPE: the text is encoded with tiktoken, every
    piece appears in the page, and the decisions agree with the router's argmax."""
    from comigs_dist import checkpoint
    from comigs_dist.config import to_yaml
    from comigs_dist.data import write_dataset
    from comigs_dist.model import build_user_model
    from helpers import tiny_config, user_of
    tokens = np.arange(1000) % 50257
    data = tmp_path / "data"
    write_dataset(data, [{"train": tokens, "valid": tokens, "test": tokens}], 50257,
                  meta_extra={"tokenizer": {"kind": "tiktoken", "name": "gpt2"}})
    run = tmp_path / "run"
    cfg = tiny_config(**{"data.path": str(data), "n_users": 1, "moe.n_experts": 3, "moe.top_k": 1})
    model = build_user_model(cfg, user_of(cfg, 0), 50257, True)
    with torch.no_grad():
        for name, p in model.report.params.items():
            if "router" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))  # make routing non-trivial
    checkpoint.save_atomic({"params": model.trainable_state()}, checkpoint.user_dir(run, 0) / "final.pt")
    (run / "config.yaml").write_text(to_yaml(cfg))
    sentence = "The cat sat on the mat.\nAnd then the cat, quite pleased, went to sleep & dreamt of <fish>."
    (tmp_path / "t.txt").write_text(sentence)
    assert analyze(["routing", "--run", str(run), "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r")]) == 0
    record = json.loads((tmp_path / "r" / "routing.json").read_text())
    import tiktoken
    ids = tiktoken.get_encoding("gpt2").encode(sentence)
    assert record["tokenizer"] == "tiktoken gpt2" and record["texts"][0]["ids"] == ids
    layers = record["texts"][0]["users"]["0"]
    assert sorted(layers) == ["0", "1"]           # default: first, middle and last of 2 layers
    by_hand = _router_top1_by_hand(cfg, run, 0, 50257, ids, cfg.train.seq_len)
    for layer, d in layers.items():
        assert d["top1"] == by_hand[int(layer)]
        assert sum(d["shares"]) == pytest.approx(1.0) and len(d["shares"]) == 3
    page = (tmp_path / "r" / "routing.html").read_text()
    assert "'> &amp;</span>" in page and "'> &lt;</span>" in page and "'> cat</span>" in page and "'>\n</span>" in page


def test_tokenizer_choice_follows_meta_json():
    """Synthetic vocabularies read token ids; a named tokenizer or a 50257 vocabulary reads GPT-2 BPE;
    anything else asks for --tokenizer."""
    from comigs_dist.analyze import AnalysisError
    from comigs_dist.analyze.routing import build_tokenizer
    ids = build_tokenizer("auto", {"vocab_size": 256, "tokenizer": {"kind": "synthetic", "vocab_size": 256}})
    assert ids.encode(" 3 17\n255 ") == [3, 17, 255] and ids.piece(17) == "17"
    with pytest.raises(AnalysisError, match=r"'256' is not a token id in 0..255"):
        ids.encode("3 256")
    for meta in ({"vocab_size": 50257}, {"vocab_size": 50257, "tokenizer": "gpt2"},
                 {"vocab_size": 50257, "tokenizer": {"kind": "tiktoken", "name": "gpt2"}}):
        tok = build_tokenizer("auto", meta)
        assert tok.encode("hello world") == [31373, 995] and tok.piece(995) == " world"
    with pytest.raises(AnalysisError, match="--tokenizer ids"):
        build_tokenizer("auto", {"vocab_size": 1000})


# --------------------------------------------------------------------------------------------
# tables and curves from results.json files
# --------------------------------------------------------------------------------------------

def _fake_results(root: Path, method: str, dataset: str, seed: int, mean_ppl: float, base: float = 100.0,
                  n_experts=2, curve=None) -> Path:
    run = root / f"{dataset}_{method}_s{seed}"
    run.mkdir(parents=True)
    users = [{"user": u, "test_ppl": mean_ppl, "base_test_ppl": base,
              "test_curve": curve[u] if curve else [{"round": 1, "step": 10, "test_ppl": mean_ppl}]} for u in range(2)]
    (run / "results.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "seed": seed, "rounds": 2, "world_size": 2, "mean_test_ppl": mean_ppl,
        "mean_base_test_ppl": base, "users": users, "config": {"moe": {"n_experts": n_experts}}}))
    return run


def test_table_means_and_stds_over_seeds(tmp_path, capsys):
    """Methods x datasets: each cell the mean and sample std over seeds, best bold, CSV with ranks."""
    values = {("comigs_1g1s", "agnews"): [33.0, 34.0, 35.5], ("local", "agnews"): [41.0, 41.5, 42.6],
              ("comigs_1g1s", "wiki"): [47.0, 47.3, 47.3], ("local", "wiki"): [46.1, 46.2, 46.6]}
    for (method, dataset), ppls in values.items():
        for seed, ppl in zip((42, 45, 47), ppls):
            _fake_results(tmp_path / "sweep", method, dataset, seed, ppl, base=90.0 + seed)
    assert analyze(["table", "--runs", str(tmp_path / "sweep"), "--pretrained", "--out", str(tmp_path / "t")]) == 0
    rows = {(r["method"], r["dataset"]): r for r in csv.DictReader(open(tmp_path / "t.csv"))}
    # by hand: [33, 34, 35.5] has mean 34.1666..., sample std sqrt(((-7/6)^2 + (-1/6)^2 + (4/3)^2) / 2) = 1.2583...
    assert float(rows[("comigs_1g1s", "agnews")]["mean"]) == pytest.approx(34.166666667)
    assert float(rows[("comigs_1g1s", "agnews")]["std"]) == pytest.approx(1.258305739)
    assert float(rows[("local", "wiki")]["mean"]) == pytest.approx(46.3)
    assert float(rows[("local", "wiki")]["std"]) == pytest.approx(0.264575131)
    assert rows[("comigs_1g1s", "agnews")]["rank"] == "1" and rows[("comigs_1g1s", "wiki")]["rank"] == "2"
    assert rows[("pretrained base", "wiki")]["mean"] == repr(90.0 + (42 + 45 + 47) / 3)
    assert rows[("local", "wiki")]["seeds"] == "42 45 47" and rows[("local", "wiki")]["n_seeds"] == "3"
    md = (tmp_path / "t.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == ["method", "agnews", "wiki"]
    assert ["comigs_1g1s", "**34.17 (1.26)**", "47.20 (0.17)"] in cells
    assert ["local", "41.70 (0.82)", "**46.30 (0.26)**"] in cells
    assert len({len(line) for line in table}) == 1  # padded: the columns line up as plain text too
    assert md in capsys.readouterr().out


def test_table_rows_by_config_key_and_duplicate_seeds(tmp_path):
    """Table 2 style rows (expert counts per user) print as the paper does; a seed given twice for
    one cell is refused, naming both files."""
    from comigs_dist.analyze.runs import build_table, load_runs
    _fake_results(tmp_path / "a", "comigs_1gxs", "wiki", 42, 46.0, n_experts=[4, 2, 2, 2])
    _fake_results(tmp_path / "a", "comigs_1gxs", "wiki", 45, 47.0, n_experts=[4, 2, 2, 2])
    _fake_results(tmp_path / "b", "comigs_1gxs", "wiki", 42, 50.0, n_experts=[2, 4, 4, 4])
    table = build_table(load_runs([tmp_path / "a", tmp_path / "b"]), rows="config.moe.n_experts", cols="method")
    assert table.rows == ["(4,2,2,2)", "(2,4,4,4)"]
    cell = table.cells[("(4,2,2,2)", "comigs_1gxs")]
    assert (cell.mean, cell.std) == pytest.approx((46.5, math.sqrt(0.5)))
    assert math.isnan(table.cells[("(2,4,4,4)", "comigs_1gxs")].std)     # one seed: no std
    from comigs_dist.analyze import AnalysisError
    with pytest.raises(AnalysisError, match=r"a/wiki_comigs_1gxs_s42/results.json and .*b/wiki_comigs_1gxs_s42"
                                            r".*their configs differ in config.moe.n_experts \(\(4,2,2,2\) / "
                                            r"\(2,4,4,4\)\), e.g. --cols config.moe.n_experts\)"):
        build_table(load_runs([tmp_path / "b", tmp_path / "a"]), rows="method")
    with pytest.raises(AnalysisError, match=r"key 'config.moe.top_k' is not in"):
        build_table(load_runs([tmp_path / "a"]), rows="config.moe.top_k")
    # two copies of one run that differ only where results do not (checkpointing): no column to suggest
    for name, every in (("c", 0), ("d", 5)):
        f = _fake_results(tmp_path / name, "local", "wiki", 42, 40.0) / "results.json"
        res = json.loads(f.read_text())
        res["config"]["checkpoint"] = {"every": every}
        f.write_text(json.dumps(res))
    with pytest.raises(AnalysisError) as caught:
        build_table(load_runs([tmp_path / "c", tmp_path / "d"]), rows="method")
    assert "pass only one of them" in str(caught.value) and "differ in" not in str(caught.value), caught.value


def test_table_cli_errors_name_the_path(tmp_path, capsys):
    """A directory without results.json: exit code 2 and a message naming it."""
    (tmp_path / "empty").mkdir()
    assert analyze(["table", "--runs", str(tmp_path / "empty")]) == 2
    assert f"--runs {tmp_path / 'empty'}: no results.json under this directory" in capsys.readouterr().err


def test_curves_average_seeds_per_user_and_method(tmp_path):
    """One line per method and user: the mean and std over seeds at the steps every seed evaluated."""
    c = lambda a, b, c_: [[{"round": 1, "step": 10, "test_ppl": a}, {"round": 2, "step": 20, "test_ppl": b},
                           {"round": 3, "step": 30, "test_ppl": c_}]] * 2
    _fake_results(tmp_path, "comigs_1g1s", "wiki", 42, 0, curve=c(50, 40, 30))
    _fake_results(tmp_path, "comigs_1g1s", "wiki", 45, 0, curve=c(52, 44, 36))
    short = [[{"round": 1, "step": 10, "test_ppl": 60}, {"round": 2, "step": 20, "test_ppl": 55}]] * 2
    _fake_results(tmp_path, "local", "wiki", 42, 0, base=80.0, curve=short)
    out = tmp_path / "plots" / "curves.png"
    assert analyze(["curves", "--runs", str(tmp_path), "--out", str(out), "--from-base"]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    comigs = [(int(r["step"]), float(r["test_ppl_mean"]), float(r["test_ppl_std"])) for r in rows
              if r["method"] == "comigs_1g1s" and r["user"] == "1"]
    assert comigs == [(0, 100.0, 0.0), (10, 51.0, pytest.approx(math.sqrt(2))), (20, 42.0, pytest.approx(math.sqrt(8))),
                      (30, 33.0, pytest.approx(math.sqrt(18)))]
    local = [(int(r["step"]), float(r["test_ppl_mean"]), r["test_ppl_std"]) for r in rows
             if r["method"] == "local" and r["user"] == "0"]
    assert local == [(0, 80.0, ""), (10, 60.0, ""), (20, 55.0, "")]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_sweep_plots_the_final_perplexity_against_tau_one_line_per_s(tmp_path):
    """Figure 7: mean test perplexity against train.router_every, one line per train.router_steps,
    mean and sample std over seeds by hand; panel names for the data-quantity curves."""
    values = {(10, 5): [30.0, 32.0], (30, 5): [28.0, 28.0], (10, 10): [29.0, 31.0], (30, 10): [27.0, 29.0]}
    for (tau, steps), ppls in values.items():
        for seed, ppl in zip((42, 45), ppls):
            run = _fake_results(tmp_path / f"t{tau}s{steps}", "comigs_1g1s", "slim", seed, ppl)
            res = json.loads((run / "results.json").read_text())
            res["config"]["train"] = {"router_every": tau, "router_steps": steps}
            (run / "results.json").write_text(json.dumps(res))
    out = tmp_path / "tau_s.png"
    assert analyze(["sweep", "--runs", str(tmp_path), "--out", str(out)]) == 0
    rows = [(r["config.train.router_steps"], float(r["config.train.router_every"]), float(r["mean_test_ppl_mean"]),
             r["mean_test_ppl_std"], r["n_seeds"]) for r in csv.DictReader(open(out.with_suffix(".csv")))]
    assert rows == [("10", 10.0, 30.0, repr(math.sqrt(2)), "2"), ("10", 30.0, 28.0, repr(math.sqrt(2)), "2"),
                    ("5", 10.0, 31.0, repr(math.sqrt(2)), "2"), ("5", 30.0, 28.0, "0.0", "2")]
    assert out.read_bytes()[:4] == b"\x89PNG"
    curves = tmp_path / "curves.png"
    assert analyze(["curves", "--runs", str(tmp_path / "t10s5"), "--out", str(curves),
                    "--user-names", "de (low),nl (low)"]) == 0 and curves.is_file()


# --------------------------------------------------------------------------------------------
# overhead
# --------------------------------------------------------------------------------------------

def _overhead(tmp_path, *overrides):
    path = tmp_path / "overhead.json"
    assert analyze(["overhead", *overrides, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_overhead_matches_a_hand_count(tmp_path):
    """The tiny GPT-2 (2 layers, width 32, vocabulary 256), T = 32, 4 experts with top-2, 4 users."""
    o = _overhead(tmp_path, "model.name=tiny", "train.seq_len=32", "moe.n_experts=4", "n_users=4")
    (user,) = o["users"]
    f = user["flops_per_token"]
    # frozen projections per layer: c_attn 32x96, attn.c_proj 32x32, c_fc 32x128, mlp.c_proj 128x32
    per_layer = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)                 # 24,576
    lm_head = 2 * 32 * 256                                                      # 16,384
    assert f["base_matmul"] == 2 * per_layer + lm_head == 65_536 and f["lm_head"] == lm_head
    assert f["attention"] == 2 * 4 * 32 * 32                                    # 4 T d per layer: 8,192
    assert f["attn_lora"] == 2 * (2 * 8 * (32 + 96) + 2 * 8 * (32 + 32))       # 6,144
    expert = 2 * 8 * (32 + 128) + 2 * 8 * (128 + 32)                            # 5,120 per expert
    assert f["experts"] == 2 * 2 * expert                                       # top-2, 2 layers: 20,480
    assert f["router"] == 2 * 2 * 32 * 4                                        # 512
    assert user["added_pct"] == pytest.approx(100 * (6_144 + 20_480 + 512) / (65_536 + 8_192))
    assert o["users"][0]["flops_per_sequence"]["added"] == 32 * (6_144 + 20_480 + 512)
    assert user["router_params"] == 2 * 4 * 32 and user["router_bytes"] == {"bf16": 512, "fp32": 1024}
    # shared: attention LoRA (8*128 + 8*64 per layer) + expert 0 (8*160 + 8*160 per layer)
    assert user["shared_attn_params"] == 2 * (8 * 128 + 8 * 64) and user["shared_expert_params"] == 2 * 2 * 8 * 160
    payload = (3_072 + 5_120) * 4
    assert user["bytes_per_round"]["server"]["fp32"] == {"sent": payload, "received": payload}
    # all2all: the bf16 payload (half the fp32 one) delivered to and received from each of the 4 users
    assert user["bytes_per_round"]["all2all"]["bf16"] == {"sent": 4 * payload // 2, "received": 4 * payload // 2}
    one, two = o["references"]
    assert one["flops_per_token"]["experts"] == 2 * expert and one["flops_per_token"]["router"] == 0
    assert two["flops_per_token"]["experts"] == 2 * 2 * expert
    assert o["paper"] is None


def test_overhead_of_gpt2_124m_against_the_paper(tmp_path, capsys):
    """GPT-2 124M shapes (built on the meta device): the paper's 32 GFLOPs base, +490 MFLOPs for two
    LoRA sets, +495 for CoMiGS-1G1S with a 5 MFLOPs router, 0.035 MB of router, 1.41 MB of expert 0."""
    o = _overhead(tmp_path, "model.name=gpt2-random", "n_users=4")
    (user,) = o["users"]
    seq = user["flops_per_sequence"]
    assert seq["base"] / 1e9 == pytest.approx(32.0, rel=0.01)
    assert o["references"][1]["flops_per_sequence"]["added"] / 1e6 == pytest.approx(490, rel=0.002)
    assert seq["added"] / 1e6 == pytest.approx(495, rel=0.002) and seq["router"] / 1e6 == pytest.approx(5, rel=0.06)
    assert user["router_bytes"]["bf16"] / 2 ** 20 == pytest.approx(0.035, rel=0.01)
    assert user["shared_expert_params"] * 2 / 2 ** 20 == pytest.approx(1.41, rel=0.003)
    assert user["shared_params"] == 1_179_648        # baselines.md section 2
    printed = capsys.readouterr().out
    assert "[paper: 32 GFLOPs]" in printed and "[paper: 1.41 MB in bf16, which is the generalist" in printed, printed


@pytest.mark.slow
def test_overhead_bytes_per_round_equal_what_a_run_sent(trained_run, tmp_path):
    """The debug run aggregated twice (rounds 2 and 3): its counted bytes are twice the report's."""
    out, _, results = trained_run
    o = _overhead(tmp_path, "--config", str(out / "config.yaml"))
    per_round = o["users"][0]["bytes_per_round"]["server"]["fp32"]
    for row in results["users"]:
        assert row["bytes_sent"] == 2 * per_round["sent"] and row["bytes_received"] == 2 * per_round["received"]
        assert row["shared_params"] == o["users"][0]["shared_params"]
