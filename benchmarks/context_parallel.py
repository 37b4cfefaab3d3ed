"""Context-parallel attention on CPU: time, per-rank peak memory, bytes sent and exactness of every
cp mode against single-device attention, with DeepSpeed's Ulysses side by side.

    python benchmarks/context_parallel.py [--max-len 65536] [--min-len 4096] [--lengths 4096,8192]
                                          [--modes ring,zigzag,zigzag-kv8,ulysses,hybrid,allgather,deepspeed]
                                          [--cps 2,4] [--repeats 3] [--long-repeats 1] [--long-from 32768]
                                          [--heads 4] [--kv-heads 2] [--head-dim 32] [--out DIR]
    python benchmarks/context_parallel.py --from-json benchmarks/results/context_parallel.json  # re-render

What runs (defaults): causal attention, fp32, batch 1, 4 query heads, 2 kv heads (GQA), head_dim 32,
scale 1/sqrt(head_dim), sequence lengths 4K, 8K, 16K, 32K and 64K tokens (about 45 minutes on 2
cores; one single-device 64K forward+backward alone takes ~75 s; `--max-len 32768` stops at 32K in
about half the time). Plus a training-step memory view at 32K (`--model-len`), cp 1 and the largest
cp: a 4-layer model whose attention layers run each mode, per-rank peak memory against cp 1.
cp=1 is plain single-device `longtrain.kernels.attention.attention`; cp=2 and cp=4 run every mode of
`longtrain.parallel.context.strategy` (hybrid: `--hybrid-ulysses` Ulysses ranks x a zigzag ring; at
cp=2 with 2 Ulysses ranks it is Ulysses with the zigzag token layout) and `deepspeed` =
`deepspeed.sequence.layer.DistributedAttention` (its default [s, b, h, d] layout, scatter_idx=2,
gather_idx=0) around the same local attention function.

Gloo process groups per cp (longtrain.tests.distributed: one for the check passes, one for the
timed passes), 1 intra-op thread per rank. The machine has 2 cores: cp=2 uses both, cp=4 runs 4
ranks on 2 cores (oversubscribed 2x), so its wall time cannot beat cp=2; the per-rank CPU seconds
(`process_time`, all threads of the rank) show the compute share each rank would have on its own
core.

For every (cp, mode, length):

- untimed *check passes*, in their own process group: one for the RSS peak (below) and the bytes
  each rank sends (torch.distributed's collectives are wrapped while it runs; forward and backward
  counted apart), one under torch.profiler for the allocator peak and the output and dq/dk/dv
  against the cp=1 result on the same global input (max abs difference over all ranks). Apart,
  because the profiler's own event records would count in the RSS (more ops, more records: it
  inflated the ring modes' RSS most);
- timed passes in a fresh group: forward+backward wall time = the slowest rank's, after a barrier;
  `--repeats` passes (`--long-repeats` from `--long-from` tokens on), interleaved over the modes in
  ABBA order so machine drift is shared; the median is reported (min and CPU seconds in the JSON).
  The cores may be shared with other work: the report says how much CPU other processes used.

Memory on CPU (there are no allocator statistics): the check group runs with glibc's mmap
threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor is its own mapping and leaves
the resident set when freed; before each pass free heap is trimmed (malloc_trim) and the kernel's
RSS high-water mark reset (/proc/self/clear_refs, value 5). Per-rank peak = this rank's input shards
(q, k, v, dout) + VmHWM after the forward+backward - VmRSS before it. Cross-check: torch.profiler
with profile_memory (PyTorch's CPU allocator on the calling thread; it misses gloo's worker-thread
buffers), the peak of the running sum of allocations and frees over the same pass.

Writes context_parallel.json, context_parallel.md and PNG plots to --out (default
benchmarks/results/) and prints the markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import (CommCounter, MachineLoad, RssPeak, all_ranks, install_comm_counter, klen,  # noqa: E402
                     length_axis, machine_info, mib, nbytes, profiler_peak_bytes, record_timed_pass, save_figure)

CP_MODES = ("ring", "zigzag", "ulysses", "hybrid", "allgather")
# A ring mode may carry "-kvN": its K/V goes round the ring in N pieces (parallel.cp_kv_chunks).
DEFAULT_MODES = ("ring", "zigzag", "zigzag-kv8", "ulysses", "hybrid", "allgather", "deepspeed")
ALL_MODES = CP_MODES + ("deepspeed",)


def mode_parts(name: str) -> tuple[str, int]:
    """("zigzag", 4) for "zigzag-kv4"; (name, 1) without a -kv suffix."""
    base, sep, chunks = name.partition("-kv")
    if sep and chunks.isdigit() and int(chunks) >= 1:
        return base, int(chunks)
    return name, 1
MEMORY_TARGET = 0.35  # issue: at 32K, cp 4 per-rank peak memory <= 0.35x cp 1
MEMORY_TARGET_LEN, MEMORY_TARGET_CP = 32768, 4
DEEPSPEED_TARGET = 1.0  # issue: longtrain's Ulysses time <= 1.0x DeepSpeed's


# ----------------------------------------------------------------------------------------------
# Memory: the profiler's view (tensor bytes on the calling thread); the RSS view is measure.RssPeak
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_stderr_fd():
    """Kineto prints a line to fd 2 at every profiler start and stop ("USDT: ... profiler_start"),
    with no setting to turn it off; it would tear the progress bar. Errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------------------------
# The attention under test, per mode, on this rank's shard (B, S_local, H, D)
# ----------------------------------------------------------------------------------------------
class Runner:
    """A callable on local (q, k, v) shards, the global token indices of this rank's shard, and
    what the report says about its layout."""

    def __init__(self, name: str, fn, index_fn, layout: str):
        self.name, self.fn, self.index_fn, self.layout = name, fn, index_fn, layout


def make_runners(cfg: dict, cp: int) -> tuple[list[Runner], dict]:
    """Every rank builds the same runners in the same order (process groups are created here)."""
    import torch
    import torch.distributed as dist

    from longtrain.kernels.attention import BlockMask, attention
    from longtrain.parallel.context.layout import CPShape, dense_index

    scale, backend = cfg["scale"], cfg["backend"]
    causal = BlockMask(causal=True)
    info = {}

    def local_attention(q, k, v):
        return attention(q, k, v, scale=scale, mask=causal, backend=backend)

    if cp == 1:
        return [Runner("single", local_attention, lambda s: torch.arange(s), "single device")], info

    from longtrain.parallel.context.strategy import build_strategy
    from longtrain.parallel.mesh import Mesh, ParallelDims

    rank = dist.get_rank()
    mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=cp, tp=1), "cpu")
    runners = []
    for mode in cfg["modes"]:
        if mode == "deepspeed":
            continue
        base, kv_chunks = mode_parts(mode)
        strategy = build_strategy(mesh, base, heads=cfg["heads"], kv_heads=cfg["kv_heads"],
                                  ulysses_degree=cfg["hybrid_ulysses"] if base == "hybrid" else 0,
                                  backend=backend, causal=True, kv_chunks=kv_chunks)
        shape = strategy.shape

        def fn(q, k, v, _s=strategy):  # unpacked rows: the causal order comes from the layout
            return _s(q, k, v, scale)

        pieces = f", K/V in {kv_chunks} pieces" if kv_chunks > 1 else ""
        runners.append(Runner(mode, fn, lambda s, _shape=shape: dense_index(s, _shape)[rank],
                              f"ring {shape.ring} x ulysses {shape.ulysses}, {shape.balance}{pieces}"))
    if "deepspeed" in cfg["modes"]:
        ds, info = make_deepspeed(cfg, cp, local_attention)
        if ds is not None:
            contiguous = CPShape(ring=1, ulysses=cp, balance="contiguous")
            # Right after longtrain's Ulysses: in the ABBA order the two then always run back to back.
            at = next((i + 1 for i, r in enumerate(runners) if r.name == "ulysses"), len(runners))
            runners.insert(at, Runner("deepspeed", ds, lambda s: dense_index(s, contiguous)[rank],
                                      f"ulysses {cp}, contiguous (DeepSpeed DistributedAttention)"))
    return runners, info


