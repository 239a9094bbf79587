"""FedALT's rest-of-world arithmetic against hand values: the mean of the other contributors,
from the group's sum, with users that sit the round out."""
import pytest
import torch

from comigs_dist.methods.fedalt import compute_rest_of_world
from dist_harness import run_on_ranks

# three users' individual LoRA factors (one small tensor each), by hand
OWN = [torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([-2.0, 5.0, 0.5])]


def test_rest_of_world_is_the_mean_of_the_others():
    """Sum (2, 3, 3.5): user 0 gets ((3,0,-1) + (-2,5,0.5)) / 2 = (0.5, 2.5, -0.25), and so on."""
    total = sum(OWN)
    expected = [torch.tensor([0.5, 2.5, -0.25]), torch.tensor([-0.5, 1.5, 2.25]), torch.tensor([2.0, -1.0, 1.5])]
    for own, want in zip(OWN, expected):
        torch.testing.assert_close(compute_rest_of_world(total, own, 3, True), want)


def test_rest_of_world_with_users_that_sat_out():
    """User 2 sits out (payload zeroed, C = 2): the contributors get each other's tensor, user 2
    the mean of both; a lone contributor has no rest of world (None: keep the previous one)."""
    total = OWN[0] + OWN[1]
    torch.testing.assert_close(compute_rest_of_world(total, OWN[0], 2, True), OWN[1])
    torch.testing.assert_close(compute_rest_of_world(total, OWN[1], 2, True), OWN[0])
    torch.testing.assert_close(compute_rest_of_world(total, OWN[2], 2, False), torch.tensor([2.0, -1.0, 1.5]))
    assert compute_rest_of_world(OWN[0], OWN[0], 1, True) is None
    assert compute_rest_of_world(torch.zeros(3), OWN[1], 0, False) is None
    with pytest.raises(ValueError, match="0 contributors, but this user did contribute"):
        compute_rest_of_world(total, OWN[0], 0, True)


def test_rest_of_world_in_place_from_a_float64_sum():
    """Written into the summed buffer itself (what the sync does with its packed RoW LoRA), or
    into an fp32 tensor from a float64 sum: the same values as the mean of the others in float64,
    rounded once."""
    g = torch.Generator().manual_seed(0)
    own = [torch.randn(1000, generator=g) * 10 ** k for k in (0, 3, -3, 1)]
    exact = sum(o.double() for o in own)
    for u in range(4):
        out = torch.empty(1000)
        compute_rest_of_world(exact, own[u], 4, True, out=out)
        want = (sum(o.double() for i, o in enumerate(own) if i != u) / 3).float()
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    buf = sum(own)                        # fp32 sum, overwritten in place
    result = compute_rest_of_world(buf, own[0], 4, True, out=buf)
    assert result is buf
    torch.testing.assert_close(buf, (own[1] + own[2] + own[3]) / 3, rtol=1e-4, atol=1e-3)


def _mlp_mixer_model():
    """The tiny GPT-2 with the adapters FedALT's whole-MLP mixer gives a user (method_options.mixer=mlp)."""
    from comigs_dist.methods import get_method
    from comigs_dist.model import AdapterSpec, wrap_user_model
    from helpers import tiny_config, tiny_gpt2
    cfg = tiny_config(method="fedalt", **{"method_options.mixer": "mlp", "moe.load_balancing": "generalist"})
    configured = AdapterSpec(n_experts=3, n_generalists=2, rank=4, alpha=16.0, attn_rank=4, top_k=1, routed=True,
                             load_balancing="generalist")
    spec = get_method("fedalt", cfg).adapter_spec(cfg, 0, configured)
    return wrap_user_model(tiny_gpt2(), spec, seed=5)


def test_mlp_mixer_untrained_leaves_the_base_and_mixes_whole_expert_outputs():
    """method_options.mixer=mlp (whatever moe.* says: 2 experts, top-2, no load balancing): with
    B = 0 everywhere the logits are the base model's; a RoW expert with B != 0 changes them, and
    the MLP's output is then w_0 E_0(u) + w_1 E_1(u), w = softmax(W_router u) and E_j the whole
    MLP with expert j's LoRAs merged into its weights."""
    from helpers import tiny_gpt2
    x = torch.randint(0, 128, (2, 16))
    ref = tiny_gpt2()(input_ids=x).logits
    model = _mlp_mixer_model()
    assert model.spec.n_experts == 2 and model.spec.top_k == 2 and model.spec.load_balancing == "none"
    with torch.no_grad():
        for mixture in model.adapters.mixtures():
            mixture.router.weight.normal_(0, 1.0)   # a mixer far from uniform: the weights must not matter
    torch.testing.assert_close(model.logits(x), ref, rtol=0, atol=1e-5)

    mixture = model.adapters.mixture(1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for expert in mixture.experts:
            for lora in (*expert.in_loras, expert.out_lora):
                lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.1)
    seen = {}
    mlp = model.lm.transformer.h[1].mlp
    hook = mlp.register_forward_hook(lambda mod, args, out: seen.update(u=args[0].detach(), y=out.detach()))
    logits = model.logits(x)
    hook.remove()
    assert (logits - ref).abs().max() > 1e-3
    u = seen["u"].reshape(-1, 32)                                             # (B*T, D)
    w = torch.softmax(u @ mixture.router.weight.t(), dim=-1)                  # (B*T, 2)
    with torch.no_grad():
        want = w[:, :1] * mixture.expert_output_merged(mlp, 0, u) + w[:, 1:] * mixture.expert_output_merged(mlp, 1, u)
    torch.testing.assert_close(seen["y"].reshape(-1, 32), want, rtol=1e-5, atol=1e-5)


