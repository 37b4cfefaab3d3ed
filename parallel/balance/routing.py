"""The routing layer: an inter-node ring send split over proxy ranks (Zeppelin section 1.6).

In a ring that spans nodes, the hop from a node's last member to the next node's first member is the
only inter-node one, and it would go through one rank's NIC while the node's other NICs idle. Routed,
the sender cuts each tensor (along the sequence) into k parts for the k ring members of its node
(dispatch, intra-node), member j sends part j to member j of the next node (rail to rail: each behind
its own NIC), and those send their parts to the receiver (combine, intra-node), which concatenates
them. Intra-node hops of the same ring step go directly. Used when both nodes hold the same number of
the ring's members (whole-node rings); otherwise the hop goes directly.

A `Router` plugs into parallel/context/comm.py's RingExchange through `SubRing.router`: `start`
posts the first phase (direct hops and the dispatch) and returns a callable that finishes the rail
and combine phases; `RingExchange.finish` calls it. On CPU a "node" is a group of local ranks
(cluster.gpus_per_node smaller than the balancing group); the result is exact either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Router:
    group: object
    ranks: tuple  # global ranks of the ring, in ring order
    nodes: tuple  # node of each ring member

    def members(self, node: int) -> list[int]:
        """Ring indices of the members on a node, in ring order."""
        return [i for i, n in enumerate(self.nodes) if n == node]

    def hops(self) -> list[tuple[int, int, list[int], list[int]]]:
        """(sender, receiver, sender-node members, receiver-node members) of every routed hop."""
        n = len(self.ranks)
        out = []
        for s in range(n):
            d = (s + 1) % n
            if self.nodes[s] != self.nodes[d]:
                src, dst = self.members(self.nodes[s]), self.members(self.nodes[d])
                if len(src) == len(dst) > 1:
                    out.append((s, d, src, dst))
        return out

    def start(self, tensors: list[torch.Tensor], tag: int = 0):
        n = len(self.ranks)
        me = self.ranks.index(dist.get_rank())
        nxt, prv = (me + 1) % n, (me - 1) % n
        sent = [t.contiguous() for t in tensors]
        hops = self.hops()
        routed_out = any(s == me for s, *_ in hops)
        routed_in = any(d == me for _, d, *_ in hops)
        received = [None] * len(sent) if routed_in else [torch.empty_like(t) for t in sent]
        g = self.group
        base = 1000 + 64 * tag

        def op(kind, t, peer_index, phase, i):
            return dist.P2POp(kind, t, self.ranks[peer_index], g, tag=base + 16 * phase + i)

        def parts(t, k):
            return [p.contiguous() for p in torch.tensor_split(t, k, dim=1)]

        # phase 0: direct hops, and each routed sender dispatches part j to its node's member j
        ops, keep = [], []
        if not routed_out:
            ops += [op(dist.isend, t, nxt, 0, i) for i, t in enumerate(sent)]
        if not routed_in:
            ops += [op(dist.irecv, r, prv, 0, i) for i, r in enumerate(received)]
        dispatched = {}  # hop -> per tensor, my part (as proxy on the sender's node)
        for h, (s, d, src, dst) in enumerate(hops):
            k = len(src)
            if s == me:
                for i, t in enumerate(sent):
                    for j, member in enumerate(src):
                        piece = parts(t, k)[j]
                        if member == me:
                            dispatched.setdefault(h, {})[i] = piece
                        elif piece.numel():
                            ops.append(op(dist.isend, piece, member, 1, i))
                            keep.append(piece)
            elif me in src:
                j = src.index(me)
                for i, t in enumerate(sent):  # every member's block has the same shape
                    buf = torch.empty_like(parts(t, k)[j])
                    dispatched.setdefault(h, {})[i] = buf
                    if buf.numel():
                        ops.append(op(dist.irecv, buf, s, 1, i))
        works = dist.batch_isend_irecv(ops) if ops else []

        def finish():
            for w in works:
                w.wait()
            # phase 2: rail to rail, member j of the sender's node to member j of the receiver's
            ops2, railed = [], {}
            for h, (s, d, src, dst) in enumerate(hops):
                k = len(src)
                if me in src:
                    j = src.index(me)
                    for i, piece in dispatched[h].items():
                        if piece.numel():
                            ops2.append(op(dist.isend, piece, dst[j], 2, i))
                if me in dst:
                    j = dst.index(me)
                    for i, t in enumerate(sent):
                        buf = torch.empty_like(parts(t, k)[j])
                        railed.setdefault(h, {})[i] = buf
                        if buf.numel():
                            ops2.append(op(dist.irecv, buf, src[j], 2, i))
            for w in (dist.batch_isend_irecv(ops2) if ops2 else []):
                w.wait()
            # phase 3: the receiver's node members hand their parts to the receiver
            ops3, gathered = [], {}
            for h, (s, d, src, dst) in enumerate(hops):
                k = len(src)
                if me in dst and me != d:
                    for i, piece in railed[h].items():
                        if piece.numel():
                            ops3.append(op(dist.isend, piece, d, 3, i))
                if me == d:
                    for i, t in enumerate(sent):
                        pieces = []
                        for j, member in enumerate(dst):
                            if member == me:
                                pieces.append(railed[h][i])
                            else:
                                buf = torch.empty_like(parts(t, k)[j])
                                if buf.numel():
                                    ops3.append(op(dist.irecv, buf, member, 3, i))
                                pieces.append(buf)
                        gathered[i] = pieces
            for w in (dist.batch_isend_irecv(ops3) if ops3 else []):
                w.wait()
            keep.clear()  # the dispatched parts were held until their sends completed
            if routed_in:
                return [torch.cat(gathered[i], dim=1) for i in range(len(sent))]
            return received

        return finish
