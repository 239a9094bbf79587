"""The frozen base held once per host: one read-only file mapped by every rank, cleaned up."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from comigs_dist.model import shared_base as sb
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


class Tied(nn.Module):
    """Two projections sharing one weight (like GPT-2's wte and lm_head) and a buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.arange(3.0), persistent=False)


def _tied_private():
    torch.manual_seed(0)
    return Tied()


def _tied_skeleton():
    with torch.device("meta"):
        return Tied()


def _plan(root: Path, token: str, n_local: int = 1, required: bool = True) -> sb.SharePlan:
    return sb.SharePlan(token=token, n_local=n_local, timeout_s=30.0, required=required, root=root)


def test_auto_shares_only_with_several_cpu_ranks_on_a_host():
    """'auto' = several local ranks on CPU; 'true' and 'false' are obeyed everywhere."""
    assert sb.should_share("auto", 4, "cpu") and not sb.should_share("auto", 1, "cpu")
    assert not sb.should_share("auto", 4, "cuda")
    assert sb.should_share("true", 1, "cuda") and not sb.should_share("false", 8, "cpu")


def test_tensor_file_round_trip_is_exact_and_mapped_read_only(tmp_path):
    """Every dtype and shape comes back bit for bit, as views of one read-only shared mapping."""
    tensors = {"w": torch.randn(5, 7), "h": torch.randn(3, 3).to(torch.bfloat16), "i": torch.arange(11),
               "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    size = sb.write_tensor_file(tmp_path / "f.bin", tensors)
    assert size == (tmp_path / "f.bin").stat().st_size and size % sb.ALIGN == 0
    mapped = sb.map_tensor_file(tmp_path / "f.bin")
    assert mapped.inode == (tmp_path / "f.bin").stat().st_ino
    for name, t in tensors.items():
        assert mapped.tensors[name].dtype == t.dtype and torch.equal(mapped.tensors[name], t), name
    where = sb.mapping_of(mapped.tensors["w"])
    assert where["perms"].startswith("r-") and where["perms"][3] == "s" and where["inode"] == mapped.inode
    assert sb.mapping_of(mapped.tensors["i"])["inode"] == mapped.inode  # one mapping for all


def test_load_shared_keeps_ties_and_copies_buffers(tmp_path):
    """Tied weights stay one parameter over the mapping; buffers are private copies; values equal."""
    model = sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(tmp_path, "t1"))
    ref = _tied_private()
    assert model.b.weight is model.a.weight and not model.a.weight.requires_grad
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    assert torch.equal(model.scale, ref.scale) and sb.mapping_of(model.scale) is None
    assert sb.mapping_of(model.a.bias)["inode"] == model.shared_base.inode
    # the only local rank has mapped it: the name is gone, the mapping lives on
    assert not model.shared_base.path.exists()
    x = torch.randn(2, 8)
    assert torch.equal(model.b(model.a(x)), ref.b(ref.a(x)))


def test_the_shared_base_directory_is_private_or_refused(tmp_path, monkeypatch):
    """A new root is made 0700 even under a lax umask; an existing one with another mode, a symlink, or
    one of another user is refused with an error naming it and the fixes (share_base=auto too)."""
    old = os.umask(0)
    try:
        sb.check_private_root(tmp_path / "fresh" / "root")
    finally:
        os.umask(old)
    assert (tmp_path / "fresh" / "root").stat().st_mode & 0o777 == 0o700
    lax = tmp_path / "lax"
    lax.mkdir()
    lax.chmod(0o755)
    for required in (True, False):
        with pytest.raises(ValueError, match=rf"shared-base directory {lax} has mode 0755, not 0700.*COMIGS_SHM_DIR"):
            sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(lax, "t0", required=required))
    assert list(lax.iterdir()) == []
    (tmp_path / "link").symlink_to(tmp_path / "fresh" / "root")
    with pytest.raises(ValueError, match=r"link is not a directory \(a symlink or a file\)"):
        sb.check_private_root(tmp_path / "link")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    uid = os.getuid()
    monkeypatch.setattr(sb.os, "getuid", lambda: uid + 1)
    with pytest.raises(ValueError, match=rf"{theirs} belongs to uid {uid}, not to this user \(uid {uid + 1}\)"):
        sb.check_private_root(theirs)


