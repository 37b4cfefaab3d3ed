"""Simulated step time of a balance plan, from the cost model (cost.py), event by event.

One layer is simulated (forward then backward) and multiplied by the model's layers. Each rank keeps
a clock:

1. linear work before attention (QKV projections: a third of the layer's linear FLOPs forward) on the
   tokens the rank holds outside attention (the linear layout with remapping, else the attention layout);
2. with remapping, the all_to_all into the attention layout: a collective, so every clock moves to the
   slowest rank's arrival plus its fixed cost (cluster.collective_us) plus the largest per-rank
   transfer (bytes at the intra- or inter-node bandwidth of the peers it sends to);
3. core attention, slot by slot in the engine's order (the plan's schedule): a
   local slot advances its rank's clock by its compute; a ring of g members starts when its last
   member arrives and runs g steps, each as long as the slowest member's compute for that step or
   the K/V block's transfer, whichever is longer (the next block is in flight while one computes);
   a member's compute includes, beyond its blocks' kernels and calls, the ring's own work outside
   them per ring step (cost.ring_work_seconds: the merges, accumulators and received copies);
4. the remap back and the linear work after attention (output projection and MLP) as in 1-2.

Backward repeats the same with 2x the linear and 2.5x the attention compute, and K/V plus their
gradients travelling round each ring (2x the bytes). Gradient reduction is the same for every
strategy and is left out. With `routing`, the inter-node hop of a whole-node ring uses all its
members' NICs (see `simulate`).

Ranks that share processors (`shared_cores`: a CPU-only machine running P ranks on C < P cores, as
the tests and benchmarks here do) are not slowed uniformly by P/C: a rank that waits leaves its core
to the others, so an unbalanced plan's straggler runs alone at full speed at the end. Each rank's
compute is then run under processor sharing (n ranks still computing progress at min(1, C/n) each;
`shared_makespan`), and the time on the critical path that is not compute (transfers, waiting for a
ring's members) is added; the step is at least the critical path at one core per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from longtrain.parallel.balance.cost import CostModel
from longtrain.parallel.balance.planner import Plan, shared_makespan
from longtrain.parallel.balance.remap import linear_layout, token_ids


@dataclass
class StepSimulation:
    strategy: str
    step_seconds: float
    busy: np.ndarray  # per rank: compute seconds
    idle: np.ndarray  # per rank: step_seconds - busy
    bytes_sent: np.ndarray  # per rank: ring + remap bytes of the step (all layers)
    events: list = field(default_factory=list)  # (rank, start, stop, kind) of one layer, forward
    remapped: bool = False  # tokens balanced outside core attention (the remapping layer)


def _kernel_calls(pieces_by_rank: dict) -> dict:
    """Per member of a slot: the attention kernel calls of one layer's forward, one per pair of (my
    query piece, a member's key piece) of the same document with a key at or before a query (the
    blocks the kernel cuts a packed block into, kernels/attention.py), over every ring step."""
    if len(pieces_by_rank) == 1:
        ((rank, pieces),) = pieces_by_rank.items()
        return {rank: len(pieces)}
    by_seq: dict = {}
    for pieces in pieces_by_rank.values():
        for p in pieces:
            by_seq.setdefault(p.seq, []).append(p.start)
    return {r: sum(sum(1 for k_start in by_seq[p.seq] if k_start < p.stop) for p in pieces)
            for r, pieces in pieces_by_rank.items()}


def simulate(plan: Plan, cm: CostModel, remap: bool = True, compute_scale: float = 1.0,
             routing: bool = False, shared_cores: int | None = None) -> StepSimulation:
    """`compute_scale`: compute seconds are multiplied by it. `shared_cores`: the ranks share this
    many processors (0: one each; None: the cluster's; see the module docstring). `routing`: a ring's inter-node hop is split over the k members of its node (routing.py), pipelined:
    max(M / (k B_nic), M / (k B_intra)) plus three latencies, instead of M / B_nic."""
    P, m, c = plan.world, cm.model, cm.cluster
    shared_cores = c.shared_cores if shared_cores is None else shared_cores
    G = plan.gpus_per_node
    attention = token_ids(plan)
    linear = linear_layout(attention, G) if remap else attention
    lin_tokens = np.array([len(x) for x in linear], dtype=float)
    per_token_linear = cm.linear_seconds(1.0) / m.n_layers / 3.0 * compute_scale  # forward, one layer, one token
    bytes_per_token = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim * c.bytes_per_element
    out_bytes_per_token = m.n_heads * m.head_dim * c.bytes_per_element

    # remap transfer per rank (forward into attention layout, and back), seconds and bytes
    remap_in = np.zeros(P)
    remap_out = np.zeros(P)
    remap_bytes = np.zeros(P)
    if remap:
        owner = np.empty(sum(len(x) for x in attention), np.int64)
        for r, ids in enumerate(attention):
            owner[ids] = r
        for r, ids in enumerate(linear):
            dest = owner[ids]
            for d in np.unique(dest):
                if d == r:
                    continue
                n = int((dest == d).sum())
                level = "intra" if d // G == r // G else "inter"
                remap_in[r] += n * bytes_per_token / c.bandwidth(level)
                remap_out[d] += n * out_bytes_per_token / c.bandwidth(level)
                remap_bytes[r] += n * bytes_per_token
                remap_bytes[d] += n * out_bytes_per_token

    # slots in engine order, with each member's forward attention seconds per ring step
    slots: dict = {}
    for r, pieces in enumerate(plan.pieces):
        for p in pieces:
            slot = slots.setdefault(p.group, {"level": p.level, "work": {}, "tokens": {}, "pieces": {}})
            seconds = cm.piece_forward_seconds(p, plan.lengths[p.seq]) * compute_scale
            slot["work"][r] = slot["work"].get(r, 0.0) + seconds
            slot["tokens"][r] = slot["tokens"].get(r, 0) + (p.stop - p.start)
            slot["pieces"].setdefault(r, []).append(p)
    # each kernel call on one document's block pays attention_call_us beyond its FLOPs (fwd + bwd:
    # the forward pass a 1/3.5 share, as the attention FLOPs)
    call_s = c.attention_call_us * 1e-6 / 3.5 * compute_scale
    for group, slot in slots.items():
        for r, n_calls in _kernel_calls(slot["pieces"]).items():
            slot["work"][r] += n_calls * call_s
        if len(group) > 1:  # the ring's work outside the kernels (cost.ring_work_seconds), forward share
            for r, tokens in slot["tokens"].items():
                slot["work"][r] += cm.ring_work_seconds(tokens, len(group)) / m.n_layers / 3.5 * compute_scale
    order = sorted(slots, key=lambda g: plan.slot_key((g, slots[g]["level"])))
    ring_bytes = np.zeros(P)
    events = []

    def attention_pass(clock, compute_factor, byte_factor, busy, record):
        for group in order:
            slot = slots[group]
            if len(group) == 1:
                r = group[0]
                t = slot["work"].get(r, 0.0) * compute_factor
                if record:
                    events.append((r, clock[r], clock[r] + t, "local"))
                clock[r] += t
                busy[r] += t
                continue
            g = len(group)
            start = max(clock[r] for r in group)
            block = max(slot["tokens"].values())
            nbytes = 2.0 * block * m.n_kv_heads * m.head_dim * c.bytes_per_element * byte_factor
            transfer = nbytes / c.bandwidth(slot["level"]) + c.latency_us * 1e-6
            nodes = [r // G for r in group]
            k = nodes.count(nodes[0])
            if routing and len(set(nodes)) > 1 and all(nodes.count(n) == k for n in set(nodes)) and k > 1:
                transfer = max(nbytes / (k * c.bandwidth("inter")), nbytes / (k * c.bandwidth("intra"))) \
                    + 3 * c.latency_us * 1e-6
            step_compute = max(slot["work"].get(r, 0.0) for r in group) * compute_factor / g
            duration = step_compute + (g - 1) * max(step_compute, transfer)
            for r in group:
                busy[r] += slot["work"].get(r, 0.0) * compute_factor
                ring_bytes[r] += nbytes * (g - 1)
                if record:
                    events.append((r, start, start + duration, slot["level"]))
                clock[r] = start + duration

    busy = np.zeros(P)
    clock = np.zeros(P)
    collective = c.collective_us * 1e-6  # the fixed cost of one remap exchange (an all_to_all)
    def spans(kind, starts, stops):  # the forward's linear work and remap exchanges, for the timeline
        events.extend((r, float(a), float(b), kind) for r, (a, b) in enumerate(zip(starts, stops)) if b > a)

    for phase, (lin_factor, att_factor, byte_factor) in enumerate(((1.0, 1.0, 1.0), (2.0, 2.5, 2.0))):
        record = phase == 0
        pre = lin_tokens * per_token_linear * lin_factor / 3.0
        post = lin_tokens * per_token_linear * lin_factor * 2.0 / 3.0
        if record:
            spans("linear", clock, clock + pre)
        clock += pre
        busy += pre
        if remap:
            before = clock.copy()
            clock[:] = clock.max() + (remap_in if phase == 0 else remap_out).max() + collective
            if record:
                spans("remap", before, clock)
        attention_pass(clock, att_factor, byte_factor, busy, record=record)
        if remap:
            before = clock.copy()
            clock[:] = clock.max() + (remap_out if phase == 0 else remap_in).max() + collective
            if record:
                spans("remap", before, clock)
        if record:
            spans("linear", clock, clock + post)
        clock += post
        busy += post
    layer = float(clock.max())
    if 0 < shared_cores < P:
        # the ranks' compute under processor sharing, plus what the critical path spends not computing
        layer = max(layer, shared_makespan(busy, shared_cores) + layer - float(busy.max()))
    step = layer * m.n_layers
    busy_step = busy * m.n_layers
    return StepSimulation(plan.strategy, step, busy_step, step - busy_step,
                          (ring_bytes + 2 * remap_bytes) * m.n_layers, events, remap)


# ----------------------------------------------------------------------------------------------
# Length mixes and the `longtrain plan balance` report
# ----------------------------------------------------------------------------------------------
# Named synthetic length mixes (the paper's distributions are not public; these are stand-ins):
# log-normal bodies (mu, sigma of ln tokens) with an optional uniform tail, capped at `cap` tokens.
MIXES = {
    "long-tailed": dict(mu=6.0, sigma=1.2, tail=0.02, tail_lo=16384, tail_hi=32768, cap=32768),
    "arxiv": dict(mu=9.0, sigma=0.8, tail=0.0, tail_lo=0, tail_hi=0, cap=65536),
    "github": dict(mu=7.0, sigma=1.8, tail=0.0, tail_lo=0, tail_hi=0, cap=65536),
    "prolong64k": dict(mu=7.5, sigma=1.5, tail=0.3, tail_lo=32768, tail_hi=65536, cap=65536),
}


def sample_lengths(rng, budget: int, mix: dict, scale: float = 1.0) -> list[int]:
    """Sequences of a mix (lengths x scale) until `budget` tokens."""
    out = []
    while True:
        if mix["tail"] and rng.random() < mix["tail"]:
            length = rng.integers(mix["tail_lo"], mix["tail_hi"] + 1)
        else:
            length = min(mix["cap"], rng.lognormal(mix["mu"], mix["sigma"]) + 1)
        length = max(1, int(length * scale))
        if sum(out) + length > budget:
            return out or [budget]
        out.append(length)


def compare_strategies(lengths: list[int], bins: list[int], world: int, cp: int, cm: CostModel, capacity: int,
                       strategies=("even_cp", "tokens", "hybrid_dp", "zeppelin"), remap: Optional[bool] = None,
                       routing: bool = False) -> dict:
    """{strategy: StepSimulation} for one step, as training runs it: zeppelin remapped per `remap`
    (`parallel.balance_remap`: None = where the cost model says it pays; remap.remaps), the others
    never; `routing`: the routing layer on (cost.routing_enabled)."""
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.remap import remaps

    out = {}
    for strategy in strategies:
        plan = plan_step(lengths, world, strategy, capacity=capacity + len(lengths), cp=cp, bins=bins,
                         gpus_per_node=cm.cluster.gpus_per_node, **cm.planner_kwargs())
        remapped = strategy == "zeppelin" and remaps(remap, plan, cm)
        out[strategy] = simulate(plan, cm, remap=remapped, routing=routing)
    return out


def timeline_png(sims: dict, path) -> None:
    """One row per rank, one panel per strategy, on one time axis: one layer's forward (linear work,
    remap exchanges, attention by level; a gap is a rank waiting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"linear": "0.75", "remap": "tab:orange", "local": "tab:green", "intra": "tab:blue", "inter": "tab:red"}
    labels = {"linear": "linear", "remap": "remap", "local": "local attention", "intra": "intra-node ring",
              "inter": "inter-node ring"}
    fig, axes = plt.subplots(len(sims), 1, figsize=(10, 1.4 + 0.9 * len(sims)), squeeze=False, sharex=True)
    ranks = max((len(sim.busy) for sim in sims.values()), default=1)
    for ax, (name, sim) in zip(axes[:, 0], sims.items()):
        for rank, start, stop, kind in sim.events:
            ax.barh(rank, stop - start, left=start, color=colors[kind], height=0.8)
        ax.set_title(f"{name}: step {sim.step_seconds:.3g} s", fontsize=9)
        ax.set_ylabel("rank")
        ax.set_ylim(-0.6, ranks - 0.4)
        ax.set_yticks(range(0, ranks, max(1, ranks // 8)))
    axes[0, 0].set_xlim(left=0)
    shown = {kind for sim in sims.values() for *_, kind in sim.events}
    fig.legend(handles=[Patch(color=colors[k], label=labels[k]) for k in colors if k in shown],
               loc="lower center", ncol=5, fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("seconds (one layer's forward; the step is all layers, forward and backward)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
