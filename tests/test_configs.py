"""configs/: every YAML loads and validates, opens with the command that runs it, and every row
command it documents is a valid configuration; together they cover every method of the paper."""
import re
import shlex
from pathlib import Path

import pytest

from comigs_dist.config import ConfigError, check_world_size, load_config
from helpers import user_of

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
    from comigs_dist.config import resolve_users
    users = resolve_users(cfg, 4)
    m = get_method("hetlora", cfg, users)
    assert [m.adapter_spec(cfg, u, adapter_spec_for(cfg, users[u], False)).rank for u in range(4)] == [32, 16, 16, 16]


# --------------------------------------------------------------------------------------------
# user order: every per-user list means what the paper's row says, on the dataset prepare writes
# --------------------------------------------------------------------------------------------

SHARED_DATA = ROOT.parent / "shared" / "data"
# the paper's users in order: section 4.1.1 (German, Dutch, French, Italian; StackExchange, GitHub
# codes, ArXiv, Book; World, Sports, Business, Sci/Tech), and section 4.3.2 (German and Dutch, the
# low-data users, first)
PAPER_USERS = {"multilingual": ["de", "nl", "fr", "it"], "slimpajama": ["stackexchange", "github", "arxiv", "book"],
               "agnews": ["world", "sports", "business", "scitech"]}
SOURCES = {"multilingual": SHARED_DATA / "multilingual", "slimpajama": SHARED_DATA / "domains",
           "agnews": SHARED_DATA / "ag_news"}


def _dataset_of(path: Path, overrides: list[str]) -> str | None:
    """The paper dataset a config runs on: the last component of its data.path (file or override),
    data/<dataset> or data/<scale>/<dataset>; None for the embedded corpus or other data."""
    import yaml
    data_path = (yaml.safe_load(path.read_text()).get("data") or {}).get("path", "embedded")
    data_path = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("data.path=")), data_path)
    name = Path(data_path).name.split("-")[0]  # data/slimpajama-lowdata: the SlimPajama users
    return name if name in PAPER_USERS else None


def _per_user_lists(cfg) -> dict:
    from comigs_dist.config import PER_USER_KEYS, get_dotted
    return {k: v for k in PER_USER_KEYS if k != "data.categories" and isinstance(v := get_dotted(cfg, k), list)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each dataset as `python -m comigs_dist.data prepare` writes it from ../shared/data (tiny budgets)."""
    from comigs_dist.data.prepare import prepare_dataset
    root = tmp_path_factory.mktemp("prepared")
    return {ds: prepare_dataset(ds, root / ds, source=[src], train_tokens=600, valid_tokens=200, test_tokens=200,
                                seq_len=32, fit="scale" if ds == "agnews" else "error")
            for ds, src in SOURCES.items()}


@pytest.mark.parametrize("path", [p for p in YAMLS if p.parent.name != "llama32_1b"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_config_user_lists_follow_the_prepared_datasets_user_order(path, prepared, monkeypatch):
    """A config on a prepared dataset names its users' categories (data.categories) in the order the
    prepared dataset holds them (meta.json), which is the paper's; its per-user lists have one entry
    per user; and a run on a dataset in another order is refused before anything starts."""
    from comigs_dist.data import DataError, check_categories
    monkeypatch.chdir(ROOT)
    for nproc, _, overrides in _commands(path):
        cfg = load_config(path, overrides + ["data.path=embedded"])
        dataset = _dataset_of(path, overrides)
        lists = _per_user_lists(cfg)
        if dataset is None:  # the embedded corpus: no categories to check against
            assert not cfg.data.categories and not lists, path
            continue
        assert cfg.data.categories, f"{path} runs on data/{dataset} but does not name its users (data.categories)"
        meta = prepared[dataset]
        assert [u["category"] for u in meta["users"]] == cfg.data.categories == PAPER_USERS[dataset]
        check_categories(cfg.data.categories, meta, str(path))  # what a run checks before it starts
        for key, values in lists.items():
            assert len(values) == len(cfg.data.categories) == nproc, (path, key)
        shuffled = dict(meta, users=[meta["users"][i] for i in (1, 0, 2, 3)])
        with pytest.raises(DataError, match=r"data.categories \(.*\) does not match .*: the config's per-user lists"):
            check_categories(cfg.data.categories, shuffled, "the dataset")


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/*/table2_*.yaml"))
                         + sorted(ROOT.glob("configs/*/table5_hetero.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_expert_lists_put_the_papers_counts_on_the_papers_users(path, monkeypatch):
    """Table 2 / 5 (hetero) rows name expert counts in the paper's user order, e.g. multilingual
    (2,2,4,4): German and Dutch 2 experts, French and Italian 4; the config's list, read through
    its data.categories, gives each language exactly that."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(path, ["data.path=embedded"])
    dataset = path.parent.name
    digits = re.search(r"table2_(\d{4})", path.name)
    if digits:
        row = [int(c) for c in digits.group(1)]
    else:  # Table 5 (hetero) reports the Table 2 setting that starts with 2 experts
        row = {"agnews": [2, 4, 4, 4], "multilingual": [2, 2, 4, 4], "slimpajama": [2, 4, 4, 2]}[dataset]
    assert dict(zip(cfg.data.categories, cfg.moe.n_experts)) == dict(zip(PAPER_USERS[dataset], row))


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/data_quantity/*.yaml"))
                         + [ROOT / "configs/sensitivity/tau_s.yaml"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_figure_configs_carry_the_paper_hyper_parameters(path, monkeypatch):
    """The data-quantity (Figures 4-6, 11-13) and tau/s (Figure 7) configs run the paper's settings
    (appendix B), 50 rounds on SlimPajama; the data-quantity ones evaluate after every round (the
    figures are curves) with one generalist and per-user expert counts; every documented line is a
    different configuration."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(path, ["data.path=embedded"])
    t = cfg.train
    assert cfg.model.name == "gpt2" and cfg.n_users == 4 and cfg.seed == 42
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.moe.lb_weight, t.lr, t.batch_size, t.micro_batch_size) == \
        (8, 16.0, 0.01, 2e-3, 64, 8)
    assert (t.local_steps, t.router_every, t.router_steps) == (10, 30, 10)
    assert t.rounds == (50 if "slimpajama" in path.read_text().split("path: data/")[1].split()[0] else 20)
    rows = [tuple(o) for _, _, o in _commands(path)][1:]  # the first command is the file's own
    assert len(rows) == len(set(rows)) >= 9
    if path.parent.name == "data_quantity":
        assert cfg.method == "comigs_1gxs" and cfg.eval.every == 1 and user_of(cfg, 0).n_generalists == 1
        counts = {load_config(path, list(o) + ["data.path=embedded"]).moe.n_experts[0] for o in rows}
        assert counts == {1, 2, 4, 8}
