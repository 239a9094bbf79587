"""FedDPA's instance-wise weights against hand values, and their use in a PairedLoRA."""
import math

import pytest
import torch

from comigs_dist.methods.feddpa import compute_instance_weights, compute_pair_weights
from comigs_dist.model.paired import PairedLoRA
from dist_harness import run_on_ranks


def test_instance_weights_against_hand_values():
    """References (1,0) and (1,1): instance (1,0) has mean cosine (1 + 1/sqrt2)/2, instance (0,2)
    (0 + 1/sqrt2)/2; times max_weight 0.5. Instance (-1,0) has mean cosine (-1 - 1/sqrt2)/2 < 0:
    clamped to 0, or kept negative without the clamp (the released code)."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    refs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r2 = 1 / math.sqrt(2)
    omega = compute_instance_weights(emb, refs, max_weight=0.5)
    torch.testing.assert_close(omega, torch.tensor([0.5 * (1 + r2) / 2, 0.5 * r2 / 2, 0.0]))
    raw = compute_instance_weights(emb, refs, max_weight=0.5, clamp=False)
    assert raw[2].item() == pytest.approx(0.5 * (-1 - r2) / 2)
    # one reference set per instance (the released code draws S instances for every test instance)
    per_row = torch.stack([refs, refs[:1].expand(2, 2), refs.flip(0)])     # (3, S=2, 2)
    omega_rows = compute_instance_weights(emb, per_row, max_weight=1.0)
    torch.testing.assert_close(omega_rows, torch.tensor([(1 + r2) / 2, 0.0, 0.0]))
    # an embedding equal to every reference: omega = max_weight; a zero embedding: 0
    assert compute_instance_weights(torch.tensor([[3.0, 0.0], [0.0, 0.0]]), refs[:1], 0.5).tolist() == [0.5, 0.0]


def test_pair_weights_give_omega_to_the_chosen_adapter():
    """Columns are (global, local): by default the local adapter gets omega; 'global' is the released
    inference script's assignment."""
    omega = torch.tensor([0.1, 0.4])
    torch.testing.assert_close(compute_pair_weights(omega), torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    torch.testing.assert_close(compute_pair_weights(omega, "global"), torch.tensor([[0.1, 0.9], [0.4, 0.6]]))
    with pytest.raises(ValueError, match=r"weighted \('both'\) must be 'local'"):
        compute_pair_weights(omega, "both")


def test_bad_shapes_and_weights_are_refused():
    """Embeddings must be 2-D, references (S, d) or (B, S, d) of the same d, max_weight in [0, 1]."""
    with pytest.raises(ValueError, match=r"embeddings must be \(instances, d\)"):
        compute_instance_weights(torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"references must be .* d = 3 for 2 instances; got shape \(2, 4\)"):
        compute_instance_weights(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"got shape \(3, 5, 3\)"):
        compute_instance_weights(torch.ones(2, 3), torch.ones(3, 5, 3))
    with pytest.raises(ValueError, match=r"max_weight \(1.5\) must be in \[0, 1\]"):
        compute_instance_weights(torch.ones(2, 3), torch.ones(1, 3), max_weight=1.5)


def _random_pair() -> tuple[PairedLoRA, torch.Tensor]:
    """A PairedLoRA (4 -> 3, rank 2) whose two B matrices are random (not the untrained 0), and an
    input of 2 sequences of 5 tokens."""
    torch.manual_seed(0)
    pair = PairedLoRA(4, 3, 2, 16.0, kind="attn", layer=0, module="attn.c_attn")
    with torch.no_grad():
        pair.first.lora_B.normal_()
        pair.second.lora_B.normal_()
    return pair, torch.randn(2, 5, 4)


def test_weights_reach_each_sequence_of_a_paired_adapter():
    """The (B, 2) weights set on a PairedLoRA (first = global, second = local) mix each sequence
    with its own weights: sequence b's output is w_g[b] g B_g A_g x + w_l[b] g B_l A_l x."""
    pair, x = _random_pair()
    w = compute_pair_weights(compute_instance_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                                                      torch.tensor([[1.0, 0.0]]), 0.5))   # omega = 0.5, 0
    pair.set_row_weights(w)
    d_global, d_local = pair.delta_weights()
    out = pair(x)
    torch.testing.assert_close(out[0], 0.5 * x[0] @ d_global.t() + 0.5 * x[0] @ d_local.t())
    torch.testing.assert_close(out[1], x[1] @ d_global.t())


