"""Configuration: YAML + overrides, types, and every validation error before any process group."""
import subprocess
import sys

import pytest
import torch.distributed as dist

from comigs_dist.config import (ConfigError, RunConfig, check_world_size, describe_options, load_config,
                                resolve_users, validate)
from comigs_dist.main import main


def test_defaults_are_the_embedded_comigs_run():
    """No arguments: CoMiGS-1G1S on the embedded corpus with the paper's schedule."""
    cfg = load_config()
    assert cfg.method == "comigs_1g1s" and cfg.data.path == "embedded" and cfg.model.name == "embedded"
    assert (cfg.train.rounds, cfg.train.local_steps, cfg.train.router_every, cfg.train.router_steps) == (20, 10, 30, 10)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.moe.lb_weight, cfg.train.lr) == (8, 16.0, 0.01, 5e-3)


def test_yaml_then_overrides(tmp_path):
    """Overrides win over the file; values are coerced to the declared types."""
    f = tmp_path / "c.yaml"
    f.write_text("method: local\ntrain:\n  rounds: 3\n  lr: 1e-3\nmoe:\n  n_experts: [2, 3]\n")
    cfg = load_config(f, ["train.rounds=5", "seed=7", "comm.mode=all2all", "train.lr=5e-4", "moe.top_k=null"])
    assert cfg.method == "local" and cfg.train.rounds == 5 and cfg.seed == 7 and cfg.comm.mode == "all2all"
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    users = resolve_users(cfg, 2)
    assert cfg.moe.n_experts == [2, 3] and users[1].n_experts == 3 and users[0].top_k == 2
    assert resolve_users(load_config(None, ["moe.n_experts=1"]), 1)[0].top_k == 1


@pytest.mark.parametrize("overrides,message", [
    (["train.roundz=3"], r"unknown key 'train.roundz'; did you mean 'rounds'"),
    (["bogus=1"], r"unknown key 'bogus'"),
    (["train.rounds=many"], r"train.rounds \('many'\) must be an integer"),
    (["train.lr=-1"], r"train.lr \(-1.0\) must be > 0"),
    (["comm.mode=p2p"], r"comm.mode \('p2p'\) must be one of 'server', 'all2all'"),
    (["moe.top_k=3"], r"moe.top_k \(3\) must be <= moe.n_experts \(2\)"),
    (["moe.n_experts=[2, 4]", "moe.top_k=3"], r"moe.top_k \(3\) must be <= moe.n_experts \(2\) for user 0"),
    (["moe.n_experts=[2, 2]", "lora.rank=[8, 8, 8]"], r"per-user lists have different lengths"),
    (["n_users=3", "moe.n_experts=[2, 2]"], r"moe.n_experts has 2 entries but n_users is 3"),
    (["method=nope"], r"method \('nope'\) is not a known method; choose one of: .*comigs_1g1s"),
    (["data.path=/does/not/exist"], r"data.path \(/does/not/exist\) does not exist"),
    (["train.batch_size=10", "train.micro_batch_size=4"], r"micro_batch_size \(4\) must divide"),
    (["data.share=1.5"], r"data.share \(1.5\) must be in \(0, 1\]"),
    (["train.loss_chunk=-1"], r"train.loss_chunk \(-1\) must be >= 0"),
])
def test_each_validation_error_names_key_and_fix(overrides, message):
    """Every rejected value produces a ConfigError naming the key, and no process group exists."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert not dist.is_initialized()


def test_all_problems_reported_together():
    """Several bad values: one error listing all of them."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.lr=-1", "train.rounds=0", "moe.top_k=5"])
    text = str(exc.value)
    assert "3 problems" in text and "train.lr" in text and "train.rounds" in text and "moe.top_k" in text


def test_users_must_cover_every_rank():
    """Fewer users than ranks is refused before any group exists; more users are spread over the
    ranks; n_users defaults to the world size."""
    cfg = load_config(None, ["n_users=2"])
    with pytest.raises(ConfigError, match=r"n_users \(2\) is smaller than the number of ranks \(4\)"):
        check_world_size(cfg, 4)
    cfg = load_config(None, ["moe.n_experts=[1, 2, 4]"])
    with pytest.raises(ConfigError, match=r"n_users \(3\) is smaller than the number of ranks \(4\)"):
        check_world_size(cfg, 4)
    check_world_size(cfg, 2)  # 3 users on 2 ranks
    assert cfg.n_users is None or cfg.n_users == 3
    cfg = load_config()
    check_world_size(cfg, 3)
    assert cfg.n_users == 3
    assert not dist.is_initialized()


def test_main_reports_config_errors_with_exit_code_2(capsys):
    """The CLI prints the message and exits 2 without starting anything."""
    assert main(["train.rounds=0", "moe.top_k=9"]) == 2
    err = capsys.readouterr().err
    assert "train.rounds (0) must be > 0" in err and "moe.top_k (9)" in err
    assert main(["--config", "/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--frobnicate"]) == 2
    assert not dist.is_initialized()


