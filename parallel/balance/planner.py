"""The balance planner: one step's whole sequences -> for each rank of the balancing group the
pieces of sequences it holds for core attention, and the ring group each piece runs in.

A pure, deterministic function of the sequence lengths (and the data-rank bins they came in): every
rank computes the same plan from the same lengths, nothing is communicated. Ranks are indices of the
balancing group (the data x context ranks, `dp_replicate x dp_shard x cp` in mesh order); node n
holds ranks [n*G, (n+1)*G) with G = the cluster's GPUs per node (all of them when the group is smaller).

A sequence runs in one `group` of ranks: one rank (local attention) or a ring of g ranks, each
holding the zigzag chunks i and 2g-1-i of the sequence (equal causal work per member). Its
`level` is local, intra (one node) or inter (several nodes).

Strategies (recipe key `parallel.balance`):
- `even_cp`: today's context parallelism: every sequence of data rank d's bin is split over all cp
  ranks of d (a ring of cp; local when cp = 1);
- `tokens`: equal tokens per rank, sequences whole (longest first onto the rank with the fewest
  tokens); a sequence longer than a rank's capacity rings over the fewest ranks that hold it;
- `hybrid_dp`: sequences that fit a rank go whole to data ranks by tokens (as `tokens`); longer ones
  ring over the cp ranks of the data rank with the least attention work;
- `zeppelin`: hierarchical partitioning (techniques.md 1.4). Longest first on attention cost:
  a sequence whose cost exceeds a rank's fair share W/P (or whose tokens exceed a rank's capacity)
  rings over g = ceil(cost / (W/P)) ranks, cut back so that every member's chunk L/g stays at least
  the hiding length tau_intra (never below what capacity needs); g > G spreads it over whole nodes
  (k = ceil(g/G) least-loaded nodes, while L/(k G) >= tau_inter), else over an aligned block of the
  least-loaded node with room: g a power of two, ranks [k g, (k+1) g) of the node, the block whose
  busiest member is least loaded (any g ranks with room when no block has it). Aligned rings are
  nested or disjoint, so they wait less for each other in the slot schedule than rings of arbitrary
  members (simulated at scale: 1.11x -> 1.13x even_cp on average). Where ranks share cores (a CPU
  machine running more ranks than cores), g may be any size, still at multiples of g in the node.
  Every other sequence is local: onto the least-loaded node with token room, then the least-loaded
  rank of that node with room (LPT, two levels).
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, field
import typing
from typing import Callable, Literal, NamedTuple, Optional, Sequence

import numpy as np

Strategy = Literal["zeppelin", "tokens", "even_cp", "hybrid_dp"]
STRATEGIES = typing.get_args(Strategy)
LEVEL_ORDER = {"inter": 0, "intra": 1, "local": 2}


class PlanError(ValueError):
    """A step that cannot be planned; str() is one line."""


class Piece(NamedTuple):
    seq: int
    start: int  # tokens [start, stop) of the sequence
    stop: int
    group: tuple  # balancing-group ranks of the sequence's ring, in ring order (one rank: local)
    level: str


@dataclass
class Plan:
    strategy: str
    lengths: list
    world: int
    gpus_per_node: int
    capacity: int  # tokens a rank may hold in the attention layout
    contiguous: bool = False  # ring members hold contiguous chunks (not zigzag pairs)
    groups: dict = field(default_factory=dict)  # seq -> (group, level)
    pieces: list = field(default_factory=list)  # per rank: its pieces in attention-layout order
    order: dict = field(default_factory=dict)  # group -> its place in the global slot order (schedule_slots)

    def tokens_per_rank(self) -> np.ndarray:
        return np.array([sum(p.stop - p.start for p in rank) for rank in self.pieces])

    def attention_work(self) -> np.ndarray:
        """Causal attention pairs (query, key) each rank computes: the balance target."""
        work = np.zeros(self.world)
        for r, rank in enumerate(self.pieces):
            for p in rank:
                work[r] += causal_pairs(p)
        return work

    def slots(self, rank: int) -> list[tuple[tuple, str, list]]:
        """This rank's (group, level, pieces), in the global slot order every rank follows."""
        out: dict = {}
        for p in self.pieces[rank]:
            out.setdefault(p.group, (p.group, p.level, []))[2].append(p)
        return sorted(out.values(), key=self.slot_key)

    def set_order(self, order: dict) -> None:
        """Make `order` (group -> place; empty: the fixed order) the global slot order, and put each
        rank's pieces (its attention layout) in it."""
        self.order = dict(order)
        keys: dict = {}  # by the group tuple's identity: hashing a wide ring's tuple per piece is slow
        for rank in self.pieces:
            for p in rank:
                if id(p.group) not in keys:
                    keys[id(p.group)] = self.slot_key((p.group, p.level))
        self.pieces = [sorted(rank, key=lambda p: keys[id(p.group)]) for rank in self.pieces]

    def slot_key(self, slot) -> tuple:
        """Sort key of a (group, level, ...) slot in the global order every rank follows."""
        group = slot[0]
        if group in self.order:
            return (0, self.order[group], ())
        return (1,) + slot_key(slot)


