"""The balance attention engine: the strategy installed into every attention module when
`parallel.balance` is on. Per step it holds this rank's `StepLayout` (from the planner's plan) and
runs core attention sequence group by sequence group:

- a sequence placed on this rank alone: local attention (kernels via LocalBlocksAttention);
- a sequence spread over a ring group: ring attention among that group's members only
  (parallel/context/ring.py's RingAttention over a `SubRing` of the balancing group's process
  group: point-to-point ops, no communicator per group), K/V with positions and sequence ids
  travelling together so that the mask is exact; the next block is in flight while one computes.

Sequences that share a ring group run as one packed block (one ring pass). A member's block is
padded to the longest member's (padding: sequence id -1, attends nothing, is dropped after).
Groups run in one global order every rank follows (the plan's schedule, planner.schedule_slots:
rings in the order they can start, inter-node first on ties, local work last), so rings never wait
on each other in a cycle. With `routing`, a ring that spans nodes sends its inter-node hops through proxy ranks
(routing.py). With remapping the tensors arrive in the linear layout and one all_to_all_single
moves q, k, v (each flattened per token, concatenated) into the attention layout; one moves the output back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from longtrain.parallel.balance.planner import Plan
from longtrain.parallel.balance.routing import Router
from longtrain.parallel.balance.remap import Route, TokenExchange, invert, linear_layout, plan_route, token_ids
from longtrain.parallel.context.comm import SubRing
from longtrain.parallel.context.ring import LocalBlocksAttention, RingAttention, TokenInfo


@dataclass
class Slot:
    ranks: tuple  # balancing-group ranks of the ring (one: local)
    level: str
    member: int  # my index in the ring
    offset: int  # my real tokens are attention-layout [offset, offset + real)
    real: int
    padded: int  # the block length every member runs with
    pos: torch.Tensor  # (1, padded) position in the sequence
    doc: torch.Tensor  # (1, padded) sequence id, -1 for padding
    nodes: tuple = ()  # node of each ring member
    sequences: tuple = ()  # (sequence, length) of every sequence of the group, in slot order


@dataclass
class StepLayout:
    """One rank's view of a step's plan: its attention slots, and the routes between its linear and
    attention layouts (None without remapping). `linear_ids`: the global token ids it holds outside
    core attention (its input rows)."""
    rank: int
    slots: list
    linear_ids: np.ndarray
    attention_ids: np.ndarray
    to_attention: Route | None = None
    to_linear: Route | None = None
    stats: dict = field(default_factory=dict)
    contiguous: bool = False  # the plan's ring members hold contiguous chunks (scan-based models)

    @classmethod
    def build(cls, plan: Plan, rank: int, remap: bool) -> "StepLayout":
        attention = token_ids(plan)
        linear = linear_layout(attention, plan.gpus_per_node) if remap else attention
        # members' token counts per group (pieces of zero tokens are not in the plan)
        counts: dict = {}
        for r, pieces in enumerate(plan.pieces):
            for p in pieces:
                counts.setdefault(p.group, {}).setdefault(r, 0)
                counts[p.group][r] += p.stop - p.start
        mine = {}
        for seq, (group, level) in plan.groups.items():
            if rank in group:
                mine.setdefault(group, (group, level, []))[2].append(seq)
        ordered = sorted(mine.values(), key=plan.slot_key)
        held = list(dict.fromkeys(p.group for p in plan.pieces[rank]))  # groups in attention-layout order
        if held != [group for group, _, _ in ordered if group in held]:
            raise ValueError("balance plan: a rank's pieces are not in the plan's slot order (set plan.order "
                             "through Plan.set_order)")
        slots, offset = [], 0
        for group, level, seqs in ordered:
            pieces = [p for p in plan.pieces[rank] if p.group == group]
            real = sum(p.stop - p.start for p in pieces)
            padded = max(counts.get(group, {}).values() or [1])
            pos = np.zeros(padded, np.int64)
            doc = np.full(padded, -1, np.int64)
            at = 0
            for p in pieces:
                pos[at:at + p.stop - p.start] = np.arange(p.start, p.stop)
                doc[at:at + p.stop - p.start] = p.seq
                at += p.stop - p.start
            slots.append(Slot(group, level, group.index(rank), offset, real, padded,
                              torch.from_numpy(pos)[None], torch.from_numpy(doc)[None],
                              tuple(r // plan.gpus_per_node for r in group),
                              tuple((seq, plan.lengths[seq]) for seq in sorted(seqs))))
            offset += real
        layout = cls(rank, slots, linear[rank], attention[rank], contiguous=plan.contiguous)
        if remap:
            layout.to_attention = plan_route(linear, attention, rank)
            layout.to_linear = invert(layout.to_attention)
        layout.stats = {"ring_slots": sum(len(s.ranks) > 1 for s in slots),
                        "local_slots": sum(len(s.ranks) == 1 for s in slots),
                        "remap_sent": 0 if not remap else int(sum(layout.to_attention.send_counts)
                                                              - layout.to_attention.send_counts[rank])}
        return layout


def empty_in_graph(shape, *inputs) -> torch.Tensor:
    """Zeros of `shape` (no tokens: numel 0) that depend on every input. A rank whose step gives it no
    tokens for a core still runs its backward through the inputs, so their projections get (zero)
    gradients as on every other rank (FSDP reduces the same parameters everywhere) and the remapping
    exchange's backward collective runs on every rank. A detached tensor here would hang or corrupt
    the step (a gloo size mismatch at the gradient reduce-scatter). In the first input's dtype, as the
    cores' outputs are (a remapped output travels in an exchange whose bytes every rank must agree on)."""
    anchor = sum(t.sum().float() for t in inputs if t is not None) * 0.0
    return inputs[0].new_zeros(shape) + anchor.to(inputs[0].dtype)


