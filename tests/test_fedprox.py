"""FedProx: the proximal term against a hand computation, mu=0 equal to FedAvg bit for bit on two
ranks, and a large mu keeping the users' local models close to the aggregate they downloaded."""
import dataclasses

import pytest
import torch
import torch.distributed as tdist

from comigs_dist.config import ConfigError, check_world_size, load_config
from comigs_dist.methods import get_method
from dist_harness import init_topology, run_on_ranks
from helpers import tiny_config


@dataclasses.dataclass
class _User:
    method_state: list


def test_the_proximal_term_is_half_mu_times_the_squared_distance_and_its_gradient_mu_times_the_gap():
    """(mu/2) ||w - w_t||^2 summed over the shared tensors; its gradient is mu (w - w_t)."""
    cfg = load_config(None, ["method=fedprox", "method_options.mu=0.3"])
    method = get_method("fedprox", cfg)
    w1 = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    w2 = torch.tensor([[3.0, 4.0]], requires_grad=True)
    a1, a2 = torch.tensor([0.0, -1.0, 0.5]), torch.tensor([[1.0, 1.0]])
    term = method.extra_loss(_User([(w1, a1), (w2, a2)]))
    # by hand: ||w1 - a1||^2 = 1 + 1 + 0 = 2, ||w2 - a2||^2 = 4 + 9 = 13
    assert float(term.detach()) == pytest.approx(0.5 * 0.3 * 15.0)
    term.backward()
    torch.testing.assert_close(w1.grad, 0.3 * (w1.detach() - a1))
    torch.testing.assert_close(w2.grad, 0.3 * (w2.detach() - a2))
    assert get_method("fedprox", load_config(None, ["method=fedprox", "method_options.mu=0"])).extra_loss(
        _User([(w1, a1)])) is None


def test_a_negative_mu_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"method_options.mu \(-0.1\) must be >= 0"):
        load_config(None, ["method=fedprox", "method_options.mu=-0.1"])


def _snapshot(rank_run) -> dict:
    u = rank_run.users[0]
    return {n: p.detach().clone() for n, p in u.model.report.params.items()}


def _drift(rank_run) -> float:
    """How far the user's shared parameters moved from the aggregate it downloaded this round."""
    u = rank_run.users[0]
    return float(sum((p.detach() - a).pow(2).sum() for p, a in u.method_state).sqrt())


def _rounds(method, world_size, rounds=2, **options):
    from comigs_dist import train
    cfg = tiny_config(method=method, **{f"method_options.{k}": v for k, v in options.items()})
    check_world_size(cfg, world_size)
    topo = init_topology()
    rank_run = train.build_rank(cfg, dataclasses.replace(topo, groups={}))
    drift = []
    for r in range(rounds):
        train.run_round(rank_run, r)
        if method == "fedprox":
            drift.append(_drift(rank_run))
    return rank_run, drift


def _fedprox_worker(rank, world_size, tmp_path):
    avg, _ = _rounds("fedavg", world_size)
    prox0, _ = _rounds("fedprox", world_size, mu=0.0)
    a, b = _snapshot(avg), _snapshot(prox0)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a), "mu=0 must be FedAvg bit for bit"
    _, small = _rounds("fedprox", world_size, mu=1e-4)
    _, large = _rounds("fedprox", world_size, mu=50.0)
    # round 0 starts every user from the common initialisation, its anchor: with mu=50 the local
    # steps stay far nearer it (measured 0.13 against 0.86 for mu=1e-4)
    assert large[0] < 0.5 * small[0], (small, large)
    if rank == 0:
        torch.save({"small": small, "large": large}, tmp_path / "drift.pt")
    tdist.barrier()


def test_fedprox_mu0_is_fedavg_and_a_large_mu_keeps_users_near_the_aggregate(tmp_path):
    """Two users on two ranks: FedProx with mu=0 ends every parameter equal to FedAvg's; with
    mu=50 the shared parameters end the first round's local steps nearer their common start than
    with mu=1e-4."""
    run_on_ranks(_fedprox_worker, 2, tmp_path, timeout_s=300)
    drift = torch.load(tmp_path / "drift.pt")
    assert all(d > 0 for d in drift["small"] + drift["large"])
