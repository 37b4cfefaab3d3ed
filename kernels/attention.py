"""Attention of a block of queries against a block of keys, returning (out, lse), and its backward.

This is the single-device building block of context parallelism: a rank attends its queries to
its own keys and to other ranks' keys, one block at a time, and merges the partial results with
their log-sum-exp (`merge_partial_into`). Tensors are (batch, seq, heads, head_dim); k/v may have fewer
heads than q (GQA). `lse` is (batch, heads, seq) in fp32; rows with no key to attend have
out = 0 and lse = -inf, and merge safely.

Which keys a query may attend is a `BlockMask`:
- contiguous blocks: `q_offset`/`k_offset` give the global position of the first query/key, and
  `causal` allows key position <= query position. Whole blocks in the past are full attention,
  whole blocks in the future are skipped, the diagonal block is plain causal: fused kernels run
  without a mask tensor;
- per token (packed documents, or any layout): `q_pos`/`k_pos` (batch, seq) positions and
  `q_doc`/`k_doc` (batch, seq) document ids. A query attends a key when both have the same
  document id >= 0 and (if causal) k_pos <= q_pos. Positions restart per document, so causality
  is decided inside a document, which is all the mask needs.

Backward takes the *final* (merged) out and lse: the gradient of one block of a split softmax is
then exactly that block's share of the whole gradient (the flash-attention backward identity).

Backends: `reference` (plain PyTorch math, fp32 accumulation; the tests' ground truth), `torch`
(PyTorch's fused flash kernels: the `_for_cpu` ops on CPU with an additive mask when one is
needed; on CUDA the flash kernel in half precision without a mask, the memory-efficient kernel
with a mask tensor or in fp32), `flash_attn` (flash-attn 2 on CUDA when installed, for blocks
without per-token masks). `auto` picks flash_attn, then torch. Every fused backend is checked once
per (device, dtype) against the reference on a small input before use; one that fails or raises
is passed over for the next (flash_attn, torch, reference) with a warning.

Masked blocks without mask tensors: an offset causal block runs as at most three pieces that are
full or aligned-causal (`causal_pieces`); a packed block larger than DENSE_MASK_MAX_ELEMENTS (on
CPU also a smaller one whose pieces cost less than its dense mask) runs as each query run against
each key run of its document, cut the same way (full pieces on adjacent tokens joined). On CUDA in
half precision with flash-attn installed, small pieces (documents of up to a few thousand tokens,
VARLEN_MAX_MEAN_PIECE_FLOPS) all go to flash-attn's varlen functions (one call for the full pieces,
one for the causal; cu_seqlens built from the runs), self-checked once against the reference;
otherwise one fused call per piece. Memory stays linear in the sequence. The accumulators
(`accumulate_forward`/`accumulate_backward`, ring attention's per-block calls) open such blocks
into their pieces and, on CPU, call the fused kernels on (batch, heads, seq, dim) views directly.
"""
from __future__ import annotations

import contextlib
import math
import time
import typing
from dataclasses import dataclass
from typing import Literal

import torch

AttentionBackend = Literal["auto", "torch", "flash_attn", "reference"]
BACKENDS = typing.get_args(AttentionBackend)


@dataclass
class BlockMask:
    causal: bool = True
    q_offset: int = 0
    k_offset: int = 0
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None

    @property
    def per_token(self) -> bool:
        return self.q_pos is not None or self.q_doc is not None

    def kind(self, q_len: int, k_len: int) -> str:
        """'full', 'causal' (aligned diagonal), 'empty', or 'masked' (needs a mask tensor)."""
        if self.per_token:
            return "masked"
        if not self.causal:
            return "full"
        if self.k_offset + k_len - 1 <= self.q_offset:
            return "full"
        if self.k_offset > self.q_offset + q_len - 1:
            return "empty"
        if self.k_offset == self.q_offset and q_len == k_len:
            return "causal"
        return "masked"

    def allowed(self, q_len: int, k_len: int, device) -> torch.Tensor:
        """Boolean (batch or 1, q_len, k_len): True where the query may attend the key."""
        if self.per_token:
            ok = None
            if self.q_doc is not None:
                qd, kd = self.q_doc[:, :, None], self.k_doc[:, None, :]
                ok = (qd == kd) & (qd >= 0)
            if self.causal:
                c = self.k_pos[:, None, :] <= self.q_pos[:, :, None]
                ok = c if ok is None else ok & c
            if ok is None:
                ok = torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)
            return ok
        q = torch.arange(q_len, device=device) + self.q_offset
        k = torch.arange(k_len, device=device) + self.k_offset
        ok = k[None, :] <= q[:, None] if self.causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        return ok[None]


def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // t.shape[2]
    return t if rep == 1 else t.repeat_interleave(rep, dim=2)