def test_position_weights_reach_each_token_of_a_paired_adapter():
    """(B, T, 2) weights (FedDPA's omega at each position): token t of sequence b gets
    w[b, t, 0] d_global x + w[b, t, 1] d_local x, for (B, T, in) and for flattened (B*T, in)
    input alike; weights of another layout than the input's are refused."""
    pair, x = _random_pair()
    omega = torch.rand(2, 5) * 0.5
    pair.set_row_weights(compute_pair_weights(omega))
    d_global, d_local = pair.delta_weights()
    want = (1 - omega)[..., None] * (x @ d_global.t()) + omega[..., None] * (x @ d_local.t())
    torch.testing.assert_close(pair(x), want)
    torch.testing.assert_close(pair(x.reshape(10, 4)), want.reshape(10, 3))
    with pytest.raises(ValueError, match=r"position weights are set for \(2, 5\)"):
        pair(torch.randn(2, 4, 4))


# --------------------------------------------------------------------------------------------
# the method on real process groups (gloo, the tiny GPT-2)
# --------------------------------------------------------------------------------------------

def _state(u) -> dict:
    return {n: p.detach().clone() for n, p in u.model.report.params.items()}


def _everyone(topo, mine: dict) -> dict:
    from comigs_dist import dist
    return {k: v for part in dist.all_gather_objects(topo, mine) for k, v in part.items()}


def _feddpa_config(**extra):
    from helpers import tiny_config
    return tiny_config(method="feddpa", n_users=4, **{"train.local_steps": 2, "train.router_every": 2,
                                                      "train.router_steps": 2, **extra})


def _hand_omega(u, x, state, n_references):
    """omega at each position of each window of x, recomputed apart from the method: the local
    adapter alone through the pairs' *fixed* weights (not the row weights the method sets), the
    hidden state of every position against the last token's of references drawn by a fresh
    sampler from the same state."""
    from comigs_dist.data import BatchSampler
    sampler = BatchSampler(u.data.train, u.cfg.train.seq_len, 0)
    sampler.load_state_dict(state)
    pairs = u.method_state.pairs
    for p in pairs:
        p.set_weights(0.0, 1.0)
    emb = u.model.hidden(x)
    refs = torch.stack([u.model.hidden(sampler.sample(x.shape[0])[0])[:, -1] for _ in range(n_references)], dim=1)
    return compute_instance_weights(emb, refs, 0.5)


