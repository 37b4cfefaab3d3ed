"""Ring attention (pass-KV): each ring member keeps its queries; keys and values travel around the
ring, one hop per step, while the current block is computed (the next block is already in
flight: double buffering). Partial outputs merge in fp32 through their log-sum-exp.

Backward runs the ring again: each member recomputes its blocks against the travelling K/V,
adding dQ locally, while a dK/dV accumulator travels *with* its K/V. After R steps every
accumulator has collected all members' contributions and one more hop returns it to its owner.

`kv_chunks` > 1 splits every member's K/V into that many pieces that go round the ring one after
another: everything in flight (K/V, dK/dV accumulators, the kernel's block gradients) shrinks by
that factor, for the price of kv_chunks x more, smaller messages and kernel calls. Memory only:
the result is the same (the pieces are key blocks, merged like any other).

Which keys a query may attend is decided per block (`BlockPairs`): for unpacked rows from the
members' contiguous segments (global offsets, so whole blocks are full, skipped or plainly
causal), for packed rows from per-token positions and document ids, which travel with K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longtrain.kernels.attention import (BlockMask, accumulate_backward, accumulate_forward, attention_backward,
                                         attention_forward, causal_pieces)
from longtrain.parallel.context.comm import P2PTag, RingExchange


@dataclass
class TokenInfo:
    """What the mask needs to know about a block of tokens: contiguous segments (unpacked) or
    per-token positions and document ids (packed)."""
    segments: list[tuple[int, int]] | None = None  # (global start, length) in local order
    pos: torch.Tensor | None = None  # (B, S)
    doc: torch.Tensor | None = None  # (B, S)
    limit: int | None = None  # unpacked: global index from which tokens are padding (never keys)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pos, self.doc) if t is not None]

    def slice(self, start: int, stop: int) -> "TokenInfo":
        """The tokens at local indices [start, stop)."""
        segments = None
        if self.segments is not None:
            segments, local = [], 0
            for seg_start, length in self.segments:
                lo, hi = max(start, local), min(stop, local + length)
                if lo < hi:
                    segments.append((seg_start + lo - local, hi - lo))
                local += length
        return TokenInfo(segments, *(None if t is None else t[:, start:stop] for t in (self.pos, self.doc)),
                         limit=self.limit)

    def with_tensors(self, tensors: list[torch.Tensor]) -> "TokenInfo":
        it = iter(tensors)
        return TokenInfo(self.segments, next(it) if self.pos is not None else None,
                         next(it) if self.doc is not None else None, self.limit)


def chunk_bounds(length: int, kv_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of `kv_chunks` near-equal pieces of a local block (fewer if it is shorter)."""
    pieces = max(1, min(kv_chunks, length))
    return [(i * length // pieces, (i + 1) * length // pieces) for i in range(pieces)]


def block_pairs(q: TokenInfo, k: TokenInfo, causal: bool):
    """(rows, q slice, k slice, mask) pieces covering queries q against keys k (every row: the
    layout is the same for all rows, or the mask is per token). Keys at or past `k.limit` (an
    unpacked row's padding) are left out of every block."""
    if q.segments is None:
        yield (slice(None), slice(None), slice(None),
               BlockMask(causal=causal, q_pos=q.pos, k_pos=k.pos, q_doc=q.doc, k_doc=k.doc))
        return
    q_local = 0
    for q_start, q_len in q.segments:
        k_local = 0
        for k_start, k_len in k.segments:
            real_len = k_len if k.limit is None else max(0, min(k_len, k.limit - k_start))
            for qs, q_n, ks, k_n in causal_pieces(q_start, q_len, k_start, real_len, causal):
                yield (slice(None), slice(q_local + qs, q_local + qs + q_n),
                       slice(k_local + ks, k_local + ks + k_n),
                       BlockMask(causal=causal, q_offset=q_start + qs, k_offset=k_start + ks))
            k_local += k_len
        q_local += q_len



def _covers_all(pair, q, k) -> bool:
    _, qs, ks, _ = pair
    return qs.indices(q.shape[1]) == (0, q.shape[1], 1) and ks.indices(k.shape[1]) == (0, k.shape[1], 1)


class LocalBlocksAttention(torch.autograd.Function):
    """Queries against one set of keys, block by block, no communication (a ring of one, or
    keys already all-gathered)."""

    @staticmethod
    def forward(ctx, q, k, v, q_info, k_info, scale, causal, backend):
        pairs = list(block_pairs(q_info, k_info, causal))
        if len(pairs) == 1 and _covers_all(pairs[0], q, k):  # one block: the kernel's own result
            out, lse = attention_forward(q, k, v, scale=scale, mask=pairs[0][3], backend=backend)
        else:
            out, lse = accumulate_forward(q, k, v, pairs, scale=scale, backend=backend)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_info, k_info, scale, causal, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        q_info, k_info, scale, causal, backend = ctx.args
        pairs = list(block_pairs(q_info, k_info, causal))
        if len(pairs) == 1 and _covers_all(pairs[0], q, k):  # no accumulators needed
            dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, scale=scale, mask=pairs[0][3],
                                            backend=backend)
            return dq, dk, dv, None, None, None, None, None
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
        accumulate_backward(dout.contiguous(), q, k, v, out, lse, pairs, scale=scale, backend=backend, dq=dq, dk=dk,
                            dv=dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


class RingAttention(torch.autograd.Function):
    """`member_infos[j]` describes ring member j's tokens (segments) for unpacked rows; for packed
    rows `q_info`/`k_info` carry per-token positions and documents and travel with K/V."""

    @staticmethod
    def forward(ctx, q, k, v, q_info, member_infos, my_member, scale, causal, backend, group, kv_chunks=1):
        ring = RingExchange(group)
        n = len(ring.ranks)
        out = lse = None
        for start, stop in chunk_bounds(k.shape[1], kv_chunks):
            # my keys carry the same positions/documents as my queries
            cur = [t[:, start:stop] for t in [k, v] + q_info.tensors()]
            for step in range(n):
                src = (my_member - step) % n
                pending = ring.start(cur, tag=P2PTag.KV) if step < n - 1 else None
                k_info = (member_infos[src].slice(start, stop) if q_info.segments is not None
                          else q_info.with_tensors(cur[2:]))
                out, lse = accumulate_forward(q, cur[0], cur[1], block_pairs(q_info, k_info, causal), scale=scale,
                                              backend=backend, out=out, lse=lse)
                if pending is not None:
                    cur = RingExchange.finish(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *q_info.tensors())
        ctx.args = (q_info, member_infos, my_member, scale, causal, backend, group, kv_chunks)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *info_tensors = ctx.saved_tensors
        q_info, member_infos, my_member, scale, causal, backend, group, kv_chunks = ctx.args
        q_info = q_info.with_tensors(info_tensors)
        ring = RingExchange(group)
        n = len(ring.ranks)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        bounds = chunk_bounds(k.shape[1], kv_chunks)
        if len(bounds) > 1:
            dk, dv = (torch.empty(t.shape, dtype=acc, device=t.device) for t in (k, v))
        going_home = None  # (pending exchange, start, stop): the last hop of a chunk's accumulators
        for start, stop in bounds:
            cur = [t[:, start:stop] for t in [k, v] + info_tensors]
            grads_pending = None
            for step in range(n):
                src = (my_member - step) % n
                kv_pending = ring.start(cur, tag=P2PTag.KV) if step < n - 1 else None
                k_info = (member_infos[src].slice(start, stop) if q_info.segments is not None
                          else q_info.with_tensors(cur[2:]))
                block_dk = torch.zeros(cur[0].shape, dtype=acc, device=k.device)
                block_dv = torch.zeros(cur[1].shape, dtype=acc, device=v.device)
                accumulate_backward(dout, q, cur[0], cur[1], out, lse, block_pairs(q_info, k_info, causal), scale=scale,
                                    backend=backend, dq=dq, dk=block_dk, dv=block_dv)
                if going_home is not None:  # the previous chunk's gradients, home while this one computed
                    home, home_start, home_stop = going_home
                    dk[:, home_start:home_stop], dv[:, home_start:home_stop] = RingExchange.finish(home)
                    going_home = None
                if grads_pending is not None:  # the accumulator of these K/V, from the previous rank
                    dk_acc, dv_acc = RingExchange.finish(grads_pending)
                    block_dk += dk_acc
                    block_dv += dv_acc
                    del dk_acc, dv_acc
                grads_pending = ring.start([block_dk, block_dv], tag=P2PTag.KV_GRAD)  # travels on with its K/V
                del block_dk, block_dv
                if kv_pending is not None:
                    cur = RingExchange.finish(kv_pending)
            going_home = (grads_pending, start, stop)
        home, home_start, home_stop = going_home
        if len(bounds) == 1:
            dk, dv = RingExchange.finish(home)  # my own K/V's gradients, back home
        else:
            dk[:, home_start:home_stop], dv[:, home_start:home_stop] = RingExchange.finish(home)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None
