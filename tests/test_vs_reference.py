"""The reference driver of benchmarks/vs_reference.py: its swaps, its data layout, its round gate.

The tests marked ``reference`` need a checkout of epfml/CoMiGS in $COMIGS_REFERENCE_DIR (nothing
of it is part of this project) and skip without one; the others test the driver's own parts.
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from comigs_dist.data import write_dataset
from helpers import subprocess_env, user_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _reference_driver as D  # noqa: E402
import vs_reference as V  # noqa: E402

REFERENCE = os.environ.get("COMIGS_REFERENCE_DIR", "")
needs_reference = pytest.mark.skipif(
    not REFERENCE, reason="set COMIGS_REFERENCE_DIR to a checkout of https://github.com/epfml/CoMiGS to run the "
                          "reference driver against the reference itself")


def _dataset(path: Path, n_users: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)
    users = [{s: rng.integers(0, vocab, n) for s, n in (("train", 700), ("valid", 300), ("test", 300))}
             for _ in range(n_users)]
    write_dataset(path, users, vocab)
    return users


def _tiny_checkpoint(path: Path, vocab: int = 512) -> Path:
    from transformers import GPT2LMHeadModel
    from comigs_dist.pretrain import _quiet_gpt2_config, save_hf_checkpoint
    torch.manual_seed(7)
    save_hf_checkpoint(GPT2LMHeadModel(_quiet_gpt2_config(n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                                          vocab_size=vocab)), path)
    return path


# --------------------------------------------------------------------------------------------
# the driver's own parts
# --------------------------------------------------------------------------------------------

def test_a_directory_that_is_not_the_reference_is_refused_naming_what_is_missing(tmp_path):
    """--reference must hold collab_run.py and the reference's packages; the error names them and the fix."""
    (tmp_path / "collab_run.py").write_text("")
    with pytest.raises(D.DriverError, match=r"not a checkout of epfml/CoMiGS \(missing models/model.py, "
                                            r"collab_utils/clients.py\); clone https://github.com/epfml/CoMiGS"):
        D.check_reference(tmp_path)


def test_dataset_links_are_the_files_the_reference_reads(tmp_path):
    """<out>/<n>/<split>_<i>.bin are links to user i's shards: the reference's uint16 memmap of
    each reads exactly our tokens."""
    users = _dataset(tmp_path / "data", 3, 1000)
    root = D.link_dataset(tmp_path / "data", 2, tmp_path / "links")
    assert sorted(p.name for p in (root / "2").iterdir()) == sorted(f"{s}_{u}.bin" for s in D.SPLITS for u in (0, 1))
    for u in (0, 1):
        for split in D.SPLITS:
            link = root / "2" / f"{split}_{u}.bin"
            assert link.is_symlink()
            np.testing.assert_array_equal(np.memmap(link, dtype=np.uint16, mode="r"), users[u][split])


def test_datasets_the_reference_cannot_read_are_refused(tmp_path):
    """uint32 ids (a vocabulary over 65,536), too few users or no meta.json: a DriverError naming the data."""
    _dataset(tmp_path / "wide", 2, 70_000)
    with pytest.raises(D.DriverError, match=r"stores token ids as uint32, but the reference reads uint16"):
        D.link_dataset(tmp_path / "wide", 2, tmp_path / "l1")
    _dataset(tmp_path / "few", 2, 1000)
    with pytest.raises(D.DriverError, match=r"holds 2 users, fewer than the reference's 4 clients"):
        D.link_dataset(tmp_path / "few", 4, tmp_path / "l2")
    with pytest.raises(D.DriverError, match=r"has no meta.json"):
        D.link_dataset(tmp_path, 1, tmp_path / "l3")


def test_the_reference_model_takes_the_checkpoints_shapes():
    """Layers, heads, width, context and vocabulary come from the Hugging Face config."""
    from transformers import GPT2Config
    shapes = D.checkpoint_shapes(GPT2Config(n_layer=3, n_head=2, n_embd=16, n_positions=96, vocab_size=500))
    assert shapes == {"n_layer": 3, "n_head": 2, "n_embd": 16, "block_size": 96, "vocab_size": 500}


def test_wandb_stand_in_keeps_what_the_reference_logs():
    """init's config and every log call are kept in order."""
    records = []
    wandb = D.wandb_stand_in(records)
    wandb.init(project="p", name="n", config={"lr": 2e-3})
    wandb.log({"client_0/train_loss": 3.5, "iter": 1})
    wandb.log({"client_1/train_loss": 3.25, "iter": 1})
    assert records == [{"init": {"lr": 2e-3}}, {"log": {"client_0/train_loss": 3.5, "iter": 1}},
                       {"log": {"client_1/train_loss": 3.25, "iter": 1}}]