def _feddpa_worker(rank, world_size, tmp_path):
    import dataclasses
    from comigs_dist import checkpoint, train
    from comigs_dist.config import check_world_size
    from comigs_dist.data import iter_eval_batches
    from comigs_dist.model import Role
    from dist_harness import init_topology
    topo0 = init_topology(n_users=4)
    cfg = _feddpa_config()
    check_world_size(cfg, world_size)
    run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
    tags = run.users[0].model.report.tags
    glob = {n for n, t in tags.items() if t.role == Role.GENERALIST}
    local = {n for n, t in tags.items() if t.role == Role.SPECIALIST}
    assert glob and local and glob | local == set(tags), "a global and a local adapter, no router"
    assert {t.kind for n, t in tags.items() if n in glob} == {"attn", "expert"}

    train.sync(run, 0)   # one common start of the global adapter
    start = _everyone(topo0, {u.user_idx: _state(u) for u in run.users})
    assert all(torch.equal(start[u][n], start[0][n]) for u in range(4) for n in glob)

    # (a) the expert steps train the local adapter on (1 - alpha) global + alpha local
    before = {u.user_idx: _state(u) for u in run.users}
    train.expert_step(run, run.users)
    for u in run.users:
        assert {n for n, p in _state(u).items() if not torch.equal(p, before[u.user_idx][n])} == local
        assert all(p.weights == (0.5, 0.5) for p in u.method_state.pairs)
    # (b) the "router" steps train the global adapter alone
    for u in run.users:
        before = _state(u)
        train.router_steps(run, u, 0)
        assert {n for n, p in _state(u).items() if not torch.equal(p, before[n])} == glob
        assert all(p.weights == (1.0, 0.0) for p in u.method_state.pairs)

    # (c) the sync: the global adapter is the users' mean, bit-identical; the local ones stay
    pre = _everyone(topo0, {u.user_idx: _state(u) for u in run.users})
    sent = {u.user_idx: u.stats.bytes_sent for u in run.users}
    train.sync(run, 1)
    post = _everyone(topo0, {u.user_idx: _state(u) for u in run.users})
    for n in glob:
        want = (sum(pre[u][n].double() for u in range(4)) / 4).float()
        assert all(torch.equal(post[u][n], want) for u in range(4)), n
    for n in local:
        assert all(torch.equal(post[u][n], pre[u][n]) for u in range(4)), n
        assert not torch.equal(post[0][n], post[3][n]) or not post[0][n].any(), n
    for u in run.users:
        numel = sum(p.numel() for _, p in u.shared["generalists"])
        assert u.stats.bytes_sent - sent[u.user_idx] == numel * 4
        assert train.analytic_round_bytes(u, cfg.comm, run.topo, run.comm.count)["total"]["sent"] == numel * 4

    # test time: each window's weights are the pure function's of independently computed embeddings
    u = run.users[0]
    x, y = next(iter_eval_batches(u.data.test, cfg.train.seq_len, 4, 0))
    refs = u.method_state.references
    state = {k: v.clone() for k, v in refs.state_dict().items()}
    with torch.no_grad():
        summed = u.model.token_sums(x, y)                  # through the method's evaluation context
        after = {k: v.clone() for k, v in refs.state_dict().items()}
        omega = _hand_omega(u, x, state, 5)
        assert torch.all((omega >= 0) & (omega <= 0.5))
        weights = compute_pair_weights(omega)
        for p in u.method_state.pairs:
            p.set_row_weights(weights)
        context, u.model.eval_context = u.model.eval_context, None
        by_hand = u.model.token_sums(x, y)
        u.model.eval_context = context
        for p in u.method_state.pairs:
            p.set_row_weights(None)
    assert summed[1:] == by_hand[1:] and summed[0] == pytest.approx(by_hand[0], rel=1e-5)
    assert all(p.row_weights is None for p in u.method_state.pairs), "the weights are cleared after the batch"
    # causal: a window whose last token changes keeps every earlier position's weight
    with torch.no_grad():
        other = x.clone()
        other[:, -1] = (other[:, -1] + 1) % u.model.lm.config.vocab_size
        refs.load_state_dict(state)
        first = u.method.omega(u, x)
        refs.load_state_dict(state)
        second = u.method.omega(u, other)
    assert first.shape == x.shape and torch.equal(first[:, :-1], second[:, :-1])
    assert not torch.equal(first[:, -1], second[:, -1])
    refs.load_state_dict(after)
    # the reference sampler's state survives a checkpoint (weights_only load)
    checkpoint.save_atomic({"m": u.method.state_dict(u)}, tmp_path / f"feddpa_{rank}.pt")
    refs.load_state_dict(state)
    u.method.load_state_dict(u, checkpoint.load(tmp_path / f"feddpa_{rank}.pt")["m"])
    assert torch.equal(refs.state_dict()["generator"], after["generator"])

    # after the last round (variant T too): one more average of the global adapters, so that the
    # model evaluated holds the averaged global adapter, as the released code evaluates it
    from comigs_dist.monitor import Monitor
    for v in run.users:
        train.router_steps(run, v, 1)
    pre = _everyone(topo0, {v.user_idx: _state(v) for v in run.users})
    train.after_training(run, 2, Monitor.silent([v.user_idx for v in run.users]))
    post = _everyone(topo0, {v.user_idx: _state(v) for v in run.users})
    for n in glob:
        want = (sum(pre[v][n].double() for v in range(4)) / 4).float()
        assert all(torch.equal(post[v][n], want) for v in range(4)), n
    assert all(torch.equal(post[v][n], pre[v][n]) for v in range(4) for n in local)

    # a whole run through train.run, evaluated every round
    rows = train.run(_feddpa_config(**{"train.rounds": 3, "eval.every": 1}), dataclasses.replace(topo0, groups={}),
                     tmp_path / "run")
    assert all(row["test_ppl"] < row["base_test_ppl"] and row["router_steps"] == 3 * 2 for row in rows)


@pytest.mark.slow
def test_feddpa_phases_share_the_global_adapter_and_weigh_each_test_window(tmp_path):
    """4 users on 2 ranks: the expert steps move the local adapters only (pair weights 0.5/0.5),
    the second phase the global adapters only (weights 1/0); after the sync every global adapter
    is bit for bit the users' mean and the local ones are untouched; the bytes are one global
    adapter, the analytic figure; an evaluation batch's loss equals the one with the row weights
    computed by hand from independently computed embeddings, at each position (a changed last
    token leaves every earlier position's weight alone); the reference sampler survives a
    checkpoint; after the last round the global adapters are averaged once more; three rounds
    through train.run beat the base model."""
    run_on_ranks(_feddpa_worker, 2, tmp_path, timeout_s=600)


