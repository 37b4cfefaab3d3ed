"""kernels/attention.py on one process: masked blocks cut into mask-free pieces (packed documents,
offset causal blocks) equal the reference math, and a long packed row never builds a dense mask."""
import pytest
import torch

import longtrain.kernels.attention as kernel
from longtrain.kernels.attention import BlockMask, attention_backward, attention_forward


def _packed_row(lengths: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids (-1 padding after the documents) and positions restarting per document."""
    doc = torch.full((total,), -1, dtype=torch.long)
    pos = torch.zeros(total, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        doc[start:start + n] = i
        pos[start:start + n] = torch.arange(n)
        start += n
    return doc, pos


def _inputs(b, sq, sk, h, hkv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, sq, h, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, generator=gen) for _ in range(2))
    return q, k, v, dout


def _compare(q, k, v, dout, mask):
    """Max abs differences of the default backend (pieces) against the reference on out, lse and grads."""
    ref_out, ref_lse = attention_forward(q.double(), k.double(), v.double(), scale=0.3, mask=mask, backend="reference")
    out, lse = attention_forward(q, k, v, scale=0.3, mask=mask)
    ref_g = attention_backward(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, scale=0.3,
                               mask=mask, backend="reference")
    got_g = attention_backward(dout, q, k, v, out, lse, scale=0.3, mask=mask)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))  # the same rows have no key at all
    errors = {"out": (out.double() - ref_out).abs().max(), "lse": (lse.double() - ref_lse)[finite].abs().max()}
    for name, got, want in zip(("dq", "dk", "dv"), got_g, ref_g):
        errors[name] = (got.double() - want).abs().max()
    return {key: float(value) for key, value in errors.items()}


@pytest.mark.parametrize("causal", [True, False])
def test_packed_blocks_in_pieces_match_reference(monkeypatch, causal):
    """Queries and keys are scattered subsets of two packed rows (as a cp rank holds them: runs of
    documents, some documents split, a length-1 document, padding), GQA."""
    monkeypatch.setattr(kernel, "DENSE_MASK_MAX_ELEMENTS", 0)  # every per-token block in pieces
    rows = [_packed_row([5, 1, 19, 3, 1, 2], 40), _packed_row([1, 1, 2, 27, 9], 40)]
    doc = torch.stack([r[0] for r in rows])
    pos = torch.stack([r[1] for r in rows])
    q_idx = torch.tensor([0, 1, 2, 5, 6, 7, 8, 20, 21, 22, 23, 24, 28, 29, 36, 37])  # runs, split documents
    k_idx = torch.tensor([3, 4, 5, 6, 9, 10, 11, 12, 13, 24, 25, 26, 27, 28, 30, 31, 38, 39])
    q, k, v, dout = _inputs(2, len(q_idx), len(k_idx), 4, 2, 8, seed=1)
    mask = BlockMask(causal=causal, q_pos=pos[:, q_idx], k_pos=pos[:, k_idx], q_doc=doc[:, q_idx],
                     k_doc=doc[:, k_idx])
    errors = _compare(q, k, v, dout, mask)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("offsets", [(3, 0), (0, 6), (5, 9), (3, 3)])
def test_offset_causal_blocks_in_pieces_match_reference(offsets):
    """A block whose keys are not aligned with its queries (a K/V piece, keys cut at the padding)."""
    q, k, v, dout = _inputs(2, 12, 7, 4, 1, 8, seed=2)
    mask = BlockMask(causal=True, q_offset=offsets[0], k_offset=offsets[1])
    assert mask.kind(12, 7) == "masked"
    errors = _compare(q, k, v, dout, mask)
    assert max(errors.values()) <= 1e-5, errors


def test_long_packed_row_builds_no_dense_mask(monkeypatch):
    """One 6K-token packed row of four documents: at most DENSE_MASK_MAX_ELEMENTS mask elements per
    kernel call (the old path built a 6K x 6K mask), and the result equals the dense-mask path."""
    sizes = []
    real = kernel._additive_mask

    def recording(allowed, dtype):
        sizes.append(allowed.numel())
        return real(allowed, dtype)

    monkeypatch.setattr(kernel, "_additive_mask", recording)
    monkeypatch.setattr(kernel, "DENSE_MASK_MAX_ELEMENTS", 1 << 20)
    doc, pos = _packed_row([3000, 1, 2500, 600], 6144)
    q, k, v, dout = _inputs(1, 6144, 6144, 2, 1, 16, seed=3)
    mask = BlockMask(causal=True, q_pos=pos[None], k_pos=pos[None], q_doc=doc[None], k_doc=doc[None])
    out, lse = attention_forward(q, k, v, scale=0.25, mask=mask)
    grads = attention_backward(dout, q, k, v, out, lse, scale=0.25, mask=mask)
    assert max(sizes, default=0) <= 1 << 20, max(sizes)

    monkeypatch.setattr(kernel, "DENSE_MASK_MAX_ELEMENTS", 1 << 40)  # one masked call, the old way
    monkeypatch.setattr(kernel, "CPU_PIECE_CALL_ELEMENTS", float("inf"))  # (on CPU pieces would cost less)
    dense_out, dense_lse = attention_forward(q, k, v, scale=0.25, mask=mask)
    dense_grads = attention_backward(dout, q, k, v, dense_out, dense_lse, scale=0.25, mask=mask)
    assert max(sizes) == 6144 * 6144
    assert (out - dense_out).abs().max() <= 1e-5
    for got, want in zip(grads, dense_grads):
        assert (got - want).abs().max() <= 1e-4


def test_small_packed_block_on_cpu_runs_the_cheaper_way(monkeypatch):
    """Under DENSE_MASK_MAX_ELEMENTS on CPU: a block of a few long documents runs in mask-free pieces
    (a dense mask visits every element of the square; measured 4-15x slower), one of many 1-token
    documents as one masked call (a piece's fixed cost would dominate); both equal the reference."""
    masks = []
    real = kernel._additive_mask

    def recording(allowed, dtype):
        masks.append(allowed.numel())
        return real(allowed, dtype)

    monkeypatch.setattr(kernel, "_additive_mask", recording)
    for lengths, dense in (([300, 2, 500, 200], False), ([1] * 250 + [6], True)):
        masks.clear()
        doc, pos = _packed_row(lengths, 1024)
        assert 1024 * 1024 <= kernel.DENSE_MASK_MAX_ELEMENTS  # a block the old rule ran as one masked call
        q, k, v, dout = _inputs(1, 1024, 1024, 4, 2, 16, seed=4)
        mask = BlockMask(causal=True, q_pos=pos[None], k_pos=pos[None], q_doc=doc[None], k_doc=doc[None])
        errors = _compare(q, k, v, dout, mask)
        assert max(errors.values()) <= 1e-5, (lengths[:4], errors)
        assert masks == ([1024 * 1024] * 2 if dense else []), (lengths[:4], masks)  # forward and backward


def _fake_flash_attn(monkeypatch, lse_layout="heads_total"):
    """A stand-in for flash-attn's varlen functions (CUDA only) built on the reference math, so the
    packing, the merge by log-sum-exp and the scatter of gradients run on CPU. `lse_layout` other
    than flash-attn's (heads, total) simulates a release whose private API changed."""
    import sys
    import types

    def segments(cu):
        return [slice(int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, window_size_left, window_size_right,
                softcap, alibi_slopes, return_softmax):
        outs, lses = [], []
        for qs, ks in zip(segments(cu_q), segments(cu_k)):
            o, lse = kernel._reference_forward(q[None, qs], k[None, ks], v[None, ks], scale, BlockMask(causal=causal))
            outs.append(o[0])
            lses.append(lse[0])
        lse = torch.cat(lses, dim=1)
        return torch.cat(outs), (lse if lse_layout == "heads_total" else lse.T.contiguous()), None, None

    def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal,
                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic):
        for qs, ks in zip(segments(cu_q), segments(cu_k)):
            g = kernel._reference_backward(dout[None, qs], q[None, qs], k[None, ks], v[None, ks], out[None, qs],
                                           lse[None, :, qs], scale, BlockMask(causal=causal))
            dq[qs], dk[ks], dv[ks] = g[0][0], g[1][0], g[2][0]

    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_varlen_forward, interface._flash_attn_varlen_backward = forward, backward
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface = interface
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_varlen_pieces_match_reference(monkeypatch, causal):
    """The CUDA path for packed blocks (every piece in one varlen call per causal flag, partials
    merged by index) on the same scattered packed rows as above."""
    _fake_flash_attn(monkeypatch)
    rows = [_packed_row([5, 1, 19, 3, 1, 2], 40), _packed_row([1, 1, 2, 27, 9], 40)]
    doc, pos = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    q_idx = torch.tensor([0, 1, 2, 5, 6, 7, 8, 20, 21, 22, 23, 24, 28, 29, 36, 37])
    k_idx = torch.tensor([3, 4, 5, 6, 9, 10, 11, 12, 13, 24, 25, 26, 27, 28, 30, 31, 38, 39])
    q, k, v, dout = (t.double() for t in _inputs(2, len(q_idx), len(k_idx), 4, 2, 8, seed=5))
    mask = BlockMask(causal=causal, q_pos=pos[:, q_idx], k_pos=pos[:, k_idx], q_doc=doc[:, q_idx],
                     k_doc=doc[:, k_idx])
    ref_out, ref_lse = kernel._reference_forward(q, k, v, 0.3, mask)
    out, lse = kernel._varlen_forward(q, k, v, 0.3, mask)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (out.double() - ref_out).abs().max() <= 1e-5
    assert (lse.double() - ref_lse)[finite].abs().max() <= 1e-5
    ref_g = kernel._reference_backward(dout, q, k, v, ref_out, ref_lse, 0.3, mask)
    got_g = kernel._varlen_backward(dout, q, k, v, ref_out, ref_lse, 0.3, mask)
    for got, want in zip(got_g, ref_g):
        assert (got.double() - want).abs().max() <= 1e-5


def test_flash_varlen_self_check_falls_back_when_the_api_differs(monkeypatch):
    _fake_flash_attn(monkeypatch)
    assert kernel._varlen_self_check(torch.device("cpu"), torch.float32)
    _fake_flash_attn(monkeypatch, lse_layout="total_heads")  # a release with another lse layout
    with pytest.warns(UserWarning, match="flash-attn varlen on cpu/torch.float32 failed its check"):
        assert not kernel._varlen_self_check(torch.device("cpu"), torch.float32)


def test_a_backend_that_fails_its_check_is_passed_over_for_the_next(monkeypatch):
    """flash_attn failing (or raising in) its self-check falls back to PyTorch's fused kernels, not
    straight to the reference math (whose q x k score matrix does not fit at long lengths)."""
    monkeypatch.setattr(kernel, "_CHECKED", {})
    monkeypatch.setattr(kernel, "flash_attn_available", lambda: True)
    passing = {"flash_attn": False, "torch": True}
    monkeypatch.setattr(kernel, "_self_check", lambda backend, device, dtype: passing[backend])
    cuda = torch.device("cuda")
    assert kernel.resolve_backend("auto", cuda, torch.bfloat16, "causal") == "torch"
    assert kernel.resolve_backend("flash_attn", cuda, torch.bfloat16, "full") == "torch"
    passing["flash_attn"] = True
    monkeypatch.setattr(kernel, "_CHECKED", {})
    assert kernel.resolve_backend("auto", cuda, torch.bfloat16, "causal") == "flash_attn"
    assert kernel.resolve_backend("auto", cuda, torch.bfloat16, "masked") == "torch"  # no per-token masks
    assert kernel.resolve_backend("auto", cuda, torch.float32, "causal") == "torch"  # half precision only
    passing.update(flash_attn=False, torch=False)
    monkeypatch.setattr(kernel, "_CHECKED", {})
    # Nothing fast passed on a GPU: an error naming the way out, not a silent reference-kernel run.
    with pytest.raises(kernel.AttentionBackendError, match="refusing to run the reference kernel on a GPU"):
        kernel.resolve_backend("auto", cuda, torch.bfloat16, "causal")
    assert kernel.resolve_backend("reference", cuda, torch.bfloat16, "causal") == "reference"  # asked for
    assert kernel.resolve_backend("auto", torch.device("cpu"), torch.bfloat16, "causal") == "reference"  # CPU: fine


def test_a_backend_that_raises_in_its_check_fails_it_with_a_warning(monkeypatch):
    """A kernel missing for the device, dtype or head size raises: the check fails, it does not crash."""
    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")

    monkeypatch.setattr(kernel, "_torch_forward", broken)
    with pytest.warns(UserWarning, match="attention backend torch on cpu/torch.float32 failed its check .*RuntimeError"):
        assert not kernel._self_check("torch", torch.device("cpu"), torch.float32)


def test_varlen_only_for_small_pieces():
    """One flash-attn varlen call for many small pieces (launches dominate), one call per piece
    when the mean piece is large (the same speed without the varlen path's gathered copies)."""
    def pieces(lengths, rows=slice(0, 1)):
        out, start = [], 0
        for n in lengths:
            out.append((rows, slice(start, start + n), slice(start, start + n), BlockMask(causal=True)))
            start += n
        return out

    heads, head_dim = 32, 128
    assert kernel._varlen_pays(pieces([512] * 16), 1, heads, head_dim)  # 4 x 32 x 128 x 512^2 = 4.3e9 each
    assert not kernel._varlen_pays(pieces([8192] * 4), 1, heads, head_dim)  # 1.1e12 each
    assert kernel._varlen_pays(pieces([8192] * 4), 1, 1, 8)  # the same pieces with one small head
    # Whole-batch pieces (slice(None)) count once per row; the mean is per piece and row.
    assert kernel._varlen_pays(pieces([1024], rows=slice(None)), 8, heads, head_dim) == \
        kernel._varlen_pays(pieces([1024] * 8), 1, heads, head_dim)
    assert not kernel._varlen_pays([], 1, heads, head_dim)