def slot_key(slot) -> tuple:
    """The fixed order (inter-node rings, intra-node rings, local; then by ranks) of a plan without a
    schedule."""
    group, level = slot[0], slot[1]
    return (LEVEL_ORDER[level], len(group) == 1, group)


def causal_pairs(piece: Piece) -> float:
    """(query, key) pairs of a piece's queries against the earlier keys of its sequence."""
    a, b = piece.start, piece.stop
    return (b * (b + 1) - a * (a + 1)) / 2.0


def zigzag_bounds(length: int, g: int) -> list[int]:
    """Bounds of the 2g near-equal chunks of a sequence (the first chunks take the remainder)."""
    base, extra = divmod(length, 2 * g)
    bounds = [0]
    for c in range(2 * g):
        bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    return bounds


def contiguous_bounds(length: int, g: int) -> list[int]:
    """Bounds of g near-equal contiguous chunks (scan-based models: member i holds chunk i)."""
    base, extra = divmod(length, g)
    bounds = [0]
    for c in range(g):
        bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    return bounds


def _ring_pieces(seq: int, length: int, group: tuple, level: str, contiguous: bool = False) -> list[tuple[int, Piece]]:
    g = len(group)
    if g == 1:
        return [(group[0], Piece(seq, 0, length, group, level))]
    out = []
    if contiguous:
        b = contiguous_bounds(length, g)
        for i, rank in enumerate(group):
            if b[i + 1] > b[i]:
                out.append((rank, Piece(seq, b[i], b[i + 1], group, level)))
        return out
    b = zigzag_bounds(length, g)
    for i, rank in enumerate(group):
        for c in (i, 2 * g - 1 - i):
            if b[c + 1] > b[c]:
                out.append((rank, Piece(seq, b[c], b[c + 1], group, level)))
    return out


def quadratic(length: int) -> float:
    return float(length) * float(length)