def test_feddpa_refuses_a_schedule_without_one_global_phase_per_round():
    from comigs_dist.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"train.router_every \(30\) must equal train.local_steps \(10\).*"
                                          r"set train.router_every=10 train.router_steps=10"):
        load_config(None, ["method=feddpa"])
    with pytest.raises(ConfigError, match=r"method_options.alpha \(1.5\) must be in \[0, 1\]"):
        load_config(None, ["method=feddpa", "train.router_every=10", "method_options.alpha=1.5"])


# --------------------------------------------------------------------------------------------
# FedDPA-F: the rounds train the global adapter alone; after the last round each local adapter
# starts as a copy of the averaged global one and is fine-tuned with the global one frozen
# --------------------------------------------------------------------------------------------

def _feddpa_f_config(**extra):
    from helpers import tiny_config
    return tiny_config(method="feddpa", n_users=4, **{"method_options.variant": "F", "train.local_steps": 2,
                                                      "train.rounds": 2, **extra})


def _ce_on(u, x, y) -> float:
    with torch.no_grad():
        return float(u.model(x, y).ce)


def _feddpa_f_worker(rank, world_size, tmp_path):
    import dataclasses
    from comigs_dist import train
    from comigs_dist.data import BatchSampler
    from comigs_dist.model import Role
    from comigs_dist.monitor import AFTER_TRAINING_LOSS, Monitor
    from dist_harness import init_topology
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    topo0 = init_topology(n_users=4)
    for n_steps in (0, 3):
        cfg = _feddpa_f_config(**{"method_options.finetune_steps": n_steps, "log.tensorboard": True})
        run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
        tags = run.users[0].model.report.tags
        glob = {n for n, t in tags.items() if t.role == Role.GENERALIST}
        local = {n for n, t in tags.items() if t.role == Role.SPECIALIST}
        for u in run.users:
            assert u.router_opt is None, "variant F has no second level"
            held = {id(p) for g in u.expert_opt.param_groups for p in g["params"]}
            assert held == {id(u.model.report.params[n]) for n in glob}, "the expert optimiser holds the global adapter"
        start = {u.user_idx: _state(u) for u in run.users}

        # the local adapter is out of the forward: a nonzero local B does not change the loss
        u = run.users[0]
        x, y = BatchSampler(u.data.train, cfg.train.seq_len, 123).sample(2)
        train.run_round(run, 0)
        for v in run.users:
            assert all(p.weights == (1.0, 0.0) for p in v.method_state.pairs)
            changed = {n for n, p in _state(v).items() if not torch.equal(p, start[v.user_idx][n])}
            assert changed == glob, "the rounds train the global adapter alone"
        before = _ce_on(u, x, y)
        saved = {n: u.model.report.params[n].detach().clone() for n in local}
        with torch.no_grad():
            for pair in u.method_state.pairs:
                pair.second.lora_B.normal_()
        assert _ce_on(u, x, y) == before, "the local adapter is not in the training forward"
        # ... nor in an evaluation before the fine-tune (the global adapter alone, as FedIT)
        with torch.no_grad():
            through_context = u.model.token_sums(x, y)
            for pair in u.method_state.pairs:
                pair.second.lora_B.zero_()
            context, u.model.eval_context = u.model.eval_context, None
            plain = u.model.token_sums(x, y)
            u.model.eval_context = context
            for n in local:
                u.model.report.params[n].copy_(saved[n])
        assert through_context == plain
        train.run_round(run, 1)
        for v in run.users:
            assert all(torch.equal(_state(v)[n], start[v.user_idx][n]) for n in local), "local untouched in rounds"

        # after training: one more mean of the global adapters, then the fine-tune
        pre = _everyone(topo0, {v.user_idx: _state(v) for v in run.users})
        samplers = {v.user_idx: {k: t.clone() for k, t in v.train_sampler.state_dict().items()} for v in run.users}
        sent = {v.user_idx: v.stats.bytes_sent for v in run.users}
        train.after_training(run, cfg.train.rounds, Monitor.silent([v.user_idx for v in run.users]))
        post = _everyone(topo0, {v.user_idx: _state(v) for v in run.users})
        for n in glob:
            want = (sum(pre[w][n].double() for w in range(4)) / 4).float()
            assert all(torch.equal(post[w][n], want) for w in range(4)), n
        for v in run.users:
            numel = sum(p.numel() for _, p in v.shared["generalists"])
            assert v.stats.bytes_sent - sent[v.user_idx] == numel * 4, "the fine-tune itself sends nothing"
            st = v.method_state
            assert st.finetuned and len(st.finetune_losses) == n_steps
            assert all(p.weights == (0.5, 0.5) for p in st.pairs)
            mine = _state(v)
            pairs_of = [(a, a.replace(".first.", ".second.")) for a in glob]
            assert all(b in local for _, b in pairs_of), "each global tensor has its local twin"
            if n_steps == 0:
                assert all(torch.equal(mine[b], mine[a]) for a, b in pairs_of), "local = copy of the global adapter"
                continue
            assert any(not torch.equal(mine[b], mine[a]) for a, b in pairs_of), "the fine-tune moved the local adapter"
            # the first step's loss is the averaged global adapter's alone on the same batch:
            # (1 - alpha) g + alpha l = g holds only if l started as a copy of g
            hand = BatchSampler(v.data.train, cfg.train.seq_len, 0)
            hand.load_state_dict(samplers[v.user_idx])
            bx, by = hand.sample(cfg.train.batch_size)
            for pair in st.pairs:
                pair.set_weights(1.0, 0.0)
            assert st.finetune_losses[0] == pytest.approx(_ce_on(v, bx, by), rel=1e-5)
            for pair in st.pairs:
                pair.set_weights(0.5, 0.5)
        if n_steps == 0:
            continue

        # a whole run through train.run: rounds, one more mean, the fine-tune, the final evaluation
        rows = train.run(cfg, dataclasses.replace(topo0, groups={}), tmp_path / "run")
        for row in rows:
            assert row["router_steps"] == 0 and row["local_steps"] == 2 * 2
            assert row["feddpa_finetune"]["steps"] == 3 and row["test_ppl"] < row["base_test_ppl"]
        for v in run.users:  # the fine-tune's losses in TensorBoard, after the 4 local iterations
            row = next(r for r in rows if r["user"] == v.user_idx)
            acc = EventAccumulator(str(tmp_path / "run" / "tb" / f"user_{v.user_idx:02d}"),
                                   size_guidance={"scalars": 0})
            acc.Reload()
            logged = [(e.step, e.value) for e in acc.Scalars(AFTER_TRAINING_LOSS)]
            assert logged == [(4 + k + 1, pytest.approx(loss, rel=1e-6))
                              for k, loss in enumerate(row["feddpa_finetune"]["losses"])]