class BalancedAttention:
    """core_attention(q, k, v, scale, positions, doc_ids) for the balanced layout of the current
    step (`set_step`). `group`: the balancing group's process group; `global_ranks[i]`: the global
    rank of balancing rank i."""

    def __init__(self, group, global_ranks: list[int], backend: str = "auto", causal: bool = True,
                 kv_chunks: int = 1, routing: bool = False):
        self.group, self.global_ranks, self.routing = group, list(global_ranks), routing
        self.backend, self.causal, self.kv_chunks = backend, causal, kv_chunks
        self.layout: StepLayout | None = None
        self.calls = {"local": 0, "ring": 0, "remap": 0, "routed": 0}  # what ran (tests assert on it)

    def set_step(self, layout: StepLayout) -> None:
        self.layout = layout

    def __call__(self, q, k, v, scale: float, positions=None, doc_ids=None, seq_len=None):
        layout = self.layout
        if layout is None:
            raise RuntimeError("BalancedAttention: no step layout set (the trainer calls set_step before forward)")
        remap = layout.to_attention is not None
        if remap:
            # one exchange for the three: each flattened to (batch, tokens, heads x head dim), as their head
            # counts and head dims may differ (GQA; MLA's value head dim is not its query/key head dim)
            shapes = [t.shape[2:] for t in (q, k, v)]
            qkv = TokenExchange.apply(torch.cat([t.flatten(2) for t in (q, k, v)], dim=2), layout.to_attention,
                                      layout.to_linear, self.group)
            q, k, v = (part.unflatten(2, shape) for part, shape in
                       zip(qkv.split([shape.numel() for shape in shapes], dim=2), shapes))
            self.calls["remap"] += 1
        outs = []
        for slot in layout.slots:
            block = [t[:, slot.offset:slot.offset + slot.real] for t in (q, k, v)]
            if slot.padded > slot.real:
                block = [torch.cat([t, t.new_zeros((t.shape[0], slot.padded - slot.real) + tuple(t.shape[2:]))], 1)
                         for t in block]
            info = TokenInfo(pos=slot.pos.to(q.device), doc=slot.doc.to(q.device))
            if len(slot.ranks) == 1:
                out = LocalBlocksAttention.apply(*block, info, info, scale, self.causal, self.backend)
                self.calls["local"] += 1
            else:
                ranks = tuple(self.global_ranks[r] for r in slot.ranks)
                router = None
                if self.routing and len(set(slot.nodes)) > 1:
                    router = Router(self.group, ranks, slot.nodes)
                    self.calls["routed"] += bool(router.hops())
                ring = SubRing(self.group, ranks, router)
                out = RingAttention.apply(*block, info, None, slot.member, scale, self.causal, self.backend, ring,
                                          self.kv_chunks)
                self.calls["ring"] += 1
            outs.append(out[:, :slot.real])
        # a rank holding no attention tokens this step: an empty output that keeps q, k, v in the graph
        out = torch.cat(outs, dim=1) if outs else empty_in_graph(q.shape[:3] + v.shape[3:], q, k, v)
        if remap:
            out = TokenExchange.apply(out, layout.to_linear, layout.to_attention, self.group)
        return out
