"""Mamba-2 layers under `parallel.balance`: the `ssm_core` of hybrid stacks, beside the attention
engine (engine.py), over the same step layout.

A sequence's ring group is also its scan group. For scan-based models the planner cuts a ring's
sequence into g *contiguous* chunks (`plan_step(contiguous=True)`: member i holds chunk i, no
zigzag), so every member scans its tokens in order. Per step and per ring group (slots in the
engine's global order):

1. conv1d halo: a member's chunk of a sequence needs the last d_conv-1 inputs that precede it: the
   members' chunk tails (last d_conv-1 inputs of each chunk, all sequences of the group at once)
   travel round the ring in g-1 point-to-point passes, and member i takes the last d_conv-1 real
   inputs of chunks 0..i-1 (several members back when chunks are shorter than the window; zeros
   before the sequence start);
2. every member scans each of its chunks from a zero state: y0, the final state S_j and the factor
   exp(sum dt A) by which the chunk carries an incoming state;
3. (S_j, log factor) of every member travel round the ring the same way (state-sized messages,
   independent of the length), and member i composes its incoming state
   h_i = S_{i-1} + f_{i-1} h_{i-1} (h_0 = 0) per sequence;
4. y = y0 + C_t (decay to t) h_i (kernels/ssd.initial_state_contribution).

Gradients go back the way the values came (each pass sends the gradient to the previous member).
Local slots (a group of one rank) scan their packed sequences in one call, resetting at every
sequence start. With remapping, xBC and dt move into the attention layout (one all_to_all each way,
as the engine's q/k/v) and y moves back. Tensor parallelism needs nothing here: heads and channels
are the local shard's, and the ring passes run among the members' ranks of this tp slice.
"""
from __future__ import annotations

import torch

from longtrain.kernels.ssd import causal_conv1d, initial_state_contribution, log_decay_to_end, ssd_scan
from longtrain.parallel.balance.engine import empty_in_graph
from longtrain.parallel.balance.planner import contiguous_bounds
from longtrain.parallel.balance.remap import TokenExchange
from longtrain.parallel.context.comm import P2PTag, RingExchange, SubRing


class _RingPass(torch.autograd.Function):
    """Each member of a ring sends x to the next member and returns the previous member's x; the
    gradient goes to the previous member."""

    @staticmethod
    def forward(ctx, x, ring):
        ctx.ring = ring
        (received,) = RingExchange.finish(RingExchange(ring).start([x.contiguous()], tag=P2PTag.SSM_STATE))
        return received

    @staticmethod
    def backward(ctx, grad):
        (received,) = RingExchange.finish(RingExchange(ctx.ring, reverse=True).start(
            [grad.contiguous()], tag=P2PTag.SSM_STATE_GRAD))
        return received, None


def ring_gather(x: torch.Tensor, ring: SubRing, member: int) -> list[torch.Tensor]:
    """Every member's x (same shape on all), indexed by member: g-1 passes round the ring."""
    g = len(ring.ranks)
    out: list = [None] * g
    out[member] = x
    current = x
    for step in range(1, g):
        current = _RingPass.apply(current, ring)
        out[(member - step) % g] = current
    return out


