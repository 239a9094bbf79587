"""The chunked language-model loss: the same loss and gradients as the plain one, less memory."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comigs_dist.evaluate import evaluate_split
from comigs_dist.model import AdapterSpec, UserModel, build_base_model, wrap_user_model
from comigs_dist.model.head import IGNORE_INDEX, lm_cross_entropy, output_head, token_sums

SPEC = AdapterSpec(n_experts=2, n_generalists=1, rank=4, alpha=16.0, attn_rank=4, top_k=2, routed=True,
                   load_balancing="generalist")


def _tensors(n: int = 74, d: int = 24, vocab: int = 301, ignored: bool = False, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.3
    b = torch.randn(vocab, generator=g) * 0.1 if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    if ignored:
        y[::3] = IGNORE_INDEX
        y[-5:] = IGNORE_INDEX  # a trailing chunk with ignored tokens only
    return h, w, b, y


def _loss_and_grads(fn, h, w, b, y):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    loss = fn(*leaves, y)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("chunk", [1, 7, 16, 50])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(chunk, ignored, bias):
    """For chunks that do and do not divide the 74 tokens, with and without ignored targets and a
    bias: the loss and the gradients of hidden states, weight and bias (a tied embedding that
    trains) equal those of F.cross_entropy over the full logits to float32 rounding."""
    h, w, b, y = _tensors(ignored=ignored, bias=bias)
    plain, plain_grads = _loss_and_grads(lambda h, w, b, y: F.cross_entropy(F.linear(h, w, b), y), h, w, b, y)
    chunked, grads = _loss_and_grads(lambda h, w, b, y: lm_cross_entropy(h, w, b, y, chunk), h, w, b, y)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(plain_grads) == (3 if bias else 2)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if ignored:  # an ignored token's hidden state gets no gradient
        assert torch.all(grads[0][y == IGNORE_INDEX] == 0)


def test_a_batch_within_one_chunk_and_chunk_zero_are_the_plain_computation_bit_for_bit():
    """chunk=0, or no more tokens than one chunk, run F.cross_entropy on the whole logits."""
    h, w, _, y = _tensors(ignored=True)
    want = F.cross_entropy(F.linear(h, w).float(), y)
    for chunk in (0, 74, 1000):
        assert torch.equal(lm_cross_entropy(h, w, None, y, chunk), want)


def test_hidden_states_of_any_shape_are_flattened_with_their_targets():
    """(B, T, D) hidden states and (B, T) targets give the loss of the flattened tokens."""
    h, w, _, y = _tensors(n=6 * 12)
    want = F.cross_entropy(F.linear(h, w), y)
    torch.testing.assert_close(lm_cross_entropy(h.reshape(6, 12, -1), w, None, y.reshape(6, 12), 5), want,
                               rtol=1e-6, atol=1e-6)


def test_chunked_loss_keeps_no_logits_sized_tensor_for_backward():
    """Autograd keeps vocabulary-sized tensors for the plain loss (at least the N x V logits'
    worth); the chunked loss keeps none: only hidden-sized state survives the forward pass."""
    h, w, _, y = _tensors(n=64, d=16, vocab=997)
    logits_numel = 64 * 997

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        hh = h.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(hh)
        loss.backward()
        return sizes
    plain = saved_sizes(lambda hh: F.cross_entropy(F.linear(hh, w), y))
    chunked = saved_sizes(lambda hh: lm_cross_entropy(hh, w, None, y, 8))
    assert sum(s for s in plain if s >= logits_numel) >= logits_numel
    assert all(s < 8 * 997 + 1 for s in chunked), chunked  # at most one chunk of logits


@pytest.mark.parametrize("chunk", [0, 1, 9, 32])
def test_token_sums_count_the_same_loss_hits_and_tokens_as_the_whole_logits(chunk):
    """Evaluation sums: summed cross-entropy, argmax hits and counted tokens, ignored tokens left out."""
    h, w, b, y = _tensors(ignored=True, bias=True)
    logits = F.linear(h, w, b)
    total, hits, count = token_sums(h, w, b, y, chunk)
    assert total == pytest.approx(F.cross_entropy(logits, y, reduction="sum").item(), rel=1e-6)
    assert hits == int((logits.argmax(-1) == y).sum())
    assert count == int((y != IGNORE_INDEX).sum()) == 74 - len(set(range(0, 74, 3)) | set(range(69, 74)))


def _user_model(name: str, vocab: int, chunk: int) -> UserModel:
    lm = build_base_model(name, vocab, 32)
    torch.manual_seed(3)
    model = wrap_user_model(lm, SPEC, loss_chunk=chunk)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # experts that differ, so that every trainable parameter gets a gradient
        for pname, p in model.named_parameters():
            if pname.endswith(("lora_B", "router.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.set_trainable(lambda tag: True)
    return model


@pytest.mark.parametrize("name,vocab", [("tiny", 128), ("llama-tiny", 96)])
def test_user_model_loss_and_gradients_do_not_depend_on_the_chunk(name, vocab):
    """GPT-2 (tied embeddings, frozen) and Llama: the cross-entropy, the load-balancing loss, the
    gradient reaching the final hidden states and every adapter's and router's gradient are the
    same for chunks of 5, 16 and 50 tokens as for the whole logits, with some targets ignored."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, 32), generator=g)
    y = torch.randint(0, vocab, (3, 32), generator=g)
    y[0, :7] = IGNORE_INDEX
    y[2, 20:] = IGNORE_INDEX

    def run(chunk):
        model = _user_model(name, vocab, chunk)
        hidden = model.hidden(x)
        hidden.retain_grad()
        ce = model.lm_loss(hidden, y)
        lb = model.load_balancing_loss()
        (ce + 0.01 * lb).backward()
        weight, _ = output_head(model.lm)
        assert not weight.requires_grad and weight.grad is None  # the frozen head (GPT-2: the tied wte)
        grads = {n: p.grad.clone() for n, p in model.report.params.items()}
        assert all(gr.abs().sum() > 0 for gr in grads.values()), [n for n, gr in grads.items() if not gr.abs().sum()]
        return ce.detach(), lb.detach(), hidden.grad, grads

    ce0, lb0, hidden0, grads0 = run(0)
    assert torch.all(hidden0[y == IGNORE_INDEX] == 0) and hidden0.abs().sum() > 0
    for chunk in (5, 16, 50):
        ce, lb, hidden, grads = run(chunk)
        torch.testing.assert_close(ce, ce0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lb, lb0, rtol=0, atol=0)
        torch.testing.assert_close(hidden, hidden0, rtol=1e-5, atol=1e-8)
        assert grads.keys() == grads0.keys()
        for n in grads:
            scale = float(grads0[n].abs().max())  # float32 rounding relative to the tensor's size
            torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name,vocab", [("tiny", 128), ("llama-tiny", 96)])