def test_feddpa_f_trains_the_global_adapter_then_fine_tunes_a_copy(tmp_path):
    """4 users on 2 ranks, variant F: the rounds move the global adapters only (weights 1/0; a
    nonzero local adapter changes neither the training loss nor an evaluation); after the last
    round every global adapter is bit for bit the users' mean, the local adapters are copies of it
    with 0 fine-tune steps and differ from it after 3, whose first loss is the global model's on
    the same batch; train.run reports the fine-tune, in results.json and TensorBoard."""
    run_on_ranks(_feddpa_f_worker, 2, tmp_path, timeout_s=600)


def test_feddpa_variant_options_are_checked():
    """variant must be T or F; finetune_steps >= 0 and only with variant F; variant F accepts
    privacy (its aggregation after the last round is planned: test_privacy_dist) and partial
    participation; F needs no router schedule."""
    from comigs_dist.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"method_options.variant \('G'\) must be one of 'T', 'F'"):
        load_config(None, ["method=feddpa", "train.router_every=10", "method_options.variant=G"])
    with pytest.raises(ConfigError, match=r"method_options.finetune_steps \(-1\) must be >= 0 for variant F.*"
                                          r"leave it out for train.local_steps \(10\)"):
        load_config(None, ["method=feddpa", "method_options.variant=F", "method_options.finetune_steps=-1"])
    with pytest.raises(ConfigError, match=r"method_options.finetune_steps \(3\) applies to FedDPA-F only.*"
                                          r"set method_options.variant=F"):
        load_config(None, ["method=feddpa", "train.router_every=10", "method_options.finetune_steps=3"])
    assert load_config(None, ["method=feddpa", "method_options.variant=F", "privacy.dp=user"])
    cfg = load_config(None, ["method=feddpa", "method_options.variant=F", "method_options.finetune_steps=0"])
    assert cfg.method_options["variant"] == "F" and cfg.train.router_every != cfg.train.local_steps
    assert load_config(None, ["method=feddpa", "method_options.variant=F", "train.participation=0.5"])