class BalancedSSMCore:
    """ssm_core(xBC, dt, mixer=..., doc_ids=...) for the balanced layout of the current step: it reads
    the step layout the attention engine was given (`engine.set_step`), so both see the same plan."""

    def __init__(self, engine, backend: str = "auto"):
        self.engine, self.backend = engine, backend
        self.calls = {"local": 0, "ring": 0}  # slots scanned (tests assert on it)

    def __call__(self, xBC, dt, *, mixer, doc_ids=None):
        layout = self.engine.layout
        if layout is None:
            raise RuntimeError("BalancedSSMCore: no step layout set (the trainer calls set_step before forward)")
        if not layout.contiguous:
            raise RuntimeError("BalancedSSMCore: the step was planned with zigzag chunks; scan-based models need "
                               "plan_step(contiguous=True)")
        remap = layout.to_attention is not None
        width = xBC.shape[-1]
        if remap:
            moved = TokenExchange.apply(torch.cat([xBC, dt.to(xBC.dtype)], dim=-1), layout.to_attention,
                                        layout.to_linear, self.engine.group)
            xBC, dt = moved[..., :width], moved[..., width:].to(dt.dtype)
        weight, bias = mixer.conv_params()
        A, D = mixer.scan_params()
        k = weight.shape[-1]
        outs, anchors = [], []
        for slot in layout.slots:
            xs, dts = xBC[:, slot.offset:slot.offset + slot.real], dt[:, slot.offset:slot.offset + slot.real]
            if len(slot.ranks) == 1:
                doc = slot.doc[:, :slot.real].to(xBC.device)
                conv = causal_conv1d(xs, weight, bias, doc_ids=doc, activation="silu")
                x, B, C = mixer.split_xBC(conv, dts.shape[-1])
                y, _ = ssd_scan(x, dts, A, B, C, chunk_size=mixer.chunk_size, D=D, seq_idx=doc, backend=self.backend)
                outs.append(y)
                self.calls["local"] += 1
                continue
            y, anchor = self._ring_slot(slot, xs, dts, weight, bias, A, D, mixer, k)
            outs.append(y)
            anchors.append(anchor)
            self.calls["ring"] += 1
        h, p = dt.shape[-1], mixer.head_dim
        # a rank holding no tokens to scan this step: an empty output that keeps the core's inputs in the graph
        out = torch.cat(outs, dim=1) if outs else empty_in_graph((xBC.shape[0], 0, h, p), xBC, dt, weight, bias, A, D)
        if anchors:  # every value received in a pass is in the graph, so every member runs every pass backward
            out = out + sum(anchors)
        if remap:
            out = TokenExchange.apply(out, layout.to_linear, layout.to_attention, self.engine.group)
        return out

    def _ring_slot(self, slot, xs, dts, weight, bias, A, D, mixer, k):
        g, me = len(slot.ranks), slot.member
        ring = SubRing(self.engine.group, tuple(self.engine.global_ranks[r] for r in slot.ranks))
        width, h = xs.shape[-1], dts.shape[-1]
        # my chunk of each sequence of the slot (contiguous: one piece per sequence), and every member's
        # chunk lengths from the plan (every rank knows them)
        chunks, at = [], 0
        for seq, length in slot.sequences:
            bounds = contiguous_bounds(length, g)
            n = bounds[me + 1] - bounds[me]
            chunks.append((at, n, [bounds[j + 1] - bounds[j] for j in range(g)]))
            at += n
        n_seq = len(chunks)
        # 1. tails (n_seq, k-1, width) round the ring -> each chunk's halo
        tails = xs.new_zeros(n_seq, max(k - 1, 0), width)
        for s, (start, n, _) in enumerate(chunks):
            take = min(n, k - 1)
            if take:
                tails[s, k - 1 - take:] = xs[0, start + n - take:start + n]
        all_tails = ring_gather(tails, ring, me) if k > 1 else []
        ys, finals, logs = [], [], []
        for s, (start, n, lengths) in enumerate(chunks):
            if n == 0:
                ys.append(xs.new_zeros(1, 0, h, mixer.head_dim))
                finals.append(torch.zeros(1, h, mixer.head_dim, mixer.d_state, device=xs.device,
                                          dtype=torch.float64 if xs.dtype == torch.float64 else torch.float32))
                logs.append(finals[-1].new_zeros(1, h))
                continue
            halo = None
            if k > 1:
                parts = [all_tails[j][s, k - 1 - min(lengths[j], k - 1):] for j in range(me)]
                before = torch.cat([xs.new_zeros(k - 1, width)] + parts, dim=0)[-(k - 1):]
                halo = before[None]
            conv = causal_conv1d(xs[:, start:start + n], weight, bias, halo=halo, activation="silu")
            x, B, C = mixer.split_xBC(conv, h)
            y0, final = ssd_scan(x, dts[:, start:start + n], A, B, C, chunk_size=mixer.chunk_size, D=D,
                                 backend=self.backend)
            ys.append((y0, C, dts[:, start:start + n]))
            finals.append(final)
            logs.append(log_decay_to_end(dts[:, start:start + n], A))
        # 3. (final state, log factor) of every member's chunk of every sequence round the ring
        finals_t, logs_t = torch.cat(finals, 0), torch.cat(logs, 0)  # (n_seq, h, p, n), (n_seq, h)
        packed = torch.cat([finals_t.flatten(1), logs_t.to(finals_t.dtype)], dim=1)
        gathered = ring_gather(packed, ring, me)
        state = torch.zeros_like(finals_t)
        split = finals_t[0].numel()
        for j in range(me):
            S_j = gathered[j][:, :split].view_as(finals_t)
            f_j = torch.exp(gathered[j][:, split:])  # (n_seq, h)
            state = S_j + f_j[:, :, None, None] * state
        out = []
        for s, item in enumerate(ys):
            if isinstance(item, torch.Tensor):
                out.append(item)
                continue
            y0, C, dt_chunk = item
            if me == 0:
                out.append(y0)
                continue
            corr = initial_state_contribution(C, dt_chunk, A, None, state[s:s + 1], ngroups=C.shape[2])
            out.append(y0 + corr.to(y0.dtype))
        anchor = (sum(t.sum() for t in gathered) + sum(t.sum() for t in all_tails)) * 0.0
        return torch.cat(out, dim=1), anchor.to(xs.dtype)