def test_mixer_option_is_checked_before_any_work():
    """A mixer other than 'projection' or 'mlp' is a configuration error naming the key, the value
    and the choices; the default is the released code's per-projection mixer."""
    from comigs_dist.config import ConfigError
    from comigs_dist.methods import get_method
    from helpers import tiny_config
    with pytest.raises(ConfigError, match=r"method_options.mixer \('block'\) must be one of 'projection', 'mlp' "
                                          r"\(method 'fedalt'\)"):
        tiny_config(method="fedalt", **{"method_options.mixer": "block"})
    assert get_method("fedalt", tiny_config(method="fedalt")).options.mixer == "projection"


# --------------------------------------------------------------------------------------------
# the method on real process groups (gloo, the tiny GPT-2)
# --------------------------------------------------------------------------------------------

def _everyone(topo, mine: dict) -> dict:
    """{user: value} of every user of the run, from each rank's own users."""
    from comigs_dist import dist
    return {k: v for part in dist.all_gather_objects(topo, mine) for k, v in part.items()}


def _pairs(u):
    """(individual name, RoW, individual) of a user, detached copies."""
    return [(n, row.detach().clone(), ind.detach().clone()) for n, row, ind in u.method_state]


# the two granularities of FedALT's mixer (method_options.mixer), as tiny_config overrides
MIXERS = {"projection": {}, "mlp": {"method_options.mixer": "mlp"}}


def _check_structure(u0, mixer):
    """Where the RoW, the individual LoRAs and the mixers sit for each granularity."""
    from comigs_dist.model import Role
    from comigs_dist.model.lora import LoRAFactors
    from comigs_dist.model.paired import PairedLoRA
    tags = u0.model.report.tags
    spec = u0.model.spec
    assert {t.role for t in tags.values()} == {Role.GENERALIST, Role.SPECIALIST, Role.ROUTER}
    assert {t.kind for t in tags.values() if t.role == Role.ROUTER} == {"router"}
    mixers = sorted({t.module for t in tags.values() if t.role == Role.ROUTER})
    assert spec.paired == "mixer"
    assert all(isinstance(p, PairedLoRA) and p.mixer is not None for b in u0.model.adapters.blocks
               for p in b.attn.values())
    if mixer == "projection":
        # a pair with a mixer on every adapted projection: 2 layers x (2 attention + c_fc + c_proj)
        assert spec.n_experts == 1 and not spec.routed
        assert mixers == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        assert sum(t.role == Role.ROUTER for t in tags.values()) == 2 * 4
        return
    # the MLP a mixture of two plain experts (0 = RoW, 1 = individual) under a dense top-2 router
    assert spec.n_experts == 2 and spec.n_generalists == 1 and spec.top_k == 2 and spec.routed
    assert spec.load_balancing == "none" and not spec.mlp_paired
    assert mixers == ["attn.c_attn", "attn.c_proj", "mlp.router"]
    assert sum(t.role == Role.ROUTER for t in tags.values()) == 2 * 3
    experts = {role: {t.expert for t in tags.values() if t.role == role and t.kind == "expert"}
               for role in (Role.GENERALIST, Role.SPECIALIST)}
    assert experts == {Role.GENERALIST: {0}, Role.SPECIALIST: {1}}
    for mixture in u0.model.adapters.mixtures():
        assert mixture.router is not None and mixture.router.top_k == mixture.n_experts == 2
        assert all(type(lora) is LoRAFactors for e in mixture.experts for lora in (*e.in_loras, e.out_lora))


