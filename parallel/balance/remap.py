"""The remapping layer: tokens live in a balanced *linear layout* (every rank of the balancing group
holds floor(T/P) or ceil(T/P) tokens, so projections, MLP, norms, embedding and loss are balanced) and
move into the planner's *attention layout* only around core attention.

Layouts are per-rank arrays of global token ids (token id = sequence offset + position in the step).
`linear_layout` plans the move with the greedy solver of techniques.md 1.7: a rank above its target
keeps the first `target` tokens of its attention layout and gives the rest away; surplus goes to
deficit ranks inside the node first, then across nodes, largest surplus to largest deficit.

`TokenExchange` moves a (1, S, ...) tensor from one layout to another with one all_to_all_single
(split sizes per peer) and is its own inverse's backward.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from longtrain.parallel.context import link_emulation


def token_ids(plan) -> list[np.ndarray]:
    """The attention layout of a plan: per rank, the global ids of its tokens in order."""
    offsets = np.concatenate([[0], np.cumsum(plan.lengths)[:-1]]).astype(np.int64)
    out = []
    for rank in plan.pieces:
        parts = [np.arange(offsets[p.seq] + p.start, offsets[p.seq] + p.stop, dtype=np.int64) for p in rank]
        out.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return out


def transfers(counts: list[int], gpus_per_node: int) -> dict[tuple[int, int], int]:
    """Greedy transfer matrix {(src, dst): tokens} that brings every rank to floor/ceil(T/P): inside
    each node first, then across nodes; largest surplus to largest deficit (ties: lowest rank)."""
    P = len(counts)
    total = sum(counts)
    base, extra = divmod(total, P)
    target = [base + (1 if r < extra else 0) for r in range(P)]
    diff = [counts[r] - target[r] for r in range(P)]  # > 0 surplus, < 0 deficit
    G = gpus_per_node if 0 < gpus_per_node < P else P
    moves: dict[tuple[int, int], int] = {}

    def match(ranks):
        surplus = sorted((r for r in ranks if diff[r] > 0), key=lambda r: (-diff[r], r))
        deficit = sorted((r for r in ranks if diff[r] < 0), key=lambda r: (diff[r], r))
        i = j = 0
        while i < len(surplus) and j < len(deficit):
            s, d = surplus[i], deficit[j]
            n = min(diff[s], -diff[d])
            moves[(s, d)] = moves.get((s, d), 0) + n
            diff[s] -= n
            diff[d] += n
            if diff[s] == 0:
                i += 1
            if diff[d] == 0:
                j += 1

    for node in range(P // G):
        match(range(node * G, (node + 1) * G))
    match(range(P))
    return moves


def linear_layout(attention: list[np.ndarray], gpus_per_node: int) -> list[np.ndarray]:
    """Per rank, the global token ids of its linear layout: its kept attention tokens, then what it
    receives, by source rank."""
    counts = [len(a) for a in attention]
    moves = transfers(counts, gpus_per_node)
    keep = list(counts)
    for (s, _), n in moves.items():
        keep[s] -= n
    out = [[a[:keep[r]]] for r, a in enumerate(attention)]
    given = list(keep)  # next attention-layout index each source gives away
    for (s, d), n in sorted(moves.items()):
        out[d].append(attention[s][given[s]:given[s] + n])
        given[s] += n
    return [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in out]


def remap_estimate(plan, cm) -> tuple[float, float]:
    """(seconds of one training step that remapping saves, seconds its exchanges cost), by the cost
    model `cm` (cost.CostModel): what `parallel.balance_remap: null` (auto) weighs.

    Without remapping a rank's linear work (projections, MLP; fwd + bwd) follows the tokens it holds
    in the attention layout, and ranks run on without waiting for each other between the two:
        off = max_r (lin(n_r) + att_r).
    Remapping gives every rank ceil(T/P) tokens outside attention, but its exchanges are collectives
    around core attention: everyone waits for the slowest before and after it, so
        on = lin(ceil(T/P)) + max_r att_r,
    both at least the whole work over the cores where P ranks share C < P cores (a rank that waits
    leaves its core to the others). lin(n) = n x one token's linear seconds over all layers; att_r =
    the rank's attention seconds (its pieces' causal pairs at the kernel speed of their block length).
    saved = off - on.
    Cost: per layer four exchanges (q, k, v into the attention layout and the output back, forward;
    the gradients of both, backward), each a collective: its fixed cost (cluster.collective_us) plus
    the largest per-rank transfer, tokens x bytes per token at the bandwidth of the level they cross
    (q, k, v: (h + 2 h_kv) d b per token, into the attention rank; the output h d b, back), as the
    simulator runs it:  cost = L (4 collective + 2 max_r in_r + 2 max_r out_r)."""
    m, c = cm.model, cm.cluster
    counts = [int(x) for x in plan.tokens_per_rank()]
    P, total = len(counts), sum(counts)
    G = plan.gpus_per_node if 0 < plan.gpus_per_node < P else P
    per_token = cm.linear_seconds(1.0)  # fwd + bwd, all layers
    attention = np.zeros(P)
    for r, pieces in enumerate(plan.pieces):
        for p in pieces:
            attention[r] += 3.5 * cm.piece_forward_seconds(p, plan.lengths[p.seq]) * m.n_layers  # fwd + bwd
    work = np.array(counts) * per_token + attention
    cores = c.shared_cores if 0 < c.shared_cores < P else 0
    floor = work.sum() / cores if cores else 0.0
    off = max(float(work.max()), floor)
    on = max(-(-total // P) * per_token + float(attention.max()), floor)
    qkv = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim * c.bytes_per_element
    out = m.n_heads * m.head_dim * c.bytes_per_element
    into, back = np.zeros(P), np.zeros(P)
    for (src, dst), n in transfers(counts, G).items():  # src holds the tokens in attention, dst outside
        bandwidth = c.bandwidth("intra" if src // G == dst // G else "inter")
        into[dst] += n * qkv / bandwidth
        back[src] += n * out / bandwidth
    cost = m.n_layers * (4 * c.collective_us * 1e-6 + 2 * into.max(initial=0.0) + 2 * back.max(initial=0.0))
    return float(off - on), float(cost)


def remap_pays(plan, cm) -> bool:
    """Remap this step (balance_remap auto): when the linear work it saves exceeds its exchanges' cost."""
    saved, cost = remap_estimate(plan, cm)
    return saved > cost