def test_a_full_directory_is_an_error_with_true_and_a_private_copy_with_auto(tmp_path, monkeypatch):
    """Too little space, or a failed write: share_base=true names the fix, auto warns and keeps a
    private base."""
    monkeypatch.setattr(sb, "_free_bytes", lambda path: 0)
    with pytest.raises(ValueError, match=r"COMIGS_SHM_DIR.*model.share_base=false"):
        sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(tmp_path, "t2"))
    with pytest.warns(UserWarning, match="private copy"):
        model = sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(tmp_path, "t3", required=False))
    assert not hasattr(model, "shared_base") and sb.mapping_of(model.a.weight) is None
    monkeypatch.setattr(sb, "_free_bytes", lambda path: 1 << 40)

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sb, "write_tensor_file", full)  # the space went while writing
    with pytest.raises(ValueError, match=r"could not write.*No space left.*model.share_base=false"):
        sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(tmp_path, "t4"))
    with pytest.warns(UserWarning, match="private copy"):
        model = sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(tmp_path, "t5", required=False))
    assert torch.equal(model.a.weight, _tied_private().a.weight) and not model.training


def _two_rank_worker(rank, world_size, tmp_path):
    from comigs_dist import dist
    from comigs_dist.model import build_base_model
    topo = init_topology()
    plan = sb.plan_sharing("auto", 30.0, topo)  # two CPU ranks on one host: on
    assert (plan is not None and plan.n_local == 2
            and plan.root == tmp_path / "shm" / f"comigs-shared-base-{os.getuid()}")
    for name in ("tiny", "llama-tiny", "embedded"):
        model = build_base_model(name, 256, 32, plan)
        info = model.shared_base
        # both ranks map the same file (same inode), read-only and shared, and exactly one wrote it
        seen = dist.all_gather_objects(topo, (info.inode, info.device, info.wrote, str(info.path)))
        assert len({s[:2] for s in seen}) == 1 and sum(s[2] for s in seen) == 1, seen
        for pname, p in model.named_parameters():
            where = sb.mapping_of(p)
            assert where is not None and where["inode"] == info.inode and where["perms"][:2] == "r-", (pname, where)
        private = build_base_model(name, 256, 32)
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in private.named_parameters()]
        for (n, p), (_, q) in zip(model.state_dict().items(), private.state_dict().items()):
            assert torch.equal(p, q), (name, n)
        for (n, b), (_, c) in zip(model.named_buffers(), private.named_buffers()):
            assert torch.equal(b, c), (name, n)
        if name != "llama-tiny":
            assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2's tie survives
        x = torch.randint(0, 256, (2, 16))
        assert torch.equal(model(input_ids=x).logits, private(input_ids=x).logits), name
        dist.barrier(topo)
        assert not info.path.exists()  # every local rank mapped it: the name was removed
    (tmp_path / f"run_dir_{rank}").write_text(str(info.path.parent))


@pytest.mark.slow
def test_two_ranks_map_one_file_equal_to_a_private_load_and_remove_it_at_exit(tmp_path, monkeypatch):
    """Built-in GPT-2, Llama and the pretrained embedded base: one inode on both ranks, read-only,
    equal to a private load (ties and buffers included); nothing left once the ranks exit."""
    monkeypatch.setenv(sb.SHM_DIR_ENV, str(tmp_path / "shm"))
    run_on_ranks(_two_rank_worker, 2, tmp_path)
    run_dirs = {Path((tmp_path / f"run_dir_{r}").read_text()) for r in range(2)}
    assert len(run_dirs) == 1
    root = next(iter(run_dirs)).parent
    assert root.is_dir() and not list(root.glob("run-*"))