def _fedalt_worker(rank, world_size, tmp_path, n_users, mixer):
    import dataclasses
    from comigs_dist import train
    from comigs_dist.config import check_world_size
    from comigs_dist.model import Role
    from dist_harness import init_topology
    from helpers import tiny_config, tiny_lora_numel
    topo0 = init_topology(n_users=n_users)
    cfg = tiny_config(method="fedalt", n_users=n_users, **MIXERS[mixer])
    check_world_size(cfg, world_size)
    run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
    u0 = run.users[0]
    tags = u0.model.report.tags
    _check_structure(u0, mixer)

    # round 0: one common start of the individual LoRAs; every RoW is a copy of it (B = 0)
    train.sync(run, 0)
    start = _everyone(topo0, {u.user_idx: _pairs(u) for u in run.users})
    for u in range(n_users):
        for (n, row, ind), (_, _, ind0) in zip(start[u], start[0]):
            assert torch.equal(ind, ind0) and torch.equal(row, ind), n

    # local steps: the individual LoRAs and the mixers move, the RoW never does
    before = {u.user_idx: {n: p.detach().clone() for n, p in u.model.report.params.items()} for u in run.users}
    for _ in range(2):
        train.expert_step(run, run.users)
    for u in run.users:
        moved = {n for n, p in u.model.report.params.items() if not torch.equal(p, before[u.user_idx][n])}
        assert moved == {n for n, t in tags.items() if t.role in (Role.SPECIALIST, Role.ROUTER)}

    # the sync of round 1: each RoW becomes the mean of the *other* users' individual LoRAs
    pre = _everyone(topo0, {u.user_idx: _pairs(u) for u in run.users})
    routers = {u.user_idx: {n: p.detach().clone() for n, p in u.model.report.select(lambda t: t.role == Role.ROUTER)}
               for u in run.users}
    sent = {u.user_idx: u.stats.bytes_sent for u in run.users}
    train.sync(run, 1)
    numel = tiny_lora_numel()  # one individual LoRA set, the same whether the MLP's sit in pairs or in expert 1
    for u in run.users:
        for i, (n, row, ind) in enumerate(u.method_state):
            others = [pre[v][i][2].double() for v in range(n_users) if v != u.user_idx]
            want = (sum(others) / len(others)).float()         # by hand, rounded once
            assert torch.equal(row.detach(), want), n
            assert torch.equal(ind.detach(), pre[u.user_idx][i][2]), f"{n}: the sync must not touch the individual"
        for n, p in u.model.report.select(lambda t: t.role == Role.ROUTER):
            assert torch.equal(p.detach(), routers[u.user_idx][n]), f"{n}: the sync must not touch a mixer"
        # bytes: the individual LoRAs once up (server), fp32: the shapes' figure and analytic_round_bytes
        assert sum(ind.numel() for _, _, ind in u.method_state) == numel
        assert u.stats.bytes_sent - sent[u.user_idx] == numel * 4
        assert numel * 4 == train.analytic_round_bytes(u, cfg.comm, run.topo, run.comm.count)["total"]["sent"]
    post = _everyone(topo0, {u.user_idx: _pairs(u) for u in run.users})
    for (n, _, ind0), (_, _, ind1) in zip(post[0], post[1]):
        if tags[n].matrix == "B":  # moved from the common B = 0 by each user's own data
            assert not torch.equal(ind0, ind1), f"{n}: individual LoRAs stay the users' own"
    mixers = _everyone(topo0, routers)
    assert all(not torch.equal(p, mixers[1][n]) for n, p in mixers[0].items()), "mixers stay the users' own"

    # after the last round: one more sum, so the RoW evaluated is the mean of the others' final
    # individual LoRAs (the released code aggregates before it evaluates), counted as one round
    from comigs_dist.monitor import Monitor
    train.expert_step(run, run.users)
    pre = _everyone(topo0, {u.user_idx: _pairs(u) for u in run.users})
    sent = {u.user_idx: u.stats.bytes_sent for u in run.users}
    train.after_training(run, 2, Monitor.silent([u.user_idx for u in run.users]))
    for u in run.users:
        for i, (n, row, ind) in enumerate(u.method_state):
            others = [pre[v][i][2].double() for v in range(n_users) if v != u.user_idx]
            assert torch.equal(row.detach(), (sum(others) / len(others)).float()), n
            assert torch.equal(ind.detach(), pre[u.user_idx][i][2]), n
        assert u.stats.bytes_sent - sent[u.user_idx] == numel * 4

    # a whole run through train.run
    [*rows] = train.run(tiny_config(method="fedalt", n_users=n_users, **{"train.rounds": 3}, **MIXERS[mixer]),
                        dataclasses.replace(topo0, groups={}), tmp_path / "run")
    for row in rows:
        assert row["test_ppl"] < row["base_test_ppl"] and row["shared_params"] == numel


@pytest.mark.slow
@pytest.mark.parametrize("world_size, n_users, mixer", [pytest.param(3, 3, "projection", marks=pytest.mark.extended),
                                                        (2, 4, "projection"), (2, 4, "mlp")])
def test_fedalt_rest_of_world_is_the_mean_of_the_others_on_real_ranks(tmp_path, world_size, n_users, mixer):
    """3 users on 3 ranks and 4 users on 2 ranks, a mixer per projection or per MLP: after round 0
    every individual LoRA is the common start and every RoW a copy of it; expert steps move the
    individual LoRAs and the mixers only; after the sync each user's RoW is bit for bit the
    hand-computed mean of the others' individual LoRAs, the individual LoRAs and the mixers are
    untouched and still differ between users; the sync sends one LoRA set, the figure from
    the shapes and the analytic one; after the last round one more sum makes each RoW the mean
    of the others' final individual LoRAs; three rounds through train.run beat the base model."""
    run_on_ranks(_fedalt_worker, world_size, tmp_path, n_users, mixer, timeout_s=600)