def make_deepspeed(cfg: dict, cp: int, local_attention):
    """DeepSpeed's DistributedAttention on the gloo group that is already initialized, around the
    same local attention function. Returns (callable or None, info)."""
    import logging

    import torch.distributed as dist

    info = {"installed": importlib.util.find_spec("deepspeed") is not None}
    if not info["installed"]:
        info["error"] = "deepspeed not installed (pip install deepspeed, or the `bench` extra)"
        return None, info
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import deepspeed
            import deepspeed.comm as ds_dist
            import deepspeed.comm.torch as ds_torch
            from deepspeed.sequence.layer import DistributedAttention

            # TorchBackend JIT-compiles a shared-memory all-reduce kernel on CPU (~85 s with a C++
            # compiler on first use); DistributedAttention only calls all_to_all_single, which
            # TorchBackend hands to torch.distributed, so that kernel is not built.
            ds_torch.build_shm_op = lambda: None
            ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    except Exception as err:  # noqa: BLE001 - report why, keep the rest of the benchmark
        info["error"] = f"{type(err).__name__}: {err}"
        return None, info
    info["version"] = deepspeed.__version__
    info["accelerator"] = os.environ.get("DS_ACCELERATOR")

    def seq_first_attention(q, k, v):  # DeepSpeed hands [s, b, h/p, d]; the kernel takes (b, s, h, d)
        return local_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    layer = DistributedAttention(seq_first_attention, dist.group.WORLD, scatter_idx=2, gather_idx=0)
    kv_rep = cp // math.gcd(cp, cfg["kv_heads"]) if cfg["kv_heads"] % cp else 1
    info["kv_heads_replicated_to"] = cfg["kv_heads"] * kv_rep
    info["note"] = ("DistributedAttention asserts kv heads >= sequence-parallel size; with fewer kv heads "
                    "they are replicated (repeat_interleave) before the call, inside the timing, as "
                    "longtrain's Ulysses does internally") if kv_rep > 1 else ""

    def fn(q, k, v):
        if kv_rep > 1:
            k, v = k.repeat_interleave(kv_rep, dim=2), v.repeat_interleave(kv_rep, dim=2)
        # (B, S_local, H, D) -> DeepSpeed's [s, b, h, d]; batch_dim_idx=1
        out = layer(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 1)
        return out.transpose(0, 1)

    return fn, info


# ----------------------------------------------------------------------------------------------
# The worker: one process group per cp, every length and mode inside it
# ----------------------------------------------------------------------------------------------
def global_inputs(cfg: dict, seq_len: int):
    """The same global q, k, v, dout on every rank (seeded per length)."""
    import torch

    gen = torch.Generator().manual_seed(1000 + seq_len)
    b, h, hkv, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    return [torch.randn(b, seq_len, n, d, generator=gen) for n in (h, hkv, hkv, h)]


def run_weight(seq_len: int, cp: int) -> float:
    """Progress-bar weight of one forward+backward: cost ~ S^2, halved when 2 cores share it."""
    return (seq_len / 4096) ** 2 * (1.0 if cp == 1 else 0.5)


