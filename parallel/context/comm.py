"""The collectives context parallelism needs, with their autograd rules.

- `SeqToHeads` / `HeadsToSeq`: Ulysses all-to-all between sequence-sharded (B, S/u, H, D) and
  head-sharded (B, S, H/u, D) tensors; each is the other's backward.
- `GatherSeq`: all-gather along the sequence (backward: reduce-scatter of the gradient).
- `RingExchange`: send tensors to the next ring rank and receive the previous rank's, async (over
  a process group, or a `SubRing` of some of its ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from longtrain.parallel.context import link_emulation


class P2PTag(IntEnum):
    """The P2P message kinds that may be in flight on one ring at once (each tensor of a message
    gets tag * 16 + its index)."""

    KV = 1  # ring attention: the next step's key/value block
    KV_GRAD = 2  # ring attention backward: key/value gradients travelling with their block
    SSM_STATE = 3  # Mamba state passing: the conv tail / state handed to the next shard
    SSM_STATE_GRAD = 4  # its gradient, handed back
    SSM_DOC_IDS = 5  # the document ids of the tail (packed rows)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # chunk j along dim 0 goes to rank j
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S_local, H, D) on each of u ranks -> (B, u x S_local, H/u, D): rank j gets head group j
    of every rank's tokens, concatenated in rank order."""
    u = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.view(b, s, u, h // u, d).permute(2, 0, 1, 3, 4)  # (u, B, S, H/u, D): chunk j -> rank j
    recv = _all_to_all(send, group)  # chunk j: rank j's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * s, h // u, d)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of seq_to_heads: (B, u x S_local, H/u, D) -> (B, S_local, H, D)."""
    u = dist.get_world_size(group)
    b, s_all, hl, d = x.shape
    s = s_all // u
    send = x.view(b, u, s, hl, d).permute(1, 0, 2, 3, 4)  # chunk j: rank j's tokens
    recv = _all_to_all(send, group)  # chunk j: my tokens, head group j
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, u * hl, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, ctx.group), None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 1 in rank order (no autograd)."""
    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class GatherSeq(torch.autograd.Function):
    """All-gather along the sequence; the backward sums every rank's gradient of my part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.local = group, x.shape[1]
        return gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        parts = [p.contiguous() for p in grad.split(ctx.local, dim=1)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)  # my part, summed over ranks
        return out, None


@dataclass(frozen=True)
class SubRing:
    """A ring over some ranks of a process group (global ranks, in ring order), run with P2P ops on
    that group: per-sequence ring groups of the balance engine need no communicator of their own."""
    group: object
    ranks: tuple
    router: object = None  # parallel/balance/routing.Router: inter-node hops split over proxy ranks


class RingExchange:
    """Async send of a list of tensors to the next rank of a ring and receive of the previous
    rank's (same shapes), so the next block travels while the current one is computed. `group`: a
    process group (its ranks form the ring) or a SubRing."""

    def __init__(self, group, reverse: bool = False):
        self.router = None
        if isinstance(group, SubRing):
            self.group, self.ranks, self.router = group.group, list(group.ranks), group.router
            if self.router is not None and reverse:
                raise ValueError("RingExchange: a routed ring runs forward only")
        else:
            self.group, self.ranks = group, dist.get_process_group_ranks(group)
        me = self.ranks.index(dist.get_rank())
        n = len(self.ranks)
        step = -1 if reverse else 1  # reverse: send to the previous rank, receive from the next
        self.next = self.ranks[(me + step) % n]
        self.prev = self.ranks[(me - step) % n]

    def start(self, tensors: list[torch.Tensor], tag: int = 0):  # tag: a P2PTag
        """Tags keep two exchanges in flight apart (K/V for the next step, gradients). The
        returned handle owns the sent tensors until finish(): a buffer freed while the backend
        still reads it would be a use-after-free."""
        emulator = link_emulation.active()
        if self.router is not None:
            if emulator is not None:
                raise ValueError("RingExchange: link emulation does not cover the routing layer's hops")
            return self.router.start(tensors, tag)
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        if emulator is not None:  # the arrival time the emulated link gives this message travels with it
            nbytes = sum(t.numel() * t.element_size() for t in sent)
            sent.append(torch.tensor([emulator.stamp(nbytes, dist.get_rank(), self.next)], dtype=torch.float64))
            received.append(torch.empty(1, dtype=torch.float64))
        ops = []
        for i, (t, r) in enumerate(zip(sent, received)):
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag=tag * 16 + i))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag=tag * 16 + i))
        works = dist.batch_isend_irecv(ops)
        return works, received, sent, emulator

    @staticmethod
    def finish(pending) -> list[torch.Tensor]:
        if callable(pending):  # a routed exchange finishes its own phases
            return pending()
        works, received, _sent, emulator = pending
        for w in works:
            w.wait()
        if emulator is not None:
            emulator.hold_until(float(received.pop()))
        return received
