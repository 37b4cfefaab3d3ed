"""Balance planner and remap solver, pure functions (no processes): every token assigned exactly once
under every strategy, determinism, zeppelin's attention balance and remapped token balance on
long-tailed batches against the baselines, the one-line errors, and the planning time."""
import math
import time
from pathlib import Path

import numpy as np
import pytest

from longtrain.parallel.balance.planner import STRATEGIES, PlanError, plan_step, zigzag_bounds
from longtrain.parallel.balance.remap import linear_layout, plan_route, token_ids, transfers


def long_tailed(rng, budget, longest=32768):
    """Most sequences under 1K tokens (log-normal, median ~400), 2% of 16K-32K; up to `budget` tokens."""
    out = []
    while True:
        if rng.random() < 0.02:
            length = int(rng.integers(min(16384, longest // 2), longest + 1))
        else:
            length = int(min(longest, rng.lognormal(6.0, 1.2) + 1))
        if sum(out) + length > budget:
            return out or [budget]
        out.append(length)


def check_exactly_once(plan):
    covered = [np.zeros(L, np.int64) for L in plan.lengths]
    for rank, pieces in enumerate(plan.pieces):
        for p in pieces:
            assert rank in p.group
            covered[p.seq][p.start:p.stop] += 1
    for seq, c in enumerate(covered):
        assert (c == 1).all(), f"sequence {seq}: tokens held {set(c.tolist())} times"
    assert plan.tokens_per_rank().max() <= plan.capacity


def test_zigzag_chunks_balance_causal_work():
    b = zigzag_bounds(1000, 4)
    assert b[0] == 0 and b[-1] == 1000 and len(b) == 9
    pairs = lambda a, z: (z * (z + 1) - a * (a + 1)) / 2  # noqa: E731
    work = [pairs(b[i], b[i + 1]) + pairs(b[7 - i], b[8 - i]) for i in range(4)]
    assert max(work) / min(work) < 1.01


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_token_exactly_once_and_deterministic(strategy):
    rng = np.random.default_rng(0)
    for world, cp, gpn in ((4, 4, 0), (4, 2, 2), (8, 2, 4), (16, 4, 8), (64, 8, 8)):
        for _ in range(20):
            cap = 4096
            lengths = long_tailed(rng, world * cap, longest=min(32768, cp * cap))
            dp = world // cp
            bins = [i % dp for i in range(len(lengths))]
            if strategy == "even_cp":  # each data rank's bin within its cp ranks' capacity
                tot = [0] * dp
                for i, L in enumerate(lengths):
                    bins[i] = min(range(dp), key=lambda d: tot[d])
                    tot[bins[i]] += L
                cap = max(cap, -(-max(tot) // cp) + len(lengths))  # zigzag remainders: a token per sequence
            cap = cap if strategy == "even_cp" else int(1.25 * cap)
            kw = dict(capacity=cap, gpus_per_node=gpn, cp=cp, bins=bins, tau_intra=64, tau_inter=512)
            plan = plan_step(lengths, world, strategy, **kw)
            check_exactly_once(plan)
            again = plan_step(lengths, world, strategy, **kw)
            assert again.pieces == plan.pieces
            # scan-based models: the same groups, one contiguous chunk per member, in ring order
            flat = plan_step(lengths, world, strategy, contiguous=True, **kw)
            check_exactly_once(flat)
            assert flat.groups == plan.groups
            for seq, (group, _) in flat.groups.items():
                held = [p for r in group for p in flat.pieces[r] if p.seq == seq]
                assert [p.start for p in held] == sorted(p.start for p in held) and len(held) <= len(group)


def sample_batch(rng, budget, longest=32768):
    """`long_tailed`, vectorized: log-normal lengths (median ~400) with 2% of longest/2..longest,
    the longest prefix that fits `budget` tokens."""
    n = budget // 200 + 8
    tail = rng.random(n) < 0.02
    lengths = np.where(tail, rng.integers(longest // 2, longest + 1, n),
                       np.minimum(longest, rng.lognormal(6.0, 1.2, n) + 1)).astype(np.int64)
    keep = max(1, int(np.searchsorted(np.cumsum(lengths), budget, side="right")))
    return lengths[:keep].tolist()


def check_exactly_once_fast(plan):
    """check_exactly_once on intervals instead of per-token counters (for thousands of sequences):
    per sequence the pieces, sorted by start, tile [0, L) with no gap and no overlap; every piece's
    rank is a member of its ring group; no rank above capacity."""
    rows = [(p.seq, p.start, p.stop) for rank, pieces in enumerate(plan.pieces) for p in pieces]
    members = {}
    for rank, pieces in enumerate(plan.pieces):
        for p in pieces:
            if rank not in members.setdefault(p.group, frozenset(p.group)):
                raise AssertionError(f"rank {rank} holds a piece of sequence {p.seq} outside its group")
    seq, start, stop = (np.array(c, np.int64) for c in zip(*rows))
    order = np.lexsort((start, seq))
    seq, start, stop = seq[order], start[order], stop[order]
    assert (stop > start).all()
    first = np.r_[True, seq[1:] != seq[:-1]]
    last = np.r_[seq[1:] != seq[:-1], True]
    assert np.array_equal(seq[first], np.arange(len(plan.lengths))), "a sequence has no piece"
    assert (start[first] == 0).all()
    assert (start[~first] == stop[np.flatnonzero(~first) - 1]).all(), "gap or overlap inside a sequence"
    assert np.array_equal(stop[last], np.asarray(plan.lengths, np.int64))
    assert plan.tokens_per_rank().max() <= plan.capacity


# (ranks, batches): 10,000 batches in all; fewer at the large rank counts, whose batches hold thousands
# of sequences (16K tokens per rank: ~6,400 sequences a batch at 512 ranks) and take ~0.1-0.2 s each
SCALE_BATCHES = ((4, 3300), (8, 3000), (16, 2000), (32, 1000), (64, 500), (128, 150), (256, 40), (512, 10))


def test_zeppelin_at_scale_10000_batches():
    """10,000 long-tailed batches on 4 to 512 ranks (8 per node; 16K tokens per rank per step, capacity
    1.25x): every token assigned exactly once; zeppelin's attention work max/mean <= 1.05; after the
    remap solver, tokens max/mean <= 1.02 (and, on every 100th batch, the linear layout is a permutation
    of the step's tokens); `tokens` (equal tokens, sequences whole) leaves attention far less balanced.
    Hiding lengths 256 (intra) and 1024 (inter) tokens. With ~2K tokens per rank instead of 16K the
    hiding lengths bind (a 16K-32K sequence may not be cut below 1K tokens a rank, so its ring's ranks
    carry more than the mean: by design, exposed communication would cost more): the 16K budget is the
    regime the 1.05 target is stated for; the benchmark reports the tight regime too."""
    assert sum(n for _, n in SCALE_BATCHES) == 10_000
    rng = np.random.default_rng(1)
    worst = {"zeppelin": 0.0, "remapped": 0.0, "tokens": 0.0}
    per_rank = 16384
    checked_perm = 0
    for world, n_batches in SCALE_BATCHES:
        for b in range(n_batches):
            lengths = sample_batch(rng, world * per_rank)
            kw = dict(capacity=int(1.25 * per_rank), gpus_per_node=8, tau_intra=256, tau_inter=1024)
            plan = plan_step(lengths, world, "zeppelin", **kw)
            check_exactly_once_fast(plan)
            work = plan.attention_work()
            worst["zeppelin"] = max(worst["zeppelin"], work.max() / work.mean())
            counts = plan.tokens_per_rank()
            after = counts.copy()
            for (src, dst), n in transfers(counts.tolist(), 8).items():
                after[src] -= n
                after[dst] += n
            assert after.sum() == sum(lengths) and after.max() - after.min() <= 1
            worst["remapped"] = max(worst["remapped"], after.max() / after.mean())
            if b % 100 == 0 and world <= 64:
                lin = linear_layout(token_ids(plan), 8)
                assert np.array_equal(np.sort(np.concatenate(lin)), np.arange(sum(lengths)))
                assert [len(x) for x in lin] == after.tolist()
                checked_perm += 1
            if b % 50 == 0:  # the baseline on a sample
                tok = plan_step(lengths, world, "tokens", **kw)
                work = tok.attention_work()
                worst["tokens"] = max(worst["tokens"], work.max() / work.mean())
    print("worst max/mean over 10,000 batches:", worst)
    assert checked_perm >= 90
    assert worst["zeppelin"] <= 1.05, worst
    assert worst["remapped"] <= 1.02, worst
    assert worst["tokens"] > 1.5, worst


def test_zeppelin_weighs_rings_by_their_real_cost():
    """ring_cost: a member's real load from a ring (slower small blocks, exposed transfers). Rings
    that cost their members more than they save are not chosen: with a ring overhead that makes
    every ring worse than its whole sequence, zeppelin keeps every sequence whole that fits a rank;
    with the ideal division (the default) it rings the long ones. shared_cores: ranks that share
    processors pay for every ring's extra work, so zeppelin keeps the plan's total work at the
    whole-sequence total when rings cannot lower the step below total / cores."""
    rng = np.random.default_rng(4)
    lengths = long_tailed(rng, 4 * 6144, longest=6144)
    kw = dict(capacity=2 * 6144, gpus_per_node=4, tau_intra=64, tau_inter=64)
    ideal = plan_step(lengths, 4, "zeppelin", **kw)
    assert any(len(g) > 1 for g, _ in ideal.groups.values())
    costly = plan_step(lengths, 4, "zeppelin", ring_cost=lambda L, g, level: 1.5 * L * L, **kw)
    assert all(len(g) == 1 for g, _ in costly.groups.values())
    check_exactly_once(costly)
    # ring_cost equal to the default division gives the default plan
    same = plan_step(lengths, 4, "zeppelin", ring_cost=lambda L, g, level: float(L) * L / g, **kw)
    assert same.groups == ideal.groups
    # shared cores, a ring 30% dearer than its share: the total work stays the whole sequences'
    dear = dict(kw, ring_cost=lambda L, g, level: 1.3 * L * L / g)
    total = sum(float(L) * L for L in lengths)
    shared = plan_step(lengths, 4, "zeppelin", shared_cores=2, **dear)
    placed = sum(1.3 * L * L if len(g) > 1 else float(L) * L
                 for L, (g, _) in zip(lengths, (shared.groups[i] for i in range(len(lengths)))))
    own = plan_step(lengths, 4, "zeppelin", shared_cores=0, **dear)
    placed_own = sum(1.3 * L * L if len(g) > 1 else float(L) * L
                     for L, (g, _) in zip(lengths, (own.groups[i] for i in range(len(lengths)))))
    assert placed <= placed_own and placed_own > total
    # its step bound max(busiest rank, total / 2 cores) is no worse than the one-device-per-rank plan's
    def bound(plan):
        load = np.zeros(4)
        for L, (g, _) in zip(lengths, (plan.groups[i] for i in range(len(lengths)))):
            for r in g:
                load[r] += float(L) * L if len(g) == 1 else 1.3 * L * L / len(g)
        return max(load.max(), load.sum() / 2)
    assert bound(shared) <= bound(own) * (1 + 1e-9)


def test_remap_moves_inside_nodes_first():
    moves = transfers([10, 2, 6, 6], gpus_per_node=2)  # node 0: 10 + 2 -> 6 + 6 inside the node
    assert moves == {(0, 1): 4}
    moves = transfers([10, 10, 2, 2], gpus_per_node=2)  # nothing to even out inside: across nodes
    assert sum(moves.values()) == 8 and all(s < 2 <= d for s, d in moves)


def test_route_reorders_exactly():
    src = [np.array([0, 5, 3]), np.array([1, 2]), np.array([4, 6, 7, 8])]
    dst = [np.array([8, 0, 1]), np.array([3, 4, 5]), np.array([2, 6, 7])]
    values = {r: np.array(x) * 10 for r, x in enumerate(src)}  # a token's value = 10 x its id
    routes = [plan_route(src, dst, r) for r in range(3)]
    sent = {r: values[r][routes[r].send_index.numpy()] for r in range(3)}
    # simulate all_to_all: rank d receives from each s its chunk d
    for d in range(3):
        chunks = []
        for s in range(3):
            start = sum(routes[s].send_counts[:d])
            chunks.append(sent[s][start:start + routes[s].send_counts[d]])
            assert routes[d].recv_counts[s] == routes[s].send_counts[d]
        got = np.concatenate(chunks)[routes[d].recv_index.numpy()]
        assert np.array_equal(got, dst[d] * 10)


def test_errors_are_one_line():
    with pytest.raises(PlanError, match=r"^balance plan: sequence 1 of 900 tokens is longer than the whole balancing "
                                        r"group holds \(4 ranks x 200 tokens\)$"):
        plan_step([10, 900], 4, capacity=200)
    with pytest.raises(PlanError, match="^parallel.balance: unknown strategy 'even'"):
        plan_step([10], 4, "even", capacity=200)
    with pytest.raises(PlanError, match="^cluster.gpus_per_node: 3 GPUs per node do not divide the 4 ranks"):
        plan_step([10], 4, capacity=200, gpus_per_node=3)


def test_planning_time():
    """1,024 sequences on 512 ranks in under 10 ms (benchmarks/balance.py records the median and the
    runs: `planning` in balance.json). The planner is single-threaded pure Python: other tenants of
    this shared 2-core machine only add time, so its own cost is the fastest of 7 runs (5-6 ms here,
    idle or beside a test run). The 10 ms are this machine's; each run is paired with a fixed
    pure-Python workload (python_speed_ms) whose time against its reference here scales the budget on
    a slower or busier machine (a CI machine ran both 2-3x slower; never below 10 ms)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "balance_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "balance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    timing = bench.planning_time(repeats=7)
    assert timing["sequences"] == 1024 and timing["ranks"] == 512 and len(timing["runs_ms"]) == 7
    assert bench.REFERENCE_PYTHON_SPEED_MS > 0 and timing["budget_ms"] >= 10
    assert 0 < min(timing["runs_ms"]) < timing["budget_ms"], (timing["runs_ms"], timing["python_speed_ms"])


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_schedule_lets_rings_of_other_members_run_together():
    """schedule_slots: the global slot order. Members pay cost / g: 5 for rings (0, 1) and (2, 3),
    0.5 for (0, 2). In the fixed order (by ranks) rank 0 chains (0, 1) then (0, 2), and (2, 3) waits for
    (0, 2): step 5 + 0.5 + 5 = 10.5. The list schedule starts (0, 1) and (2, 3) together (both free at 0)
    and (0, 2) when both its members are free at 5; rank 1's local sequence (1) comes last: step 6.
    Written out with the makespan of a global order."""
    from longtrain.parallel.balance.planner import schedule_slots, slot_key

    lengths = [10, 1, 10, 1]
    groups = {0: ((0, 1), "intra"), 1: ((0, 2), "intra"), 2: ((2, 3), "intra"), 3: ((1,), "local")}
    cost = lambda L: float(L)  # noqa: E731  (a ring's members each pay cost / g: 5, 0.5, 5)

    def makespan(order):
        clock = [0.0] * 4
        for group in order:
            seconds = sum(cost(lengths[s]) / len(g) for s, (g, _) in groups.items() if g == group)
            start = max(clock[r] for r in group)
            for r in group:
                clock[r] = start + seconds
        return max(clock)

    fixed = sorted({g: lv for g, lv in groups.values()}.items(), key=slot_key)
    assert [g for g, _ in fixed] == [(0, 1), (0, 2), (2, 3), (1,)]
    assert makespan([g for g, _ in fixed]) == 10.5  # 5 + 0.5 + 5
    order = schedule_slots(groups, lengths, 4, cost)
    scheduled = sorted(order, key=order.get)
    assert scheduled == [(0, 1), (2, 3), (0, 2), (1,)]
    assert makespan(scheduled) == 6.0
    # ring_cost (what a member really pays) is what the schedule weighs when given: (0, 2) is now the
    # longest of the rings free at 0, and starts first
    order = schedule_slots(groups, lengths, 4, cost, ring_cost=lambda L, g, level: 100.0 if L == 1 else L / g)
    assert sorted(order, key=order.get) == [(0, 2), (0, 1), (2, 3), (1,)]


def test_schedule_is_a_total_order_with_locals_last():
    rng = np.random.default_rng(11)
    for _ in range(50):
        world = int(rng.choice([4, 8, 16]))
        lengths = long_tailed(rng, world * 3000, longest=12000)
        plan = plan_step(lengths, world, "zeppelin", capacity=6000 + len(lengths), gpus_per_node=4, tau_intra=64)
        groups = {g for g, _ in plan.groups.values()}
        assert set(plan.order) == groups and sorted(plan.order.values()) == list(range(len(groups)))
        places = [plan.order[g] for g in sorted(groups, key=plan.order.get)]
        assert all(len(g) == 1 for g in sorted(groups, key=plan.order.get)[len(places) - sum(len(g) == 1 for g in groups):])
        for rank in plan.pieces:  # each rank's pieces: slot by slot, by sequence inside a slot, chunks in order
            assert rank == sorted(rank, key=lambda p: (plan.order[p.group], p.seq, p.start))


def test_layout_refuses_pieces_out_of_the_slot_order():
    """An order set behind the pieces' back would shift every rank's attention offsets (wrong
    attention, silently): the layout refuses it; Plan.set_order keeps them together."""
    from longtrain.parallel.balance.engine import StepLayout

    plan = plan_step([32, 1192, 977, 46, 59], 4, "zeppelin", capacity=900, tau_intra=16)
    reversed_order = {g: i for i, g in enumerate(sorted(plan.order, key=lambda g: -plan.order[g]))}
    StepLayout.build(plan, 0, True)
    plan.order = reversed_order
    with pytest.raises(ValueError, match="slot order"):
        StepLayout.build(plan, 0, True)
    plan.set_order(reversed_order)
    assert [s.ranks for s in StepLayout.build(plan, 0, True).slots] == sorted(
        {p.group for p in plan.pieces[0]}, key=reversed_order.get)


def test_zeppelin_rings_inside_a_node_are_aligned_blocks():
    """A ring inside a node is an aligned block (g a power of two, ranks [k g, (k + 1) g) of the node)
    whenever one has room: rings are then nested or disjoint. Checked over sampled long-tailed steps on
    16 and 64 ranks in nodes of 8, with the plan still covering every token once."""
    rng = np.random.default_rng(21)
    rings = 0
    for _ in range(40):
        world = int(rng.choice([16, 64]))
        lengths = long_tailed(rng, world * 4000, longest=32768)
        plan = plan_step(lengths, world, "zeppelin", capacity=12000 + len(lengths), gpus_per_node=8, tau_intra=256,
                         tau_inter=4096)
        check_exactly_once(plan)
        for group, level in plan.groups.values():
            if level != "intra":
                continue
            g, first = len(group), group[0]
            rings += 1
            assert g & (g - 1) == 0 and first % g == 0 and group == tuple(range(first, first + g)), group
    assert rings > 20


def test_zeppelin_rings_any_size_where_ranks_share_cores():
    """One 2048-token sequence at cp4 with room for 768 tokens a rank needs a ring of at least 3. On
    dedicated devices zeppelin takes the aligned block of 4; where the 4 ranks share 2 cores, the
    ring of 3 (ranks 0-2, an aligned block of its size): the rank it leaves out gives its core to the
    members. The simulator, on a copy of the shipped local preset (this 2-core CPU), prices the ring of
    3 below the ring of 4. Over sampled steps, rings of 3 take the place of rings of 4 where cores are
    shared, and every ring is an aligned block of its size."""
    from longtrain.launcher.balanced_batches import CAPACITY_FACTOR
    from longtrain.models.sizes import SIZES
    from longtrain.parallel.balance.cost import CostModel, ModelShape, resolve_cluster
    from longtrain.parallel.balance.simulator import simulate

    # the cost model as the trainer plans with it, on a copy of the shipped local preset (4 ranks on 2
    # cores; a copy, as `longtrain probe` rewrites configs/clusters/local.yaml for the machine it runs on)
    preset = Path(__file__).parent / "presets" / "cpu_2core.yaml"
    cm = CostModel(ModelShape.of(SIZES["debug"]), resolve_cluster(str(preset), 4, world=4))
    planner = cm.planner_kwargs()
    assert 0 < planner["shared_cores"] < 4
    shared = plan_step([2048], 4, "zeppelin", capacity=768, gpus_per_node=4, **planner)
    assert shared.groups[0][0] == (0, 1, 2)
    check_exactly_once(shared)
    dedicated = plan_step([2048], 4, "zeppelin", capacity=768, gpus_per_node=4, **dict(planner, shared_cores=0))
    assert dedicated.groups[0][0] == (0, 1, 2, 3)
    assert simulate(shared, cm, False).step_seconds < simulate(dedicated, cm, False).step_seconds / 1.05
    # many steps at cp4 on 2 cores: every ring an aligned block of its size; rings of 3 where
    # dedicated devices take the block of 4
    rng = np.random.default_rng(8)
    three_for_four = 0
    for _ in range(40):
        lengths = [int(x) for x in rng.integers(256, 8192, size=int(rng.integers(1, 5)))]
        capacity = max(math.ceil(CAPACITY_FACTOR * sum(lengths) / 4), max(lengths) // 4 + 2) + len(lengths)
        plans = [plan_step(lengths, 4, "zeppelin", capacity=capacity, gpus_per_node=4, **dict(planner, shared_cores=cores))
                 for cores in (planner["shared_cores"], 0)]
        for plan in plans:
            check_exactly_once(plan)
            for group, _ in plan.groups.values():
                g, first = len(group), group[0]
                assert g == 1 or (first % g == 0 and group == tuple(range(first, first + g))), group
        three_for_four += sum(len(plans[0].groups[i][0]) == 3 and len(plans[1].groups[i][0]) == 4
                              for i in range(len(lengths)))
    assert three_for_four >= 5, three_for_four
