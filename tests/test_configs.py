"""configs/: every YAML loads and validates, opens with the command that runs it, and every row
command it documents is a valid configuration; together they cover every method of the paper."""
import re
import shlex
from pathlib import Path

import pytest

from comigs_dist.config import ConfigError, check_world_size, load_config

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(ROOT.glob("configs/**/*.yaml"))
PAPER = [p for p in YAMLS if p.parent.name in ("agnews", "multilingual", "slimpajama")]


def _commands(path: Path) -> list[tuple[int, str, list[str]]]:
    """(nproc, config path, overrides) of every command in the file's comment header."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.search(r"torchrun --nproc_per_node=(\d+) -m comigs_dist\.main --config (\S+)(.*)$", line)
        if m:
            out.append((int(m.group(1)), m.group(2), shlex.split(m.group(3))))
    return out


def test_there_is_a_config_per_row_group_and_dataset():
    """Tables 1/4 (four groups), 2 (two settings) and 5 (homo, hetero) for each of the three datasets."""
    assert len(PAPER) == 3 * 8
    for ds in ("agnews", "multilingual", "slimpajama"):
        names = {p.stem for p in PAPER if p.parent.name == ds}
        assert {"table4_i_no_routing", "table4_ii_joint", "table4_iii_alternating_train",
                "table4_iv_alternating_valid", "table5_homo", "table5_hetero"} <= names
        assert len([n for n in names if n.startswith("table2_")]) == 2


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads_and_every_documented_row_validates(path, monkeypatch):
    """The file opens with its own command; each row command is a valid config for its process count
    (data.path is pointed at the embedded corpus: the real datasets are prepared by the user)."""
    monkeypatch.chdir(ROOT)
    rel = str(path.relative_to(ROOT))
    first = path.read_text().splitlines()[0]
    assert first.startswith("# torchrun") and first.endswith(f"--config {rel}"), first
    commands = _commands(path)
    assert commands
    for nproc, config, overrides in commands:
        assert config == rel
        cfg = load_config(config, overrides + ["data.path=embedded"])
        check_world_size(cfg, nproc)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(ROOT)))
def test_paper_configs_carry_the_paper_hyper_parameters(path, monkeypatch):
    """Appendix B: GPT-2, rank 8 / alpha 16, lr 2e-3, batch 64 of 128 tokens in micro-batches of 8,
    10 local steps, 20 rounds (50 on SlimPajama), router every 30 steps for 10; the data path is the
    prepared dataset, and a missing dataset is still reported to the user."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(path, ["data.path=embedded"])
    t = cfg.train
    assert cfg.model.name == "gpt2" and cfg.n_users == 4 and cfg.seed == 42
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.attn_rank, cfg.moe.lb_weight) == (8, 16.0, 8, 0.01)
    assert (t.lr, t.router_lr, t.batch_size, t.micro_batch_size, t.seq_len) == (2e-3, 2e-3, 64, 8, 128)
    assert (t.local_steps, t.router_every, t.router_steps, t.weight_decay, t.min_lr_ratio) == (10, 30, 10, 0.01, 0.1)
    assert t.rounds == (50 if path.parent.name == "slimpajama" else 20)
    data_path = f"data/{path.parent.name}"
    assert f"path: {data_path}" in path.read_text()
    if not (ROOT / data_path).exists():
        with pytest.raises(ConfigError, match=rf"data.path \({data_path}\) does not exist; prepare it"):
            load_config(path)


def test_the_configs_cover_every_method_and_table2_matching():
    """Every one of the 18 methods appears in a row command; Table 2 rows give the caption's ranks."""
    from comigs_dist.methods import get_method
    from comigs_dist.model import adapter_spec_for
    methods = set()
    for path in PAPER:
        for _, _, overrides in _commands(path):
            methods |= {o.split("=", 1)[1] for o in overrides if o.startswith("method=")}
    from test_methods import PAPER_METHODS
    assert PAPER_METHODS <= methods
    cfg = load_config(ROOT / "configs/agnews/table2_4222.yaml",
                      ["data.path=embedded", "method=hetlora", "method_options.match=full"])
    m = get_method("hetlora", cfg)
    assert [m.adapter_spec(cfg, u, adapter_spec_for(cfg, u, False)).rank for u in range(4)] == [32, 16, 16, 16]
