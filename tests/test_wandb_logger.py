"""log.wandb: the checks before a run starts, and one user's W&B logger in this process (offline)."""
import json
import sys

import pytest

from comigs_dist.config import ConfigError, load_config


def test_missing_client_or_bad_mode_is_refused_before_the_run_starts(monkeypatch, tmp_path, capsys):
    """With the wandb import failing, log.wandb=online|offline is a configuration error naming the
    key, the value and the fix, and the command stops before any process group or out_dir; a bad
    mode or project name is refused the same way; log.wandb=off needs no client."""
    import torch.distributed as dist

    from comigs_dist.main import main
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    for mode in ("online", "offline"):
        with pytest.raises(ConfigError, match=rf"log\.wandb \({mode}\) needs the wandb client, but the wandb client "
                                              r"is not installed .*; install it with `pip install -e \"\.\[wandb\]\"`"
                                              r" \(or `pip install wandb`\), or set log\.wandb=off"):
            load_config(None, [f"log.wandb={mode}"])
    assert load_config(None, ["log.wandb=off"]).log.wandb == "off"
    assert load_config(None, []).log.wandb == "off"
    assert main(["model.name=tiny", "log.wandb=offline", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "log.wandb (offline) needs the wandb client" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()
    with pytest.raises(ConfigError, match=r"log\.wandb \('sometimes'\) must be one of 'off', 'online', 'offline'"):
        load_config(None, ["log.wandb=sometimes"])
    with pytest.raises(ConfigError, match=r"2 problems(.|\n)*needs the wandb client(.|\n)*log\.wandb_project \('a/b'\) "
                                          r"must be 1 to 128 characters without"):
        load_config(None, ["log.wandb=offline", "log.wandb_project=a/b"])


def _options(tmp_path, resumed: bool):
    from comigs_dist.wandb_logger import options_for
    cfg = load_config(None, ["model.name=tiny", "log.wandb=offline", "method=fedavg"])
    return options_for(cfg, tmp_path / "exp_7", user_idx=3, resumed=resumed)


@pytest.mark.slow
def test_rows_per_step_summary_and_the_run_id_of_a_resume(tmp_path, monkeypatch, capsys):
    """Scalars of one step logged in several calls land in one W&B row; a step lower than one sent
    is reported, not silently lost; the summary is the row with NaN as null; a resumed logger
    continues the stored run id, a fresh start (or an unreadable id file) makes a new one."""
    pytest.importorskip("wandb", reason="the wandb client is not installed (pip install -e \".[dev]\" installs it)")
    from comigs_dist.wandb_logger import WandbLogger, id_file
    from wandb_records import offline_runs, read_run
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    out = tmp_path / "exp_7"

    opts = _options(tmp_path, resumed=False)
    assert (opts.name, opts.group, opts.job_type, opts.config["user"]) == ("user_03", "exp_7", "fedavg", 3)
    logger = WandbLogger(opts)
    logger.scalar("train/loss", 1.25, 1)
    logger.scalars({"train/ce": 1.0, "lr/expert": 0.5}, 1)
    logger.scalar("valid/loss", 2.5, 1)
    logger.scalars({"train/loss": 0.75}, 2)
    logger.scalar("train/ce", 9.0, 1)  # behind the committed step 1 once step 2 began: W&B cannot store it
    logger.summary({"test_ppl": 3.5, "bad": float("nan"), "groups": {"g": [0, 3]}})
    logger.close()
    assert "W&B cannot store train/ce at step 1" in capsys.readouterr().err
    (first,) = offline_runs(out / "wandb")
    run = read_run(first)
    assert run.history == {"train/loss": [(1, 1.25), (2, 0.75)], "train/ce": [(1, 1.0)], "lr/expert": [(1, 0.5)],
                           "valid/loss": [(1, 2.5)]}
    assert run.summary["test_ppl"] == 3.5 and run.summary["bad"] is None and run.summary["groups"] == {"g": [0, 3]}
    assert (run.name, run.group, run.job_type, run.config["method"]) == ("user_03", "exp_7", "fedavg", "fedavg")
    stored = json.loads(id_file(out, 3).read_text())
    assert stored["id"] == run.id and stored["group"] == "exp_7"

    resumed = WandbLogger(_options(tmp_path, resumed=True))
    resumed.scalar("train/loss", 0.5, 3)
    resumed.close()
    fresh = WandbLogger(_options(tmp_path, resumed=False))
    fresh.close()
    ids = [read_run(p).id for p in offline_runs(out / "wandb")]
    assert len(ids) == 3 and ids.count(run.id) == 2
    new_id = next(i for i in ids if i != run.id)
    assert json.loads(id_file(out, 3).read_text())["id"] == new_id
    later = [r for r in map(read_run, offline_runs(out / "wandb")) if r.history.get("train/loss") == [(3, 0.5)]]
    assert [r.id for r in later] == [run.id]  # the resumed attempt's scalars went to the stored run

    id_file(out, 3).write_text("{not json")  # a resume that cannot read the id starts a new run, and says so
    capsys.readouterr()
    WandbLogger(_options(tmp_path, resumed=True)).close()
    assert "cannot be read (JSONDecodeError" in capsys.readouterr().err
    assert json.loads(id_file(out, 3).read_text())["id"] not in ids