def _feddpa_f_participation_worker(rank, world_size, tmp_path):
    import dataclasses
    from comigs_dist import train
    from comigs_dist.config.users import participants
    from comigs_dist.model import Role
    from comigs_dist.monitor import Monitor
    from dist_harness import init_topology
    topo0 = init_topology(n_users=4)
    cfg = _feddpa_f_config(**{"train.rounds": 3, "train.users_per_round": 2, "method_options.finetune_steps": 0})
    run = train.build_rank(cfg, dataclasses.replace(topo0, groups={}))
    glob = [n for n, t in run.users[0].model.report.tags.items() if t.role == Role.GENERALIST]
    for r in range(3):
        train.run_round(run, r)
    last = sorted(participants(cfg, 4, 2))
    assert len(last) == 2
    pre = _everyone(topo0, {v.user_idx: _state(v) for v in run.users})
    train.after_training(run, cfg.train.rounds, Monitor.silent([v.user_idx for v in run.users]))
    post = _everyone(topo0, {v.user_idx: _state(v) for v in run.users})
    for n in glob:  # every user, drawn in the last round or not, holds the mean of its participants
        want = (sum(pre[w][n].double() for w in last) / 2).float()
        assert all(torch.equal(post[w][n], want) for w in range(4)), n
        assert not all(torch.equal(pre[w][n], want) for w in range(4)), "the closing mean changed something"
    for v in run.users:  # 0 fine-tune steps: each local adapter is a copy of that mean
        mine = _state(v)
        assert all(torch.equal(mine[n.replace(".first.", ".second.")], mine[n]) for n in glob)


def test_feddpa_f_under_partial_participation_hands_the_last_participants_mean_to_everyone(tmp_path):
    """4 users on 2 ranks, 2 of them per round, variant F: after the last round every user's global
    adapter is bit for bit the mean over that round's two participants (the users not drawn
    download it too), and the fine-tune starts every local adapter from it."""
    run_on_ranks(_feddpa_f_participation_worker, 2, tmp_path, timeout_s=600)


def _feddpa_f_resume_worker(rank, world_size, tmp_path, plans):
    from dist_harness import init_topology
    from helpers import run_and_record
    topo = init_topology(n_users=4)
    for tag, resume in plans:
        cfg = _feddpa_f_config(**{"train.rounds": 3, "method_options.finetune_steps": 3, "eval.every": 1,
                                  "checkpoint.every": 1, "checkpoint.final": True, "train.schedule": "constant",
                                  "resume": resume, "out_dir": str(tmp_path / tag)})
        run_and_record(topo, cfg, tmp_path / tag, tmp_path / f"{tag}.json")


@pytest.mark.slow
def test_feddpa_f_resumes_to_the_whole_runs_results_and_fine_tunes_once(tmp_path):
    """4 users on 2 ranks, variant F, 3 rounds checkpointed every round and a final checkpoint:
    resumed from round 2 (a round and the fine-tune left), from round 3 (the fine-tune alone
    left) and rerun in the finished directory (final.pt present; a resume starts from the last
    round checkpoint, written before the fine-tune), every user's row equals the whole run's
    bit for bit: the fine-tune ran once, from the restored samplers."""
    import shutil
    from comigs_dist import checkpoint
    from helpers import assert_same_rows, cut_run, read_rows
    run_on_ranks(_feddpa_f_resume_worker, 2, tmp_path, [("whole", "false")], timeout_s=600)
    whole = tmp_path / "whole"
    assert all((checkpoint.user_dir(whole, u) / "final.pt").exists() for u in range(4))
    for keep in (2, 3):
        cut_run(whole, tmp_path / f"from{keep}", keep)
    shutil.copytree(whole, tmp_path / "again")
    run_on_ranks(_feddpa_f_resume_worker, 2, tmp_path, [("from2", "true"), ("from3", "true"), ("again", "true")],
                 timeout_s=600)
    rows = read_rows(tmp_path / "whole.json")
    assert all(r["feddpa_finetune"]["steps"] == 3 for r in rows)
    for tag in ("from2", "from3", "again"):
        assert_same_rows(rows, read_rows(tmp_path / f"{tag}.json"), tag)
