"""The chunked Mamba-2 SSD scan against the step-by-step recurrence: outputs, final states,
document resets, grouped B/C, lengths that are not a multiple of the chunk, gradients, the two
identities context parallelism relies on, and the causal conv with documents and halos."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longtrain.kernels.ssd import (
    causal_conv1d,
    initial_state_contribution,
    log_decay_to_end,
    segment_ids,
    ssd_reference,
    ssd_scan,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def make(b=2, l=77, h=6, p=8, g=3, n=16, dtype=torch.float32, seed=0, docs=True):
    """Inputs at the scale of a trained layer: outputs and states of order one."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    x = r(b, l, h, p)
    dt = F.softplus(r(b, l, h) - 1.5)
    A = -torch.exp(r(h) * 0.5)
    B = r(b, l, g, n) / math.sqrt(n)
    C = r(b, l, g, n) / math.sqrt(n)
    D = r(h)
    h0 = r(b, h, p, n) * 0.5
    seq_idx = None
    if docs:
        # Row 0: documents start at 10 and 40. Row 1: ids that repeat non-adjacently (5, 3, 5)
        # and a one-token document at 16; still a reset at every change.
        seq_idx = torch.zeros(b, l, dtype=torch.long)
        seq_idx[0, 10:] = 1
        seq_idx[0, 40:] = 2
        if b > 1:
            seq_idx[1, 16:] = 5
            seq_idx[1, 17:] = 3
            seq_idx[1, min(70, l - 1):] = 5
    cast = [t.to(dtype) for t in (x, dt, A, B, C, D, h0)]
    return (*cast, seq_idx)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 8, 16, 100])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_equals_recurrence(dtype, chunk, with_init, with_docs):
    x, dt, A, B, C, D, h0, seq_idx = make(dtype=dtype, docs=with_docs)
    init = h0 if with_init else None
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=chunk, D=D, initial_states=init, seq_idx=seq_idx)
    y_ref, final_ref = ssd_reference(x, dt, A, B, C, D=D, initial_states=init, seq_idx=seq_idx)
    assert y.dtype == dtype and y.shape == x.shape and final.shape == h0.shape
    assert max_err(y, y_ref) < TOL[dtype]
    assert max_err(final, final_ref) < TOL[dtype]


@pytest.mark.parametrize("l", [1, 5, 16, 17, 63])
def test_lengths_and_padding(l):
    # Lengths below, at and past the chunk; no D, one group (h = g·r with g = 1).
    x, dt, A, B, C, D, h0, seq_idx = make(l=l, g=1, dtype=torch.float64, docs=False)
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=16, initial_states=h0)
    y_ref, final_ref = ssd_reference(x, dt, A, B, C, initial_states=h0)
    assert max_err(y, y_ref) < 1e-12 and max_err(final, final_ref) < 1e-12


def test_heads_equal_groups():
    x, dt, A, B, C, D, h0, seq_idx = make(h=4, g=4, dtype=torch.float64)
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_states=h0, seq_idx=seq_idx)
    y_ref, final_ref = ssd_reference(x, dt, A, B, C, D=D, initial_states=h0, seq_idx=seq_idx)
    assert max_err(y, y_ref) < 1e-12 and max_err(final, final_ref) < 1e-12


def test_documents_are_independent():
    # Each document of a packed row gives what it gives alone; the final state is the last one's.
    x, dt, A, B, C, D, h0, seq_idx = make(b=1, dtype=torch.float64, docs=True)
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_states=h0, seq_idx=seq_idx)
    bounds = [(0, 10), (10, 40), (40, x.shape[1])]
    for i, (s, e) in enumerate(bounds):
        init = h0 if i == 0 else None  # the initial state reaches only the first document
        y_doc, f_doc = ssd_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], chunk_size=16, D=D,
                                initial_states=init)
        assert max_err(y[:, s:e], y_doc) < 1e-12
    assert max_err(final, f_doc) < 1e-12


@pytest.mark.parametrize("with_docs", [False, True])
def test_gradients_match_recurrence(with_docs):
    x, dt, A, B, C, D, h0, seq_idx = make(l=45, dtype=torch.float32, docs=with_docs)
    leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, h0)]
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(x.shape, generator=gen)
    gf = torch.randn(h0.shape, generator=gen)

    def grads(fn, **kw):
        for t in leaves:
            t.grad = None
        xx, dd, aa, bb, cc, DD, hh = leaves
        y, final = fn(xx, dd, aa, bb, cc, D=DD, initial_states=hh, seq_idx=seq_idx, **kw)
        ((y * gy).sum() + (final * gf).sum()).backward()
        return [t.grad.clone() for t in leaves]

    ours = grads(ssd_scan, chunk_size=16)
    ref = grads(ssd_reference)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "initial_states"), ours, ref):
        scale = max(1.0, b.abs().max().item())
        assert torch.isfinite(a).all(), name
        assert max_err(a, b) / scale < 1e-5, (name, max_err(a, b))


@pytest.mark.parametrize("docs", ["none", "inside", "at_start"])
def test_cp_identities(docs):
    x, dt, A, B, C, D, h0, _ = make(dtype=torch.float64, docs=False)
    b, l = x.shape[:2]
    seq_idx = None
    if docs == "inside":
        seq_idx = torch.zeros(b, l, dtype=torch.long)
        seq_idx[0, 30:] = 1  # row 1 has no reset: both cases in one batch
    elif docs == "at_start":
        seq_idx = torch.full((b, l), 7, dtype=torch.long)  # one document, any id: no reset
    y0, f0 = ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, seq_idx=seq_idx)
    y1, f1 = ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_states=h0, seq_idx=seq_idx)
    contrib = initial_state_contribution(C, dt, A, seq_idx, h0, ngroups=C.shape[2])
    assert max_err(y1, y0 + contrib) < 1e-12
    decay = log_decay_to_end(dt, A, seq_idx)
    assert decay.shape == (b, x.shape[2])
    assert max_err(f1, f0 + torch.exp(decay)[..., None, None] * h0) < 1e-12
    if docs == "inside":
        assert torch.isneginf(decay[0]).all() and torch.isfinite(decay[1]).all()
        assert contrib[0, 30:].abs().max() == 0 and contrib[0, :30].abs().max() > 0


