"""Small models and configs built in code for the tests."""
import os
from pathlib import Path


def tiny_gpt2(vocab_size: int = 128, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64):
    """The tiny GPT-2 of the style guide (random weights, no dropout)."""
    import torch
    from comigs_dist.pretrain import _quiet_gpt2_config
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(_quiet_gpt2_config(n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=vocab_size,
                                              n_positions=n_positions)).eval()


def tiny_config(**overrides):
    """A RunConfig for the tiny random GPT-2 on the embedded corpus (fast, no pretraining)."""
    from comigs_dist.config import load_config
    base = {"model.name": "tiny", "train.rounds": 2, "train.local_steps": 3, "train.router_every": 2,
            "train.router_steps": 2, "train.batch_size": 4, "train.seq_len": 32, "eval.every": 0,
            "eval.max_tokens": 1024, "log.tensorboard": False, "log.progress": False,
            "checkpoint.final": False, "data.train_tokens": 4000, "data.valid_tokens": 2000,
            "data.test_tokens": 2000}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def tiny_lora_numel(n_layer: int = 2, d: int = 32, rank: int = 8, attn_rank: int = 8) -> int:
    """One LoRA set of the tiny GPT-2, from its shapes: per block c_attn (d -> 3d) and c_proj
    (d -> d) at the attention rank, c_fc (d -> 4d) and c_proj (4d -> d) at the MLP rank; A is
    (r, in), B is (out, r). ``attn_rank=0``: one MLP expert's LoRAs alone."""
    attn = attn_rank * (d + 3 * d) + attn_rank * (d + d)
    mlp = rank * (d + 4 * d) + rank * (4 * d + d)
    return n_layer * (attn + mlp)


def user_of(cfg, user_idx: int):
    """One user's resolved values (``config.resolve_users``) for a config whose user count may be unset."""
    from comigs_dist.config import inferred_n_users, resolve_users
    return resolve_users(cfg, inferred_n_users(cfg) or user_idx + 1)[user_idx]


TIMING_KEYS = frozenset({"tokens_per_second", "comm_seconds"})  # per-user results that measure time


def without_timing(user_row: dict) -> dict:
    """A user's results.json row without the entries that measure time (they differ between identical runs)."""
    return {k: v for k, v in user_row.items() if k not in TIMING_KEYS}


def run_and_record(topo, cfg, run_dir: Path, rows_file: Path) -> None:
    """In a rank of a test's process group: ``train.run`` of ``cfg`` over this rank's users (the
    topology's groups built afresh for the run), every rank's rows gathered, and rank 0 writes them
    to ``rows_file`` as JSON, sorted by user, timing left out (``read_rows`` reads them back)."""
    import dataclasses
    import json
    from comigs_dist import dist, train
    mine = train.run(cfg, dataclasses.replace(topo, groups={}), run_dir)
    rows = [r for part in dist.all_gather_objects(topo, mine) for r in part]
    if topo.rank == 0:
        rows_file.write_text(json.dumps(sorted((without_timing(r) for r in rows), key=lambda r: r["user"])))


def read_rows(rows_file: Path) -> list[dict]:
    """The rows ``run_and_record`` wrote."""
    import json
    return json.loads(rows_file.read_text())


def assert_same_rows(a_rows: list[dict], b_rows: list[dict], what: str = "") -> None:
    """Two runs' rows equal user by user; a failure names the run, the user and the keys that differ."""
    assert len(a_rows) == len(b_rows), (what, len(a_rows), len(b_rows))
    for a, b in zip(a_rows, b_rows):
        assert a == b, (what, a["user"], {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)})


_ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(_ROOT / "configs" / "debug.yaml")


def cut_run(whole: Path, to: Path, keep: int) -> None:
    """A copy of a whole run's directory as a run stopped after round ``keep`` leaves it: the
    later round checkpoints, the final one and the manifest removed."""
    import shutil

    from comigs_dist import checkpoint
    shutil.copytree(whole, to)
    for path in checkpoint.checkpoints_dir(to).rglob("*.pt"):
        done = path.stem.split("_")[-1]
        if not done.isdigit() or int(done) > keep:
            path.unlink()
    checkpoint.manifest_path(to).unlink(missing_ok=True)


def assert_packed_matches_one_by_one(topo, config_for, rounds: int = 2) -> int:
    """The rank's users built twice, with train.pack_users off and on (``config_for(pack)``), run
    ``rounds`` rounds: every user's training losses and parameters agree to float32 rounding.
    Returns the users' local steps."""
    import dataclasses

    import pytest
    import torch

    from comigs_dist import train
    runs = {}
    for pack in ("off", "on"):
        cfg = config_for(pack)
        run = train.build_rank(cfg, dataclasses.replace(topo, groups={}))
        assert train.packs_users(cfg, topo.device, run.users) == (pack == "on")
        for r in range(rounds):
            train.run_round(run, r)
        runs[pack] = run
    for a, b in zip(runs["off"].users, runs["on"].users, strict=True):
        assert a.step == b.step
        for ca, cb in zip(a.train_curve, b.train_curve, strict=True):
            assert cb["loss"] == pytest.approx(ca["loss"], rel=2e-5)
        for n, p in a.model.report.params.items():
            torch.testing.assert_close(b.model.report.params[n], p, rtol=2e-4, atol=2e-6, msg=n)
    return runs["off"].users[0].step


def subprocess_env(one_thread: bool = True, **extra) -> dict:
    """The environment of a run started by a test: this checkout first on the path and, unless
    one_thread=False (jobs that size their own threads), one intra-op thread."""
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {}), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env