def test_forward_is_the_models_own_logits_cross_entropy(name, vocab):
    """UserModel.forward (the base model's final hidden states through the output projection, in
    chunks) equals F.cross_entropy over the Hugging Face model's own logits, GPT-2 and Llama."""
    model = _user_model(name, vocab, 7)
    x, y = torch.randint(0, vocab, (2, 32)), torch.randint(0, vocab, (2, 32))
    want = F.cross_entropy(model.logits(x).reshape(-1, vocab), y.reshape(-1))
    torch.testing.assert_close(model(x, y).ce, want, rtol=1e-6, atol=1e-6)


def test_bf16_base_under_autocast_gives_the_plain_loss_to_bf16_rounding():
    """A bf16 frozen base under bf16 autocast (the GPU setting, here on CPU): the chunked loss
    casts the hidden states as autocast would and agrees with the whole logits' loss."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 128, (2, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    losses = {}
    for chunk in (0, 8):
        model = _user_model("tiny", 128, chunk)
        model.cast_frozen_(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, y)
        out.ce.backward()
        assert out.ce.dtype == torch.float32 and torch.isfinite(out.ce)
        losses[chunk] = (out.ce.item(), next(iter(model.report.params.values())).grad.clone())
    assert losses[8][0] == pytest.approx(losses[0][0], rel=1e-2)
    torch.testing.assert_close(losses[8][1], losses[0][1], rtol=0.1, atol=1e-3)


def test_evaluation_does_not_depend_on_the_chunk():
    """evaluate_split: loss, perplexity, accuracy, token count and routing shares are the same
    with the logits of 16 tokens at a time as with a whole batch's."""
    tokens = np.random.default_rng(0).integers(0, 128, 32 * 9 + 1).astype(np.uint16)
    results = {}
    for chunk in (0, 16):
        model = _user_model("tiny", 128, chunk)
        results[chunk] = evaluate_split(model, tokens, 32, batch_size=4)
    a, b = results[0], results[16]
    assert a.tokens == b.tokens == 32 * 9
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.ppl == pytest.approx(a.ppl, rel=1e-5)
    assert b.accuracy == a.accuracy
    assert b.routing == a.routing


def _run_worker(rank, world_size, tmp_path, chunk):
    import json
    from dist_harness import init_topology
    from helpers import tiny_config
    from comigs_dist.train import run
    cfg = tiny_config(**{"train.loss_chunk": chunk, "train.batch_size": 4, "train.seq_len": 32})
    [row] = run(cfg, init_topology(), tmp_path / f"run_{chunk}")
    (tmp_path / f"row_{chunk}_{rank}.json").write_text(json.dumps(
        {k: row[k] for k in ("test_loss", "test_accuracy", "final_train_loss", "base_test_ppl")}))


@pytest.mark.slow
@pytest.mark.extended  # by default: the chunked loss and gradients equal the whole logits' above
def test_a_run_with_chunks_of_16_tokens_ends_where_the_whole_logits_run_ends(tmp_path):
    """Algorithm 1 on 2 ranks (expert and router steps, sync, evaluation) with train.loss_chunk=16
    (8 chunks per micro-batch of 4 x 32 tokens) gives every user the losses and accuracy of the
    same run with the whole logits, to float32 rounding accumulated over its steps."""
    import json
    from dist_harness import run_on_ranks
    for chunk in (0, 16):
        run_on_ranks(_run_worker, 2, tmp_path, chunk)
    for rank in range(2):
        whole, chunked = (json.loads((tmp_path / f"row_{c}_{rank}.json").read_text()) for c in (0, 16))
        assert chunked["base_test_ppl"] == pytest.approx(whole["base_test_ppl"], rel=1e-6)
        for key in ("test_loss", "final_train_loss"):
            assert chunked[key] == pytest.approx(whole[key], rel=1e-4), key
        assert chunked["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=2e-3)
