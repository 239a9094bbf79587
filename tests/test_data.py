"""Token shards: the format, the checks against meta.json, and batches."""
import json

import numpy as np
import pytest
import torch

from comigs_dist.data import BatchSampler, DataError, eval_windows, load_user_data, read_meta, write_dataset
from comigs_dist import synthetic


def _users(n=2, size=500, vocab=100):
    rng = np.random.default_rng(0)
    return [{s: rng.integers(0, vocab, size) for s in ("train", "valid", "test")} for _ in range(n)]


def test_write_then_load_round_trip(tmp_path):
    """Shards come back as written, memory-mapped, with the vocabulary from meta.json."""
    users = _users()
    meta = write_dataset(tmp_path / "d", users, 100, meta_extra={"dataset": "t"})
    assert meta["dtype"] == "uint16" and meta["n_users"] == 2
    d = load_user_data(tmp_path / "d", 1, seq_len=16)
    assert isinstance(d.train, np.memmap) and d.vocab_size == 100
    assert np.array_equal(d.test, users[1]["test"])
    assert write_dataset(tmp_path / "big", _users(1, 10, 70_000), 70_000)["dtype"] == "uint32"


def test_bad_shards_are_refused_with_the_file_named(tmp_path):
    """Missing meta, missing, truncated or modified shard, unknown user, too-short split."""
    write_dataset(tmp_path / "d", _users(), 100)
    with pytest.raises(DataError, match="meta.json is missing"):
        load_user_data(tmp_path / "nope", 0, 16)
    with pytest.raises(DataError, match="holds 2 users but user 2 was asked for"):
        load_user_data(tmp_path / "d", 2, 16)
    with pytest.raises(DataError, match="fewer than one window"):
        load_user_data(tmp_path / "d", 0, 600)
    shard = tmp_path / "d" / "user_00" / "valid.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"user_00/valid.bin has 998 bytes but meta.json says 500 tokens"):
        load_user_data(tmp_path / "d", 0, 16)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(DataError, match="does not match the sha256"):
        load_user_data(tmp_path / "d", 0, 16)
    load_user_data(tmp_path / "d", 0, 16, verify=False)  # the size still matches
    shard.unlink()
    with pytest.raises(DataError, match="valid.bin is missing"):
        load_user_data(tmp_path / "d", 0, 16)
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_meta(tmp_path / "d")


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    """A failure while writing removes the temporary directory and never creates the target."""
    users = _users()
    users[1]["test"] = np.array([5, 500])  # out of the vocabulary: fails after user 0 was written
    with pytest.raises(DataError, match="token ids outside"):
        write_dataset(tmp_path / "d", users, 100)
    assert list(tmp_path.iterdir()) == []


def test_share_keeps_a_prefix_of_the_training_split(tmp_path):
    """data.share=0.5 trains on the first half of the user's training tokens."""
    write_dataset(tmp_path / "d", _users(size=1000), 100)
    assert len(load_user_data(tmp_path / "d", 0, 16, share=0.5).train) == 500


def test_batches_are_windows_of_the_stream_and_reproducible():
    """x and y are consecutive windows shifted by one; the same seed gives the same batches."""
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BatchSampler(tokens, 16, seed=3), BatchSampler(tokens, 16, seed=3)
    x, y = a.sample(4)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.equal(x, b.sample(4)[0])
    state = a.state_dict()
    nxt = a.sample(4)[0]
    a.load_state_dict(state)
    assert torch.equal(a.sample(4)[0], nxt)


def test_eval_windows_are_fixed_and_disjoint():
    """Evaluation windows: non-overlapping, from the start, capped by max_tokens."""
    assert eval_windows(np.zeros(100), 10).tolist() == list(range(0, 90, 10))
    assert eval_windows(np.zeros(100), 10, max_tokens=35).tolist() == [0, 10, 20]