def _fold_kv_grad(g: torch.Tensor, n_kv: int) -> torch.Tensor:
    b, s, h, d = g.shape
    return g if h == n_kv else g.view(b, s, n_kv, h // n_kv, d).sum(3)


def _empty(q: torch.Tensor, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_zeros(b, s, h, v_dim), torch.full((b, h, s), -math.inf, dtype=lse_dtype, device=q.device)


# ----------------------------------------------------------------------------------------------
# Reference backend: explicit math, fp32 (or fp64) accumulation
# ----------------------------------------------------------------------------------------------
def _reference_forward(q, k, v, scale, mask: BlockMask):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.transpose(1, 2).to(acc)
    kh = _expand_kv(k, q.shape[2]).transpose(1, 2).to(acc)
    vh = _expand_kv(v, q.shape[2]).transpose(1, 2).to(acc)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    allowed = mask.allowed(q.shape[1], k.shape[1], q.device)[:, None]
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = (probs @ vh).transpose(1, 2).to(q.dtype)
    return out, lse if acc == torch.float64 else lse.float()


def _reference_backward(dout, q, k, v, out, lse, scale, mask: BlockMask):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_kv = k.shape[2]
    qh = q.transpose(1, 2).to(acc)
    kh = _expand_kv(k, q.shape[2]).transpose(1, 2).to(acc)
    vh = _expand_kv(v, q.shape[2]).transpose(1, 2).to(acc)
    do = dout.transpose(1, 2).to(acc)
    o = out.transpose(1, 2).to(acc)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    allowed = mask.allowed(q.shape[1], k.shape[1], q.device)[:, None]
    probs = torch.exp(scores - lse.to(acc)[..., None]).masked_fill(~allowed, 0.0).nan_to_num(0.0)
    dv = probs.transpose(-1, -2) @ do
    dp = do @ vh.transpose(-1, -2)
    delta = (do * o).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    dq = (ds @ kh) * scale
    dk = (ds.transpose(-1, -2) @ qh) * scale
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq.to(q.dtype), _fold_kv_grad(dk, n_kv).to(k.dtype), _fold_kv_grad(dv, n_kv).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch fused backend
# ----------------------------------------------------------------------------------------------
def _additive_mask(allowed: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive mask (batch, 1, q, k) and the rows that have at least one key. Rows with none are
    opened fully (fused kernels give NaN or garbage otherwise) and fixed up by the caller."""
    has_key = allowed.any(-1)  # (batch, q)
    safe = allowed | ~has_key[..., None]
    bias = torch.zeros(safe.shape, dtype=dtype, device=safe.device).masked_fill(~safe, -math.inf)
    return bias[:, None], has_key


def _kv_for_fused(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The CPU flash kernels take fewer kv heads than query heads (GQA) as they are; CUDA's get
    them expanded."""
    return t if t.device.type == "cpu" else _expand_kv(t, n_heads)


def _cuda_flash_kernel(bias, dtype) -> bool:
    """On CUDA, PyTorch's flash kernel (half precision, no mask tensor); else the memory-efficient one."""
    return bias is None and dtype != torch.float32


@dataclass
class KernelClock:
    """Processor time spent inside the CPU attention kernels (PyTorch's flash ops, every CPU path's
    kernel) while `kernel_clock()` is active, on whichever thread ran them, and how many kernel calls
    (forwards and backwards each count one): `longtrain probe` subtracts it from a ring member's
    processor time to find the ring's own work outside the kernels (parallel/balance/probe.py)."""
    seconds: float = 0.0
    calls: int = 0


_kernel_clock: KernelClock | None = None


@contextlib.contextmanager
def kernel_clock():
    """A KernelClock that counts the CPU kernels' processor time while the context is open."""
    global _kernel_clock
    outer, _kernel_clock = _kernel_clock, KernelClock()
    clock = _kernel_clock
    try:
        yield clock
    finally:
        _kernel_clock = outer


def _clocked(kernel, *args, **kwargs):
    """kernel(*args, **kwargs), its thread time added to the active KernelClock (if any)."""
    clock = _kernel_clock
    if clock is None:
        return kernel(*args, **kwargs)
    start = time.thread_time()
    result = kernel(*args, **kwargs)
    clock.seconds += time.thread_time() - start
    clock.calls += 1
    return result


def _cpu_flash_forward(qh, kh, vh, scale, causal: bool, bias=None):
    """PyTorch's CPU flash kernel on (batch, heads, seq, dim) views (k, v may have fewer heads):
    out (batch, heads, seq, dim) and fp32 lse (batch, heads, seq)."""
    out, lse = _clocked(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, qh, kh, vh, 0.0, causal,
                        attn_mask=bias, scale=scale)
    return out, lse.float()


def _cpu_flash_backward(do, qh, kh, vh, o, lse, scale, causal: bool, bias=None):
    """Its backward, (dq, dk, dv) shaped as qh, kh, vh; lse finite in every row."""
    return _clocked(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, do, qh, kh, vh, o, lse,
                    0.0, causal, attn_mask=bias, scale=scale)


def _torch_forward(q, k, v, scale, mask: BlockMask, kind: str):
    h = q.shape[2]
    qh, kh, vh = q.transpose(1, 2), _kv_for_fused(k, h).transpose(1, 2), _kv_for_fused(v, h).transpose(1, 2)
    bias, has_key = None, None
    if kind == "masked":
        bias, has_key = _additive_mask(mask.allowed(q.shape[1], k.shape[1], q.device), q.dtype)
        bias = bias.expand(qh.shape[0], h, -1, -1)
    if q.device.type == "cpu":
        out, lse = _cpu_flash_forward(qh, kh, vh, scale, kind == "causal", bias)
    elif _cuda_flash_kernel(bias, q.dtype):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qh, kh, vh, 0.0, kind == "causal", False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qh, kh, vh, None if bias is None else bias.contiguous(), True, 0.0, kind == "causal", scale=scale)[:2]
        lse = lse[..., : q.shape[1]]
    out, lse = out.transpose(1, 2), lse.float()
    if has_key is not None:
        out = out * has_key[:, :, None, None].to(out.dtype)
        lse = lse.masked_fill(~has_key[:, None, :], -math.inf)
    return out, lse


def _torch_backward(dout, q, k, v, out, lse, scale, mask: BlockMask, kind: str):
    h, n_kv = q.shape[2], k.shape[2]
    bias = None
    if kind == "masked":
        # rows without keys (-inf): their dout is zeroed below. In a full or causal block every query
        # has a key, so the whole softmax's lse of its rows is finite.
        lse = lse.masked_fill(torch.isinf(lse), 0.0)
        bias, has_key = _additive_mask(mask.allowed(q.shape[1], k.shape[1], q.device), q.dtype)
        bias = bias.expand(q.shape[0], h, -1, -1)
        dout = dout * has_key[:, :, None, None].to(dout.dtype)
    if q.device.type == "cuda":
        # The CUDA memory-efficient backward reads dout and out (and q, k, v) as (batch, seq, heads, dim)
        # memory seen through a transpose, the layout its forward returns; any other layout (the
        # reference's out, a merged out) gives wrong gradients without an error.
        q, k, v, dout, out = (t.contiguous() for t in (q, k, v, dout, out))
    qh, kh, vh = q.transpose(1, 2), _kv_for_fused(k, h).transpose(1, 2), _kv_for_fused(v, h).transpose(1, 2)
    do, o = dout.transpose(1, 2), out.transpose(1, 2)
    if q.device.type == "cpu":
        dq, dk, dv = _cpu_flash_backward(do, qh, kh, vh, o, lse, scale, kind == "causal", bias)
    elif _cuda_flash_kernel(bias, q.dtype):
        s_q, s_k = q.shape[1], k.shape[1]
        # cum_seq_q/k None: dense (batch, heads, seq, dim) inputs; a defined tensor means varlen
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, qh, kh, vh, o, lse, None, None, s_q, s_k, 0.0, kind == "causal",
            torch.zeros(2, dtype=torch.int64, device=q.device), torch.zeros(0, dtype=torch.int64, device=q.device),
            scale=scale)
    else:
        # its lse's head stride must be aligned ("LSE is not correctly aligned (strideH)" otherwise):
        # padded to a multiple of 32 queries, as its forward returns it
        s_q = q.shape[1]
        lse_padded = lse.new_zeros(*lse.shape[:-1], -(-s_q // 32) * 32)
        lse_padded[..., :s_q] = lse
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, qh, kh, vh, None if bias is None else bias.contiguous(), o, lse_padded,
            torch.zeros(2, dtype=torch.int64, device=q.device), torch.zeros(0, dtype=torch.int64, device=q.device), 0.0,
            (True, True, True, False), kind == "causal", scale=scale)
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, _fold_kv_grad(dk, n_kv), _fold_kv_grad(dv, n_kv)


# ----------------------------------------------------------------------------------------------
# flash-attn backend (CUDA, optional extra `gpu`), blocks without per-token masks
# ----------------------------------------------------------------------------------------------
def flash_attn_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_forward(q, k, v, scale, kind: str):
    from flash_attn.flash_attn_interface import _flash_attn_forward

    res = _flash_attn_forward(q, k, v, 0.0, scale, causal=kind == "causal", window_size_left=-1,
                              window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
    return res[0], res[1].float()


def _flash_backward(dout, q, k, v, out, lse, scale, kind: str):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.masked_fill(torch.isinf(lse), 0.0).contiguous()
    _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, kind == "causal", -1, -1, 0.0,
                         None, False)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Masked blocks without mask tensors: cut into full and aligned-causal pieces
# ----------------------------------------------------------------------------------------------
DENSE_MASK_MAX_ELEMENTS = 1 << 22  # batch x q x k of a per-token mask tensor (16 MiB of fp32 bias)


def causal_pieces(q_start: int, q_len: int, k_start: int, k_len: int, causal: bool):
    """Queries [q_start, +q_len) against keys [k_start, +k_len) (global positions) as at most three
    (q offset, q len, k offset, k len) pieces, offsets local to the two ranges, that the kernels run
    without a mask tensor: keys before every query (full), the aligned diagonal square (causal) and
    the later queries against that square's keys (full). Keys after every query are dropped. A
    misaligned causal block (K/V pieces, padding cut off the keys, one document's runs) would
    otherwise need a dense q_len x k_len mask."""
    if k_len <= 0 or q_len <= 0:
        return
    if not causal:
        yield 0, q_len, 0, k_len
        return
    q_end, k_end = q_start + q_len, k_start + k_len
    diag_start, diag_end = max(q_start, k_start), min(q_end, k_end)
    if k_start < q_start:  # keys before the first query: seen by all queries
        yield 0, q_len, 0, min(k_end, q_start) - k_start
    if diag_start < diag_end:
        n = diag_end - diag_start
        yield diag_start - q_start, n, diag_start - k_start, n  # the diagonal: plain causal
        if diag_end < q_end:  # queries after the diagonal see all of its keys
            yield diag_end - q_start, q_end - diag_end, diag_start - k_start, n


def _runs(pos: torch.Tensor | None, doc: torch.Tensor | None, length: int) -> list[tuple[int, int, int, int]]:
    """(local start, length, document, first position) of the maximal runs of one row's tokens that
    are one document (id >= 0) with consecutive positions; padding (id < 0) is in no run."""
    if pos is None:
        pos = torch.arange(length, device=doc.device)
    if doc is None:
        doc = torch.zeros(length, dtype=torch.long, device=pos.device)
    new_run = torch.ones(length, dtype=torch.bool, device=pos.device)
    new_run[1:] = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = new_run.nonzero().flatten()
    ends = starts[1:].tolist() + [length]
    return [(s, e - s, d, p) for s, e, d, p in zip(starts.tolist(), ends, doc[starts].tolist(), pos[starts].tolist())
            if d >= 0]


def _pieces_of_row(mask: BlockMask, row: int, q_len: int, k_len: int) -> list:
    """(q start, q len, k start, k len, BlockMask) pieces of one batch row of a per-token mask:
    each query run against each key run of its document, cut by causal_pieces, full pieces on
    adjacent tokens joined (`_joined_full_pieces`)."""
    def pick(t):
        return None if t is None else t[min(row, t.shape[0] - 1)]

    k_runs: dict[int, list] = {}
    for run in _runs(pick(mask.k_pos), pick(mask.k_doc), k_len):
        k_runs.setdefault(run[2], []).append(run)
    pieces = []
    for q_start, q_n, doc, q_pos in _runs(pick(mask.q_pos), pick(mask.q_doc), q_len):
        for k_start, k_n, _, k_pos in k_runs.get(doc, ()):
            for qo, qn, ko, kn in causal_pieces(q_pos, q_n, k_pos, k_n, mask.causal):
                pieces.append((q_start + qo, qn, k_start + ko, kn,
                               BlockMask(causal=mask.causal, q_offset=q_pos + qo, k_offset=k_pos + ko)))
    return _joined_full_pieces(pieces)


def _joined_full_pieces(pieces: list) -> list:
    """Full pieces (every query attends every key) with the same queries and adjacent keys, then
    with the same keys and adjacent queries, joined into one full piece each (BlockMask(causal=False)):
    the same (query, key) pairs in fewer kernel calls. A ring member's zigzag chunk pair of a
    document is two runs side by side: both chunks fully in the past of a query run, or one key
    chunk fully in the past of both query chunks, are one piece instead of two."""
    full = [p[:4] for p in pieces if p[4].kind(p[1], p[3]) == "full"]
    if len(full) < 2:
        return pieces
    for same, adjacent in ((0, 2), (2, 0)):  # (start field shared, start field of the adjacent ranges)
        full.sort(key=lambda p: (p[same], p[same + 1], p[adjacent]))
        joined = [full[0]]
        for p in full[1:]:
            last = joined[-1]
            if (last[same], last[same + 1]) == (p[same], p[same + 1]) \
                    and last[adjacent] + last[adjacent + 1] == p[adjacent]:
                grown = list(last)
                grown[adjacent + 1] += p[adjacent + 1]
                joined[-1] = tuple(grown)
            else:
                joined.append(p)
        full = joined
    rest = [p for p in pieces if p[4].kind(p[1], p[3]) != "full"]
    return rest + [(*p, BlockMask(causal=False)) for p in full]


def _pieces(mask: BlockMask, batch: int, q_len: int, k_len: int):
    """(row slice, q slice, k slice, BlockMask) covering a masked block with mask-free pieces."""
    if not mask.per_token:
        for qo, qn, ko, kn in causal_pieces(mask.q_offset, q_len, mask.k_offset, k_len, mask.causal):
            yield (slice(None), slice(qo, qo + qn), slice(ko, ko + kn),
                   BlockMask(causal=mask.causal, q_offset=mask.q_offset + qo, k_offset=mask.k_offset + ko))
        return
    for row in range(batch):
        for qs, qn, ks, kn, piece in _pieces_of_row(mask, row, q_len, k_len):
            yield slice(row, row + 1), slice(qs, qs + qn), slice(ks, ks + kn), piece


# On CPU a per-token mask below DENSE_MASK_MAX_ELEMENTS is not cheap either: the masked fused kernel
# visits every (query, key) element of the block and the mask is built first (~26-44 ns an element,
# forward + backward, one thread), while a mask-free piece costs its pairs (a causal piece half its
# square) plus a fixed cost a call: ~80 us since the accumulators write pieces in place (~250 us
# before). Measured with 4 heads of 16, fwd + bwd: a 1024-token row of 251 tiny documents 40 ms as one
# masked call against 14 ms in pieces, a 512-token one 8 against 15 ms; a 2048-token row of 32
# documents 130 against 7 ms. Over rows of 512-2048 tokens and 2-256 documents the time of the pieces
# puts a call at ~2,000-3,800 mask elements (median ~2,500; 6,000 before the accumulator work):
CPU_PIECE_CALL_ELEMENTS = 2500


def _pieces_cost_elements(pieces: list, batch: int) -> float:
    """What running `pieces` costs on CPU, in dense-mask elements (CPU_PIECE_CALL_ELEMENTS a call)."""
    total = 0.0
    for rows, qs, ks, piece in pieces:
        q_n, k_n = qs.stop - qs.start, ks.stop - ks.start
        share = 0.5 if piece.kind(q_n, k_n) == "causal" else 1.0
        total += len(range(batch)[rows]) * (CPU_PIECE_CALL_ELEMENTS + share * q_n * k_n)
    return total


def _masked_pieces(mask: BlockMask, kind: str, batch: int, q_len: int, k_len: int, device) -> list | None:
    """The mask-free pieces a masked block runs as, or None for one kernel call with a dense mask:
    always pieces for offset causal blocks (at most three); for per-token masks when the mask tensor
    would be large (a packed row of long documents) and, on CPU, when the pieces cost less than the
    dense block (_pieces_cost_elements). A small block of many tiny documents is cheaper as one
    masked call; on CUDA every per-token block under DENSE_MASK_MAX_ELEMENTS runs as one."""
    if kind != "masked":
        return None
    elements = batch * q_len * k_len
    small = mask.per_token and elements <= DENSE_MASK_MAX_ELEMENTS
    if small and torch.device(device).type != "cpu":
        return None
    pieces = list(_pieces(mask, batch, q_len, k_len))
    if small and _pieces_cost_elements(pieces, batch) >= elements:
        return None
    return pieces


# ----------------------------------------------------------------------------------------------
# The pieces in two flash-attn varlen calls (CUDA): one for the full pieces, one for the causal
# ----------------------------------------------------------------------------------------------
def _piece_index(pieces: list, batch: int, q_len: int, k_len: int, device):
    """Flat (batch x seq) token indices of every piece's queries and keys, and cu_seqlens."""
    q_idx, k_idx, q_lens, k_lens = [], [], [], []
    for rows, qs, ks, _ in pieces:
        for row in range(batch)[rows]:
            q_idx.append(torch.arange(qs.start, qs.stop) + row * q_len)
            k_idx.append(torch.arange(ks.start, ks.stop) + row * k_len)
            q_lens.append(qs.stop - qs.start)
            k_lens.append(ks.stop - ks.start)

    def cu(lengths):
        return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    return (torch.cat(q_idx).to(device), torch.cat(k_idx).to(device), cu(q_lens), cu(k_lens),
            max(q_lens), max(k_lens))


def _varlen_groups(pieces: list, batch: int, q_len: int, k_len: int, device):
    """Per causal flag, the flat indices and cu_seqlens of its pieces (full pieces, causal pieces)."""
    by_kind: dict[bool, list] = {}
    for piece in pieces:
        kind = piece[3].kind(piece[1].stop - piece[1].start, piece[2].stop - piece[2].start)
        by_kind.setdefault(kind == "causal", []).append(piece)
    return [(causal, _piece_index(group, batch, q_len, k_len, device)) for causal, group in by_kind.items()]


def _varlen_forward(q, k, v, scale, mask: BlockMask, pieces: list | None = None):
    """Every piece of a masked block in one flash-attn varlen call per causal flag; the partial
    results of a query (several key runs) merge through their log-sum-exp by index."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

    b, s_q, h, d = q.shape
    q_flat, k_flat, v_flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    outs, lses, idxs = [], [], []
    pieces = list(_pieces(mask, b, s_q, k.shape[1])) if pieces is None else pieces
    for causal, (q_idx, k_idx, cu_q, cu_k, max_q, max_k) in _varlen_groups(pieces, b, s_q, k.shape[1], q.device):
        res = _flash_attn_varlen_forward(q_flat[q_idx], k_flat[k_idx], v_flat[k_idx], cu_q, cu_k, max_q, max_k, 0.0,
                                         scale, causal=causal, window_size_left=-1, window_size_right=-1,
                                         softcap=0.0, alibi_slopes=None, return_softmax=False)
        outs.append(res[0])
        lses.append(res[1].float().transpose(0, 1))  # (heads, total) -> (total, heads)
        idxs.append(q_idx)
    out_flat = torch.zeros(b * s_q, h, d, dtype=torch.float32, device=q.device)
    lse_flat = torch.full((b * s_q, h), -math.inf, dtype=torch.float32, device=q.device)
    if outs:
        idx, part_lse, part_out = torch.cat(idxs), torch.cat(lses), torch.cat(outs)
        top = lse_flat.scatter_reduce(0, idx[:, None].expand(-1, h), part_lse, reduce="amax")
        weights = torch.exp(part_lse - top[idx])
        total = torch.zeros_like(lse_flat).index_add_(0, idx, weights)
        lse_flat = top + torch.log(total)
        share = torch.exp(part_lse - lse_flat[idx])[..., None]
        out_flat.index_add_(0, idx, part_out.float() * share)
    return out_flat.view(b, s_q, h, d).to(q.dtype), lse_flat.view(b, s_q, h).transpose(1, 2).contiguous()


def _varlen_backward(dout, q, k, v, out, lse, scale, mask: BlockMask, pieces: list | None = None):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    b, s_q, h, d = q.shape
    q_flat, k_flat, v_flat, do_flat, o_flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v, dout, out))
    lse_flat = lse.masked_fill(torch.isinf(lse), 0.0).transpose(1, 2).reshape(-1, h)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q_flat, k_flat, v_flat))
    pieces = list(_pieces(mask, b, s_q, k.shape[1])) if pieces is None else pieces
    for causal, (q_idx, k_idx, cu_q, cu_k, max_q, max_k) in _varlen_groups(pieces, b, s_q, k.shape[1], q.device):
        qp, kp, vp = q_flat[q_idx], k_flat[k_idx], v_flat[k_idx]
        gq, gk, gv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        _flash_attn_varlen_backward(do_flat[q_idx], qp, kp, vp, o_flat[q_idx],
                                    lse_flat[q_idx].transpose(0, 1).contiguous(), gq, gk, gv, cu_q, cu_k, max_q,
                                    max_k, 0.0, scale, causal, -1, -1, 0.0, None, False)
        dq.index_add_(0, q_idx, gq.float())
        dk.index_add_(0, k_idx, gk.float())
        dv.index_add_(0, k_idx, gv.float())
    return (dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype))


def _varlen_usable(device, dtype) -> bool:
    """flash-attn's varlen functions for the pieces: CUDA, half precision, installed, and checked
    once per (device, dtype) against the reference (private functions change between releases;
    on any disagreement or error the pieces run one kernel call each)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not flash_attn_available():
        return False
    key = ("flash_varlen", device.type, dtype)
    if key not in _CHECKED:
        _CHECKED[key] = _varlen_self_check(device, dtype)
    return _CHECKED[key]


def _agrees_with_reference(forward, backward, q, k, v, do, mask: BlockMask, bar: float) -> tuple[bool, str]:
    """A candidate's forward(q, k, v, scale, mask) -> (out, lse) and backward(dout, q, k, v, out, lse,
    scale, mask) -> (dq, dk, dv) against the reference on one small input: (all max abs errors of out,
    lse (rows with keys), dq, dk, dv within `bar`, a detail for the warning). Any exception (a kernel
    missing for this device, dtype or head size, a changed private signature) fails it."""
    try:
        ref_out, ref_lse = _reference_forward(q, k, v, 0.2, mask)
        out, lse = forward(q, k, v, 0.2, mask)
        ref_g = _reference_backward(do, q, k, v, ref_out, ref_lse, 0.2, mask)
        got_g = backward(do, q, k, v, ref_out, ref_lse, 0.2, mask)
        finite = torch.isfinite(ref_lse)
        errs = [(out.float() - ref_out.float()).abs().max(), (lse - ref_lse)[finite].abs().max()]
        errs += [(a.float() - b.float()).abs().max() for a, b in zip(got_g, ref_g)]
        return all(bool(e <= bar) for e in errs), f"max error {max(float(e) for e in errs):.2e}"
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        return False, f"{type(err).__name__}: {err}"


def _varlen_self_check(device, dtype) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, do = (torch.randn(2, 40, 4, 64, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, 40, 2, 64, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    doc = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [0] * 1 + [1] * 30 + [-1] * 9], device=device)
    pos = torch.cat([torch.arange(n) for n in (7, 20, 13, 1, 30, 9)]).view(2, 40).to(device)
    mask = BlockMask(causal=True, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc)
    ok, detail = _agrees_with_reference(_varlen_forward, _varlen_backward, q, k, v, do, mask, bar=0.3)
    if not ok:
        import warnings

        warnings.warn(f"flash-attn varlen on {device.type}/{dtype} failed its check ({detail}); packed blocks run "
                      "one kernel call per piece")
    return ok


def accumulate_forward(q, k, v, pieces, *, scale: float, backend: str, out=None, lse=None):
    """Merge q's attention over `pieces`, (rows, q slice, k slice, BlockMask) tuples, into fp32 (out,
    lse) (fp64 for fp64 inputs), started as zeros and -inf when None. A block that runs in mask-free
    pieces is opened into them (`_opened_blocks`); a piece whose queries nothing was written to yet in
    this call's fresh (out, lse) is copied in, any other merged in place. Works on (batch, heads, seq,
    dim) views, the layout of lse and of the CPU kernels (`_cpu_flash_pieces`)."""
    first_writes = None
    if out is None:
        b, s, h, _ = q.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(b, s, h, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, h, s), -math.inf, dtype=acc, device=q.device)
        first_writes = _FirstWrites(b, s)
    cpu_flash = _cpu_flash_pieces(q, v, backend)
    q, k, v = _dense(q, k, v)
    qh, kh, vh, out_h = (t.transpose(1, 2) for t in (q, k, v, out))
    for rows, qs, ks, piece in _opened_blocks(q, k, v, pieces, backend):
        kind = piece.kind(qs.stop - qs.start, ks.stop - ks.start)
        if cpu_flash and kind in ("full", "causal"):
            o, l = _cpu_flash_forward(qh[rows, :, qs], kh[rows, :, ks], vh[rows, :, ks], scale, kind == "causal")
        else:
            o, l = attention_forward(q[rows, qs], k[rows, ks], v[rows, ks], scale=scale, mask=piece, backend=backend)
            o = o.transpose(1, 2)
        if first_writes is not None and first_writes.claim(rows, qs):
            out_h[rows, :, qs] = o
            lse[rows, :, qs] = l
        else:
            merge_partial_into(out_h[rows, :, qs], lse[rows, :, qs], o, l)
    return out, lse


def accumulate_backward(dout, q, k, v, out, lse, pieces, *, scale: float, backend: str, dq, dk, dv) -> None:
    """Add every piece's gradients into dq, dk, dv, given the final (merged) out and lse. A block that
    runs in mask-free pieces is opened into them (`_opened_blocks`); (batch, heads, seq, dim) views as
    in accumulate_forward."""
    cpu_flash = _cpu_flash_pieces(q, v, backend)
    dout, q, k, v, out = _dense(dout, q, k, v, out)
    qh, kh, vh, do_h, out_h, dq_h, dk_h, dv_h = (t.transpose(1, 2) for t in (q, k, v, dout, out, dq, dk, dv))
    for rows, qs, ks, piece in _opened_blocks(q, k, v, pieces, backend):
        kind = piece.kind(qs.stop - qs.start, ks.stop - ks.start)
        if cpu_flash and kind in ("full", "causal"):
            grads = _cpu_flash_backward(do_h[rows, :, qs], qh[rows, :, qs], kh[rows, :, ks], vh[rows, :, ks],
                                        out_h[rows, :, qs], lse[rows, :, qs], scale, kind == "causal")
        else:
            grads = attention_backward(dout[rows, qs], q[rows, qs], k[rows, ks], v[rows, ks], out[rows, qs],
                                       lse[rows, :, qs], scale=scale, mask=piece, backend=backend)
            grads = (g.transpose(1, 2) for g in grads)
        for total, g in zip((dq_h[rows, :, qs], dk_h[rows, :, ks], dv_h[rows, :, ks]), grads):
            total.add_(g)


def _cpu_flash_pieces(q, v, backend: str) -> bool:
    """Whether the accumulators' mask-free (full, causal) pieces go straight to PyTorch's CPU flash
    kernels (what attention_forward/backward would pick for them) on (batch, heads, seq, dim) views:
    no per-piece dispatch, transposes or lse fix-up (a mask-free piece's rows all have keys)."""
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1] \
        and resolve_backend(backend, q.device, q.dtype, "full") == "torch"