def test_help_lists_every_option_with_its_default():
    """--help shows each dotted key, its default and its help text."""
    out = subprocess.run([sys.executable, "-m", "comigs_dist.main", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key, default, _ in describe_options():
        assert f"{key}={default}" in out
    for key in ("train.router_every=30", "train.router_steps=10", "comm.mode=server", "model.name=embedded",
                "data.path=embedded", "out_dir=null", "method=comigs_1g1s"):
        assert key in out


def test_config_round_trips_through_yaml(tmp_path):
    """The resolved config written by a run loads back to the same values."""
    from comigs_dist.config import to_yaml
    cfg = load_config(None, ["moe.n_experts=[1, 3]", "train.rounds=4"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f).to_dict() == cfg.to_dict()
    assert validate(RunConfig()).to_dict() == load_config().to_dict()


def test_yaml_boolean_words_are_read_as_choices(tmp_path):
    """`train.amp=off` (a YAML boolean) selects the 'off' choice, in a file and on the command line."""
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  amp: off\nmodel:\n  share_base: true\n")
    cfg = load_config(f)
    assert cfg.train.amp == "off" and cfg.model.share_base == "true"
    with pytest.raises(ConfigError, match=r"model.dtype \(bf16\) needs bf16 autocast"):
        load_config(f, ["model.dtype=bf16"])


@pytest.mark.parametrize("overrides,message", [
    # once clamped silently to the user's count (comigs_1gxs then shared user 1's every expert)
    (["method=comigs_1gxs", "moe.n_experts=[3, 1]", "moe.n_generalists=2"],
     r"moe.n_generalists \(2\) must be <= moe.n_experts \(1\) for user 1: a user cannot share more experts"),
    (["moe.n_experts=2", "moe.n_generalists=3", "method=comigs_2g"], r"moe.n_generalists \(3\) must be <= "
                                                                     r"moe.n_experts \(2\)"),
    (["eval.max_tokens=100", "train.seq_len=128"],
     r"eval.max_tokens \(100\) is below one evaluation window of train.seq_len \(128\).*at least 128"),
    (["train.amp=fp16"], r"train.amp \(fp16\) is refused: fp16 gradients need loss scaling .* train.amp=bf16"),
])
def test_inputs_once_accepted_silently_are_refused_before_any_group(overrides, message):
    """A generalist count above a user's experts, an evaluation cap below one window and fp16
    without loss scaling are configuration errors naming the key, the value and the fix."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_method_set_generalist_counts_and_edge_values_stay_valid():
    """Methods that set their own generalists (comigs_2g, local) accept the default value; a cap of
    exactly one window, and 0 (the whole split), are valid."""
    from comigs_dist.model import adapter_spec_for
    from comigs_dist.methods import get_method
    cfg = load_config(None, ["method=comigs_2g", "moe.n_experts=3"])
    user = resolve_users(cfg, 1)[0]
    assert get_method("comigs_2g", cfg).adapter_spec(cfg, 0, adapter_spec_for(cfg, user, True)).n_generalists == 3
    assert load_config(None, ["eval.max_tokens=128", "train.seq_len=128"]).eval.max_tokens == 128
    assert load_config(None, ["eval.max_tokens=0", "train.seq_len=128"]).eval.max_tokens == 0
    assert resolve_users(load_config(None, ["method=comigs_1gxs", "moe.n_experts=[3, 1]"]), 2)[1].n_generalists == 1


# --------------------------------------------------------------------------------------------
# per-user values, resolved once
# --------------------------------------------------------------------------------------------

def test_resolve_users_reads_every_per_user_list():
    """Per-user lists give each user its own entry; top_k defaults to min(2, n_i) per user."""
    from comigs_dist.config import UserSpec
    cfg = load_config(None, ["moe.n_experts=[4, 2, 1]", "moe.n_generalists=[2, 1, 0]", "lora.rank=[8, 16, 4]",
                             "data.train_tokens=[1000, 2000, 3000]", "data.share=[1.0, 0.5, 0.25]",
                             "data.categories=[de, nl, fr]"])
    assert resolve_users(cfg, 3) == [
        UserSpec(user_idx=0, n_experts=4, n_generalists=2, top_k=2, lora_rank=8, train_tokens=1000, share=1.0,
                 category="de"),
        UserSpec(user_idx=1, n_experts=2, n_generalists=1, top_k=2, lora_rank=16, train_tokens=2000, share=0.5,
                 category="nl"),
        UserSpec(user_idx=2, n_experts=1, n_generalists=0, top_k=1, lora_rank=4, train_tokens=3000, share=0.25,
                 category="fr")]


def test_resolve_users_repeats_scalars_and_leaves_categories_unset():
    """One value is everyone's; an explicit moe.top_k applies to every user; no categories -> None."""
    import dataclasses
    cfg = load_config(None, ["moe.n_experts=3", "moe.top_k=1", "lora.rank=4", "data.share=0.5", "n_users=2"])
    users = resolve_users(cfg, 2)
    assert [u.user_idx for u in users] == [0, 1]
    for u in users:
        assert (u.n_experts, u.n_generalists, u.top_k, u.lora_rank, u.train_tokens, u.share, u.category) == \
            (3, 1, 1, 4, 4000, 0.5, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        users[0].share = 1.0


def test_resolve_users_refuses_lists_of_another_length_and_keeps_generalists_as_given():
    """A list that does not hold one entry per user is named; n_generalists is the configured value
    (comigs_2g makes every expert a generalist in its adapter_spec, not here)."""
    from comigs_dist.methods import get_method
    from comigs_dist.model import adapter_spec_for
    cfg = load_config(None, ["moe.n_experts=[2, 3, 2]"])
    with pytest.raises(ConfigError, match=r"moe.n_experts has 3 entries but the run has 2 users"):
        resolve_users(cfg, 2)
    cfg = load_config(None, ["method=comigs_2g", "moe.n_experts=3"])
    (user,) = resolve_users(cfg, 1)
    assert user.n_generalists == 1
    assert get_method("comigs_2g", cfg).adapter_spec(cfg, 0, adapter_spec_for(cfg, user, True)).n_generalists == 3


def test_a_hand_built_config_is_checked_only_by_validate():
    """RunConfig is plain data (building it imports no method and checks nothing); validate()
    reports every problem and resolves the method's options, as load_config does."""
    from comigs_dist.config import TrainConfig
    cfg = RunConfig(train=TrainConfig(lr=-1.0, rounds=0))
    assert cfg.method_options == {}
    with pytest.raises(ConfigError, match=r"2 problems") as exc:
        validate(cfg)
    assert "train.lr (-1.0) must be > 0" in str(exc.value) and "train.rounds (0) must be > 0" in str(exc.value)
    assert validate(RunConfig()).method_options == {"reference_quirks": False}


def test_a_model_name_written_as_a_missing_local_directory_is_refused_before_anything_starts(tmp_path, monkeypatch,
                                                                                           capsys):
    """model.name=models/small-gpt2 before the base is built (the CPU configs' base) was taken for a
    hub name: every rank failed on a download with a traceback and left an empty run directory. A
    name written as a local path that holds no model is refused naming the fix, by comigs_dist.main
    before any process group or directory, and by launch.submit before anything is submitted; hub
    names and the built-in models pass (whether a hub name downloads is the network's business)."""
    from comigs_dist.config.validation import local_model_problem
    from comigs_dist.main import main
    from launch.submit import plan_jobs
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "openai-community/gpt2", "meta-llama/Llama-3.2-1B", "tiny", "embedded"):
        assert local_model_problem(name) is None, name
    (tmp_path / "models" / "empty").mkdir(parents=True)
    (tmp_path / "models" / "built").mkdir()
    (tmp_path / "models" / "built" / "config.json").write_text("{}")
    assert local_model_problem("models/built") is None and local_model_problem(str(tmp_path / "models/built")) is None
    assert "holds no config.json" in local_model_problem("models/empty")
    for name in ("models/small-gpt2", "./base", "../elsewhere/base", str(tmp_path / "nope"), "a/b/c"):
        problem = local_model_problem(name)
        assert problem.startswith(f"model.name ({name}) is a local directory that does not exist"), problem
        assert "--scale cpu --prepare" in problem and f"--out {name}" in problem, problem
    assert main(["model.name=models/small-gpt2", "n_users=1"]) == 2
    err = capsys.readouterr().err
    assert "error: model.name (models/small-gpt2) is a local directory that does not exist" in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=r"(?s)nothing was submitted.*model.name \(models/small-gpt2\) is a local"):
        plan_jobs(["model.name=models/small-gpt2"], [], tmp_path / "sweep")


def test_unknown_keys_wrong_types_and_broken_rules_are_reported_in_one_error():
    """configuration.md promises every problem together: an unknown key and a wrong type once hid
    the rules between values until they were fixed, one error message at a time."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["foo.bar=1", "train.lr=abc", "moe.top_k=5", "train.amp=fp16", "eval.max_tokens=1"])
    text = str(caught.value)
    assert "(5 problems)" in text, text
    for part in ("unknown key 'foo'", "train.lr ('abc') must be a number", "moe.top_k (5) must be <=",
                 "train.amp (fp16) is refused", "eval.max_tokens (1) is below one evaluation window"):
        assert part in text, (part, text)
    # a rule judged on the default that stands in for a value that did not parse is not reported
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["moe.n_experts=[8,x]", "moe.top_k=4"])
    assert "moe.n_experts[1] ('x') must be an integer" in str(caught.value), str(caught.value)
    assert "moe.top_k (4) must be <=" not in str(caught.value), str(caught.value)
    # an unknown key names no option: a rule about an option of the same last name still speaks
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["rounds=5", "method=comigs_learned", "method_options.warmup_rounds=50"])
    assert "unknown key 'rounds'" in str(caught.value) and "warmup_rounds (50)" in str(caught.value), str(caught.value)