def cp_worker(cfg: dict, cp: int, role: str, ref_dir: str, events) -> dict:
    """role "check": one untimed pass per (length, mode) for memory, bytes and exactness (this
    group runs with a fixed glibc mmap threshold, see `main`); role "time": the timed passes."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    warnings.filterwarnings("ignore")
    rank = dist.get_rank()
    counter = CommCounter()
    install_comm_counter(counter)
    runners, ds_info = make_runners(cfg, cp)
    rss = RssPeak(timed_after_stop=False)  # the check group keeps its 64 KiB mmap threshold throughout

    def progress(weight, label):
        if rank == 0:
            events.put((weight, label))

    def barrier():
        if cp > 1:
            dist.barrier()

    def shard(t, index):
        return t[:, index].contiguous()

    def fwd_bwd(runner, q, k, v, dout):
        counter.phase = "fwd"
        t0 = time.perf_counter()
        out = runner.fn(q, k, v)
        t1 = time.perf_counter()
        counter.phase = "bwd"
        grads = torch.autograd.grad(out, (q, k, v), dout)
        t2 = time.perf_counter()
        return out, grads, t1 - t0, t2 - t0

    # Warm every runner on a tiny input (under the profiler in the check group): one-time costs
    # (kernel self-checks, gloo connections of new groups, DeepSpeed's first call, the profiler's
    # own start-up) stay out of the measurements.
    for runner in runners:
        s = 64 * cp
        g = global_inputs(cfg, s)
        idx = runner.index_fn(s)
        q, k, v = (shard(t, idx).requires_grad_() for t in g[:3])
        if role == "check":
            with quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True):
                fwd_bwd(runner, q, k, v, shard(g[3], idx))
        else:
            fwd_bwd(runner, q, k, v, shard(g[3], idx))
        barrier()

    results = {}
    for seq_len in cfg["lengths"]:
        g = global_inputs(cfg, seq_len)
        local = {}
        for runner in runners:
            idx = runner.index_fn(seq_len)
            assert idx.numel() * cp == seq_len, "lengths must divide by 2 x cp (no padding in this benchmark)"
            q, k, v = (shard(t, idx).requires_grad_() for t in g[:3])
            local[runner.name] = (idx, q, k, v, shard(g[3], idx))
            results[(runner.name, seq_len)] = {"layout": runner.layout, "wall_s": [], "fwd_s": [], "cpu_s": []}
        del g
        if role == "check":
            ref = None
            if cp > 1:
                ref = torch.load(os.path.join(ref_dir, f"ref_{seq_len}.pt"), weights_only=True)
            for runner in runners:
                idx, q, k, v, dout = local[runner.name]
                barrier()
                counter.reset()
                rss.start()
                counter.active = True
                out, grads, _, _ = fwd_bwd(runner, q, k, v, dout)
                rss_peak = rss.stop()  # without the profiler: its event records would count in the RSS
                counter.active = False
                del out, grads
                barrier()
                with quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    out, grads, _, _ = fwd_bwd(runner, q, k, v, dout)
                prof_peak = profiler_peak_bytes(prof)
                del prof
                got = {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
                if cp == 1:
                    torch.save({key: t.contiguous() for key, t in got.items()},
                               os.path.join(ref_dir, f"ref_{seq_len}.pt"))
                    errors = {key: 0.0 for key in got}
                else:
                    errors = {}
                    for key, t in got.items():
                        err = torch.tensor(float((t - ref[key][:, idx]).abs().max()), dtype=torch.float64)
                        dist.all_reduce(err, op=dist.ReduceOp.MAX)
                        errors[key] = float(err)
                del out, grads, got
                per_rank = {"profiler_peak_bytes": prof_peak, "rss_peak_increase_bytes": rss_peak,
                            "input_bytes": sum(nbytes(t) for t in (q, k, v, dout)), "comm": counter.totals()}
                gathered = all_ranks(per_rank, cp)
                results[(runner.name, seq_len)].update(per_rank=gathered, errors=errors)
                progress(2 * run_weight(seq_len, cp), f"cp{cp} {runner.name} {klen(seq_len)} check")
            del ref
        else:  # timed passes, interleaved over the modes (ABBA)
            repeats = cfg["long_repeats"] if seq_len >= cfg["long_from"] else cfg["repeats"]
            for r in range(repeats):
                for runner in (runners if r % 2 == 0 else runners[::-1]):
                    idx, q, k, v, dout = local[runner.name]
                    gc.collect()
                    barrier()
                    c0 = time.process_time()
                    out, grads, fwd_s, wall_s = fwd_bwd(runner, q, k, v, dout)
                    cpu_s = time.process_time() - c0
                    del out, grads
                    record_timed_pass(results[(runner.name, seq_len)], cp, fwd_s, wall_s, cpu_s)
                    progress(run_weight(seq_len, cp), f"cp{cp} {runner.name} {klen(seq_len)} #{r + 1}")
        del local
    model = {}
    if role == "check" and cfg["model_len"] and cp in (1, max(cfg["cps"])):  # cp 1 and the largest cp
        model = model_step_checks(cfg, cp, runners, rss, ref_dir, barrier, progress)
    return {"results": {f"{name}@{s}": v for (name, s), v in results.items()}, "deepspeed": ds_info,
            "model": model}


def model_config(cfg: dict):
    from longtrain.models.transformer import TransformerConfig

    return TransformerConfig(vocab_size=cfg["model_vocab"], dim=cfg["heads"] * cfg["head_dim"],
                             n_layers=cfg["model_layers"], n_heads=cfg["heads"], n_kv_heads=cfg["kv_heads"],
                             ffn_dim=cfg["model_ffn"], max_seq_len=cfg["model_len"])


def model_step_checks(cfg: dict, cp: int, runners: list, rss, ref_dir: str, barrier, progress) -> dict:
    """Per-rank peak memory of one training step's forward+backward of a small Llama-style model
    (models.transformer.Transformer, fed hidden states; cross-entropy summed over the tokens, as
    the trainer does) whose attention layers run each mode: what a rank holds in training (every
    layer's saved activations, the MLPs and the logits, plus one attention's transient buffers)
    rather than one attention call alone. Exactness: the summed loss, the input gradient and the
    summed parameter gradients against cp 1."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from longtrain.models.transformer import Transformer

    seq_len, b = cfg["model_len"], cfg["batch"]
    model = Transformer(model_config(cfg))
    model.init_weights(seed=0)
    model.tok_embeddings = None  # fed hidden states, so the input gradient can be compared too
    attentions = [layer.attention for layer in model.layers.values()]
    gen = torch.Generator().manual_seed(7 + seq_len)
    x_global = torch.randn(b, seq_len, model.cfg.dim, generator=gen)
    labels_global = torch.randint(0, cfg["model_vocab"], (b, seq_len), generator=gen)
    ref = None
    if cp > 1:
        ref = torch.load(os.path.join(ref_dir, f"model_ref_{seq_len}.pt"), weights_only=True)
    out = {}
    for runner in runners:
        def core(q, k, v, scale, positions=None, doc_ids=None, _fn=runner.fn):
            assert abs(scale - cfg["scale"]) < 1e-12 and doc_ids is None
            return _fn(q, k, v)

        for attention in attentions:
            attention.core_attention = core
        idx = runner.index_fn(seq_len)
        x = x_global[:, idx].contiguous().requires_grad_()
        labels = labels_global[:, idx].contiguous()
        positions = idx[None].expand(b, -1)
        model.zero_grad(set_to_none=True)
        barrier()
        rss.start()
        logits = model(x, positions)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        loss.backward()
        peak = rss.stop()
        del logits
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        loss = loss.detach().reshape(1)
        if cp > 1:  # the loss and the weight gradients are sums over the ranks' tokens
            dist.all_reduce(loss)
            dist.all_reduce(grads)
        if cp == 1:
            torch.save({"loss": loss, "grads": grads, "dx": x.grad},
                       os.path.join(ref_dir, f"model_ref_{seq_len}.pt"))
            errors = {"loss_rel": 0.0, "grads_rel": 0.0, "dx_abs": 0.0}
        else:
            dx_err = torch.tensor(float((x.grad - ref["dx"][:, idx]).abs().max()), dtype=torch.float64)
            dist.all_reduce(dx_err, op=dist.ReduceOp.MAX)
            errors = {"loss_rel": float((loss - ref["loss"]).abs() / ref["loss"].abs()),
                      "grads_rel": float((grads - ref["grads"]).abs().max() / ref["grads"].abs().max()),
                      "dx_abs": float(dx_err)}
        per_rank = {"rss_peak_increase_bytes": peak, "memory_method": rss.method,
                    "input_bytes": nbytes(x) + nbytes(labels)}
        gathered = all_ranks(per_rank, cp)
        out[runner.name] = {"per_rank": gathered, "errors": errors}
        del x, grads
        progress(cfg["model_layers"] * run_weight(seq_len, cp), f"cp{cp} {runner.name} model {klen(seq_len)}")
    return out