def test_state_passing_across_a_split():
    # What a context-parallel core does: scan the second half from the first half's final state,
    # zeroing it for rows whose document changes exactly at the split.
    x, dt, A, B, C, D, h0, _ = make(l=80, dtype=torch.float64, docs=False)
    b, l = x.shape[:2]
    seq_idx = torch.zeros(b, l, dtype=torch.long)
    seq_idx[0, 25:] = 1  # row 0: a document crosses the split at 40
    seq_idx[1, 40:] = 1  # row 1: a document starts exactly at the split
    y_full, f_full = ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, seq_idx=seq_idx)
    s = 40
    y_a, f_a = ssd_scan(x[:, :s], dt[:, :s], A, B[:, :s], C[:, :s], chunk_size=16, D=D, seq_idx=seq_idx[:, :s])
    same_doc = (seq_idx[:, s - 1] == seq_idx[:, s]).to(f_a.dtype)
    incoming = f_a * same_doc[:, None, None, None]
    y_b, f_b = ssd_scan(x[:, s:], dt[:, s:], A, B[:, s:], C[:, s:], chunk_size=16, D=D, initial_states=incoming,
                        seq_idx=seq_idx[:, s:])
    assert max_err(torch.cat([y_a, y_b], 1), y_full) < 1e-12
    assert max_err(f_b, f_full) < 1e-12
    # The same with the identities instead of a re-run.
    y_b0, f_b0 = ssd_scan(x[:, s:], dt[:, s:], A, B[:, s:], C[:, s:], chunk_size=16, D=D, seq_idx=seq_idx[:, s:])
    y_b2 = y_b0 + initial_state_contribution(C[:, s:], dt[:, s:], A, seq_idx[:, s:], incoming)
    f_b2 = f_b0 + torch.exp(log_decay_to_end(dt[:, s:], A, seq_idx[:, s:]))[..., None, None] * incoming
    assert max_err(y_b2, y_b) < 1e-12 and max_err(f_b2, f_b) < 1e-12


def test_segment_ids():
    ids = torch.tensor([[3, 3, 1, 1, 3, -1, -1], [0, 0, 0, 0, 0, 0, 0]])
    assert segment_ids(ids).tolist() == [[0, 0, 1, 1, 2, 3, 3], [0] * 7]


def test_bad_inputs():
    x, dt, A, B, C, D, h0, seq_idx = make(l=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="groups"):
        B4 = torch.randn(*B.shape[:2], 4, B.shape[3])
        ssd_scan(x, dt, A, B4, B4, chunk_size=4, D=D)  # 6 heads do not split into 4 groups
    with pytest.raises(ValueError, match="backend"):
        ssd_scan(x, dt, A, B, C, chunk_size=4, backend="nope")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        ssd_scan(x, dt, A, B, C, chunk_size=4, backend="mamba_ssm")  # CPU tensors
    y, f = ssd_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], chunk_size=4, initial_states=h0)
    assert y.shape[1] == 0 and torch.equal(f, h0)


# ----------------------------------------------------------------------------------------------
# Causal depthwise conv
# ----------------------------------------------------------------------------------------------
def conv_reference(x, w, bias, doc_ids=None):
    b, l, c = x.shape
    k = w.shape[1]
    seg = segment_ids(doc_ids) if doc_ids is not None else torch.zeros(b, l, dtype=torch.long)
    out = bias.expand(b, l, c).clone()
    for t in range(l):
        for j in range(k):
            if t - j >= 0:
                keep = (seg[:, t - j] == seg[:, t]).to(x.dtype)[:, None]
                out[:, t] += w[:, k - 1 - j] * x[:, t - j] * keep
    return out


def test_causal_conv1d():
    gen = torch.Generator().manual_seed(0)
    b, l, c, k = 2, 23, 5, 4
    x = torch.randn(b, l, c, generator=gen, dtype=torch.float64)
    w = torch.randn(c, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    doc = torch.zeros(b, l, dtype=torch.long)
    doc[0, 6:] = 1
    doc[0, 7:] = 2
    doc[1, 20:] = -1
    plain = causal_conv1d(x, w, bias)
    assert max_err(plain, conv_reference(x, w, bias)) < 1e-12
    # The masked path with one document equals the plain (F.conv1d) path.
    assert max_err(causal_conv1d(x, w, bias, doc_ids=torch.zeros(b, l, dtype=torch.long)), plain) < 1e-12
    masked = causal_conv1d(x, w, bias, doc_ids=doc)
    assert max_err(masked, conv_reference(x, w, bias, doc)) < 1e-12
    # nn.Conv1d's weight shape and the activation.
    assert max_err(causal_conv1d(x, w[:, None], bias, activation="silu"), F.silu(plain)) < 1e-12
    # A halo of the k-1 previous inputs (and their document ids) continues the sequence exactly.
    s = 9
    for docs in (None, doc):
        full = causal_conv1d(x, w, bias, doc_ids=docs)
        second = causal_conv1d(x[:, s:], w, bias, doc_ids=None if docs is None else docs[:, s:],
                               halo=x[:, s - k + 1:s],
                               halo_doc_ids=None if docs is None else docs[:, s - k + 1:s])
        assert max_err(second, full[:, s:]) < 1e-12