def _identical_worker(rank, world_size, tmp_path):
    from comigs_dist import train
    calls = []
    real = sb.load_shared

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        calls.append(model.shared_base)
        return model
    sb.load_shared = spy
    rows, params = {}, {}
    for share in ("true", "false"):
        torch.manual_seed(7)
        cfg = tiny_config(**{"model.share_base": share, "checkpoint.final": True, "eval.every": 1,
                             "out_dir": str(tmp_path / share)})
        cfg.n_users = world_size
        [rows[share]] = train.run(cfg, init_topology(), tmp_path / share)
        params[share] = torch.load(tmp_path / share / "checkpoints" / f"user_{rank:02d}" / "final.pt",
                                   weights_only=True)["params"]
    assert len(calls) == 1  # the shared run mapped its base, the other did not
    for key in ("test_ppl", "base_test_ppl", "final_train_loss", "routing", "test_curve", "bytes_sent"):
        assert rows["true"][key] == rows["false"][key], key
    assert params["true"].keys() == params["false"].keys()
    for name in params["true"]:
        assert torch.equal(params["true"][name], params["false"][name]), name


@pytest.mark.slow
def test_training_is_bit_identical_with_and_without_sharing(tmp_path, monkeypatch):
    """Two users, two rounds: metrics and every trained parameter equal bit for bit."""
    monkeypatch.setenv(sb.SHM_DIR_ENV, str(tmp_path / "shm"))
    run_on_ranks(_identical_worker, 2, tmp_path)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[3])
    from test_shared_base import Tied, _plan, _tied_private, _tied_skeleton
    from comigs_dist.model.shared_base import load_shared
    model = load_shared({"name": "tied"}, _tied_private, _tied_skeleton,
                        _plan(Path(sys.argv[1]), sys.argv[2], n_local=2))
    print(model.shared_base.path, flush=True)
    sys.stdin.readline()
    with torch.no_grad():
        model.a.weight.add_(1.0)  # a write to a frozen, shared weight
    print("written", flush=True)
""")


def _start_child(root: Path, token: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), token, str(Path(__file__).parent)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return child, Path(child.stdout.readline().strip())


def test_a_write_to_a_frozen_weight_faults_and_killed_runs_are_swept_at_restart(tmp_path):
    """The write kills its process (the page is read-only) and never reaches the file; the files of
    a crashed and of a SIGKILLed run stay until the next run starts, which removes them."""
    root = tmp_path / "shm"
    writer, path_w = _start_child(root, "crashed")
    killed, path_k = _start_child(root, "killed")
    writer.stdin.write("go\n")
    writer.stdin.flush()
    assert writer.wait(60) in (-signal.SIGSEGV, -signal.SIGBUS) and "written" not in writer.stdout.read()
    killed.kill()
    assert killed.wait(60) == -signal.SIGKILL
    # neither reached its second local rank, so both files are still there
    assert path_w.exists() and path_k.exists()
    untouched = sb.map_tensor_file(path_w).tensors
    ref = _tied_private()
    assert torch.equal(untouched["a.weight"], ref.a.weight) and torch.equal(untouched["a.bias"], ref.a.bias)
    del untouched
    # a run whose owner is alive is never swept
    live = root / "run-live"
    (live / "pids").mkdir(parents=True)
    (live / "pids" / str(os.getpid())).write_text(sb._start_time(os.getpid()))
    # the restart: the stale directories go, the live one stays, the new run maps its own file
    model = sb.load_shared({"name": "tied"}, _tied_private, _tied_skeleton, _plan(root, "restart"))
    assert not path_w.parent.exists() and not path_k.parent.exists() and live.is_dir()
    assert model.shared_base.path.parent == root / "run-restart"
    # at exit the last rank out removes its run directory
    sb._release(root, root / "run-restart", os.getpid())
    assert not (root / "run-restart").exists()
