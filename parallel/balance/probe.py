"""`longtrain probe`: measure this machine for the balance cost model and write a cluster preset.

- attention FLOP/s by length: the attention kernel (kernels/attention.py, the backend training uses)
  forward + backward on one causal sequence of each length, FLOPs counted as 3.5 x 4 x (1/2) x L^2 x
  heads x head_dim (cost.py's convention), best of `repeats`; and on one full (unmasked) block of each
  length (3.5 x 4 x L^2 x heads x head_dim): a ring member's queries against earlier chunks' keys,
  which run faster per FLOP than a causal block of the same length (on this machine's CPU 1.1-2x);
- the fixed cost of one attention call (forward + backward of a 16-token block: what every
  document's piece of a packed block pays beyond its FLOPs);
- linear FLOP/s: a (tokens x dim) @ (dim x 4 dim) matmul forward + backward (3 x 2 x M x K x N FLOPs);
  with a model config (`longtrain probe --model NAME`, or the balance benchmark's model), instead the
  model itself on `tokens` tokens, forward + loss + backward with core attention left out (every
  projection, norm, RoPE, activation, the head and the loss), its linear FLOPs counted as cost.py counts
  them (`model_linear_flops`): the rate at which this machine runs everything but core attention of that
  model (on a small model far below a matmul's: elementwise work weighs as much as the matmuls);
- point-to-point bandwidth and latency between two local ranks (gloo on CPU, nccl on CUDA): a
  ping-pong of each message size; bandwidth from the largest, latency from the smallest;
- on CPU, a ring's own work outside the attention kernels (ring_extra_seconds, fit_ring_costs): one
  ring over the local ranks through the balance engine at two block sizes, each member's processor
  time less its kernels' and less its block alone, as a fixed cost per ring step plus a cost per token
  (cluster.ring_step_us, ring_token_us).

On CPU the compute probes run on one thread: ranks started together share the machine's cores
(launcher/supervisor.py gives each cores / ranks threads, one when there are more ranks than cores), so
a rank's speed is the one-thread speed, and the preset records the cores they share (`shared_cores`,
which the simulator and the planner use: simulator.py).

The preset it writes puts every rank of this machine in one node and gives its "NICs" the measured
local bandwidth, so simulated multi-node runs on CPU (cluster.gpus_per_node smaller than the world)
price inter-node ring steps as what they are here: the same local transport.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from longtrain.parallel.balance.cost import LOCAL_PRESET, ClusterSpec, write_preset_file

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
MESSAGE_BYTES = (4 << 10, 1 << 20, 8 << 20)
CPU_RANKS_PER_NODE = 1024


def lengths_up_to(longest: int) -> tuple:
    """Probe lengths from DEFAULT_LENGTHS[0], doubling, until one reaches `longest` (the cost model clamps
    at a table's last length: a probe that stops short prices every longer sequence at that rate)."""
    lengths = [DEFAULT_LENGTHS[0]]
    while lengths[-1] < longest:
        lengths.append(2 * lengths[-1])
    return tuple(lengths)


# A measurement repeats at least `repeats` times and for at least this long (at most MAX_REPEATS times):
# on a shared VM a hiccup of ~0.1 s slows three back-to-back repeats of a millisecond call alike (best
# of 3: a per-call cost of 86-188 us and a linear rate of 36-50 GFLOP/s over six probes a minute apart).
MIN_MEASURE_S = 0.25
MAX_REPEATS = 64


def _best(fn, repeats: int) -> float:
    """Fastest of the timed runs of fn() after one warm-up: `repeats` runs, more while they have taken
    less than MIN_MEASURE_S together (up to MAX_REPEATS)."""
    fn()  # warm up
    times: list[float] = []
    while len(times) < repeats or (sum(times) < MIN_MEASURE_S and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _attention_pass(length: int, heads: int, head_dim: int, device, dtype, backend: str = "auto",
                    causal: bool = True):
    """fn() running one attention call of `length` tokens (causal, or a full block) forward and
    backward (the kernel training uses, kernels/attention.py) without synchronizing."""
    from longtrain.kernels.attention import BlockMask, attention

    q, k, v = (torch.randn(1, length, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def run():
        attention(q, k, v, scale=head_dim ** -0.5, mask=BlockMask(causal=causal), backend=backend).sum().backward()

    return run


def _synchronize(device) -> None:
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def attention_tflops(lengths=DEFAULT_LENGTHS, heads: int = 8, head_dim: int = 64, device="cpu",
                     dtype=torch.float32, repeats: int = 2, backend: str = "auto",
                     causal: bool = True) -> list[tuple[int, float]]:
    """(length, achieved TFLOP/s) of one causal call (or full block) of each length, fwd + bwd."""
    table = []
    for length in lengths:
        one_pass = _attention_pass(length, heads, head_dim, device, dtype, backend, causal)

        def run():
            one_pass()
            _synchronize(device)

        seconds = _best(run, repeats)
        flops = 3.5 * 4 * (0.5 if causal else 1.0) * length * length * heads * head_dim
        table.append((int(length), flops / seconds / 1e12))
    return table


def attention_call_seconds(length: int = 16, heads: int = 8, head_dim: int = 64, device="cpu",
                           dtype=torch.float32, calls: int = 50) -> float:
    """Seconds of one tiny attention call, forward + backward (best of 3 runs of `calls` calls):
    the per-piece cost that packed blocks of many short documents pay."""
    one_pass = _attention_pass(length, heads, head_dim, device, dtype)

    def run():
        for _ in range(calls):
            one_pass()
        _synchronize(device)

    return _best(run, 3) / calls


def linear_tflops(tokens: int = 2048, dim: int = 512, device="cpu", dtype=torch.float32, repeats: int = 2) -> float:
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(dim, 4 * dim, device=device, dtype=dtype, requires_grad=True)

    def run():
        (x @ w).sum().backward()
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()

    return 3 * 2 * tokens * dim * 4 * dim / _best(run, repeats) / 1e12


def model_linear_tflops(cfg, tokens: int = 2048, device="cpu", repeats: int = 2, max_layers: int = 2,
                        dtype=torch.float32) -> float:
    """Achieved "linear" TFLOP/s of a model as it trains, without core attention: forward, cross
    entropy and backward of `tokens` tokens (one sequence) through the model built from `cfg` (at most
    `max_layers` layers: a layer's cost repeats; the head and loss are in), every attention module's
    core attention replaced by a pass-through of its queries; FLOPs as cost.model_linear_flops counts."""
    import dataclasses

    import torch.nn.functional as F

    from longtrain.models.registry import build_model
    from longtrain.parallel.balance.cost import ModelShape, model_linear_flops

    cfg = dataclasses.replace(cfg, n_layers=min(cfg.n_layers, max_layers), max_seq_len=max(cfg.max_seq_len, tokens))
    model = build_model(cfg).to(device=device, dtype=dtype)
    replaced = 0
    for module in model.modules():
        if hasattr(module, "core_attention"):
            module.core_attention = lambda q, k, v, scale, **_: q
            replaced += 1
    if not replaced:
        raise ValueError(f"probe: model {type(model).__name__} has no core attention to leave out")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens + 1), generator=gen).to(device)
    positions = torch.arange(tokens, device=device)[None]

    def run():
        logits = model(ids[:, :-1], positions)
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        _synchronize(device)

    return 3 * model_linear_flops(tokens, ModelShape.of(cfg)) / _best(run, repeats) / 1e12


def ping_pong(sizes=MESSAGE_BYTES, repeats: int = 3) -> dict:
    """Run on every rank of an initialized group: {message bytes: best one-way seconds} between
    ranks 0 and 1 (the others wait at the barriers)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for size in sizes:
        buf = torch.zeros(size // 4, dtype=torch.float32, device=device)
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            times.append((time.perf_counter() - start) / 2)  # one way
        out[size] = min(times[1:])
    return out


def exchange_seconds(calls: int = 30, repeats: int = 5) -> float:
    """Run on every rank of an initialized group: the fixed cost of one all_to_all_single among all
    of them (one float per peer; best of `repeats` means over `calls`), seconds. With more ranks than
    cores (a CPU-only machine) it is mostly the time for every rank to be scheduled, far above a
    ping-pong's latency: it is what the remap's exchanges pay (cluster.collective_us)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    device = torch.device("cuda", dist.get_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    send, recv = torch.zeros(world, device=device), torch.zeros(world, device=device)
    best = float("inf")
    for rep in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            dist.all_to_all_single(recv, send)
        _synchronize(device)
        if rep:  # the first is a warm-up
            best = min(best, (time.perf_counter() - start) / calls)
    return best


# Tokens a ring member holds in the ring probe's two runs: its work outside the kernels is a fixed part
# per ring step and a part per token (measured here with 4 heads of 16 on 4 ranks: ~1-3 ms a step and
# ~1-2 us a token, forward + backward); two block sizes separate them, and the probe takes seconds.
RING_MEMBER_TOKENS = (512, 2048)


def _outside_kernel_seconds(fn) -> float:
    """Processor seconds of fn() (this process, every thread: gloo's included) less the attention
    kernels' (kernels/attention.py's KernelClock)."""
    from longtrain.kernels.attention import kernel_clock

    with kernel_clock() as clock:
        start = time.process_time()
        fn()
        return time.process_time() - start - clock.seconds


def _ring_extra_seconds(member_tokens: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> float:
    """This rank's processor seconds outside the kernels in a ring over one sequence of member_tokens x
    ranks tokens (forward + backward, the balance engine as training runs it), less the same for its
    own block alone (LocalBlocksAttention: what its first ring step would cost without the ring); best
    of `repeats` after a warm-up."""
    import torch.distributed as dist

    from longtrain.parallel.balance.engine import BalancedAttention, StepLayout
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.context.ring import LocalBlocksAttention, TokenInfo

    rank, ring_size = dist.get_rank(), dist.get_world_size()
    length = member_tokens * ring_size
    plan = plan_step([length], ring_size, "even_cp", capacity=length + 1, cp=ring_size, bins=[0])
    layout = StepLayout.build(plan, rank, remap=False)
    engine = BalancedAttention(dist.group.WORLD, list(range(ring_size)))
    engine.set_step(layout)
    (slot,) = layout.slots
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, slot.padded, heads, head_dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, slot.padded, kv_heads, head_dim, generator=gen, requires_grad=True) for _ in range(2))
    info = TokenInfo(pos=slot.pos, doc=slot.doc)
    scale = head_dim ** -0.5

    def ring():
        engine(q, k, v, scale).sum().backward()

    def alone():
        LocalBlocksAttention.apply(q, k, v, info, info, scale, True, "auto").sum().backward()

    ring_s, alone_s = float("inf"), float("inf")
    for rep in range(repeats + 1):
        dist.barrier()
        ring_outside = _outside_kernel_seconds(ring)
        alone_outside = _outside_kernel_seconds(alone)
        if rep:  # the first is a warm-up
            ring_s, alone_s = min(ring_s, ring_outside), min(alone_s, alone_outside)
    return ring_s - alone_s


def ring_extra_seconds(heads: int, kv_heads: int, head_dim: int, member_tokens=RING_MEMBER_TOKENS,
                       repeats: int = 3) -> dict:
    """Run on every rank of an initialized gloo group: what a ring member spends outside the attention
    kernels, forward + backward, beyond what its tokens cost outside the kernels alone, at each block
    size of `member_tokens` (tokens a member holds; one ring over all ranks): {"ring_size": ranks,
    "extra_s": ((member tokens, processor seconds, the ranks' mean), ...)}. It is the merges of partial
    outputs and log-sum-exps, the dK/dV accumulators that travel, the copies and bookkeeping of
    received blocks, gloo's threads and the kernel calls a ring's blocks add, and the system time of
    gloo's transfers (loopback TCP between local ranks: 40-90% of the extra on the 2-core CPU box);
    fit_ring_costs turns it into the cost model's per-step and per-token terms."""
    import torch.distributed as dist

    ring_size = dist.get_world_size()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extra = torch.tensor([_ring_extra_seconds(tokens, heads, kv_heads, head_dim, repeats)
                              for tokens in member_tokens], dtype=torch.float64)
    finally:
        torch.set_num_threads(threads)
    dist.all_reduce(extra)
    return {"ring_size": ring_size,
            "extra_s": tuple((int(tokens), float(x) / ring_size) for tokens, x in zip(member_tokens, extra))}


def fit_ring_costs(ring_extra: dict, call_s: float) -> tuple[float, float]:
    """(seconds per ring step, seconds per token per ring step) of a ring member's work that the cost
    model does not already charge (cluster.ring_step_us, ring_token_us), from ring_extra_seconds'
    measurement: at each block size the member's extra less the kernel calls the model charges a ring
    member beyond a whole sequence's one (2 x ring size calls of `call_s`: cost.ring_member_seconds,
    the simulator's _kernel_calls), over its ring size - 1 ring steps, fitted as fixed + per-token x
    tokens through the first and last points. Neither is negative: where the line would make one
    negative, everything goes on the other, through the points' mean (none where that is negative)."""
    ring_size = ring_extra["ring_size"]
    points = [(tokens, (extra - 2 * ring_size * call_s) / (ring_size - 1)) for tokens, extra in ring_extra["extra_s"]]
    (short, short_s), (long_, long_s) = points[0], points[-1]
    per_token = (long_s - short_s) / (long_ - short) if long_ > short else 0.0
    fixed = short_s - per_token * short
    mean_tokens = sum(t for t, _ in points) / len(points)
    mean_s = sum(x for _, x in points) / len(points)
    if per_token < 0:
        return max(0.0, mean_s), 0.0
    if fixed < 0:
        return 0.0, max(0.0, mean_s / mean_tokens)
    return fixed, per_token


def link_times(sizes=MESSAGE_BYTES, repeats: int = 3, attention_shape: tuple | None = None) -> dict:
    """Run on every rank of an initialized group of the ranks that will train: {"p2p": ping_pong's
    times between ranks 0 and 1, "collective_s": exchange_seconds() over all}; with `attention_shape`
    (heads, kv heads, head dim) on gloo also "ring_extra": ring_extra_seconds over all."""
    import torch.distributed as dist

    out = {"p2p": ping_pong(sizes, repeats), "collective_s": exchange_seconds()}
    if attention_shape is not None and dist.get_backend() == "gloo":
        out["ring_extra"] = ring_extra_seconds(*attention_shape)
    return out


def p2p_bandwidth(times: dict) -> tuple[float, float]:
    """(GB/s one way, latency in microseconds) from ping_pong's one-way times."""
    small, large = min(times), max(times)
    latency = times[small]
    bandwidth = (large - small) / max(times[large] - latency, 1e-9)
    return bandwidth / 1e9, latency * 1e6


def probe(p2p_times: dict | None, out=LOCAL_PRESET, lengths=DEFAULT_LENGTHS, gpus_per_node: int = 0,
          device: str = "cpu", heads: int = 8, head_dim: int = 64, dim: int = 512,
          collective_s: float | None = None, model=None, links: ClusterSpec | None = None,
          ring_extra: dict | None = None, model_name: str = "") -> ClusterSpec:
    """Measure attention and linear FLOP/s here (fp32 on CPU, bf16 on CUDA: what training runs); with
    `p2p_times` (ping_pong on two local ranks, run by the launcher) and `collective_s`
    (exchange_seconds among the local ranks; None: the preset default) write the preset. `heads`,
    `head_dim`, `dim`: the attention and matmul shapes measured (a kernel's speed depends on them: probe
    at the model's own to simulate it); `model`: a model config whose non-attention work gives the
    linear rate (model_linear_tflops) instead of a matmul's, and whose heads and head dim are the
    attention shapes. `links`: a preset whose node shape, links, latency and collective cost the
    written preset takes instead of measured ones (one GPU cannot measure a link: its kernels are
    probed and the cluster's links come from the preset). `ring_extra`: ring_extra_seconds among the
    local ranks (link_times' "ring_extra"), fitted with this probe's per-call cost into the ring's work
    outside the kernels (fit_ring_costs; None: none, the GPU presets' assumption). The preset records
    the shapes measured (probed_heads, probed_head_dim, probed_linear: "model `model_name`" or "matmul
    `dim`"), so a run of another model is told (cost.probe_shape_note)."""
    if (p2p_times is None) == (links is None):
        raise ValueError("probe: pass either p2p_times (measured links) or links (a preset's)")
    if model is not None:
        heads, head_dim, dim = model.n_heads, model.head_dim, model.dim
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    # On CPU every local process is a rank of this one "node", however many are started.
    gpus = gpus_per_node or (torch.cuda.device_count() if device == "cuda" else CPU_RANKS_PER_NODE)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        table = attention_tflops(lengths, heads=heads, head_dim=head_dim, device=device, dtype=dtype, repeats=3)
        full_table = attention_tflops(lengths, heads=heads, head_dim=head_dim, device=device, dtype=dtype, repeats=3,
                                      causal=False)
        call_us = attention_call_seconds(heads=heads, head_dim=head_dim, device=device, dtype=dtype) * 1e6
        lin = (linear_tflops(dim=dim, device=device, dtype=dtype, repeats=3) if model is None
               else model_linear_tflops(model, device=device, dtype=dtype, repeats=3))
    finally:
        torch.set_num_threads(threads)
    kernels = dict(attention_tflops=tuple(table), linear_tflops=lin, bytes_per_element=dtype.itemsize,
                   shared_cores=(os.cpu_count() or 1) if device == "cpu" else 0, attention_call_us=call_us,
                   attention_full_tflops=tuple(full_table), probed_heads=heads, probed_head_dim=head_dim,
                   probed_linear=f"matmul {dim}" if model is None else f"model {model_name}".rstrip())
    if ring_extra is not None:
        step_s, token_s = fit_ring_costs(ring_extra, call_us * 1e-6)
        kernels.update(ring_step_us=step_s * 1e6, ring_token_us=token_s * 1e6)
    if links is not None:
        spec = replace(links, name=f"{links.name} links, kernels probed on {os.uname().nodename} ({device})",
                       **({"gpus_per_node": gpus_per_node} if gpus_per_node else {}), **kernels)
    else:
        gbs, latency = p2p_bandwidth(p2p_times)
        spec = ClusterSpec(name=f"local (probed on {os.uname().nodename}, {device})", gpus_per_node=max(1, gpus),
                           nics_per_node=max(1, gpus), nic_gbps=gbs * 8.0, intra_gbs=gbs, latency_us=latency,
                           **kernels, **({} if collective_s is None else {"collective_us": collective_s * 1e6}))
    write_preset_file(spec, out)
    return spec