def _dense(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The accumulators' inputs made contiguous once per call (the kernels read a strided last dim
    wrongly, without an error; attention_forward/backward make every piece contiguous)."""
    return tuple(t.contiguous() for t in tensors)


class _FirstWrites:
    """Which queries (batch row, position) of a fresh (out, lse) have a partial: `claim` tells whether
    none of a piece's queries had one yet (then the piece is the partial: copied, not merged) and
    marks them."""

    def __init__(self, batch: int, seq: int):
        self.batch, self.seq = batch, seq
        self.written = [bytearray(seq) for _ in range(batch)]

    def claim(self, rows: slice, qs: slice) -> bool:
        start, stop, _ = qs.indices(self.seq)
        row_ids = range(self.batch)[rows]
        first = not any(1 in self.written[r][start:stop] for r in row_ids)
        for r in row_ids:
            self.written[r][start:stop] = b"\x01" * (stop - start)
        return first


def merge_partial_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                       block_lse: torch.Tensor) -> None:
    """Merge a block's softmax partial into (out, lse) in place (fp32 or fp64 accumulators, or views of
    them), out (batch, heads, seq, dim) as lse (batch, heads, seq): lse = log(e^lse + e^block_lse), out
    moved towards block_out by the block's share e^(block_lse - new lse). Safe when either or both are
    -inf (rows with no keys yet)."""
    torch.logaddexp(lse, block_lse, out=lse)
    share = torch.exp(block_lse - lse).nan_to_num_(0.0)  # 0 where both are -inf
    out.lerp_(block_out.to(out.dtype), share[..., None])


def _within(outer: slice, inner: slice, size: int) -> slice:
    """The slice of a dimension of `size` that `inner` selects within `outer` (both of step 1)."""
    start, stop, _ = outer.indices(size)
    inner_start, inner_stop, _ = inner.indices(stop - start)
    return slice(start + inner_start, start + inner_stop)


def _opened_blocks(q, k, v, blocks, backend: str):
    """`blocks` (rows, q slice, k slice, BlockMask) with every block that attention_forward/backward
    would run as one fused call per mask-free piece replaced by those pieces (slices composed), so
    that the accumulators take each piece straight into their (out, lse) or gradients: no block-sized
    partial, merge or gradient buffers. Blocks that run whole (one kernel call, the reference,
    flash-attn varlen) stay as they are. Every slice yielded has its start and stop."""
    for rows, qs, ks, mask in blocks:
        pieces = None
        if mask.kind(len(range(q.shape[1])[qs]), len(range(k.shape[1])[ks])) == "masked":
            pieces = _per_piece_calls(q[rows, qs], k[rows, ks], v[rows, ks], mask, backend)
        if pieces is None:
            yield (_within(rows, slice(None), q.shape[0]), _within(qs, slice(None), q.shape[1]),
                   _within(ks, slice(None), k.shape[1]), mask)
            continue
        for piece_rows, piece_qs, piece_ks, piece in pieces:
            yield (_within(rows, piece_rows, q.shape[0]), _within(qs, piece_qs, q.shape[1]),
                   _within(ks, piece_ks, k.shape[1]), piece)


def _per_piece_calls(q, k, v, mask: BlockMask, backend: str) -> list | None:
    """The mask-free pieces this block runs as, one fused call each, or None when it runs otherwise."""
    kind = mask.kind(q.shape[1], k.shape[1])
    if kind != "masked" or q.shape[-1] != v.shape[-1] \
            or resolve_backend(backend, q.device, q.dtype, kind) == "reference":
        return None
    pieces = _masked_pieces(mask, kind, q.shape[0], q.shape[1], k.shape[1], q.device)
    return None if pieces is None or _use_varlen(pieces, q, backend) else pieces


# One varlen call pays when the pieces are small: then kernel launches, one or more per piece,
# dominate. With large pieces it gathers copies of q, k, v (and dout, out) for nothing: measured on
# an H100 in bf16 with 32 heads of 128 (benchmarks/results/attention_kernel_cuda_bf16.md), varlen was
# 1.5-2x faster than one call per piece for documents of up to 1-2K tokens (mean piece 2.3e10
# forward FLOPs), equal at up to 4K (9e10), and 3% slower with 2.3x the transient memory beyond.
VARLEN_MAX_MEAN_PIECE_FLOPS = 5e10


def _varlen_pays(pieces: list, batch: int, heads: int, head_dim: int) -> bool:
    """Whether the mean piece (per batch row) is small enough for one varlen call to beat one
    call per piece: 4 x heads x head_dim forward FLOPs per (query, key) pair of the piece."""
    pairs, count = 0, 0
    for rows, qs, ks, _ in pieces:
        n_rows = len(range(batch)[rows])
        pairs += n_rows * (qs.stop - qs.start) * (ks.stop - ks.start)
        count += n_rows
    return count > 0 and 4 * heads * head_dim * pairs / count < VARLEN_MAX_MEAN_PIECE_FLOPS


def _use_varlen(pieces: list, q: torch.Tensor, backend: str) -> bool:
    """The pieces of q's block go to flash-attn's varlen call (forward and backward decide alike)."""
    return backend in ("auto", "flash_attn") and _varlen_usable(q.device, q.dtype) \
        and _varlen_pays(pieces, q.shape[0], q.shape[2], q.shape[3])


def _forward_in_pieces(q, k, v, scale, mask: BlockMask, backend: str, pieces: list):
    if _use_varlen(pieces, q, backend):
        return _varlen_forward(q, k, v, scale, mask, pieces)
    out, lse = accumulate_forward(q, k, v, pieces, scale=scale, backend=backend)
    return out.to(q.dtype), lse


def _backward_in_pieces(dout, q, k, v, out, lse, scale, mask: BlockMask, backend: str, pieces: list):
    if _use_varlen(pieces, q, backend):
        return _varlen_backward(dout, q, k, v, out, lse, scale, mask, pieces)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    accumulate_backward(dout, q, k, v, out, lse, pieces, scale=scale, backend=backend, dq=dq, dk=dk, dv=dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
_CHECKED: dict = {}


class AttentionBackendError(RuntimeError):
    """No attention kernel but the reference passed its check on a GPU; str() is one line."""


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, kind: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend: unknown {name!r}; known: {', '.join(BACKENDS)}")
    if name == "reference":
        return name
    if dtype == torch.float64:
        return "reference"
    candidates = ["torch"]  # flash-attn has no per-token masks or fp32; the fused PyTorch kernels do
    if name in ("auto", "flash_attn") and kind != "masked" and dtype in (torch.float16, torch.bfloat16) \
            and device.type == "cuda" and flash_attn_available():
        candidates.insert(0, "flash_attn")
    for chosen in candidates:  # the first that passes its check
        key = (chosen, device.type, dtype)
        if key not in _CHECKED:
            _CHECKED[key] = _self_check(chosen, device, dtype)
        if _CHECKED[key]:
            return chosen
    if device.type == "cuda":
        # The reference kernel materializes every score in fp32: on a GPU that is a silent 10-100x
        # slowdown and an out-of-memory at long context, not a fallback anyone wants.
        raise AttentionBackendError(
            f"attention backend: no fast kernel passed its check on {device.type}/{dtype} ({', '.join(candidates)} "
            "failed, see the warnings above); refusing to run the reference kernel on a GPU "
            "(set parallel.attention_backend: reference to run it deliberately)")
    return "reference"


def _self_check(backend: str, device, dtype) -> bool:
    """Forward and backward of a small causal block (and for torch a masked one) against the reference."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, 48, 4, 64, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    masks = [BlockMask(causal=True)]
    if backend == "torch":
        masks.append(BlockMask(causal=True, q_offset=10, k_offset=0))
    for mask in masks:
        kind = mask.kind(48, 48)
        ok, detail = _agrees_with_reference(
            lambda *args: _dispatch_forward(backend, *args, kind), lambda *args: _dispatch_backward(backend, *args, kind),
            q, k, v, do, mask, bar=tol * 10)
        if not ok:
            break
    if not ok:
        import warnings

        warnings.warn(f"attention backend {backend} on {device.type}/{dtype} failed its check against the reference "
                      f"({detail}); not using it")
    return ok


