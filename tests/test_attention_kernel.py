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


def _record_masks(monkeypatch) -> list:
    """The element count of every dense mask the kernel builds from now on (appended as they are built)."""
    sizes = []
    real = kernel._additive_mask

    def recording(allowed, dtype):
        sizes.append(allowed.numel())
        return real(allowed, dtype)

    monkeypatch.setattr(kernel, "_additive_mask", recording)
    return sizes


def test_long_packed_row_builds_no_dense_mask(monkeypatch):
    """One 6K-token packed row of four documents: at most DENSE_MASK_MAX_ELEMENTS mask elements per
    kernel call (the old path built a 6K x 6K mask), and the result equals the dense-mask path."""
    sizes = _record_masks(monkeypatch)
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
    (a dense mask visits every element of the square; measured 4-15x slower), and so does a 1024-token
    block of 251 tiny documents (14 ms against 40); a 512-token block of them runs as one masked call
    (8 ms against 15: the pieces' fixed cost dominates). All equal the reference."""
    masks = _record_masks(monkeypatch)
    assert 1024 * 1024 <= kernel.DENSE_MASK_MAX_ELEMENTS  # blocks the old rule ran as one masked call
    for total, lengths, dense in ((1024, [300, 2, 500, 200], False), (1024, [1] * 250 + [6], False),
                                  (512, [1] * 250 + [6], True)):
        masks.clear()
        doc, pos = _packed_row(lengths, total)
        q, k, v, dout = _inputs(1, total, total, 4, 2, 16, seed=4)
        mask = BlockMask(causal=True, q_pos=pos[None], k_pos=pos[None], q_doc=doc[None], k_doc=doc[None])
        errors = _compare(q, k, v, dout, mask)
        assert max(errors.values()) <= 1e-5, (total, lengths[:4], errors)
        assert masks == ([total * total] * 2 if dense else []), (total, lengths[:4], masks)  # forward and backward


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


def _zigzag_member(lengths: list[int], member: int, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, documents) of one ring member's tokens of a packed row: chunks `member` and
    2 x members - 1 - member of every document (as the balance planner places them), so that a
    member's later chunk sees the keys of two chunks (two pieces on the same queries)."""
    pos, doc = [], []
    for d, n in enumerate(lengths):
        bounds = [i * n // (2 * members) for i in range(2 * members + 1)]
        for c in (member, 2 * members - 1 - member):
            pos.append(torch.arange(bounds[c], bounds[c + 1]))
            doc.append(torch.full((bounds[c + 1] - bounds[c],), d))
    return torch.cat(pos)[None], torch.cat(doc)[None]


@pytest.mark.parametrize("me", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulators_copy_first_partials_and_merge_the_rest(monkeypatch, dtype, me):
    """accumulate_forward/backward as ring attention runs them, for member `me` of three: its queries
    against its own keys (fresh out/lse: pieces on queries nothing was written to are copied in, the
    later chunk's second piece is merged), then against the other members' keys (out/lse carried:
    every piece merged; full pieces on adjacent tokens joined). Packed blocks open into their pieces
    (in fp32 on CPU each goes straight to the CPU kernel); out, lse and gradients equal the reference
    over all keys at once."""
    monkeypatch.setattr(kernel, "DENSE_MASK_MAX_ELEMENTS", 0)  # every per-token block in pieces
    merges, per_token_calls, cpu_piece_calls = [], [], []
    real_merge, real_forward, real_piece = kernel.merge_partial_into, kernel.attention_forward, kernel._cpu_flash_forward
    monkeypatch.setattr(kernel, "merge_partial_into", lambda *args: merges.append(1) or real_merge(*args))
    monkeypatch.setattr(kernel, "_cpu_flash_forward", lambda *args: cpu_piece_calls.append(1) or real_piece(*args))

    def recording_forward(q, k, v, *, scale, mask, backend="auto"):
        per_token_calls.append(mask.per_token)
        return real_forward(q, k, v, scale=scale, mask=mask, backend=backend)

    monkeypatch.setattr(kernel, "attention_forward", recording_forward)
    lengths = [40, 3, 17, 64, 1, 9, 6]
    members = [_zigzag_member(lengths, m, 3) for m in range(3)]
    order = [me] + [m for m in range(3) if m != me]  # own keys first, as the ring
    gen = torch.Generator().manual_seed(7)
    q, dout = (torch.randn(1, members[me][0].shape[1], 4, 8, generator=gen, dtype=dtype) for _ in range(2))
    kv = [tuple(torch.randn(1, p.shape[1], 2, 8, generator=gen, dtype=dtype) for _ in range(2)) for p, _ in members]

    def block(m):
        return [(slice(None), slice(None), slice(None),
                 BlockMask(causal=True, q_pos=members[me][0], k_pos=members[m][0], q_doc=members[me][1],
                           k_doc=members[m][1]))]

    out, lse = kernel.accumulate_forward(q, *kv[me], block(me), scale=0.3, backend="auto")
    own_merges, own_calls = len(merges), len(cpu_piece_calls)
    for m in order[1:]:
        out, lse = kernel.accumulate_forward(q, *kv[m], block(m), scale=0.3, backend="auto", out=out, lse=lse)
    if dtype == torch.float32:  # every piece straight to the CPU kernel on views
        assert per_token_calls == [] and own_calls > 0, (per_token_calls, own_calls)
        # own keys: two pieces on a document's later chunk (its diagonal, the earlier chunk's keys),
        # one of them merged, where the earlier chunk has tokens and the later more than one (a
        # 1-token diagonal is full, joined with the earlier chunk's keys); chunk c: [n c / 6, n (c + 1) / 6)
        def size(n, c):
            return n * (c + 1) // 6 - n * c // 6

        assert own_merges == sum(size(n, me) > 0 and size(n, 5 - me) > 1 for n in lengths), own_merges
        assert len(merges) - own_merges == len(cpu_piece_calls) - own_calls  # carried out/lse: all merged
    else:  # fp64 runs the reference on whole blocks: the first copied, the others merged
        assert own_merges == 0 and len(merges) == 2
        assert per_token_calls == [True] * 3 and cpu_piece_calls == []
    dq = torch.zeros_like(q)
    dk, dv = zip(*[(torch.zeros_like(k), torch.zeros_like(v)) for k, v in kv])
    for m in order:
        kernel.accumulate_backward(dout, q, *kv[m], out.to(dtype), lse, block(m), scale=0.3, backend="auto",
                                   dq=dq, dk=dk[m], dv=dv[m])

    k_all, v_all = (torch.cat([t[i] for t in kv], dim=1) for i in range(2))
    k_pos, k_doc = (torch.cat([p[i] for p in members], dim=1) for i in range(2))
    mask = BlockMask(causal=True, q_pos=members[me][0], k_pos=k_pos, q_doc=members[me][1], k_doc=k_doc)
    wide = (t.double() for t in (q, k_all, v_all))
    ref_out, ref_lse = kernel._reference_forward(*wide, 0.3, mask)
    ref_dq, ref_dk, ref_dv = kernel._reference_backward(dout.double(), q.double(), k_all.double(), v_all.double(),
                                                         ref_out, ref_lse, 0.3, mask)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (out.double() - ref_out).abs().max() <= tol
    assert (lse.double() - ref_lse).abs().max() <= tol
    assert (dq.double() - ref_dq).abs().max() <= tol
    assert (torch.cat(dk, dim=1).double() - ref_dk).abs().max() <= tol
    assert (torch.cat(dv, dim=1).double() - ref_dv).abs().max() <= tol


def test_full_pieces_on_adjacent_tokens_are_joined():
    """One 60-token document over three zigzag members (chunks of 10: member 0 holds positions
    0-9 and 50-59, member 1 10-19 and 40-49): member 0's later chunk sees both of member 1's chunks,
    side by side in member 1's block, and both of member 1's chunks see member 0's first chunk: one
    full piece each way, not two."""
    members = [_zigzag_member([60], m, 3) for m in range(2)]
    for me, other, want in ((0, 1, (slice(10, 20), slice(0, 20))), (1, 0, (slice(0, 20), slice(0, 10)))):
        mask = BlockMask(causal=True, q_pos=members[me][0], k_pos=members[other][0], q_doc=members[me][1],
                         k_doc=members[other][1])
        pieces = list(kernel._pieces(mask, 1, 20, 20))
        assert [(qs, ks) for _, qs, ks, _ in pieces] == [want], pieces
        assert pieces[0][3].kind(10, 20) == "full"
    # keys of the document on both sides of another document's: two pieces
    k_doc, k_pos = torch.tensor([[0] * 5 + [1] * 3 + [0] * 5]), torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9]])
    mask = BlockMask(causal=True, q_pos=torch.arange(20, 25)[None], k_pos=k_pos, q_doc=torch.zeros(1, 5, dtype=torch.long),
                     k_doc=k_doc)
    assert sorted((ks.start, ks.stop) for _, _, ks, _ in kernel._pieces(mask, 1, 5, 13)) == [(0, 5), (8, 13)]


