"""Chunked linear + cross-entropy (kernels/chunked_loss.py) against the plain full-logits loss."""
import pytest
import torch
import torch.nn.functional as F

from longtrain.kernels.chunked_loss import chunked_linear_cross_entropy


def _case(tokens=37, dim=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, dim, generator=gen, dtype=torch.float64).float()
    w = (torch.randn(vocab, dim, generator=gen) * 0.5)
    labels = torch.randint(0, vocab, (2, tokens), generator=gen)
    labels[0, :5] = -100
    labels[1, 10:20] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_equals_full_loss_and_grads(chunk):
    h, w, labels = _case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    full = F.cross_entropy(F.linear(h1, w1).flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    (full * 0.37).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h2, w2, labels, chunk)
    (loss * 0.37).backward()
    assert abs(loss.item() - full.item()) <= 1e-6 * max(1.0, abs(full.item()))
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0, atol=1e-6)
    assert h2.grad[0, :5].abs().max() == 0  # ignored tokens get no gradient


def test_plain_equations_reference():
    """Outside reference: -log softmax(h W^T)[target], written plainly in float64."""
    h, w, labels = _case(tokens=9, vocab=11)
    logits = h.double() @ w.double().t()
    keep = labels != -100
    ref = (torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1))[keep].sum()
    assert abs(chunked_linear_cross_entropy(h, w, labels, 4).item() - ref.item()) < 1e-4


def test_all_ignored_and_tied_weight():
    h, w, labels = _case(tokens=6)
    labels[:] = -100
    w = w.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, labels, 4)
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().max() == 0
    # A weight used twice (tied embedding and head) accumulates both gradients.
    h, w, labels = _case(tokens=6, dim=8, vocab=12)
    tokens = labels.clamp(min=0)
    for fn in ("full", "chunked"):
        wt = w[:, :8].clone().requires_grad_()
        hid = F.embedding(tokens, wt) + h[..., :8]
        loss = (F.cross_entropy(F.linear(hid, wt).flatten(0, 1), labels.flatten(), reduction="sum")
                if fn == "full" else chunked_linear_cross_entropy(hid, wt, labels, 5))
        loss.backward()
        if fn == "full":
            ref = wt.grad
        else:
            torch.testing.assert_close(wt.grad, ref, rtol=0, atol=1e-6)


def test_bad_chunk_fails():
    h, w, labels = _case()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(h, w, labels, 0)