def test_round_gate_waits_for_go_and_reports_each_rounds_clocks():
    """Each round starts only after 'go'; the gate reads its clock after 'go' and after the
    round's work (not while it waits), and reports the difference of the two readings."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    log = []
    ticks = iter(range(100))

    def clock():
        log.append("clock")
        t = float(next(ticks))
        return {"wall": 10 * t, "user": t, "sys": t / 2, "minflt": 3 * t}
    gate = D.RoundGate(os.fdopen(to_r, "r"), os.fdopen(from_w, "w"), clock)
    commands, events = os.fdopen(to_w, "w"), os.fdopen(from_r, "r")
    seen = []

    def benchmark():
        for _ in range(2):
            seen.append(json.loads(events.readline()))
            log.append("go")
            commands.write("go\n")
            commands.flush()
            seen.append(json.loads(events.readline()))
    thread = threading.Thread(target=benchmark)
    thread.start()
    for i in gate(range(2)):
        log.append(f"round {i}")
    thread.join(10)
    assert log == ["go", "clock", "round 0", "clock", "go", "clock", "round 1", "clock"]
    assert [(e["event"], e["round"]) for e in seen] == [("ready", 0), ("round", 0), ("ready", 1), ("round", 1)]
    for e in seen[1::2]:
        assert (e["wall"], e["user"], e["sys"], e["minflt"]) == (10.0, 1.0, 0.5, 3.0)


def test_only_the_main_scripts_loop_goes_through_the_gate():
    """quiet_tqdm gates the loop of the script run as __main__ and returns every other iterable as it is."""
    calls = []
    tqdm = D.quiet_tqdm(lambda it: calls.append("gated") or iter(it))
    script = {"__name__": "__main__", "tqdm": tqdm}
    exec("out = list(tqdm(range(3)))", script)
    assert script["out"] == [0, 1, 2] and calls == ["gated"]
    steps = range(4)
    assert tqdm(steps) is steps and calls == ["gated"]


def test_both_sides_are_given_the_same_1g1s_configuration():
    """The reference's arguments and the project's overrides describe one run: users, experts,
    top-k, rank, batch (one micro-batch), steps, learning rate, load-balancing weight, seed, and
    no router phase inside the reference's rounds."""
    ref = V.reference_args(4, 3, 10, 8, 42, "/out")
    assert "-is_alter" in ref and "-wandb" not in ref
    get = {ref[i]: ref[i + 1] for i in range(len(ref) - 1) if ref[i].startswith("-") and not ref[i + 1].startswith("-")}
    assert get["-nc"] == "4" and get["-en"] == "[2, 2, 2, 2]" and get["-el"] == "[8, 8, 8, 8]"
    assert get["-k"] == "2" and get["-as"] == "expert_0" and get["-device"] == "cpu"
    assert get["-bs"] == get["-micro_bs"] == "8" and get["-num_steps"] == "10" and get["-gr"] == "3"
    assert int(get["-update_router_every"]) > 3 * 10
    from comigs_dist.config import load_config
    cfg = load_config(None, V.project_overrides("tiny", "embedded", 4, 10, 8, 42))
    assert cfg.method == "comigs_1g1s" and cfg.n_users == 4 and cfg.train.batch_size == 8
    assert cfg.train.local_steps == 10 and cfg.train.seq_len == 128 and cfg.seed == int(get["-seed"])
    assert cfg.train.lr == float(get["-lr"]) and cfg.moe.lb_weight == float(get["-lb_lam"])
    user = user_of(cfg, 0)
    assert user.n_experts == 2 and user.top_k == 2 and user.lora_rank == 8


# --------------------------------------------------------------------------------------------
# against the reference checkout
# --------------------------------------------------------------------------------------------

@needs_reference
def test_both_sides_untrained_logits_equal_the_hugging_face_models(tmp_path):
    """Through the driver's swaps the reference builds its own CoMiGS model (2 experts per layer,
    LoRA and per-token routers trainable) on our checkpoint; untrained (B = 0), its logits and
    this project's user model's equal the Hugging Face model's."""
    from transformers import GPT2LMHeadModel
    from comigs_dist.model import build_user_model
    from helpers import tiny_config
    ckpt = _tiny_checkpoint(tmp_path / "base")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_reference_driver.py"), "logits",
                           "--reference", REFERENCE, "--base", str(ckpt), "--tokens", str(tmp_path / "tokens.pt"),
                           "--out", str(tmp_path / "ref.pt")], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(), cwd=REFERENCE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    hf = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    torch.testing.assert_close(ref["logits"], want, rtol=0, atol=1e-5)
    assert ref["config"]["n_layer"] == 2 and ref["config"]["n_embd"] == 32 and ref["config"]["vocab_size"] == 512
    assert any(".mlp.experts.1.c_fc.lora_A" in n for n in ref["trainable"])
    assert any("per_token_router" in n for n in ref["trainable"])
    assert not any(n.endswith("wte.weight") for n in ref["trainable"])
    cfg = tiny_config(**{"model.name": str(ckpt), "train.seq_len": 24})
    ours = build_user_model(cfg, user_of(cfg, 0), 512, routed=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(tokens), want, rtol=0, atol=1e-5)


@needs_reference
@pytest.mark.slow
def test_driver_runs_the_references_rounds_one_at_a_time(tmp_path):
    """collab_run.py itself runs through the driver on our base and data: it waits for each
    round, reports its clocks, and ends when its rounds are done."""
    ckpt = _tiny_checkpoint(tmp_path / "base")
    _dataset(tmp_path / "data", 2, 512)
    args = V.reference_args(2, 2, 1, 2, 42, str(tmp_path / "out"))
    run = V.ReferenceRun(Path(REFERENCE), str(ckpt), str(tmp_path / "data"), 1, args, tmp_path / "ref.log")
    try:
        run.ready(timeout_s=600)
        rounds = [run.round(timeout_s=600) for _ in range(2)]
        assert run.next_event["event"] == "done"
    finally:
        run.close()
    assert run.proc.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["user"] > 0 and r["wall"] > 0 for r in rounds)