# ----------------------------------------------------------------------------------------------
# Formulas (techniques.md 6.3) and the report
# ----------------------------------------------------------------------------------------------
def expected_bytes(mode: str, cfg: dict, cp: int, seq_len: int, hybrid_u: int) -> dict:
    """Per-rank bytes sent. `formula_fwd`: techniques.md 6.3 as written, with t = the whole
    sequence's tokens S (the only reading under which its formulas give a per-device volume; with
    t = S/N tokens per device they come out N times too small) and the model's kv heads.
    `derived_fwd` / `derived_total`: the same algebra with what the algorithm must move: kv heads
    replicated up to the Ulysses degree when fewer, and the backward (Ulysses: the same four
    all-to-alls again; ring: K/V again plus the dK/dV accumulators, N hops; all-gather: a
    reduce-scatter of dK/dV)."""
    d, hq, hkv, e = cfg["head_dim"], cfg["heads"], cfg["kv_heads"], 4  # fp32
    n, t = cp, cfg["batch"] * seq_len
    tl = t // n

    def rep(u):
        return hkv if hkv % u == 0 else hkv * (u // math.gcd(u, hkv))

    ulysses_fwd = 2 * (n - 1) / n ** 2 * t * (hq + hkv) * d * e
    ring_fwd = 2 * (n - 1) / n * t * hkv * d * e
    if mode in ("ulysses", "deepspeed"):
        h = rep(n)
        derived = 2 * (n - 1) / n * tl * (hq + h) * d * e
        return {"formula": "Ulysses", "formula_fwd": ulysses_fwd,
                "derived_fwd": derived, "derived_total": 2 * derived}
    if mode in ("ring", "zigzag"):
        x = tl * hkv * d * e
        return {"formula": "Ring-P2P", "formula_fwd": ring_fwd,
                "derived_fwd": 2 * (n - 1) * x, "derived_total": 2 * (n - 1) * x + 2 * (n - 1) * x + 2 * n * x}
    if mode == "allgather":
        x = tl * hkv * d * e
        return {"formula": "Ring-P2P (same K/V volume)", "formula_fwd": ring_fwd,
                "derived_fwd": 2 * (n - 1) * x, "derived_total": 4 * (n - 1) * x}
    if mode == "hybrid":
        u = hybrid_u
        ring = n // u
        h = rep(u)
        a2a = 2 * (u - 1) / u * tl * (hq + h) * d * e
        p2p_fwd = 2 * (ring - 1) * tl * h * d * e
        p2p_bwd = 2 * (ring - 1) * tl * h * d * e + (2 * ring * tl * h * d * e if ring > 1 else 0)
        return {"formula": f"USP u={u} x R={ring} (derived)", "formula_fwd": a2a + p2p_fwd,
                "derived_fwd": a2a + p2p_fwd, "derived_total": 2 * a2a + p2p_fwd + p2p_bwd}
    raise ValueError(mode)


def ulysses_floor_bytes(cfg: dict, cp: int, seq_len: int) -> float:
    """What a rank holds at the moment of Ulysses' kernel backward, whatever the implementation:
    the caller's sequence shards of q, k, v, dout and out, plus the head-sharded q, k, v, out, dout
    and their gradients dq, dk, dv (kv heads replicated up to cp when fewer); fp32."""
    hq, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    rep = hkv if hkv % cp == 0 else hkv * (cp // math.gcd(cp, hkv))
    local = cfg["batch"] * seq_len / cp
    return 4 * local * d * ((3 * hq + 2 * hkv) + (4 * hq + 4 * rep))


def _memory(per_rank: list[dict]) -> dict:
    """Per-rank peak = this rank's input shards + the peak increase over the forward+backward; the
    RSS measurement is the primary one (it sees every thread, gloo's included), the profiler's
    (PyTorch's CPU allocator, calling thread only) the cross-check. Max over ranks."""
    prof = [p["input_bytes"] + p["profiler_peak_bytes"] for p in per_rank]
    rss = None if any(p["rss_peak_increase_bytes"] is None for p in per_rank) else \
        [p["input_bytes"] + p["rss_peak_increase_bytes"] for p in per_rank]
    return {"peak_bytes": max(rss) if rss else max(prof), "method": "rss" if rss else "profiler",
            "rss_peak_bytes_per_rank": rss, "profiler_peak_bytes_per_rank": prof,
            "profiler_peak_bytes": max(prof), "input_bytes": max(p["input_bytes"] for p in per_rank)}


def summarize(cfg: dict, raw: dict) -> dict:
    """Medians, ratios, formulas and targets from the workers' raw numbers."""
    out = {"single": {}, "cp": {}}
    single = raw[1]["results"]
    for seq_len in cfg["lengths"]:
        r = single[f"single@{seq_len}"]
        out["single"][str(seq_len)] = {
            "wall_s": statistics.median(r["wall_s"]), "min_wall_s": min(r["wall_s"]),
            "fwd_s": statistics.median(r["fwd_s"]), "cpu_s": statistics.median(c[0] for c in r["cpu_s"]),
            "repeats_wall_s": r["wall_s"], **_memory(r["per_rank"])}
    for cp in cfg["cps"]:
        per_cp = out["cp"][str(cp)] = {}
        for mode in cfg["modes"]:
            for seq_len in cfg["lengths"]:
                key = f"{mode}@{seq_len}"
                if key not in raw[cp]["results"]:
                    continue
                r = raw[cp]["results"][key]
                base = out["single"][str(seq_len)]
                ranks = r["per_rank"]
                mem = _memory(ranks)
                cpu_max = statistics.median(max(c) for c in r["cpu_s"])
                cpu_sum = statistics.median(sum(c) for c in r["cpu_s"])
                sent = {ph: max(p["comm"][ph] for p in ranks) for ph in ("fwd", "bwd", "total")}
                exp = expected_bytes(mode_parts(mode)[0], cfg, cp, seq_len, min(cfg["hybrid_ulysses"], cp))
                wall = statistics.median(r["wall_s"])
                per_cp.setdefault(mode, {})[str(seq_len)] = {
                    "layout": r["layout"],
                    "wall_s": wall, "min_wall_s": min(r["wall_s"]), "fwd_s": statistics.median(r["fwd_s"]),
                    "repeats_wall_s": r["wall_s"], "speedup_vs_cp1": base["wall_s"] / wall,
                    "max_rank_cpu_s": cpu_max, "sum_rank_cpu_s": cpu_sum,
                    "compute_share_max_rank": cpu_max / base["cpu_s"],
                    "compute_total_vs_cp1": cpu_sum / base["cpu_s"],
                    "cpu_s_per_rank_repeats": r["cpu_s"],
                    **mem,
                    "memory_ratio_vs_cp1": mem["peak_bytes"] / base["peak_bytes"],
                    "profiler_ratio_vs_cp1": mem["profiler_peak_bytes"] / base["profiler_peak_bytes"],
                    "bytes_sent": sent, "bytes_by_op_rank0": ranks[0]["comm"]["by_op"],
                    "bytes_sent_per_rank": [p["comm"]["total"] for p in ranks],
                    "expected": exp,
                    "fwd_over_formula": sent["fwd"] / exp["formula_fwd"],
                    "fwd_over_derived": sent["fwd"] / exp["derived_fwd"],
                    "total_over_derived": sent["total"] / exp["derived_total"],
                    "total_over_2x_formula": sent["total"] / (2 * exp["formula_fwd"]),
                    "max_abs_diff_vs_cp1": r["errors"],
                    "exact": max(r["errors"].values()) <= cfg["tolerance"],
                }
    targets = {}
    mem_len, mem_cp = str(MEMORY_TARGET_LEN), str(MEMORY_TARGET_CP)
    target = f"per-rank peak memory <= {MEMORY_TARGET}x cp 1 at 32K, cp 4"
    if mem_len in out["single"] and mem_cp in out["cp"]:
        per_mode = {m: v[mem_len]["memory_ratio_vs_cp1"] for m, v in out["cp"][mem_cp].items() if mem_len in v}
        targets["memory_32k_cp4"] = {
            "target": target, "ratio_per_mode": per_mode,
            "profiler_ratio_per_mode": {m: v[mem_len]["profiler_ratio_vs_cp1"] for m, v in out["cp"][mem_cp].items()
                                        if mem_len in v},
            "passed_per_mode": {m: v <= MEMORY_TARGET for m, v in per_mode.items()}}
        floor = ulysses_floor_bytes(cfg, MEMORY_TARGET_CP, MEMORY_TARGET_LEN)
        targets["memory_32k_cp4"].update(ulysses_floor_bytes=floor,
                                         ulysses_floor_ratio=floor / out["single"][mem_len]["peak_bytes"])
    else:
        targets["memory_32k_cp4"] = {"target": target, "skipped": "32K or cp 4 not in this run"}
    out["model"] = summarize_model(cfg, raw)
    if out["model"] and mem_cp in out["model"]["cp"] and cfg["model_len"] == MEMORY_TARGET_LEN:
        per_mode = {m: v["memory_ratio_vs_cp1"] for m, v in out["model"]["cp"][mem_cp].items()}
        targets["memory_32k_cp4_training_step"] = {
            "target": target + f" (training step of a {cfg['model_layers']}-layer model)",
            "ratio_per_mode": per_mode, "passed_per_mode": {m: v <= MEMORY_TARGET for m, v in per_mode.items()}}
    else:
        targets["memory_32k_cp4_training_step"] = {"target": target, "skipped": "model view not at 32K or no cp 4"}
    points = {}
    for cp in cfg["cps"]:
        modes = out["cp"][str(cp)]
        if "ulysses" in modes and "deepspeed" in modes:
            for x in cfg["lengths"]:
                u, d = modes["ulysses"].get(str(x)), modes["deepspeed"].get(str(x))
                if u and d:
                    # Repeat i of both ran back to back (ABBA order), under the same machine load.
                    paired = [a / b for a, b in zip(u["repeats_wall_s"], d["repeats_wall_s"])]
                    points[f"cp{cp}@{x}"] = {"median_wall": u["wall_s"] / d["wall_s"],
                                             "paired_wall": statistics.median(paired),
                                             "min_wall": u["min_wall_s"] / d["min_wall_s"],
                                             "cpu_sum": u["sum_rank_cpu_s"] / d["sum_rank_cpu_s"]}
    if points:
        def geo(key):
            return math.exp(sum(math.log(v[key]) for v in points.values()) / len(points))

        targets["ulysses_vs_deepspeed"] = {
            "target": f"longtrain Ulysses wall time <= {DEEPSPEED_TARGET}x DeepSpeed DistributedAttention's "
                      "(median over repeats of the ratio of back-to-back runs)",
            "ratio_per_point": points, "geomean_paired_wall": geo("paired_wall"),
            "geomean_median_wall": geo("median_wall"), "geomean_min_wall": geo("min_wall"),
            "geomean_cpu_sum": geo("cpu_sum"),
            "passed_per_point": {k: v["paired_wall"] <= DEEPSPEED_TARGET for k, v in points.items()},
            "passed_geomean": geo("paired_wall") <= DEEPSPEED_TARGET}
    else:
        targets["ulysses_vs_deepspeed"] = {"skipped": "deepspeed or ulysses not run"}
    out["targets"] = targets
    out["all_exact"] = all(v["exact"] for modes in out["cp"].values() for m in modes.values() for v in m.values()) \
        and all(v["exact"] for modes in out["model"].get("cp", {}).values() for v in modes.values())
    return out


def summarize_model(cfg: dict, raw: dict) -> dict:
    """The training-step view: per-rank peak (inputs + RSS increase, max over ranks), ratio vs cp 1."""
    if not cfg["model_len"] or not raw[1].get("model"):
        return {}

    def peak(ranks):
        return max(p["input_bytes"] + p["rss_peak_increase_bytes"] for p in ranks)

    base = peak(raw[1]["model"]["single"]["per_rank"])
    out = {"length": cfg["model_len"], "layers": cfg["model_layers"], "single": {"peak_bytes": base}, "cp": {}}
    for cp in cfg["cps"]:
        for mode, r in raw[cp].get("model", {}).items():
            e = r["errors"]
            out["cp"].setdefault(str(cp), {})[mode] = {
                "peak_bytes": peak(r["per_rank"]), "memory_ratio_vs_cp1": peak(r["per_rank"]) / base,
                "peak_bytes_per_rank": [p["input_bytes"] + p["rss_peak_increase_bytes"] for p in r["per_rank"]],
                "errors": e,
                "exact": e["dx_abs"] <= cfg["tolerance"] and e["loss_rel"] <= 1e-5 and e["grads_rel"] <= 1e-4}
    return out


def to_markdown(report: dict) -> str:
    c, m, s = report["config"], report["machine"], report["summary"]
    ds = report["deepspeed"]
    other = report.get("other_processes_cpu_share")
    lengths = [str(x) for x in c["lengths"]]
    modes = [x for x in c["modes"] if any(x in s["cp"][str(cp)] for cp in c["cps"])]
    header = "| cp | mode | " + " | ".join(klen(x) for x in lengths) + " |"
    sep = "|---|---|" + "---|" * len(lengths)

    def table(cell, single_cell=None):
        rows = [header, sep]
        if single_cell:
            rows.append("| 1 | single | " + " | ".join(single_cell(s["single"][x]) for x in lengths) + " |")
        for cp in c["cps"]:
            for mode in modes:
                v = s["cp"][str(cp)].get(mode)
                if v:
                    rows.append(f"| {cp} | {mode} | " + " | ".join(cell(v[x]) if x in v else "-" for x in lengths)
                                + " |")
        return rows

    lines = [
        "# Context-parallel attention: time, memory, bytes, exactness (CPU)",
        "",
        f"Causal attention, fp32, batch {c['batch']}, {c['heads']} query heads / {c['kv_heads']} kv heads, "
        f"head_dim {c['head_dim']}; lengths {', '.join(klen(x) for x in lengths)}; cp 1 = single-device "
        f"`kernels.attention.attention`; cp {', '.join(map(str, c['cps']))} over gloo, 1 thread per rank, "
        f"{m['cpu_count']} cores. **cp 4 runs 4 ranks on 2 cores (2x oversubscribed)**: its wall time is bounded "
        f"by the 2 cores; the per-rank CPU seconds show each rank's compute share. Wall time = the slowest "
        f"rank's forward+backward after a barrier, median of {c['repeats']} repeats ({c['long_repeats']} from "
        f"{klen(c['long_from'])} on), interleaved over the modes.",
    ]
    if other is not None:
        lines += ["", f"Other processes used {100 * other:.0f}% of the machine's CPU during this run (the cores are "
                      "shared with other work): wall times carry that noise, CPU seconds much less."]
    lines += ["", "## Forward+backward wall time (s, median; speedup over cp 1)", ""]
    rows = [header.replace("| mode |", "| mode | layout |"), sep + "---|"]
    rows.append("| 1 | single | single device | " + " | ".join(f"{s['single'][x]['wall_s']:.3f}" for x in lengths) + " |")
    for cp in c["cps"]:
        for mode in modes:
            v = s["cp"][str(cp)].get(mode)
            if v:
                layout = next(iter(v.values()))["layout"]
                rows.append(f"| {cp} | {mode} | {layout} | " + " | ".join(
                    f"{v[x]['wall_s']:.3f} ({v[x]['speedup_vs_cp1']:.2f}x)" if x in v else "-" for x in lengths) + " |")
    lines += rows
    if any("ring 1 x" in (next(iter(v.values()))["layout"]) for v in (s["cp"].get("2", {}).get("hybrid") or {},) if v):
        lines += ["", "hybrid at cp 2 has one ring member (Ulysses 2 x ring 1): Ulysses on the zigzag token layout, "
                      "so its diagonal splits into 3 smaller kernel calls."]
    lines += ["", "## Per-rank compute share", "",
              "Slowest rank's CPU seconds / cp 1's CPU seconds (ideal 1/cp); in parentheses all ranks' CPU seconds "
              "summed / cp 1's (1.00 = no extra work; includes gloo's threads and copies).", ""]
    lines += table(lambda v: f"{v['compute_share_max_rank']:.3f} ({v['compute_total_vs_cp1']:.2f})")
    lines += ["", "## Per-rank peak memory (MiB, max over ranks; ratio vs cp 1)", "",
              "Input shards (q, k, v, dout) + the RSS high-water increase over one forward+backward (check pass, "
              "fixed glibc mmap threshold so freed memory leaves the RSS).", ""]
    lines += table(lambda v: f"{mib(v['peak_bytes'])} ({v['memory_ratio_vs_cp1']:.2f}x)",
                   lambda v: mib(v["peak_bytes"]))
    lines += ["", "Cross-check with torch.profiler (input shards + peak of PyTorch CPU-allocator bytes on the calling "
                  "thread; misses gloo's worker-thread buffers):", ""]
    lines += table(lambda v: f"{mib(v['profiler_peak_bytes'])} ({v['profiler_ratio_vs_cp1']:.2f}x)",
                   lambda v: mib(v["profiler_peak_bytes"]))
    t = s["targets"]["memory_32k_cp4"]
    def verdict(r):
        return "pass" if r <= MEMORY_TARGET else "FAIL"

    lines += ["", f"**Memory target** ({t['target']}; RSS view, then PyTorch-allocator view): " + (
        t["skipped"] if "skipped" in t else "; ".join(
            f"{mode} {r:.3f}x {verdict(r)} / {t['profiler_ratio_per_mode'][mode]:.3f}x "
            f"{verdict(t['profiler_ratio_per_mode'][mode])}" for mode, r in t["ratio_per_mode"].items()))]
    if "ulysses_floor_ratio" in t:
        lines += ["", f"Why one attention call alone stays near {t['ulysses_floor_ratio']:.2f}x: the caller holds its "
                      "shards of q, k, v, dout and out (1/N of cp 1's footprint), and at the moment of Ulysses' kernel "
                      "backward the head-sharded q, k, v, out, dout and dq, dk, dv exist as well (kv heads replicated "
                      "up to N) — the same volume again, so Ulysses cannot go below "
                      f"{mib(t['ulysses_floor_bytes'])} MiB = {t['ulysses_floor_ratio']:.2f}x here (DeepSpeed's "
                      "Ulysses measures the same). The ring's double buffers (K/V in flight, dK/dV accumulators "
                      "travelling, the kernel's block gradients) are of the same order with whole blocks; "
                      "`-kvN` modes (recipe key `parallel.cp_kv_chunks: N`) send K/V round the ring in N pieces, so "
                      "those buffers shrink N-fold for N x more, smaller messages and kernel calls. The RSS view "
                      "carries a few MiB more than the allocator view for the ring modes (memory outside PyTorch's "
                      "allocator: gloo's transport threads, glibc's arenas; not broken down here); the allocator "
                      "view is what a GPU's caching allocator would count. These transients are paid once per step, "
                      "while every layer's saved activations shrink to 1/N: the training-step view below is what a "
                      "rank holds in training."]
    mv = s.get("model") or {}
    if mv:
        tm = s["targets"]["memory_32k_cp4_training_step"]
        lines += ["", f"## Per-rank peak memory of a training step ({klen(mv['length'])} tokens, {mv['layers']}-layer "
                      "model)", "",
                  f"models.transformer.Transformer (dim {c['heads'] * c['head_dim']}, {mv['layers']} layers, the "
                  f"attention shape above, SwiGLU {c['model_ffn']}, vocab {c['model_vocab']}, fed hidden states), "
                  "whose attention layers run each mode; loss = cross-entropy summed over the rank's tokens; one "
                  "forward+backward. Peak = the rank's inputs (hidden states, labels) + the RSS high-water increase. "
                  "Exact = summed loss (rel), summed parameter gradients (max rel) and input gradient (max abs) "
                  "against cp 1.", "",
                  "| cp | mode | peak MiB | ratio vs cp 1 | loss rel | grads rel | dx abs | exact |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| 1 | single | {mib(mv['single']['peak_bytes'])} | 1.00x | - | - | - | - |"]
        for cp, per_mode in mv["cp"].items():
            for mode, v in per_mode.items():
                e = v["errors"]
                lines.append(f"| {cp} | {mode} | {mib(v['peak_bytes'])} | {v['memory_ratio_vs_cp1']:.2f}x | "
                             f"{e['loss_rel']:.1e} | {e['grads_rel']:.1e} | {e['dx_abs']:.1e} | "
                             f"{'yes' if v['exact'] else 'NO'} |")
        lines += ["", f"**Memory target, training step** ({tm['target']}): " + (tm["skipped"] if "skipped" in tm else
                  "; ".join(f"{mode} {r:.3f}x {'pass' if tm['passed_per_mode'][mode] else 'FAIL'}"
                            for mode, r in tm["ratio_per_mode"].items()))]

    longest = lengths[-1]
    lines += ["", f"## Bytes sent per rank at {klen(longest)} (max over ranks) vs techniques.md 6.3", "",
              "Measured by wrapping torch.distributed's collectives. In the formulas t must be the whole sequence's "
              "tokens S (they give a per-device volume; with t = tokens per device, as 6.3 says, they are N times "
              "too small). `derived` = the same algebra with the kv heads replicated up to the Ulysses degree when "
              "fewer (both Ulysses implementations do) and the backward (Ulysses: the 4 all-to-alls again; ring: "
              "K/V again + the dK/dV accumulators, N hops; allgather: a reduce-scatter of dK/dV).", "",
              "| cp | mode | formula | fwd MiB | bwd MiB | formula fwd MiB | fwd / formula | fwd / derived | "
              "total / derived | total / (2 x formula) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cp in c["cps"]:
        for mode in modes:
            v = s["cp"][str(cp)].get(mode, {}).get(longest)
            if v:
                b, e = v["bytes_sent"], v["expected"]
                lines.append(f"| {cp} | {mode} | {e['formula']} | {mib(b['fwd'])} | {mib(b['bwd'])} | "
                             f"{mib(e['formula_fwd'])} | {v['fwd_over_formula']:.3f} | {v['fwd_over_derived']:.3f} | "
                             f"{v['total_over_derived']:.3f} | {v['total_over_2x_formula']:.3f} |")
    lines += ["", "Formulas (per rank, elements x 4 bytes): Ulysses 2(N-1)/N^2 t (h_q+h_kv) d; Ring-P2P "
              "2(N-1)/N t h_kv d; USP (derived here, 6.3 has no closed form): 2(u-1)/u t_l (h_q+h_kv) d + "
              "2(R-1) t_l h_kv d, t_l = t/N, u Ulysses ranks x R ring members. The byte counts are exact, so the "
              "ratios are the same at every length (see the JSON)."]

    lines += ["", "## longtrain Ulysses vs DeepSpeed DistributedAttention", ""]
    if not ds.get("installed") or ds.get("error"):
        lines.append(f"DeepSpeed not run: {ds.get('error') or 'deepspeed not installed'}.")
    else:
        t = s["targets"]["ulysses_vs_deepspeed"]
        notes = " ".join(f"cp {cp}: {v['note']}." for cp, v in ds.get("per_cp", {}).items() if v.get("note"))
        lines += [f"DeepSpeed {ds.get('version')} (DS_ACCELERATOR={ds.get('accelerator')}, its TorchBackend on the "
                  "already-initialized gloo group), its default [s, b, h, d] layout, around the same local attention "
                  f"function as longtrain's Ulysses (`kernels.attention.attention`, causal). {notes}", "",
                  "Ratios longtrain / DeepSpeed: of the median wall times; the median of the per-repeat ratios of "
                  "back-to-back runs (paired: both under the same machine load; the target is judged on it); of "
                  "all ranks' CPU seconds (the work done, insensitive to other load).", "",
                  "| cp | length | longtrain s | DeepSpeed s | ratio of medians | paired ratio | CPU-seconds ratio | "
                  "target | result |", "|---|---|---|---|---|---|---|---|---|"]
        for key, r in t.get("ratio_per_point", {}).items():
            cp, x = key[2:].split("@")
            u, d = s["cp"][cp]["ulysses"][x], s["cp"][cp]["deepspeed"][x]
            lines.append(f"| {cp} | {klen(x)} | {u['wall_s']:.3f} | {d['wall_s']:.3f} | {r['median_wall']:.3f} | "
                         f"{r['paired_wall']:.3f} | {r['cpu_sum']:.3f} | <= {DEEPSPEED_TARGET} | "
                         f"{'pass' if r['paired_wall'] <= DEEPSPEED_TARGET else 'FAIL'} |")
        if "geomean_paired_wall" in t:
            lines += ["", f"Geometric means over the points: paired ratio {t['geomean_paired_wall']:.3f} "
                          f"({'pass' if t['passed_geomean'] else 'FAIL'}), ratio of medians "
                          f"{t['geomean_median_wall']:.3f}, CPU seconds {t['geomean_cpu_sum']:.3f}."]

    lines += ["", "## Exactness: max |cp - cp 1| over out, dq, dk, dv (all ranks)", ""]
    lines += table(lambda v: f"{max(v['max_abs_diff_vs_cp1'].values()):.1e}")
    lines += ["", f"All within {c['tolerance']:.0e}: {'yes' if s['all_exact'] else 'NO'}.", "",
              "## Method", "",
              "- Per configuration two untimed check passes in one process group (RSS memory and bytes; then under "
              "torch.profiler the allocator view and exactness: apart, because the profiler's own event records "
              "would count in the RSS), then the timed passes in a fresh group with glibc's default malloc settings.",
              "- Memory: in the check group glibc's mmap threshold is fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so "
              "every tensor is its own mapping and a free returns it to the OS; before the pass free heap is trimmed "
              "(malloc_trim) and the RSS high-water mark reset (/proc/self/clear_refs = 5); VmHWM after minus VmRSS "
              "before, plus the input shards, is the per-rank peak. torch.profiler(profile_memory=True) over the "
              "second pass gives the tensor-allocator view.",
              "- Bytes: torch.distributed's all_to_all_single, all_gather, reduce_scatter, batch_isend_irecv (and "
              "the other collectives) are wrapped during the check pass; a rank's bytes are what leaves it under the "
              "standard algorithms (all-to-all minus its own chunk, all-gather (N-1) x input, reduce-scatter "
              "(N-1) x output, ring all-reduce 2(N-1)/N x buffer, P2P sends).",
              "- Exactness: every rank compares its shard of out, dq, dk, dv with the cp 1 result on the same seeded "
              "global input.",
              f"- Plots: {', '.join(report['plots']) or 'none'}.",
              "",
              f"Machine: {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch_version']}, Python {m['python']}, "
              f"{m['platform']}. Total run {report['elapsed_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def make_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, s = report["config"], report["summary"]
    lengths = c["lengths"]
    single_t = [s["single"][str(x)]["wall_s"] for x in lengths]
    single_cpu = [s["single"][str(x)]["cpu_s"] for x in lengths]
    styles = {"ring": ("tab:blue", "o"), "zigzag": ("tab:orange", "s"), "ulysses": ("tab:green", "^"),
              "hybrid": ("tab:red", "D"), "allgather": ("tab:purple", "v"), "deepspeed": ("tab:gray", "x")}
    cps = c["cps"]
    names = []

    def xaxis(ax):
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        length_axis(ax, lengths)

    def mode_lines(ax, cp, key, scale=1.0):
        for mode in c["modes"]:
            v = s["cp"][str(cp)].get(mode)
            base, kv_chunks = mode_parts(mode)
            if not v or base not in styles:
                continue
            color, marker = styles[base]
            xs = [x for x in lengths if str(x) in v]
            label = "deepspeed (Ulysses)" if mode == "deepspeed" else mode
            style = "--" if mode == "deepspeed" else (":" if kv_chunks > 1 else "-")
            ax.plot(xs, [v[str(x)][key] * scale for x in xs], marker="P" if kv_chunks > 1 else marker, color=color,
                    label=label, linestyle=style)

    fig, axes = plt.subplots(2, len(cps), figsize=(6.5 * len(cps), 9.5), squeeze=False)
    for j, cp in enumerate(cps):
        ax = axes[0][j]
        ax.plot(lengths, single_t, color="black", linestyle=":", marker=".", label="cp 1 (single device)")
        mode_lines(ax, cp, "wall_s")
        ax.set_yscale("log")
        ax.set_ylabel("forward+backward wall time (s)")
        title = f"cp {cp}: wall time (slowest rank)"
        if cp > os.cpu_count():
            title += f"\n{cp} ranks on {os.cpu_count()} cores (oversubscribed)"
        ax.set_title(title)
        xaxis(ax)
        ax.legend(fontsize=8)
        ax = axes[1][j]
        ax.plot(lengths, single_cpu, color="black", linestyle=":", marker=".", label="cp 1")
        ax.plot(lengths, [x / cp for x in single_cpu], color="black", linestyle="-.", alpha=0.5,
                label=f"ideal: cp 1 / {cp}")
        mode_lines(ax, cp, "max_rank_cpu_s")
        ax.set_yscale("log")
        ax.set_ylabel("slowest rank's CPU seconds")
        ax.set_title(f"cp {cp}: per-rank compute (CPU time)")
        xaxis(ax)
        ax.legend(fontsize=8)
    fig.suptitle(f"Context-parallel causal attention, fp32, {c['heads']}q/{c['kv_heads']}kv heads, d={c['head_dim']}, "
                 "CPU, 1 thread per rank", fontsize=11)
    save_figure(fig, out / "context_parallel_time.png", names, dpi=110)

    views = [("peak_bytes", "inputs + RSS increase"), ("profiler_peak_bytes", "inputs + PyTorch allocator peak")]
    fig, axes = plt.subplots(len(views), len(cps), figsize=(6.5 * len(cps), 5 * len(views)), squeeze=False)
    for i, (key, what) in enumerate(views):
        single_view = [s["single"][str(x)][key] / 2 ** 20 for x in lengths]
        for j, cp in enumerate(cps):
            ax = axes[i][j]
            ax.plot(lengths, single_view, color="black", linestyle=":", marker=".", label="cp 1 (single device)")
            ax.plot(lengths, [x / cp for x in single_view], color="black", linestyle="-.", alpha=0.5,
                    label=f"cp 1 / {cp}")
            if cp == MEMORY_TARGET_CP:
                ax.plot(lengths, [x * MEMORY_TARGET for x in single_view], color="tab:red", linestyle=":", alpha=0.7,
                        label=f"target {MEMORY_TARGET} x cp 1 (at 32K)")
            mode_lines(ax, cp, key, 1 / 2 ** 20)
            ax.set_yscale("log")
            ax.set_ylabel("per-rank peak memory (MiB, max over ranks)")
            ax.set_title(f"cp {cp}: per-rank peak memory ({what})")
            xaxis(ax)
            ax.legend(fontsize=8)
    save_figure(fig, out / "context_parallel_memory.png", names, dpi=110)
    return names


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--min-len", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=65536,
                   help="longest sequence (default 65536; 32768 halves the run on 2 cores)")
    p.add_argument("--lengths", default=None, help="comma-separated lengths (overrides --min-len/--max-len)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated, from {','.join(ALL_MODES)}; ring, zigzag and hybrid may take -kvN: "
                        f"K/V round the ring in N pieces (default {','.join(DEFAULT_MODES)})")
    p.add_argument("--cps", default="2,4", help="cp degrees besides 1 (default 2,4)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (default 3)")
    p.add_argument("--long-repeats", type=int, default=1, help="timed passes from --long-from on (default 1)")
    p.add_argument("--long-from", type=int, default=32768)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hybrid-ulysses", type=int, default=2, help="Ulysses degree of the hybrid mode (default 2)")
    p.add_argument("--backend", default="auto", help="attention kernel backend (default auto)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference vs cp 1 counted as exact")
    p.add_argument("--model-len", type=int, default=None,
                   help="length of the training-step memory view (default: the longest length up to 32768; "
                        "0 skips it)")
    p.add_argument("--model-layers", type=int, default=4, help="layers of the training-step model (default 4)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-json", metavar="JSON", default=None,
                   help="no measuring: redraw the plots and the markdown of an earlier run's context_parallel.json "
                        "(its summary as stored) into --out")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if mode_parts(m)[0] not in ALL_MODES
           or (mode_parts(m)[1] > 1 and mode_parts(m)[0] not in ("ring", "zigzag", "hybrid"))]
    if bad or not modes:
        p.error(f"--modes: unknown {', '.join(bad) or '(empty)'}; known: {', '.join(ALL_MODES)}, and ring, zigzag "
                f"or hybrid with -kvN (K/V in N pieces, e.g. zigzag-kv4)")
    cps = sorted({int(x) for x in args.cps.split(",") if x})
    if any(cp < 2 for cp in cps):
        p.error("--cps: degrees must be >= 2 (cp 1 always runs)")
    if args.lengths:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x})
    else:
        lengths, s = [], args.min_len
        while s <= args.max_len:
            lengths.append(s)
            s *= 2
    if not lengths:
        p.error("no sequence length in range")
    for s in lengths:
        for cp in cps:
            if s % (2 * cp * max(args.hybrid_ulysses, 1)):
                p.error(f"length {s} must divide by 2 x cp x hybrid Ulysses degree ({2 * cp * args.hybrid_ulysses})")
    for cp in cps:
        if any(m in ("ulysses", "deepspeed") for m in modes) and args.heads % cp:
            p.error(f"--heads {args.heads} must divide by cp {cp} for Ulysses")
    if args.repeats < 1 or args.long_repeats < 1:
        p.error("--repeats and --long-repeats must be at least 1")
    if args.model_len is None:
        args.model_len = max([s for s in lengths if s <= MEMORY_TARGET_LEN] or [lengths[0]])
    for cp in cps:
        if args.model_len and args.model_len % (2 * cp * max(args.hybrid_ulysses, 1)):
            p.error(f"--model-len {args.model_len} must divide by 2 x cp x hybrid Ulysses degree")
    return args, modes, cps, lengths


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    args, modes, cps, lengths = parse_args(argv)
    if args.from_json:
        return rerender(Path(args.from_json), Path(args.out), plots=not args.no_plots)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tqdm import tqdm

    from longtrain.tests.distributed import run_group

    cfg = {"lengths": lengths, "modes": modes, "cps": cps, "repeats": args.repeats,
           "long_repeats": args.long_repeats, "long_from": args.long_from, "heads": args.heads,
           "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": args.batch,
           "hybrid_ulysses": args.hybrid_ulysses, "backend": args.backend, "tolerance": args.tolerance,
           "scale": 1 / math.sqrt(args.head_dim), "precision": "fp32", "device": "cpu", "causal": True,
           "threads_per_rank": 1, "model_len": args.model_len, "model_layers": args.model_layers,
           "model_vocab": 256, "model_ffn": 344}
    deepspeed_installed = importlib.util.find_spec("deepspeed") is not None

    def n_runners(cp):
        if cp == 1:
            return 1
        return sum(1 for m in modes if m != "deepspeed" or deepspeed_installed)

    total = 0.0
    for cp in [1] + cps:
        for s in lengths:
            passes = 2 + (args.long_repeats if s >= args.long_from else args.repeats)  # 2 check passes
            total += n_runners(cp) * passes * run_weight(s, cp)
        if args.model_len and cp in (1, max(cps)):
            total += n_runners(cp) * args.model_layers * run_weight(args.model_len, cp)
    start = time.time()
    load = MachineLoad()
    raw = {}
    with tempfile.TemporaryDirectory() as ref_dir, \
            tqdm(total=total, desc="context parallel", unit="work",
                 bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}") as bar:
        def on_event(event):
            weight, label = event
            bar.set_postfix_str(label, refresh=False)
            bar.update(weight)

        for cp in [1] + cps:
            bar.set_postfix_str(f"cp{cp} starting")
            # The check group runs with a fixed glibc mmap threshold: every allocation of 64 KiB or
            # more is its own mapping, returned to the OS when freed, so the RSS high-water mark
            # follows live memory instead of heap reuse. Timing runs with glibc's defaults.
            with _env(MALLOC_MMAP_THRESHOLD_="65536"):
                check = run_group(cp, cp_worker, cfg, cp, "check", ref_dir, on_event=on_event)
            timed = run_group(cp, cp_worker, cfg, cp, "time", ref_dir, on_event=on_event)
            for key, value in check["results"].items():
                for name in ("wall_s", "fwd_s", "cpu_s"):
                    value[name] = timed["results"][key][name]
            raw[cp] = check
    ds_info = {"installed": deepspeed_installed, "per_cp": {}}
    if "deepspeed" not in modes:
        ds_info["error"] = "not requested (--modes)"
    for cp in cps:
        info = dict(raw[cp]["deepspeed"])
        for key in ("installed", "version", "accelerator", "error"):
            if key in info:
                ds_info[key] = info.pop(key)
        ds_info["per_cp"][str(cp)] = info
    report = {"machine": machine_info(), "config": cfg, "deepspeed": ds_info,
              "other_processes_cpu_share": load.other_share(),
              "summary": summarize(cfg, raw), "elapsed_s": time.time() - start, "plots": []}
    report["raw"] = {str(cp): raw[cp]["results"] for cp in raw}
    return write_report(report, Path(args.out), plots=not args.no_plots)


def write_report(report: dict, out: Path, plots: bool) -> int:
    """The plots, context_parallel.json and .md into `out`; the markdown printed."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out) if plots else []
    (out / "context_parallel.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "context_parallel.md").write_text(markdown)
    print(markdown)
    return 0


def rerender(report_path: Path, out: Path, plots: bool) -> int:
    try:
        report = json.loads(report_path.read_text())
        report["summary"], report["config"]
    except (OSError, ValueError, KeyError) as err:
        print(f"--from-json: {report_path}: not a context_parallel.py report ({err})", file=sys.stderr)
        return 2
    return write_report(report, out, plots)


if __name__ == "__main__":
    sys.exit(main())