# parallel.balance_remap's settings, as the trainer's header and `plan balance` say them
REMAP_SETTINGS = {None: "where the cost model says it pays", True: "every step", False: "never"}


def remaps(setting, plan, cm) -> bool:
    """Whether a step remaps under parallel.balance_remap `setting`: as set, or (None, auto) where
    remap_pays says so. The trainer's loader and `plan balance` both decide here."""
    return bool(setting) if setting is not None else remap_pays(plan, cm)


@dataclass
class Route:
    """One rank's part of a move between two layouts: gather `send_index` of its source-layout
    tokens (grouped by destination rank), send `send_counts[p]` to rank p, receive `recv_counts[p]`
    from rank p, and gather `recv_index` of the received tokens into the destination layout."""
    send_index: torch.Tensor
    send_counts: list
    recv_counts: list
    recv_index: torch.Tensor


def plan_route(source: list[np.ndarray], dest: list[np.ndarray], rank: int) -> Route:
    """Route of `rank` from layout `source` to layout `dest` (the same token ids, distributed differently)."""
    P = len(source)
    n_tokens = sum(len(x) for x in source)
    owner = np.empty(n_tokens, np.int64)
    where = np.empty(n_tokens, np.int64)
    for r, ids in enumerate(dest):
        owner[ids] = r
        where[ids] = np.arange(len(ids))
    mine = source[rank]
    dest_rank = owner[mine]
    send_index = np.argsort(dest_rank, kind="stable")
    send_counts = np.bincount(dest_rank, minlength=P).tolist()
    # what arrives: from each source rank s (in rank order), its tokens whose owner is me, in s's send order
    arriving = [ids[owner[ids] == rank] for ids in source]
    recv_counts = [len(a) for a in arriving]
    arrived = np.concatenate(arriving) if arriving else np.zeros(0, np.int64)
    recv_index = np.empty(len(arrived), np.int64)
    recv_index[where[arrived]] = np.arange(len(arrived))  # dest position -> position in the received buffer
    return Route(torch.from_numpy(send_index), send_counts, recv_counts, torch.from_numpy(recv_index))


def _exchange(x: torch.Tensor, route: Route, group) -> torch.Tensor:
    send = x.index_select(1, route.send_index.to(x.device)).movedim(1, 0).contiguous()
    recv = send.new_empty((sum(route.recv_counts),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send, route.recv_counts, route.send_counts, group=group)
    emulator = link_emulation.active()
    if emulator is not None:  # held for what the emulated links take to carry it
        done, ranks = time.monotonic(), dist.get_process_group_ranks(group)
        row = math.prod(send.shape[1:]) * send.element_size()  # bytes per token (also when none is sent)
        emulator.hold_until(done + emulator.collective_seconds(
            dist.get_rank(), {p: n * row for p, n in zip(ranks, route.send_counts)},
            {p: n * row for p, n in zip(ranks, route.recv_counts)}))
    return recv.movedim(0, 1).index_select(1, route.recv_index.to(x.device))


def invert(route: Route) -> Route:
    """The route back: the received buffer's order, inverted."""
    back_send = torch.empty_like(route.recv_index)
    back_send[route.recv_index] = torch.arange(len(route.recv_index))
    back_recv = torch.empty_like(route.send_index)
    back_recv[route.send_index] = torch.arange(len(route.send_index))
    return Route(back_send, route.recv_counts, route.send_counts, back_recv)


class TokenExchange(torch.autograd.Function):
    """x (1, S_source, ...) in the source layout -> (1, S_dest, ...) in the destination layout."""

    @staticmethod
    def forward(ctx, x, route: Route, back: Route, group):
        ctx.back, ctx.route, ctx.group = back, route, group
        return _exchange(x, route, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.back, ctx.group), None, None, None
