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
  ping-pong of each message size; bandwidth from the largest, latency from the smallest.

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


def link_times(sizes=MESSAGE_BYTES, repeats: int = 3) -> dict:
    """Run on every rank of an initialized group of the ranks that will train: {"p2p": ping_pong's
    times between ranks 0 and 1, "collective_s": exchange_seconds() over all}."""
    return {"p2p": ping_pong(sizes, repeats), "collective_s": exchange_seconds()}


def p2p_bandwidth(times: dict) -> tuple[float, float]:
    """(GB/s one way, latency in microseconds) from ping_pong's one-way times."""
    small, large = min(times), max(times)
    latency = times[small]
    bandwidth = (large - small) / max(times[large] - latency, 1e-9)
    return bandwidth / 1e9, latency * 1e6


def probe(p2p_times: dict | None, out=LOCAL_PRESET, lengths=DEFAULT_LENGTHS, gpus_per_node: int = 0,
          device: str = "cpu", heads: int = 8, head_dim: int = 64, dim: int = 512,
          collective_s: float | None = None, model=None, links: ClusterSpec | None = None) -> ClusterSpec:
    """Measure attention and linear FLOP/s here (fp32 on CPU, bf16 on CUDA: what training runs); with
    `p2p_times` (ping_pong on two local ranks, run by the launcher) and `collective_s`
    (exchange_seconds among the local ranks; None: the preset default) write the preset. `heads`,
    `head_dim`, `dim`: the attention and matmul shapes measured (a kernel's speed depends on them: probe
    at the model's own to simulate it); `model`: a model config whose non-attention work gives the
    linear rate (model_linear_tflops) instead of a matmul's, and whose heads and head dim are the
    attention shapes. `links`: a preset whose node shape, links, latency and collective cost the
    written preset takes instead of measured ones (one GPU cannot measure a link: its kernels are
    probed and the cluster's links come from the preset)."""
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
                   attention_full_tflops=tuple(full_table))
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