def plan_step(lengths: Sequence[int], world: int, strategy: str = "zeppelin", *, capacity: int,
              gpus_per_node: int = 0, cp: int = 1, bins: Optional[Sequence[int]] = None,
              cost: Callable[[int], float] = quadratic, tau_intra: float = 0.0, tau_inter: float = 0.0,
              contiguous: bool = False, ring_cost: Optional[Callable[[int, int, str], float]] = None,
              shared_cores: int = 0, member_cost: Optional[Callable[[int, int, str], float]] = None) -> Plan:
    """Plan one step. `capacity`: tokens one rank may hold; `cp`: ranks per data rank (even_cp,
    hybrid_dp; ranks d*cp .. d*cp+cp-1 are data rank d's); `bins[i]`: the data rank whose bin
    sequence i came in (even_cp); `cost`: the balancing weight of a whole sequence (the cost model's
    attention seconds; L^2 by default); tau_*: hiding lengths in tokens; `contiguous`: a ring member
    holds one contiguous chunk of its sequence instead of the zigzag pair (scan-based models: hybrid
    Mamba stacks scan each chunk in order; causal attention work is then uneven inside a ring).
    `ring_cost(length, g, level)`: what one member of a ring of g ranks pays for a sequence, in the
    units of `cost` (zeppelin weighs rings with it: smaller blocks run slower and transfers may show;
    default cost(length) / g, a ring that divides the work perfectly; CostModel.planner_kwargs()).
    `shared_cores` > 0: the ranks share that many processors (a CPU-only machine, more ranks than
    cores): zeppelin then weighs a placement by max(the busiest rank's load, all ranks' load over
    the cores), so it does not buy balance with work that the shared cores pay for anyway.
    `member_cost(length, g, level)`: what a ring member pays, for the slot schedule only
    (schedule_slots; default ring_cost, else the ideal share)."""
    lengths = [int(x) for x in lengths]
    if strategy not in STRATEGIES:
        raise PlanError(f"parallel.balance: unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if world < 1 or capacity < 1 or world % cp:
        raise PlanError(f"balance plan: {world} ranks, capacity {capacity}, cp {cp} do not fit")
    G = gpus_per_node if 0 < gpus_per_node < world else world
    if world % G:
        raise PlanError(f"cluster.gpus_per_node: {G} GPUs per node do not divide the {world} ranks of the balancing group")
    total = world * capacity
    for i, length in enumerate(lengths):
        if length < 1:
            raise PlanError(f"balance plan: sequence {i} has length {length}")
        if length > total:
            raise PlanError(f"balance plan: sequence {i} of {length} tokens is longer than the whole balancing group "
                            f"holds ({world} ranks x {capacity} tokens)")
    if sum(lengths) > total:
        raise PlanError(f"balance plan: {sum(lengths)} tokens exceed the balancing group's capacity "
                        f"({world} ranks x {capacity} tokens)")
    plan = Plan(strategy, lengths, world, G, capacity, contiguous)
    if strategy == "zeppelin":
        groups = _zeppelin(lengths, world, G, capacity, cost, tau_intra, tau_inter, ring_cost, shared_cores)
    else:
        groups = {"tokens": _tokens, "even_cp": _even_cp, "hybrid_dp": _hybrid_dp}[strategy](
            lengths, world, G, capacity, cp, bins, cost, tau_intra, tau_inter)
    plan.groups = groups
    plan.order = schedule_slots(groups, lengths, world, cost, member_cost or ring_cost)
    # the attention layout: each rank's pieces slot by slot in the global order, by sequence inside a
    # slot (what set_order makes of them, built in that order here rather than sorted after)
    seqs_of: dict = {}
    for seq in sorted(groups):
        seqs_of.setdefault(groups[seq][0], []).append(seq)
    per_rank: list[list[Piece]] = [[] for _ in range(world)]
    new_piece = functools.partial(tuple.__new__, Piece)
    for group in sorted(plan.order, key=plan.order.__getitem__):
        if len(group) == 1:
            pieces = per_rank[group[0]]
            for seq in seqs_of[group]:
                pieces.append(new_piece((seq, 0, lengths[seq], group, groups[seq][1])))
            continue
        for seq in seqs_of[group]:
            for rank, piece in _ring_pieces(seq, lengths[seq], group, groups[seq][1], contiguous):
                per_rank[rank].append(piece)
    plan.pieces = per_rank
    return plan


def schedule_slots(groups: dict, lengths: list[int], world: int, cost: Callable[[int], float],
                   ring_cost: Optional[Callable[[int, int, str], float]] = None) -> dict:
    """The global slot order every rank follows: group -> place. Any global order is free of
    deadlock (the earliest unfinished slot has all its members at it), but rings of different members
    wait for each other: in the fixed order (slot_key) a rank in many rings chains them while the
    other members of each wait. This is a list schedule: the rings in the order they can start (all
    members free, by the planner's costs: a member's share of each sequence, `ring_cost` where given),
    ties by level (inter-node first: the slowest transfers start first) then the longer ring; each
    rank's local sequences last, where they fill what the rings leave (techniques.md 1.5). The fixed
    order unless the schedule ends the step sooner by the same costs (greedy schedules can lose)."""
    seconds: dict = {}
    levels: dict = {}
    for seq, (group, level) in groups.items():
        g, L = len(group), lengths[seq]
        share = cost(L) / g if g == 1 or ring_cost is None else ring_cost(L, g, level)
        seconds[group] = seconds.get(group, 0.0) + share
        levels[group] = level
    rings = [g for g in seconds if len(g) > 1]
    local = sorted(g for g in seconds if len(g) == 1)  # last in both orders, by rank
    clock = [0.0] * world
    heap = [(0.0, LEVEL_ORDER[levels[g]], -seconds[g], g) for g in rings]
    heapq.heapify(heap)
    listed: list = []
    while heap:
        start, level, neg_seconds, group = heapq.heappop(heap)
        ready = max(clock[r] for r in group)
        if ready > start:  # a member got busier since this entry was pushed: try again later
            heapq.heappush(heap, (ready, level, neg_seconds, group))
            continue
        listed.append(group)
        for r in group:
            clock[r] = ready - neg_seconds
    # a greedy schedule can lose to the fixed order: keep whichever ends the step sooner by these costs
    fixed = sorted(rings, key=lambda g: slot_key((g, levels[g])))
    after_rings = [0.0] * world  # each rank's local sequences, run after its rings in either order
    for group in local:
        after_rings[group[0]] = seconds[group]
    listed_end = _makespan(listed, seconds, world, after_rings)
    best = listed if listed_end < _makespan(fixed, seconds, world, after_rings) * (1 - 1e-9) else fixed
    return {group: place for place, group in enumerate(best + local)}


def _makespan(order: list, seconds: dict, world: int, after: list) -> float:
    """When the last rank ends if every slot starts once all its members are free and each rank then
    works `after[rank]` seconds more."""
    clock = [0.0] * world
    for group in order:
        end = max(clock[r] for r in group) + seconds[group]
        for r in group:
            clock[r] = end
    return max(c + a for c, a in zip(clock, after))


def shared_makespan(work, cores: int) -> float:
    """When the last of independent jobs of these compute seconds ends on `cores` processors shared
    equally among the jobs still running (each at min(1, cores / running))."""
    left = sorted(float(w) for w in work if w > 0)
    clock, done = 0.0, 0.0
    for i, w in enumerate(left):
        running = len(left) - i
        clock += (w - done) / min(1.0, cores / running)
        done = w
    return clock


def _filled_step(loads, rest: float, cores: int) -> float:
    """The step a placement leads to where ranks share `cores` processors: the loads so far with the
    work still to place (`rest`) poured onto the least-loaded ranks (water-filling: the small sequences
    still to come fill the gaps), run under processor sharing (shared_makespan). Sharing is not the
    best schedule: while more ranks than cores compute each runs at cores / running, so one rank far
    above the others ends the step alone long after the total work over the cores."""
    x = np.sort(np.asarray(loads, dtype=float))
    if rest > 0:
        below = np.cumsum(x)
        for k in range(1, len(x) + 1):
            level = (below[k - 1] + rest) / k
            if k == len(x) or level <= x[k]:
                x[:k] = level
                break
    return shared_makespan(x, cores)


def _level(group: tuple, G: int) -> str:
    if len(group) == 1:
        return "local"
    return "intra" if group[0] // G == group[-1] // G else "inter"


def _longest_first(lengths: list[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
def _even_cp(lengths, world, G, capacity, cp, bins, cost, tau_intra, tau_inter):
    dp = world // cp
    if bins is None:
        bins = [0] * len(lengths) if dp == 1 else None
    if bins is None or any(not 0 <= b < dp for b in bins):
        raise PlanError(f"balance plan: even_cp needs each sequence's data-rank bin in [0, {dp})")
    out = {}
    for seq, b in enumerate(bins):
        group = tuple(range(b * cp, (b + 1) * cp))
        out[seq] = (group, _level(group, G))
    return out


def _whole_by_tokens(seqs, lengths, world, capacity, tokens, work, G):
    """Each sequence whole onto the rank with the fewest tokens (ties: lowest rank); one that fits
    no rank whole rings over the fewest ranks (those with the fewest tokens) that hold it."""
    heap = [(int(tokens[r]), r) for r in range(world)]
    heapq.heapify(heap)
    out = {}
    for seq in seqs:
        L = lengths[seq]
        t, r = heap[0]
        if t + L <= capacity:
            heapq.heappop(heap)
            out[seq] = ((r,), "local")
            tokens[r] += L
            work[r] += quadratic(L)
            heapq.heappush(heap, (int(tokens[r]), r))
            continue
        order = sorted(range(world), key=lambda r: (tokens[r], r))
        for g in range(2, world + 1):
            if all(tokens[r] + -(-L // g) + 1 <= capacity for r in order[:g]):
                break
        else:
            raise PlanError(f"balance plan: no room for sequence {seq} of {L} tokens (capacity {capacity} per rank)")
        group = tuple(sorted(order[:g]))
        out[seq] = (group, _level(group, G))
        for r in group:
            tokens[r] += -(-L // g)
            work[r] += quadratic(L) / g
        heap = [(int(tokens[r]), r) for r in range(world)]
        heapq.heapify(heap)
    return out


def _tokens(lengths, world, G, capacity, cp, bins, cost, tau_intra, tau_inter):
    tokens, work = np.zeros(world, np.int64), np.zeros(world)
    out, short = {}, []
    for seq in _longest_first(lengths):
        L = lengths[seq]
        if L <= capacity:
            short.append(seq)
            continue
        g = math.ceil(L / capacity)
        while True:
            order = np.argsort(tokens, kind="stable")[:g]
            if all(tokens[order] + -(-L // g) + 1 <= capacity) or g == world:
                break
            g += 1
        group = tuple(sorted(order.tolist()))
        out[seq] = (group, _level(group, G))
        tokens[list(group)] += -(-L // g)
    out.update(_whole_by_tokens(short, lengths, world, capacity, tokens, work, G))
    return out


def _hybrid_dp(lengths, world, G, capacity, cp, bins, cost, tau_intra, tau_inter):
    dp = world // cp
    tokens, work = np.zeros(world, np.int64), np.zeros(world)
    out, short = {}, []
    for seq in _longest_first(lengths):
        L = lengths[seq]
        if L <= capacity or cp == 1:
            short.append(seq)
            continue
        if L > cp * capacity:
            raise PlanError(f"balance plan: hybrid_dp rings a sequence over cp={cp} ranks, but sequence {seq} of {L} "
                            f"tokens exceeds {cp} x {capacity}")
        d = min(range(dp), key=lambda d: (work[d * cp:(d + 1) * cp].sum(), d))
        group = tuple(range(d * cp, (d + 1) * cp))
        out[seq] = (group, _level(group, G))
        tokens[list(group)] += -(-L // cp)
        work[list(group)] += quadratic(L) / cp
    out.update(_whole_by_tokens(short, lengths, world, capacity, tokens, work, G))
    return out


# ----------------------------------------------------------------------------------------------
# Zeppelin
# ----------------------------------------------------------------------------------------------
def _zeppelin(lengths, world, G, capacity, cost, tau_intra, tau_inter, ring_cost, shared_cores):
    N = world // G
    costs = [cost(L) for L in lengths]
    # A placement is judged by the step it leads to. On dedicated devices: at least its busiest rank's
    # load, and at least the step's whole work (placed so far, this placement's, the rest at
    # whole-sequence cost) over the ranks. Where ranks share cores: the loads with the rest poured onto
    # the least loaded, run under processor sharing (_filled_step: a straggler ends the step alone, so
    # max(peak, work / cores) would be too hopeful). A ring's members pay ring_cost, more than their
    # share when its blocks run slower or its transfers show, less where its full blocks run faster
    # than one causal block: a ring is chosen only when it lowers the step, not merely the busiest rank.
    totals = {"placed": 0.0, "rest": float(sum(costs))}
    processors = shared_cores if 0 < shared_cores < world else world

    def objective(peak, added, members, member, c):
        """(the step after placing a sequence of whole cost c on `members`, each paying `member`, then
        the busiest rank `peak`: ties keep the lower peak). `added`: what the members pay beyond c in
        all (a ring costs more, or less, than the whole sequence). The step: on dedicated devices its
        lower bound, max(peak, all the work over the ranks); where ranks share cores, the loads with the
        rest of the work poured in, under processor sharing (_filled_step)."""
        if processors < world:
            loads = list(rank_load)
            for r in members:
                loads[r] += member
            return (_filled_step(loads, totals["rest"] - c, processors), peak)
        return (max(peak, (totals["placed"] + added + totals["rest"]) / processors), peak)

    def better(a, b):
        """Placement objective a is strictly better than b (beyond rounding)."""
        if a[0] < b[0] * (1 - 1e-9):
            return True
        return a[0] <= b[0] * (1 + 1e-9) and a[1] < b[1] * (1 - 1e-9)

    def share(L, c, g, level):
        """A member's load from a sequence of length L (whole cost c) in a group of g ranks."""
        if g == 1 or ring_cost is None:
            return c / g
        return ring_cost(L, g, level)

    # Ring sizes inside a node: on dedicated devices aligned blocks of 2, 4, 8 ... ranks, so rings are
    # nested or disjoint (allowing 3, 5, 6, 7 too, at multiples of their size, simulated worse at
    # scale: 1.128x -> 1.113x even_cp on average; allowing them for a node's first ring only changed 3
    # of the 108 configurations, each for the worse, 1.09-1.11x -> 1.01-1.05x: the placement's bound
    # does not see the rings that later wait on it). Where ranks share cores, any size: a rank a ring
    # leaves out gives its core to the members, and the objective there runs the loads under processor
    # sharing. A sequence that needs 3 ranks' room at cp4 on 2 cores then rings over 3 instead of 4:
    # simulated 1.10-1.57x faster over sampled steps that choose it; measured on the README's example
    # (one 2048-token sequence, forward + backward) 1.00-1.02x, with 4% less processor time.
    any_ring_size = processors < world
    fair = sum(costs) / world  # a rank's fair share of the attention cost
    node_fair = fair * G
    node_load, node_tok = [0.0] * N, [0] * N
    rank_load, rank_tok = [0.0] * world, [0] * world
    # lazy heaps: an entry is stale when its load is no longer the rank's (node's) load
    node_heap = [(0.0, n) for n in range(N)]
    rank_heaps = [[(0.0, r) for r in range(n * G, (n + 1) * G)] for n in range(N)]
    out = {}

    def add(group, L, c):
        """Place a sequence of whole cost c on `group`."""
        g = len(group)
        totals["rest"] -= c
        if g == 1:  # a local sequence (most of them): one rank, one node
            totals["placed"] += c
            r = group[0]
            n = r // G
            raise_load(rank_heaps[n], rank_load, r, c)
            rank_tok[r] += L
            raise_load(node_heap, node_load, n, c)
            node_tok[n] += L
            return
        member = share(L, c, g, _level(group, G))
        totals["placed"] += member * g
        for r in group:
            rank_load[r] += member
            rank_tok[r] += -(-L // g)
            heapq.heappush(rank_heaps[r // G], (rank_load[r], r))
        members_of: dict = {}
        for r in group:
            members_of[r // G] = members_of.get(r // G, 0) + 1
        for n, members in sorted(members_of.items()):
            node_load[n] += member * members
            node_tok[n] += -(-L // g) * members
            heapq.heappush(node_heap, (node_load[n], n))

    def raise_load(heap, loads, i, c):
        """loads[i] += c, and its heap entry with it: replaced in place when it is the heap's top (a
        local sequence goes onto the top rank of the top node), else pushed (the old entry goes stale)."""
        old = loads[i]
        loads[i] = old + c
        if heap and heap[0][1] == i and heap[0][0] == old:
            heapq.heapreplace(heap, (loads[i], i))
        else:
            heapq.heappush(heap, (loads[i], i))

    def valid_top(heap, loads):
        """The heap's least (load, index) entry that is not stale, left in place; None when none is."""
        while heap:
            load, i = heap[0]
            if load == loads[i]:
                return i
            heapq.heappop(heap)
        return None

    def best_whole(L):
        """The least-loaded rank with room for L tokens in the least-loaded node that has one.
        Looks at heap tops in place; only ranks (nodes) without room are set aside, then put back."""
        nodes_seen, found = [], None
        while found is None:
            n = valid_top(node_heap, node_load)
            if n is None:
                break
            if node_tok[n] + L <= G * capacity:  # else no rank of n has room: skip its ranks
                heap, ranks_seen = rank_heaps[n], []
                while True:
                    r = valid_top(heap, rank_load)
                    if r is None:
                        break
                    if rank_tok[r] + L <= capacity:
                        found = r
                        break
                    ranks_seen.append(heapq.heappop(heap))
                for item in ranks_seen:
                    heapq.heappush(heap, item)
            if found is None:
                nodes_seen.append(heapq.heappop(node_heap))
        for item in nodes_seen:
            heapq.heappush(node_heap, item)
        return found

    def intra_ring(L, c, g_lo, g_hi):
        """(group, its members' largest load) over the least-loaded node with room, or (None, inf)."""
        # the least-loaded node with token room first; when its ranks' free room is too fragmented
        # for the ring, the next nodes (by load), so a plan never fails while a node can hold it
        node_room = G * capacity - L
        for _, _, n in sorted(zip([t > node_room for t in node_tok], node_load, range(N))):
            best, best_key = None, ((float("inf"), float("inf")), 0)
            for g in range(g_lo, min(g_hi, G) + 1):
                if g & (g - 1) and not any_ring_size:  # dedicated devices: blocks of 2, 4, 8 ... ranks
                    continue
                room = capacity - (-(-L // g) + 1)  # a member's zigzag chunk pair holds at most L/g + 1 tokens
                blocks = [(max(rank_load[a:a + g]), range(a, a + g)) for a in range(n * G, (n + 1) * G - g + 1, g)
                          if max(rank_tok[a:a + g]) <= room]
                if not blocks:
                    continue
                peak, fits = min(blocks, key=lambda b: b[0])
                member = share(L, c, g, "intra")
                key = (objective(peak + member, g * member - c, fits, member, c), g)
                if key < best_key:
                    best, best_key = list(fits), key
            if best is None:  # no aligned block, or wider than the hiding length allows: any ranks that fit
                by_load = sorted(range(n * G, (n + 1) * G), key=lambda r: (rank_load[r], r))
                for g in range(g_lo, G + 1):
                    room = -(-L // g) + 1
                    fits = [r for r in by_load if rank_tok[r] + room <= capacity][:g]
                    if len(fits) == g:
                        member = share(L, c, g, "intra")
                        best, best_key = fits, (objective(rank_load[fits[-1]] + member, g * member - c,
                                                          fits, member, c), g)
                        break
            if best is not None:
                return tuple(sorted(best)), best_key[0]
        return None, (float("inf"), float("inf"))

    def inter_ring(L, c, k_hidden, need_mem):
        """Whole nodes, k of them minimizing the most loaded chosen node (ties: fewer nodes); and
        the largest load of a member rank after it."""
        k_lo = max(2, -(-need_mem // G))
        k_hi = max(k_lo, min(N, k_hidden))
        order = sorted(range(N), key=lambda n: (node_load[n], n))
        k = min(range(k_lo, k_hi + 1), key=lambda k: (node_load[order[k - 1]] + G * share(L, c, k * G, "inter"), k))
        group = tuple(n * G + j for n in sorted(order[:k]) for j in range(G))
        member = share(L, c, len(group), "inter")
        return group, objective(max(rank_load[r] for r in group) + member, len(group) * member - c,
                                group, member, c)

    def roomiest_ring(L):
        """Last resort when no node's free room holds the sequence: the fewest ranks anywhere (those
        with the most free tokens) whose zigzag shares fit; None if none do."""
        by_room = sorted(range(world), key=lambda r: (rank_tok[r], r))
        for g in range(2, world + 1):
            if all(rank_tok[r] + -(-L // g) + 1 <= capacity for r in by_room[:g]):
                return tuple(sorted(by_room[:g]))
        return None

    fair_limit, node_limit = fair * (1 + 1e-9), node_fair * (1 + 1e-9)
    # longest first on cost, ties by index (a reverse sort keeps equal keys in their order)
    for seq in sorted(range(len(lengths)), key=costs.__getitem__, reverse=True):
        L, c = lengths[seq], costs[seq]
        need_mem = -(-L // capacity)
        hidden = int(L // tau_intra) if tau_intra > 0 else world  # most ranks whose chunks stay hidden
        k_hidden = int(L // (G * tau_inter)) if tau_inter > 0 else N
        if N > 1 and (need_mem > G or (c > node_limit and k_hidden >= 2 and shared_cores <= 0)):
            group, _ = inter_ring(L, c, k_hidden, need_mem)
            out[seq] = (group, "inter")
            add(group, L, c)
            continue
        r = best_whole(L) if need_mem == 1 else None
        # whole under the fair share: local. (On this CPU the probe finds full blocks 1.1-2.3x faster per
        # FLOP than causal ones, so rings for such sequences look cheaper in the cost model; a planner that
        # weighed them too measured between 7% faster and 4% slower than even_cp over four runs, never
        # clearly better than without them: the gain does not show in training steps.)
        if r is not None and (rank_load[r] + c <= fair_limit or hidden < 2):
            out[seq] = ((r,), "local")
            add((r,), L, c)
            continue
        # whole it would overshoot the fair share (or it does not fit): a ring, if that does better;
        # across nodes when that evens out the nodes better than any ring inside one
        group, peak = intra_ring(L, c, max(2, need_mem), max(2, need_mem, hidden))
        if N > 1 and k_hidden >= 2:
            wide, wide_peak = inter_ring(L, c, k_hidden, need_mem)
            if better(wide_peak, peak):
                group, peak = wide, wide_peak
        if r is not None and (group is None or not better(peak, objective(rank_load[r] + c, 0.0, (r,), c, c))):
            group = (r,)
        elif group is None:
            group = roomiest_ring(L)
        if group is None:
            raise PlanError(f"balance plan: no room for sequence {seq} of {L} tokens (capacity {capacity} per rank)")
        out[seq] = (group, _level(group, G))
        add(group, L, c)
    return out
