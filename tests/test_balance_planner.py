"""Balance planner and remap solver, pure functions (no processes): every token assigned exactly once
under every strategy, determinism, zeppelin's attention balance and remapped token balance on
long-tailed batches against the baselines, the one-line errors, and the planning time."""
import time

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


def test_zeppelin_balances_attention_and_remap_balances_tokens():
    """Long-tailed batches on 4 to 512 ranks: zeppelin's attention work max/mean <= 1.05 and, after
    remapping, tokens max/mean <= 1.02; `tokens` (equal tokens) leaves attention far less balanced.
    Hiding lengths 256 (intra) and 1024 (inter) tokens: with a longer tau_inter a 16K-32K sequence
    whose cost alone exceeds a node's fair share may not leave its node (8 x tau_inter > its length),
    and that node's ranks carry more than the mean (by design: exposed inter-node traffic would cost more)."""
    rng = np.random.default_rng(1)
    worst = {"zeppelin": 0.0, "tokens": 0.0, "remapped": 0.0}
    for world in (4, 8, 16, 64, 512):
        for _ in range(40 if world < 512 else 3):
            cap = 16384
            lengths = long_tailed(rng, world * cap)
            for strategy in ("zeppelin", "tokens"):
                plan = plan_step(lengths, world, strategy, capacity=int(1.5 * cap), gpus_per_node=8,
                                 tau_intra=256, tau_inter=1024)
                check_exactly_once(plan)
                work = plan.attention_work()
                worst[strategy] = max(worst[strategy], work.max() / work.mean())
                if strategy == "zeppelin":
                    lin = linear_layout(token_ids(plan), 8)
                    counts = np.array([len(x) for x in lin])
                    worst["remapped"] = max(worst["remapped"], counts.max() / counts.mean())
                    assert np.array_equal(np.sort(np.concatenate(lin)), np.arange(sum(lengths)))
    assert worst["zeppelin"] <= 1.05, worst
    assert worst["remapped"] <= 1.02, worst
    assert worst["tokens"] > 1.5, worst


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
    """1,024 sequences on 512 ranks. The target is 10 ms; this shared 2-core machine is slower and
    busier than a training host, so the test allows 100 ms (the measured time is in the benchmark)."""
    rng = np.random.default_rng(2)
    lengths = [int(min(32768, rng.lognormal(6.0, 1.2) + 1)) for _ in range(1024)]
    cap = 2 * -(-sum(lengths) // 512)
    plan_step(lengths, 512, capacity=cap, gpus_per_node=8, tau_intra=256, tau_inter=2048)
    best = min(_timed(lambda: plan_step(lengths, 512, capacity=cap, gpus_per_node=8, tau_intra=256,
                                        tau_inter=2048)) for _ in range(3))
    assert best < 0.1, best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
