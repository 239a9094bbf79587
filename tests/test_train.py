"""Algorithm 1 on real process groups (gloo, several processes, the tiny GPT-2)."""
import pytest
import torch
import torch.distributed as tdist

from comigs_dist import dist
from comigs_dist.config import check_world_size
from comigs_dist.model.roles import Role
from comigs_dist.train import build_rank, expert_step, router_steps, run, sync
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config


def _snapshot(model, role=None, kind=None):
    return {n: p.detach().clone() for n, p in model.report.params.items()
            if (role is None or model.report.tags[n].role == role)
               and (kind is None or model.report.tags[n].kind == kind)}


def _gather(tensors: dict) -> list[dict]:
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, {k: v.clone() for k, v in tensors.items()})
    return out


def _round_worker(rank, world_size, tmp_path, mode):
    cfg = tiny_config(**{"comm.mode": mode})
    check_world_size(cfg, world_size)
    topo = init_topology()
    rank_run = build_rank(cfg, topo)
    r = rank_run.users[0]
    for _ in range(2):  # local steps on each user's own data: every parameter now differs
        expert_step(rank_run, rank_run.users)
        router_steps(rank_run, r, 0)
    # the group's parameters live in one buffer (dist.pack_flat), which the sync reduces in place,
    # and the optimiser's steps above kept them there
    packed = dist.packed_buffer([p for _, p in r.shared["generalists"]])
    assert packed is not None and packed.numel() == sum(p.numel() for _, p in r.shared["generalists"])
    gen_before = _gather(_snapshot(r.model, Role.GENERALIST))
    local_before = _snapshot(r.model, Role.SPECIALIST) | _snapshot(r.model, Role.ROUTER)

    sync(rank_run, 1)  # what opens round 2: the mean of what the users hold

    gen_after = _gather(_snapshot(r.model, Role.GENERALIST))
    for name in gen_before[0]:
        expected = sum(g[name] for g in gen_before) / world_size
        for user in range(world_size):  # bit-identical on every user, equal to the mean
            assert torch.equal(gen_after[user][name], gen_after[0][name]), (name, user)
        torch.testing.assert_close(gen_after[0][name], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(gen_before[0][name], gen_before[1][name])
    assert dist.packed_buffer([p for _, p in r.shared["generalists"]]).data_ptr() == packed.data_ptr()
    local_after = _snapshot(r.model, Role.SPECIALIST) | _snapshot(r.model, Role.ROUTER)
    assert local_after.keys() == local_before.keys() and local_after
    for name in local_after:  # untouched by the sync ...
        assert torch.equal(local_after[name], local_before[name]), name
    others = _gather(local_after)
    for name in local_after:  # ... and still different between users
        if name.endswith("lora_B") or "router" in name:
            assert not torch.equal(others[0][name], others[1][name]), name
    # bytes (delivered payload): the generalists once up and once down (server), or delivered to and
    # received from each of the N members (all2all)
    payload = sum(p.numel() for _, p in r.shared["generalists"]) * 4
    copies = 1 if mode == "server" else world_size
    assert r.stats.bytes_sent == payload * copies and r.stats.bytes_received == payload * copies


@pytest.mark.parametrize("world_size,mode", [(2, "server"), pytest.param(4, "server", marks=pytest.mark.extended),
                                             (4, "all2all")])
def test_after_a_round_generalists_are_averaged_and_specialists_stay(tmp_path, world_size, mode):
    """After the sync every user holds bit-identical generalists equal to the mean of what they held;
    specialists and routers are untouched and still differ between users."""
    run_on_ranks(_round_worker, world_size, tmp_path, mode)


def _phase_worker(rank, world_size, tmp_path):
    cfg = tiny_config()
    topo = init_topology()
    rank_run = build_rank(cfg, topo)
    r = rank_run.users[0]
    router = lambda: _snapshot(r.model, Role.ROUTER)
    experts = lambda: _snapshot(r.model, Role.GENERALIST) | _snapshot(r.model, Role.SPECIALIST)
    for _ in range(2):
        before_r, before_e = router(), experts()
        expert_step(rank_run, rank_run.users)
        assert all(torch.equal(v, router()[k]) for k, v in before_r.items()), "router moved in an expert step"
        assert any(not torch.equal(v, experts()[k]) for k, v in before_e.items())
        assert all(p.grad is None for p in r.model.report.params.values()), "gradients left behind"
        before_r, before_e = router(), experts()
        router_steps(rank_run, r, 0)
        assert all(torch.equal(v, experts()[k]) for k, v in before_e.items()), "experts moved in a router step"
        assert all(not torch.equal(v, router()[k]) for k, v in before_r.items())
        assert all(p.grad is None for p in r.model.report.params.values()), "gradients left behind"


def test_router_frozen_in_expert_steps_and_experts_frozen_in_router_steps(tmp_path):
    """The two levels of Algorithm 1 never move each other's parameters nor leave gradients behind."""
    run_on_ranks(_phase_worker, 1, tmp_path)


def _snapshot_from_ckpt(out_dir, rank):
    from comigs_dist import checkpoint
    return checkpoint.load(checkpoint.user_dir(out_dir, rank) / "final.pt")["params"]


def test_users_with_different_expert_counts_train_together(tmp_path):
    """n_i = 1 and n_i = 3 in one run: both improve on the base; the one-expert user has no router."""
    run_on_ranks(_hetero_worker_ckpt, 2, tmp_path)


def _hetero_worker_ckpt(rank, world_size, tmp_path):
    cfg = tiny_config(**{"moe.n_experts": "[1, 3]", "train.rounds": 3, "checkpoint.final": True})
    check_world_size(cfg, world_size)
    topo = init_topology()
    (row,) = run(cfg, topo, tmp_path / "run")
    assert row["n_experts"] == [1, 3][rank]
    assert row["test_ppl"] < row["base_test_ppl"]
    params = _snapshot_from_ckpt(tmp_path / "run", rank)
    names = _gather({n: torch.zeros(1) for n in params})
    assert not any("router" in n for n in names[0]), "a user with one expert must have no router"
    assert any("router" in n for n in names[1])
    assert any(".experts.2." in n for n in names[1]) and not any(".experts.1." in n for n in names[0])
    # the shared generalist (expert 0 and attention LoRA) ends identical up to the last local steps:
    # both users started the last round from the same average
    assert {n for n in names[0] if ".experts.0." in n or ".attn." in n} <= set(names[1])


def _mismatch_worker(rank, world_size, tmp_path):
    cfg = tiny_config(**{"lora.rank": "[4, 8]"})
    topo = init_topology()
    with pytest.raises(ValueError, match=r"user 1 holds .*experts\.0\.in_loras\.0\.lora_A with shape \(8, 32\).*"
                                         r"user 0 holds \(4, 32\)"):
        build_rank(cfg, topo)


def test_generalists_of_different_shapes_are_refused_before_any_collective(tmp_path):
    """Generalists whose shapes differ between users: an error naming the user and the parameter."""
    run_on_ranks(_mismatch_worker, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# the reference's gradient leakage between the two levels (method_options.reference_quirks)
# --------------------------------------------------------------------------------------------

def _phase_gradient(r, sampler, predicate):
    """The gradient of CE + lambda * LB on the sampler's next batch for the parameters ``predicate``
    selects, at the current parameters; the sampler is left where it was."""
    state = sampler.state_dict()
    x, y = sampler.sample(r.cfg.train.batch_size)
    sampler.load_state_dict(state)
    names = [n for n, tag in r.model.report.tags.items() if predicate(tag)]
    params = [r.model.report.params[n] for n in names]
    r.model.set_trainable(predicate)
    out = r.model(x, y)
    grads = torch.autograd.grad(out.ce + r.cfg.moe.lb_weight * out.lb, params)
    return dict(zip(names, grads))


def _leak_worker(rank, world_size, tmp_path, quirks):
    from comigs_dist import resume
    cfg = tiny_config(**{"method_options.reference_quirks": quirks, "train.router_steps": 1})
    topo = init_topology()
    rank_run = build_rank(cfg, topo)
    r = rank_run.users[0]
    assert r.method.leaks_gradients == quirks
    m, params = r.method, r.model.report.params
    in_router = lambda tag: m.trains_in("router", tag)
    in_expert = lambda tag: m.trains_in("expert", tag)
    router = lambda: _snapshot(r.model, Role.ROUTER)
    experts = lambda: {n: p for n, p in _snapshot(r.model).items() if r.model.report.tags[n].role != Role.ROUTER}
    grad_of = lambda names: {n: params[n].grad for n in names}
    out = {}

    # an expert step: the router's weights never move, but under the leak it keeps the training gradient
    train_grad = _phase_gradient(r, r.train_sampler, in_router)
    before = router()
    expert_step(rank_run, rank_run.users)
    assert all(torch.equal(v, router()[k]) for k, v in before.items()), "router moved in an expert step"
    out["experts_after_step_1"] = experts()
    for n, g in grad_of(before).items():
        if quirks:
            torch.testing.assert_close(g, train_grad[n], rtol=1e-5, atol=1e-7)
        else:
            assert g is None, n
    # a checkpoint carries the pending gradients into the next round (and only them)
    pending = resume.user_state(r, 0)["pending_grads"]
    assert set(pending) == (set(before) if quirks else set())

    # a router step: it applies its validation gradient (plus the pending training one under the leak);
    # the experts keep the validation gradient under the leak
    valid_grad = _phase_gradient(r, r.router_sampler, in_expert)
    router_steps(rank_run, r, 0)
    out["router_after_router_step"] = router()
    assert all(params[n].grad is None for n in before), "router gradients left after a router step"
    for n, g in grad_of(out["experts_after_step_1"]).items():
        if quirks:
            torch.testing.assert_close(g, valid_grad[n], rtol=1e-5, atol=1e-7)
        else:
            assert g is None, n

    # the next expert step adds that validation gradient to its own
    expert_step(rank_run, rank_run.users)
    out["experts_after_step_2"] = experts()
    torch.save(out, tmp_path / f"leak_{quirks}.pt")


def test_reference_quirks_leak_gradients_between_router_and_expert_steps(tmp_path):
    """Off (the paper): after an expert step the router holds no gradient, so the following router
    step sees only its validation gradient, and vice versa. On (the reference, baselines.md 1.6):
    the router keeps the expert step's training gradient (equal to one computed by hand) and its
    next step differs; the experts keep the router steps' validation gradient and their next step
    differs; the first expert step is the same either way."""
    for quirks in (False, True):
        run_on_ranks(_leak_worker, 1, tmp_path, quirks)
    off, on = torch.load(tmp_path / "leak_False.pt"), torch.load(tmp_path / "leak_True.pt")
    for n, v in off["experts_after_step_1"].items():
        assert torch.equal(v, on["experts_after_step_1"][n]), n
    routers = off["router_after_router_step"].items()
    assert all(not torch.equal(v, on["router_after_router_step"][n]) for n, v in routers)
    assert any(not torch.equal(v, on["experts_after_step_2"][n]) for n, v in off["experts_after_step_2"].items())


def test_auto_keeps_the_frozen_base_in_fp32_under_bf16_autocast(monkeypatch):
    """model.dtype=auto stores the base in fp32 on CPU and on a CUDA device whose autocast is bf16
    (the reference's fp32 weights under bf16 autocast); only model.dtype=bf16 stores it in bf16,
    and only where bf16 autocast runs."""
    from comigs_dist.train import resolve_base_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_base_dtype("auto", cuda, "auto") == torch.float32   # was bf16
    assert resolve_base_dtype("auto", cuda, "bf16") == torch.float32
    assert resolve_base_dtype("auto", cpu, "bf16") == torch.float32
    assert resolve_base_dtype("fp32", cuda, "auto") == torch.float32
    assert resolve_base_dtype("bf16", cuda, "auto") == torch.bfloat16
    assert resolve_base_dtype("bf16", cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match=r"model.dtype=bf16 needs bf16 autocast, but train.amp=auto runs without it "
                                         r"on cpu; set train.amp=bf16"):
        resolve_base_dtype("bf16", cpu, "auto")


def _dtype_worker(rank, world_size, tmp_path, dtype):
    r = build_rank(tiny_config(**{"model.dtype": dtype, "train.amp": "bf16"}), init_topology()).users[0]
    trainable = {id(p) for p in r.model.report.params.values()}
    frozen = {p.dtype for p in r.model.lm.parameters() if id(p) not in trainable}
    assert frozen == ({torch.float32} if dtype == "auto" else {torch.bfloat16}), (dtype, frozen)
    assert {p.dtype for p in r.model.report.params.values()} == {torch.float32}


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_setup_user_stores_the_base_as_resolved(tmp_path, dtype):
    """Under bf16 autocast the built model's frozen weights are fp32 with auto, bf16 with bf16; adapters fp32."""
    run_on_ranks(_dtype_worker, 1, tmp_path, dtype)


def _eval_points_worker(rank, world_size, tmp_path):
    topo = init_topology()
    rows = {}
    for every in (0, 1):
        cfg = tiny_config(**{"train.rounds": 3, "eval.every": every})
        check_world_size(cfg, world_size)
        (rows[every],) = run(cfg, topo, tmp_path / f"every-{every}")
    assert [p["round"] for p in rows[1]["test_curve"]] == [1, 2, 3]
    assert rows[0]["test_curve"] == rows[1]["test_curve"][-1:]  # the final evaluation, the same
    for key in ("test_ppl", "test_loss", "final_train_loss", "train_curve", "routing"):
        assert rows[0][key] == rows[1][key], key


def test_evaluation_points_do_not_change_training(tmp_path):
    """eval.every=1 against 0 (only the final evaluation), 2 users, routed, 3 rounds: the
    intermediate evaluations add points to test_curve and change nothing else: the final test
    perplexity, the training curve and the routing are equal bit for bit (launch.reproduce relies
    on this when it skips them at the CPU scale)."""
    run_on_ranks(_eval_points_worker, 2, tmp_path)