def _dispatch_forward(backend, q, k, v, scale, mask, kind):
    if backend == "reference":
        return _reference_forward(q, k, v, scale, mask)
    if backend == "flash_attn":
        return _flash_forward(q, k, v, scale, kind)
    return _torch_forward(q, k, v, scale, mask, kind)


def _dispatch_backward(backend, dout, q, k, v, out, lse, scale, mask, kind):
    if backend == "reference":
        return _reference_backward(dout, q, k, v, out, lse, scale, mask)
    if backend == "flash_attn":
        return _flash_backward(dout, q, k, v, out, lse, scale, kind)
    return _torch_backward(dout, q, k, v, out, lse, scale, mask, kind)


def attention_forward(q, k, v, *, scale: float, mask: BlockMask, backend: str = "auto"):
    """(out, lse) of queries q against keys k, v under `mask`. No autograd: see attention()."""
    kind = mask.kind(q.shape[1], k.shape[1])
    if kind == "empty":
        return _empty(q, v.shape[-1])
    chosen = resolve_backend(backend, q.device, q.dtype, kind)
    if chosen != "reference" and q.shape[-1] != v.shape[-1]:
        v_dim = v.shape[-1]
        out, lse = attention_forward(*_pad_head_dims(q, k, v), scale=scale, mask=mask, backend=backend)
        return out[..., :v_dim], lse
    pieces = None if chosen == "reference" else _masked_pieces(mask, kind, q.shape[0], q.shape[1], k.shape[1],
                                                                q.device)
    if pieces is not None:
        return _forward_in_pieces(q, k, v, scale, mask, backend, pieces)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _dispatch_forward(chosen, q, k, v, scale, mask, kind)


