"""Seeds: every random stream comes from a hash of (seed, user, stream); the paper's seeds 42, 45
and 47 share no stream, for any user."""
import itertools

import pytest
import torch

from comigs_dist.seeds import EVERY_USER, STREAMS, derive_seed
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config, user_of

PAPER_SEEDS = (42, 45, 47)


def test_no_two_seeds_users_or_streams_share_a_seed():
    """Over the paper's seeds, 64 users and every stream (the common one included) every derived
    seed differs; the derivation is a fixed function (the same value twice) and 63-bit."""
    triples = [(s, u, name) for s in PAPER_SEEDS for u in [EVERY_USER, *range(64)] for name in STREAMS]
    values = [derive_seed(*t) for t in triples]
    assert len(set(values)) == len(triples)
    assert all(0 <= v < 2 ** 63 for v in values)
    assert derive_seed(42, 3, "adapters") == derive_seed(42, 3, "adapters")
    with pytest.raises(ValueError, match="random stream 'dropout' is not one of adapters"):
        derive_seed(42, 0, "dropout")


def test_adapter_inits_differ_between_seeds_for_every_user():
    """The adapters and routers each (seed, user) starts from are distinct tensors: seed 45's user 0
    is not seed 42's user 3 (as seed + user made it), and no pair of the 12 is equal anywhere."""
    from comigs_dist.model import build_user_model
    inits = {}
    for seed, user in itertools.product(PAPER_SEEDS, range(4)):
        cfg = tiny_config(seed=seed, n_users=4)
        model = build_user_model(cfg, user_of(cfg, user), 256, True)
        inits[(seed, user)] = {n: p.detach().clone() for n, p in model.report.params.items()
                               if n.endswith("lora_A") or "router" in n}
    names = next(iter(inits.values())).keys()
    assert any("router" in n for n in names) and any(n.endswith("lora_A") for n in names)
    for a, b in itertools.combinations(inits, 2):
        for n in names:
            assert not torch.equal(inits[a][n], inits[b][n]), (a, b, n)


def _streams_worker(rank, world_size, tmp_path):
    from comigs_dist.train import build_rank
    topo = init_topology()
    for seed in PAPER_SEEDS:
        topo.groups.clear()  # one process group serves the three set-ups (each creates its groups once)
        r = build_rank(tiny_config(seed=seed), topo).users[0]
        # the samplers draw from the user's own streams
        assert r.train_sampler.generator.initial_seed() == derive_seed(seed, rank, "train_batches")
        assert r.router_sampler.generator.initial_seed() == derive_seed(seed, rank, "router_batches")
        x_train, _ = r.train_sampler.sample(4)
        x_router, _ = r.router_sampler.sample(4)
        torch.save({"train": x_train, "router": x_router,
                    "router_init": {n: p.detach() for n, p in r.model.report.params.items() if "router" in n}},
                   tmp_path / f"seed{seed}_user{rank}.pt")


def test_each_runs_samplers_and_inits_are_its_own(tmp_path):
    """setup_user (what a run builds) seeds each sampler from its (seed, user, stream); over seeds
    42, 45 and 47 and two users no two first batches, and no two router inits, are equal."""
    run_on_ranks(_streams_worker, 2, tmp_path)
    got = {p.stem: torch.load(p) for p in tmp_path.glob("seed*_user*.pt")}
    assert len(got) == 6
    batches = [v[k] for v in got.values() for k in ("train", "router")]
    for a, b in itertools.combinations(range(len(batches)), 2):
        assert not torch.equal(batches[a], batches[b]), (a, b)
    for a, b in itertools.combinations(got, 2):
        for n, t in got[a]["router_init"].items():
            assert not torch.equal(t, got[b]["router_init"][n]), (a, b, n)