def test_a_block_of_whole_documents_is_copied_without_merges(monkeypatch):
    """A packed block against its own keys, every document one run (LocalBlocksAttention's case): its
    pieces are on disjoint queries, all copied into the fresh out/lse, none merged."""
    monkeypatch.setattr(kernel, "DENSE_MASK_MAX_ELEMENTS", 0)
    merges = []
    real_merge = kernel.merge_partial_into
    monkeypatch.setattr(kernel, "merge_partial_into", lambda *args: merges.append(1) or real_merge(*args))
    doc, pos = _packed_row([30, 1, 12, 50, 7], 104)
    q, k, v, dout = _inputs(1, 104, 104, 4, 2, 8, seed=8)
    mask = BlockMask(causal=True, q_pos=pos[None], k_pos=pos[None], q_doc=doc[None], k_doc=doc[None])
    errors = _compare(q, k, v, dout, mask)
    assert max(errors.values()) <= 1e-5, errors
    assert merges == []


def test_merge_partial_into_handles_rows_without_keys():
    """Rows (of one batch row, one head) where neither, only the accumulator, only the block, or both
    have keys: lse = log(e^a + e^b), out the weighted mean, 0 and -inf where neither has keys."""
    inf = float("inf")
    lse = torch.tensor([[[-inf, -inf, 0.5, 0.5]]])
    block_lse = torch.tensor([[[-inf, 1.0, -inf, 1.0]]])
    out = torch.tensor([0.0, 0.0, 2.0, 2.0]).view(1, 1, 4, 1)
    block_out = torch.tensor([9.0, 3.0, 9.0, 3.0]).view(1, 1, 4, 1)
    kernel.merge_partial_into(out, lse, block_out, block_lse)
    both = torch.logaddexp(torch.tensor(0.5), torch.tensor(1.0))
    assert torch.allclose(lse, torch.tensor([[[-inf, 1.0, 0.5, float(both)]]]))
    share = float(torch.exp(1.0 - both))
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 3.0, 2.0, 2.0 * (1 - share) + 3.0 * share]))