def attention_backward(dout, q, k, v, out, lse, *, scale: float, mask: BlockMask, backend: str = "auto"):
    """(dq, dk, dv) of this block, given the final out and lse of the queries' whole softmax."""
    kind = mask.kind(q.shape[1], k.shape[1])
    if kind == "empty":
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    chosen = resolve_backend(backend, q.device, q.dtype, kind)
    if chosen != "reference" and q.shape[-1] != v.shape[-1]:
        qk_dim, v_dim = q.shape[-1], v.shape[-1]
        q, k, v = _pad_head_dims(q, k, v)
        dout, out = (_pad_last(t, v.shape[-1]) for t in (dout, out))
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale=scale, mask=mask, backend=backend)
        return dq[..., :qk_dim], dk[..., :qk_dim], dv[..., :v_dim]
    pieces = None if chosen == "reference" else _masked_pieces(mask, kind, q.shape[0], q.shape[1], k.shape[1],
                                                                q.device)
    if pieces is not None:
        return _backward_in_pieces(dout, q, k, v, out, lse, scale, mask, backend, pieces)
    q, k, v, dout, out = (t.contiguous() for t in (q, k, v, dout, out))
    return _dispatch_backward(chosen, dout, q, k, v, out, lse, scale, mask, kind)


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def _pad_head_dims(q, k, v):
    """Fused kernels need one head dim for q, k and v; MLA has a query/key head dim (nope + rope)
    different from the value head dim. Zero columns change nothing: zeros appended to v give
    zero output columns (sliced off), zeros appended to q and k add nothing to the scores, and
    the log-sum-exp is unchanged; the gradients of the padding are sliced off."""
    size = max(q.shape[-1], v.shape[-1])
    return _pad_last(q, size), _pad_last(k, size), _pad_last(v, size)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, backend):
        out, lse = attention_forward(q, k, v, scale=scale, mask=mask, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.mask, ctx.backend = scale, mask, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale=ctx.scale, mask=ctx.mask, backend=ctx.backend)
        return dq, dk, dv, None, None, None


def attention(q, k, v, *, scale: float, mask: BlockMask, backend: str = "auto") -> torch.Tensor:
    """Differentiable single-device attention (B, S, H, D) with the given mask."""
    return _LocalAttention.apply(q, k, v, scale, mask, backend)