def test_embedded_corpus_is_deterministic_and_heterogeneous(tmp_path, monkeypatch):
    """The same settings give the same shards; users' chains differ; splits differ."""
    u = synthetic.build_user_splits(2, "in", [3000, 3000], 1000, 1000)
    v = synthetic.build_user_splits(2, "in", [3000, 3000], 1000, 1000)
    assert all(np.array_equal(u[i][s], v[i][s]) for i in range(2) for s in ("train", "valid", "test"))
    assert not np.array_equal(u[0]["train"][:100], u[0]["test"][:100])
    c0, c1, shared = synthetic.user_chain(0), synthetic.user_chain(1), synthetic.shared_chain()
    np.testing.assert_allclose(c0.sum(1), 1.0)
    differ = lambda a, b: int((np.abs(a - b).sum(1) > 1e-9).sum())
    assert differ(c0, c1) > 50 and differ(shared, synthetic.public_chain()) > 50
    # the best possible perplexity of a user's text is far below what a model of the public text gets
    assert synthetic.chain_entropy_rate(c0) < 2.0
    monkeypatch.setenv("COMIGS_CACHE_DIR", str(tmp_path))
    d = synthetic.ensure_embedded_dataset(2, "out", [3000, 3000], 1000, 1000)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["scenario"] == "out" and meta["vocab_size"] == 256
    assert synthetic.ensure_embedded_dataset(2, "out", [3000, 3000], 1000, 1000) == d


def _main_before_any_group(monkeypatch, tmp_path, *overrides):
    """main() in this process on the tiny model; forming a process group fails the test."""
    from comigs_dist import dist
    from comigs_dist.main import main
    monkeypatch.setattr(dist, "init_distributed", lambda *a, **k: pytest.fail("a process group was formed"))
    return main(["model.name=tiny", "train.seq_len=16", "log.progress=false", f"out_dir={tmp_path / 'run'}",
                 *overrides])


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        node = meta
        for k in keys[:-1]:
            node = node[k]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("users", 0, "splits", "valid", "sha256", None), "key 'users[0].splits.valid.sha256' is missing"),
    (_set("users", 0, "splits", "test", None), "key 'users[0].splits.test' is missing"),
    (_set("vocab_size", None), "key 'vocab_size' ('missing') must be an integer >= 1"),
    (_set("users", None), "key 'users' (missing) must be a list of users"),
    (_set("users", 0, "splits", "train", "tokens", "many"), "key 'users[0].splits.train.tokens' ('many') must be an "
                                                            "integer >= 0"),
    (_set("users", 0, "splits", "train", "file", "../outside.bin"), "key 'users[0].splits.train.file' "
                                                                    "('../outside.bin') points outside the dataset"),
    (_set("users", 0, "splits", "train", "file", "/etc/hostname"), "key 'users[0].splits.train.file' "
                                                                   "('/etc/hostname') points outside the dataset"),
])
def test_a_malformed_meta_json_stops_the_run_before_any_group_naming_the_key(tmp_path, monkeypatch, capsys, edit,
                                                                             message):
    """A meta.json missing a key, with a key of the wrong type, or with a shard path leaving the
    dataset directory: exit 2 with a DataError naming the file and the key (never a KeyError, never
    a read outside the directory), before any process group and without writing out_dir."""
    write_dataset(tmp_path / "d", _users(1), 100)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    edit(meta)
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    code = _main_before_any_group(monkeypatch, tmp_path, f"data.path={tmp_path / 'd'}")
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'd' / 'meta.json'}: {message}" in err and "prepare the dataset again" in err, err
    assert "KeyError" not in err and not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="meta.json: key"):
        load_user_data(tmp_path / "d", 0, 16)


def test_fewer_users_or_windows_than_the_run_needs_stop_it_before_any_group(tmp_path, monkeypatch, capsys):
    """2 ranks on a dataset of 1 user, or a split shorter than one window: exit 2 naming the dataset,
    both counts and the fix, before any process group forms."""
    write_dataset(tmp_path / "d", _users(1, size=40), 100)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = _main_before_any_group(monkeypatch, tmp_path, f"data.path={tmp_path / 'd'}")
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'd'} holds 1 user(s) but this run has 2 (n_users" in err, err
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = _main_before_any_group(monkeypatch, tmp_path, f"data.path={tmp_path / 'd'}", "train.seq_len=64")
    err = capsys.readouterr().err
    assert code == 2 and "user_00/train.bin holds 40 tokens (meta.json), fewer than one window" in err, err
    assert not (tmp_path / "run").exists()