def test_accumulators_take_strided_inputs(monkeypatch):
    """Inputs the CPU kernels would misread if the accumulators passed them on as views (a strided
    last dim, an expanded dout) give what their contiguous copies give."""
    monkeypatch.setattr(kernel, "DENSE_MASK_MAX_ELEMENTS", 0)
    doc, pos = _packed_row([30, 1, 12, 50], 100)
    wide_q, _, _, _ = _inputs(1, 100, 100, 4, 2, 16, seed=9)
    _, k, v, _ = _inputs(1, 100, 100, 4, 2, 8, seed=10)
    q, dout = wide_q[..., ::2], torch.ones(1, 1, 1, 1).expand(1, 100, 4, 8)
    assert q.stride(-1) == 2
    mask = BlockMask(causal=True, q_pos=pos[None], k_pos=pos[None], q_doc=doc[None], k_doc=doc[None])
    results = []
    for q_in, dout_in in ((q, dout), (q.contiguous(), dout.contiguous())):
        out, lse = attention_forward(q_in, k, v, scale=0.3, mask=mask)
        results.append((out, lse, *attention_backward(dout_in, q_in, k, v, out, lse, scale=0.3, mask=mask)))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_kernel_clock_counts_the_cpu_kernels_while_open():
    """kernel_clock: the processor time and calls of the CPU flash kernels (forward and backward count one
    call each) while the context is open, nothing outside it; an inner clock does not feed the outer.
    `longtrain probe` subtracts it from a ring member's time (parallel/balance/probe.py)."""
    import torch

    from longtrain.kernels.attention import BlockMask, attention, kernel_clock

    q, k, v = (torch.randn(1, 256, 4, 16, requires_grad=True) for _ in range(3))

    def one_call():
        attention(q, k, v, scale=0.25, mask=BlockMask(causal=True), backend="torch").sum().backward()

    one_call()
    with kernel_clock() as clock:
        one_call()
        with kernel_clock() as inner:
            one_call()
        one_call()
    assert (clock.calls, inner.calls) == (4, 2)
    assert clock.seconds > 0 and inner.seconds > 0
    one_call()  # closed: counts nowhere
    assert clock.calls == 4
