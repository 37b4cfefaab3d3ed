"""Mamba-2 context parallelism on CPU: forward+backward time, per-rank peak memory, bytes sent per
rank per layer and exactness of both SSM cp modes (`state_passing`, `all_to_all`) against cp 1,
and where the two modes cross over.

    python benchmarks/ssm.py [--min-len 8192] [--max-len 131072] [--lengths 8192,16384]
                             [--short-lengths 1024,2048,4096] [--short-repeats 5]
                             [--cp 4 | --cps 1,2,4] [--modes state_passing,all_to_all]
                             [--parts mixer,stack] [--stack-max-len 131072] [--stack-timed-max-len 32768]
                             [--attn-cp-mode ulysses]
                             [--repeats 2] [--long-repeats 2] [--long-from 65536]
                             [--dim 64] [--d-state 16] [--headdim 16] [--ngroups 2] [--chunk 64]
                             [--pattern M-M*-] [--tie-band 0.05] [--preset tiny] [--no-plots] [--out DIR]
    python benchmarks/ssm.py --from-json benchmarks/results/ssm.json   # re-render, no measuring

What runs (defaults; fp32, batch 1, 1 intra-op thread per rank, gloo over local processes):

- `mixer`: ONE Mamba-2 mixer (models.mamba.Mamba2Mixer: in-projections, conv, SSD scan, gated
  norm, out_proj) at 8K, 16K, 32K, 64K and 128K tokens, plus 1K, 2K and 4K (`--short-lengths`,
  cheap, 5 repeats) to locate a time crossover below 8K if there is one. Sizes: dim 64, expand 2
  (d_inner 128), 8 heads of 16, d_state 16, 2 groups, d_conv 4, chunk 64: hybrid-debug's Mamba layer (dim 256, 8
  heads of 64, d_state 64, 2 groups, chunk 64) with dim, head size and state divided by 4, so that
  the whole default run fits in minutes on 2 cores (`--dim 256 --headdim 64 --d-state 64` is
  hybrid-debug's layer exactly).
- `stack`: a reduced hybrid stack, models.hybrid.HybridModel with pattern `M-M*-` (one pipeline
  stage of hybrid-debug: 2 Mamba-2 + 1 attention + 2 MLP layers) with the same Mamba layers,
  attention 4 query / 2 kv heads of 16, SwiGLU MLP 172 (hybrid-debug's 688/256 ratio), final norm
  and a 260-token output head, fed hidden states (the embedding is dropped so that the input
  gradient can be checked), at 8K to 128K tokens (`--stack-max-len`). Its attention layer is
  quadratic: one cp 1 stack pass at 128K takes minutes on 2 cores, so above 32K
  (`--stack-timed-max-len`) the stack is timed by its check pass alone (one pass, no repeats; the
  per-rank CPU seconds of that pass too). Attention layers run the cp strategy
  `--attn-cp-mode` (ulysses or ring: contiguous layouts, since the scans need each rank's tokens in
  order).

cp 1 is the plain single-device model (LocalSSMCore, PlainAttention); cp 2 and 4 install
`mixer.ssm_core = build_ssm_core(mode, mesh, backend="torch")` on every Mamba mixer and
`parallel/context/strategy.build_strategy` on every attention layer. The machine has 2 cores: cp 2
uses both, cp 4 runs 4 ranks on 2 cores (2x oversubscribed), so its wall time cannot beat cp 2; the
per-rank CPU seconds show the compute share a rank would have on its own core.

Per (cp, part, mode, length), in one process group per cp:

- one *check pass*: per-rank peak memory, bytes each rank sends (torch.distributed's
  all_to_all_single, all_gather, all_reduce, batch_isend_irecv, ... wrapped while it runs; forward
  and backward apart; in the stack attributed to the Mamba or attention core whose forward or
  backward issued them), and the output and the input gradient against cp 1 on the same seeded
  global input (max abs difference over all ranks; the correctness guard);
- timed passes: forward+backward wall time = the slowest rank's, after a barrier; `--repeats`
  passes (`--long-repeats` from `--long-from` tokens on), interleaved over the modes in ABBA order;
  the best pass is reported (the least disturbed by other load on shared cores; medians in the JSON).

Memory on CPU (no allocator statistics), in the check pass: glibc malloc's mmap threshold is fixed
at 64 KiB (mallopt), so every tensor of 64 KiB or more is its own mapping and leaves the resident
set when freed (the RSS follows live memory, not the heap's free lists); the free heap is returned
to the OS (gc + malloc_trim) and the kernel's RSS high-water mark reset (/proc/self/clear_refs = 5);
per-rank peak = the rank's input shards + VmHWM after the forward+backward - VmRSS before it, every
thread (gloo's buffers) included. No fresh process per configuration is needed since the mark can
be reset. Timed passes run with a fixed 32 MiB mmap / 64 MiB trim threshold (the ceiling glibc's
dynamic threshold settles at) in every group. Without clear_refs (non-Linux) the peak falls back to
resource.getrusage's ru_maxrss, which cannot be reset and is then only an upper bound.

Writes ssm.json, ssm.md and ssm_time.png, ssm_bytes.png, ssm_memory.png to --out (default
benchmarks/results/) and prints the markdown.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from longtrain.parallel.context.ssm import SSM_MODES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import (CommCounter, MachineLoad, RssPeak, all_ranks, install_comm_counter, kib, klen,  # noqa: E402
                     length_axis, machine_info, mib, nbytes, record_timed_pass, save_figure)

PARTS = ("mixer", "stack")
TOLERANCE = 1e-5  # the correctness guard: max |cp - cp 1| of the output (fp32)
BYTES = 4  # fp32

PRESETS = {
    # For the smoke test: seconds, not minutes.
    "tiny": dict(lengths="256,512", stack_max_len=512, stack_timed_max_len=256, dim=32, d_state=8, headdim=8, ngroups=2, chunk=16,
                 n_heads=4, n_kv_heads=2, ffn_dim=64, repeats=1, long_repeats=1),
}


# ----------------------------------------------------------------------------------------------
# Bytes each rank sends, attributed to the core that sent them (measure.CommCounter's tag)
# ----------------------------------------------------------------------------------------------
class Tagged:
    """A core (ssm_core or core_attention) whose communication is attributed to `tag`: during its
    forward, and in backward from the moment its output's gradient arrives until the gradients of
    all its differentiable inputs are complete (nothing else communicates in between: the other ops
    of a layer are local, and the previous layer waits for this layer's input gradient)."""

    def __init__(self, core, tag: str, counter: CommCounter):
        self.core, self.tag, self.counter = core, tag, counter

    def __call__(self, *args, **kwargs):
        import torch

        c = self.counter
        prev, c.tag = c.tag, self.tag
        try:
            out = self.core(*args, **kwargs)
        finally:
            c.tag = prev
        inputs = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        if torch.is_grad_enabled() and out.requires_grad and inputs:
            left = [len(inputs)]

            def enter(grad):
                c.tag, left[0] = self.tag, len(inputs)

            def leave(grad):
                left[0] -= 1
                if left[0] == 0:
                    c.tag = "other"

            out.register_hook(enter)
            for t in inputs:
                t.register_hook(leave)
        return out


# ----------------------------------------------------------------------------------------------
# Models and cores (run inside the worker processes)
# ----------------------------------------------------------------------------------------------
def mamba_config(cfg: dict):
    from longtrain.models.mamba import MambaConfig

    m = cfg["mamba"]
    return MambaConfig(dim=cfg["dim"], d_state=m["d_state"], d_conv=m["d_conv"], expand=m["expand"],
                       headdim=m["headdim"], ngroups=m["ngroups"], chunk_size=m["chunk"])


def hybrid_config(cfg: dict):
    from longtrain.models.hybrid import HybridConfig

    m, s = cfg["mamba"], cfg["stack"]
    return HybridConfig(vocab_size=s["vocab_size"], dim=cfg["dim"], pattern=s["pattern"], n_heads=s["n_heads"],
                        n_kv_heads=s["n_kv_heads"], ffn_dim=s["ffn_dim"], d_state=m["d_state"], d_conv=m["d_conv"],
                        expand=m["expand"], mamba_headdim=m["headdim"], ngroups=m["ngroups"], chunk_size=m["chunk"],
                        max_seq_len=max(cfg["lengths"]))


class Part:
    """One model (same weights on every rank) and a way to install a mode's cores in it."""

    def __init__(self, name: str, model, mamba_mixers: list, attentions: list):
        self.name, self.model, self.mamba_mixers, self.attentions = name, model, mamba_mixers, attentions

    def install(self, ssm_core, attn_core):
        for mixer in self.mamba_mixers:
            mixer.ssm_core = ssm_core
        for attention in self.attentions:
            attention.core_attention = attn_core


def build_parts(cfg: dict, seed: int = 0) -> dict:
    import torch

    from longtrain.models.hybrid import HybridModel
    from longtrain.models.mamba import Mamba2Mixer

    parts = {}
    if "mixer" in cfg["parts"]:
        torch.manual_seed(seed)  # same weights on every rank (CPU generator)
        mixer = Mamba2Mixer(mamba_config(cfg))
        parts["mixer"] = Part("mixer", mixer, [mixer], [])
    if "stack" in cfg["parts"] and cfg["stack_lengths"]:
        model = HybridModel(hybrid_config(cfg))
        model.init_weights(seed=seed)
        model.tok_embeddings = None  # fed hidden states: the input gradient is checked too
        blocks = list(model.layers.values())
        parts["stack"] = Part("stack", model, [b.mixer for b in blocks if b.kind == "M"],
                              [b.mixer for b in blocks if b.kind == "*"])
    return parts


def global_inputs(cfg: dict, part: str, seq_len: int):
    """The same global input and output gradient on every rank (seeded per part and length)."""
    import torch

    gen = torch.Generator().manual_seed(1000 * (1 + PARTS.index(part)) + seq_len)
    b, d = cfg["batch"], cfg["dim"]
    x = torch.randn(b, seq_len, d, generator=gen)
    out_dim = d if part == "mixer" else cfg["stack"]["vocab_size"]
    dout = torch.randn(b, seq_len, out_dim, generator=gen)
    return x, dout


def repeats_for(cfg: dict, seq_len: int) -> int:
    if seq_len in cfg["short_lengths"]:
        return cfg["short_repeats"]
    return cfg["long_repeats"] if seq_len >= cfg["long_from"] else cfg["repeats"]


def run_weight(part: str, seq_len: int, cp: int) -> float:
    """Progress-bar weight of one forward+backward (~ seconds on 2 cores at the default sizes)."""
    x = seq_len / 8192
    w = 1.3 * x * (1 + 0.05 * x) if part == "mixer" else 3.0 * x + 1.0 * x * x
    return w * (1.0 if cp == 1 else 0.55)


def ssm_worker(cfg: dict, cp: int, ref_dir: str, events) -> dict:
    """All parts, lengths and modes of one cp degree in this process group."""
    import torch
    import torch.distributed as dist

    from longtrain.models.mamba import LocalSSMCore
    from longtrain.models.transformer import PlainAttention

    warnings.filterwarnings("ignore")
    rank = dist.get_rank()
    counter = CommCounter()
    install_comm_counter(counter)
    rss = RssPeak()
    rss.timed()
    parts = build_parts(cfg)

    # The cores of each mode (process groups are created here, in the same order on every rank).
    if cp == 1:
        modes = {"single": (Tagged(LocalSSMCore(backend="torch"), "mamba", counter),
                            Tagged(PlainAttention(), "attention", counter))}
    else:
        from longtrain.parallel.context.ssm import build_ssm_core, check_ssm_cp
        from longtrain.parallel.context.strategy import build_strategy
        from longtrain.parallel.mesh import Mesh, ParallelDims

        mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=cp, tp=1), "cpu")
        attn = None
        if "stack" in parts:
            s = cfg["stack"]
            attn = Tagged(build_strategy(mesh, cfg["attn_cp_mode"], heads=s["n_heads"], kv_heads=s["n_kv_heads"],
                                         ulysses_degree=0, backend="auto", causal=True), "attention", counter)
        m = mamba_config(cfg)
        modes = {}
        for mode in cfg["modes"]:
            check_ssm_cp(mode, cp, m.n_heads, m.ngroups)
            modes[mode] = (Tagged(build_ssm_core(mode, mesh, backend="torch"), "mamba", counter), attn)
    assert dist.get_rank() == rank and (cp == 1 or mesh.local_rank("cp") == rank)

    def progress(weight, label):
        if rank == 0:
            events.put((weight, label))

    def barrier():
        if cp > 1:
            dist.barrier()

    def fwd_bwd(part, x, dout, positions):
        part.model.zero_grad(set_to_none=True)
        x.grad = None
        counter.phase = "fwd"
        t0 = time.perf_counter()
        out = part.model(x, positions)
        t1 = time.perf_counter()
        counter.phase = "bwd"
        out.backward(dout)
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t0

    def shards(part_name, seq_len):
        x, dout = global_inputs(cfg, part_name, seq_len)
        local = seq_len // cp
        mine = slice(rank * local, (rank + 1) * local)
        positions = torch.arange(rank * local, (rank + 1) * local)[None].expand(cfg["batch"], -1)
        return x[:, mine].clone().requires_grad_(), dout[:, mine].clone(), positions, mine

    # Warm-up on a short input (gloo connections of new groups, first-call costs).
    for part in parts.values():
        for name, (ssm_core, attn_core) in modes.items():
            part.install(ssm_core, attn_core)
            x, dout, positions, _ = shards(part.name, 4 * cfg["mamba"]["chunk"] * cp)
            fwd_bwd(part, x, dout, positions)
            barrier()

    results = {}
    for part in parts.values():
        lengths = cfg["lengths"] if part.name == "mixer" else cfg["stack_lengths"]
        for seq_len in lengths:
            x, dout, positions, mine = shards(part.name, seq_len)
            ref_path = os.path.join(ref_dir, f"ref_{part.name}_{seq_len}.pt")
            ref = torch.load(ref_path, weights_only=True) if cp > 1 else None
            # Check pass per mode: memory, bytes, exactness.
            for name, (ssm_core, attn_core) in modes.items():
                part.install(ssm_core, attn_core)
                barrier()
                counter.reset()
                rss.start()
                counter.active = True
                c0 = time.process_time()
                out, fwd_s, wall_s = fwd_bwd(part, x, dout, positions)
                check_cpu_s = time.process_time() - c0
                peak = rss.stop()
                counter.active = False
                got = {"out": out.detach(), "dx": x.grad.detach()}
                if cp == 1:
                    torch.save({k: t.contiguous() for k, t in got.items()}, ref_path)
                    errors = {k: 0.0 for k in got}
                else:
                    errors = {}
                    for key, t in got.items():
                        err = torch.tensor(float((t - ref[key][:, mine]).abs().max()), dtype=torch.float64)
                        dist.all_reduce(err, op=dist.ReduceOp.MAX)
                        errors[key] = float(err)
                del out, got
                per_rank = {"rss_peak_increase_bytes": peak, "memory_method": rss.method,
                            "input_bytes": nbytes(x) + nbytes(dout), "comm": counter.snapshot(),
                            "check_wall_s": wall_s, "check_cpu_s": check_cpu_s}
                gathered = all_ranks(per_rank, cp)
                results[f"{part.name}|{name}|{seq_len}"] = {"per_rank": gathered, "errors": errors, "wall_s": [],
                                                             "fwd_s": [], "cpu_s": []}
                progress(run_weight(part.name, seq_len, cp), f"cp{cp} {part.name} {name} {klen(seq_len)} check")
            del ref
            # Timed passes, interleaved over the modes (ABBA).
            repeats = repeats_for(cfg, seq_len)
            if part.name == "stack" and seq_len > cfg["stack_timed_max_len"]:
                repeats = 0  # timed by the check pass alone (one pass costs minutes here)
            names = list(modes)
            for r in range(repeats):
                for name in (names if r % 2 == 0 else names[::-1]):
                    part.install(*modes[name])
                    gc.collect()
                    barrier()
                    c0 = time.process_time()
                    out, fwd_s, wall_s = fwd_bwd(part, x, dout, positions)
                    cpu_s = time.process_time() - c0
                    del out
                    record_timed_pass(results[f"{part.name}|{name}|{seq_len}"], cp, fwd_s, wall_s, cpu_s)
                    progress(run_weight(part.name, seq_len, cp), f"cp{cp} {part.name} {name} {klen(seq_len)} #{r + 1}")
            del x, dout
    return results


# ----------------------------------------------------------------------------------------------
# Formulas: bytes per rank per layer (fp32, batch b, N = cp ranks, l = L/N tokens per rank)
# ----------------------------------------------------------------------------------------------
def mamba_dims(cfg: dict) -> dict:
    m = cfg["mamba"]
    d_inner = m["expand"] * cfg["dim"]
    h = d_inner // m["headdim"]
    return {"b": cfg["batch"], "h": h, "p": m["headdim"], "n": m["d_state"], "g": m["ngroups"], "k": m["d_conv"],
            "C": d_inner + 2 * m["ngroups"] * m["d_state"]}


def expected_mamba_bytes(mode: str, cfg: dict, N: int, L: int) -> dict:
    """What parallel/context/ssm.py sends per rank per Mamba layer, under CommCounter's accounting
    (unpacked rows: no document ids travel).

    state_passing: conv halo (k-1 rows of the C = d_inner + 2gn conv channels, P2P, forward and its
    gradient back) + all-gather of the final state (h·p·n) and log decay (h) per rank, whose
    backward is a reduce-scatter ((N-1) x the part):
        fwd = bwd = 4b[(k-1)C + (N-1)h(pn+1)]                                      (flat in L)
    all_to_all: x (h·p), dt (h) and the B/C channels of the groups a rank's heads use (replicated
    up to N when g < N: 2n·max(g, N)) all-to-all to head shards, y (h·p) back; backward the same
    all-to-alls reversed:
        fwd = bwd = 4bl (N-1)/N (2hp + h + 2n·max(g, N))                           (linear in L)"""
    d = mamba_dims(cfg)
    b, h, p, n, g, k, C = d["b"], d["h"], d["p"], d["n"], d["g"], d["k"], d["C"]
    if N == 1:
        return {"fwd": 0.0, "bwd": 0.0, "total": 0.0}
    if mode == "state_passing":
        fwd = bwd = BYTES * b * ((k - 1) * C + (N - 1) * h * (p * n + 1))
    elif mode == "all_to_all":
        fwd = bwd = BYTES * b * (L / N) * (N - 1) / N * (2 * h * p + h + 2 * n * max(g, N))
    else:
        raise ValueError(mode)
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}


def bytes_crossover(cfg: dict, N: int) -> dict:
    """L* where all_to_all's bytes (linear in L) equal state_passing's (flat):
        L* = N² [(k-1)C + (N-1)h(pn+1)] / ((N-1) (2hp + h + 2n·max(g, N)))."""
    d = mamba_dims(cfg)
    h, p, n, g, k, C = d["h"], d["p"], d["n"], d["g"], d["k"], d["C"]
    sp = 2 * ((k - 1) * C + (N - 1) * h * (p * n + 1))  # elements per layer, fwd+bwd
    per_token = 2 * (N - 1) / N ** 2 * (2 * h * p + h + 2 * n * max(g, N))  # per token of the whole sequence
    return {"tokens": sp / per_token, "state_passing_bytes": BYTES * d["b"] * sp,
            "all_to_all_bytes_per_token": BYTES * d["b"] * per_token}


def expected_attention_bytes(cfg: dict, N: int, L: int) -> dict | None:
    """Per rank per attention layer, fwd+bwd (fp32), for the contiguous modes used here:
    ulysses: q, k, v to head shards and out back, the same in backward; kv heads replicated up to N
    when fewer: 2 x 4 (N-1)/N l d (2 h_q + 2 h_kv');
    ring: K/V N-1 hops forward, again in backward plus the dK/dV accumulators N hops:
    4 l h_kv d [2(N-1) + 2(N-1) + 2N]."""
    s = cfg["stack"]
    hq, hkv, d = s["n_heads"], s["n_kv_heads"], cfg["dim"] // s["n_heads"]
    l = cfg["batch"] * L / N
    if N == 1:
        return {"total": 0.0}
    if cfg["attn_cp_mode"] == "ulysses":
        hkv_rep = hkv if hkv % N == 0 else hkv * (N // math.gcd(N, hkv))
        return {"total": 2 * BYTES * (N - 1) / N * l * d * (2 * hq + 2 * hkv_rep)}
    if cfg["attn_cp_mode"] == "ring":
        return {"total": BYTES * l * hkv * d * (2 * (N - 1) * 2 + 2 * N)}
    return None


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def _memory(per_rank: list[dict]) -> dict:
    peaks = [p["input_bytes"] + p["rss_peak_increase_bytes"] for p in per_rank]
    return {"peak_bytes": max(peaks), "peak_bytes_per_rank": peaks, "input_bytes": max(p["input_bytes"] for p in per_rank),
            "memory_method": per_rank[0]["memory_method"]}


def _layer_bytes(per_rank: list[dict], tag: str, n_layers: int) -> dict:
    """Per rank per layer of kind `tag` (max over ranks), fwd/bwd/total."""
    out = {}
    for phase in ("fwd", "bwd", "total"):
        vals = [p["comm"].get(tag, {}).get(phase, 0.0) / max(n_layers, 1) for p in per_rank]
        out[phase] = max(vals)
    out["total_per_rank"] = [p["comm"].get(tag, {}).get("total", 0.0) / max(n_layers, 1) for p in per_rank]
    out["by_op_rank0"] = per_rank[0]["comm"].get(tag, {}).get("by_op", {})
    return out


def _timing(r: dict) -> dict:
    """Best of the timed passes (the least disturbed by other load on shared cores; the median is
    kept too): wall time of the slowest rank and the slowest rank's CPU seconds."""
    if not r["wall_s"]:  # no timed passes at this length: the check pass's time
        wall = max(p["check_wall_s"] for p in r["per_rank"])
        cpu = max(p["check_cpu_s"] for p in r["per_rank"])
        return {"wall_s": wall, "median_wall_s": wall, "repeats_wall_s": [], "fwd_s": None, "max_rank_cpu_s": cpu,
                "median_max_rank_cpu_s": cpu, "repeats_max_rank_cpu_s": [],
                "cpu_s_per_rank_repeats": [[p["check_cpu_s"] for p in r["per_rank"]]], "timed_from": "check pass"}
    cpu = [max(c) for c in r["cpu_s"]]
    return {"wall_s": min(r["wall_s"]), "median_wall_s": statistics.median(r["wall_s"]), "repeats_wall_s": r["wall_s"],
            "fwd_s": min(r["fwd_s"]), "max_rank_cpu_s": min(cpu), "median_max_rank_cpu_s": statistics.median(cpu),
            "repeats_max_rank_cpu_s": cpu, "cpu_s_per_rank_repeats": r["cpu_s"]}


def summarize(cfg: dict, raw: dict) -> dict:
    out = {}
    kinds = {"mixer": {"mamba": 1, "attention": 0}}
    if cfg["stack_lengths"]:
        pattern = cfg["stack"]["pattern"]
        kinds["stack"] = {"mamba": pattern.count("M"), "attention": pattern.count("*")}
    for part in cfg["parts"]:
        if part == "stack" and not cfg["stack_lengths"]:
            continue
        lengths = cfg["lengths"] if part == "mixer" else cfg["stack_lengths"]
        res = out[part] = {"1": {}}
        single = raw[1]
        for L in lengths:
            r = single[f"{part}|single|{L}"]
            res["1"].setdefault("single", {})[str(L)] = {**_timing(r), "check_wall_s": r["per_rank"][0]["check_wall_s"],
                                                          **_memory(r["per_rank"])}
        for cp in cfg["cps"]:
            if cp == 1:
                continue
            per_cp = res[str(cp)] = {}
            for mode in cfg["modes"]:
                for L in lengths:
                    r = raw[cp][f"{part}|{mode}|{L}"]
                    base = res["1"]["single"][str(L)]
                    mem = _memory(r["per_rank"])
                    timing = _timing(r)
                    wall, cpu_max = timing["wall_s"], timing["max_rank_cpu_s"]
                    mamba = _layer_bytes(r["per_rank"], "mamba", kinds[part]["mamba"])
                    exp = expected_mamba_bytes(mode, cfg, cp, L)
                    entry = {
                        **timing, "speedup_vs_cp1": base["wall_s"] / wall,
                        "compute_share_vs_cp1": cpu_max / base["max_rank_cpu_s"],
                        "check_wall_s": max(p["check_wall_s"] for p in r["per_rank"]),
                        **mem, "memory_ratio_vs_cp1": mem["peak_bytes"] / base["peak_bytes"],
                        "bytes_per_mamba_layer": mamba, "expected_mamba_bytes": exp,
                        "mamba_bytes_over_formula": mamba["total"] / exp["total"] if exp["total"] else None,
                        "mamba_fwd_over_formula": mamba["fwd"] / exp["fwd"] if exp["fwd"] else None,
                        "other_bytes": max(p["comm"].get("other", {}).get("total", 0.0) for p in r["per_rank"]),
                        "max_abs_diff_vs_cp1": r["errors"],
                        "guard_ok": r["errors"]["out"] <= cfg["tolerance"],
                    }
                    if kinds[part]["attention"]:
                        att = _layer_bytes(r["per_rank"], "attention", kinds[part]["attention"])
                        exp_att = expected_attention_bytes(cfg, cp, L)
                        entry["bytes_per_attention_layer"] = att
                        entry["expected_attention_bytes"] = exp_att
                        entry["attention_bytes_over_formula"] = (att["total"] / exp_att["total"]
                                                                 if exp_att and exp_att["total"] else None)
                    per_cp.setdefault(mode, {})[str(L)] = entry
    out["crossover"] = crossover(cfg, out)
    guards = [v["max_abs_diff_vs_cp1"]["out"] for part in PARTS if part in out for cp, modes in out[part].items()
              if cp != "1" for m in modes.values() for v in m.values()]
    dx = [v["max_abs_diff_vs_cp1"]["dx"] for part in PARTS if part in out for cp, modes in out[part].items()
          if cp != "1" for m in modes.values() for v in m.values()]
    out["guard"] = {"tolerance": cfg["tolerance"], "max_abs_diff_out": max(guards, default=0.0),
                    "max_abs_diff_dx": max(dx, default=0.0), "passed": max(guards, default=0.0) <= cfg["tolerance"]}
    return out


def _fit_line(xs, ys):
    """Least-squares t = a + b·L."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def _time_crossing(v: dict, lengths: list[int], key: str, band: float) -> dict:
    """Per length: the ratio of the best times a2a / sp, and a verdict from the paired repeats (repeat i
    of both modes ran back to back): a mode wins where every paired ratio is on its side of 1 and the
    best-time ratio is more than `band` away from 1, else `tie` (within the noise). A crossover lies
    between two lengths with different winners."""
    reps = "repeats_wall_s" if key == "wall_s" else "repeats_max_rank_cpu_s"
    ratio, paired, winner = {}, {}, {}
    for L in lengths:
        a2a, sp = v["all_to_all"][str(L)], v["state_passing"][str(L)]
        ratio[str(L)] = a2a[key] / sp[key]
        r = ratio[str(L)]
        pr = [x / y for x, y in zip(a2a[reps], sp[reps])] or [r]  # timed by the check pass alone: one pair
        paired[str(L)] = pr
        if max(pr) < 1 and r < 1 - band:
            winner[str(L)] = "all_to_all"
        elif min(pr) > 1 and r > 1 + band:
            winner[str(L)] = "state_passing"
        else:
            winner[str(L)] = "tie"
    t = {"metric": key, "ratio_a2a_over_sp": ratio, "paired_ratios": paired, "winner": winner, "crossings": []}
    decided = [L for L in lengths if winner[str(L)] != "tie"]
    for a, b in zip(decided[:-1], decided[1:]):
        if winner[str(a)] != winner[str(b)]:
            ra, rb = ratio[str(a)], ratio[str(b)]
            la, lb = math.log(a), math.log(b)
            if (ra - 1) * (rb - 1) < 0:
                at = math.exp(la + (lb - la) * (0 - math.log(ra)) / (math.log(rb) - math.log(ra)))
            else:
                at = math.exp((la + lb) / 2)
            t["crossings"].append({"between": [a, b], "tokens": at, "from": winner[str(a)], "to": winner[str(b)]})
    if len(lengths) >= 2:
        fits = {m: _fit_line(lengths, [v[m][str(L)][key] for L in lengths]) for m in SSM_MODES}
        (a1, b1), (a2, b2) = fits["state_passing"], fits["all_to_all"]
        t["fit"] = {m: {"intercept": a, "per_token": b} for m, (a, b) in fits.items()}
        cross = (a2 - a1) / (b1 - b2) if b1 != b2 else None
        # Only an extrapolation is reported: inside the range the measured ratios say more than a fit.
        outside = cross is not None and cross > 0 and not lengths[0] <= cross <= lengths[-1]
        t["fit_crossing_tokens"] = cross if outside else None
    return t


def crossover(cfg: dict, s: dict) -> dict:
    """Bytes: analytical L* (and the measured per-token a2a bytes against the measured flat state
    passing bytes). Time: where t(all_to_all)/t(state_passing) crosses 1 between two measured lengths
    (log-interpolated), else the crossing of straight-line fits t = a + b·L (an extrapolation)."""
    out = {}
    if set(cfg["modes"]) != set(SSM_MODES):
        return {"skipped": "needs both modes"}
    for cp in cfg["cps"]:
        if cp == 1:
            continue
        entry = out[str(cp)] = {"bytes": bytes_crossover(cfg, cp)}
        if "mixer" in s:
            v = s["mixer"][str(cp)]
            L = max(cfg["lengths"])
            sp = v["state_passing"][str(L)]["bytes_per_mamba_layer"]["total"]
            a2a_per_token = v["all_to_all"][str(L)]["bytes_per_mamba_layer"]["total"] / L
            entry["bytes"]["measured_tokens"] = sp / a2a_per_token if a2a_per_token else None
        for part in PARTS:
            if part not in s:
                continue
            lengths = cfg["lengths"] if part == "mixer" else cfg["stack_lengths"]
            for key, label in (("wall_s", "wall"), ("max_rank_cpu_s", "cpu")):
                entry[f"time_{part}_{label}"] = _time_crossing(s[part][str(cp)], lengths, key, cfg["tie_band"])
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def to_markdown(report: dict) -> str:
    c, m, s = report["config"], report["machine"], report["summary"]
    mc, st, md = c["mamba"], c["stack"], c["mamba_derived"]
    modes = c["modes"]
    cps = [cp for cp in c["cps"] if cp != 1]
    lines = [
        "# Mamba-2 context parallelism: state passing vs all-to-all (CPU)",
        "",
        f"fp32, batch {c['batch']}, 1 intra-op thread per rank, gloo, {m['cpu_count']} cores ({m['cpu']}). "
        + "".join(f"**cp {cp} runs {cp} ranks on {m['cpu_count']} cores ({cp / m['cpu_count']:g}x oversubscribed)**: "
                  "its wall time is bounded by the cores; the per-rank CPU seconds show each rank's compute share. "
                  for cp in cps if cp > (m["cpu_count"] or 1))
        + "Wall time = the slowest rank's forward+backward "
        f"after a barrier, the best of {c['repeats']} timed passes ({c['long_repeats']} from {klen(c['long_from'])} on"
        + (f", {c['short_repeats']} at {', '.join(klen(x) for x in c['short_lengths'])}" if c.get("short_lengths") else "")
        + "; the least disturbed by other load; medians in the JSON), modes interleaved (ABBA), per-rank CPU seconds "
        "likewise.",
        "",
        f"- **mixer** = one Mamba-2 mixer (`models.mamba.Mamba2Mixer`, {md['params_mixer']:,} parameters): dim {c['dim']}, "
        f"d_inner {md['d_inner']}, {md['heads']} heads x headdim {mc['headdim']}, d_state {mc['d_state']}, "
        f"{mc['ngroups']} groups, d_conv {mc['d_conv']}, chunk {mc['chunk']} (hybrid-debug's Mamba layer has dim 256, "
        f"8 heads x 64, d_state 64, 2 groups, chunk 64); lengths {', '.join(klen(x) for x in c['lengths'])}"
        + (f" ({', '.join(klen(x) for x in c['short_lengths'])}: extra short points to locate a time crossover, "
           f"{c['short_repeats']} repeats)" if c.get("short_lengths") else "") + ".",
    ]
    if c["stack_lengths"]:
        lines.append(
            f"- **stack** = `HybridModel`, pattern `{st['pattern']}` ({st['pattern'].count('M')} Mamba-2, "
            f"{st['pattern'].count('*')} attention, {st['pattern'].count('-')} MLP; {md['params_stack']:,} parameters): "
            f"the same Mamba layers, attention {st['n_heads']} q / {st['n_kv_heads']} kv heads of "
            f"{c['dim'] // st['n_heads']} (cp mode `{c['attn_cp_mode']}`, contiguous), MLP {st['ffn_dim']}, final norm "
            f"and {st['vocab_size']}-way output head, fed hidden states; lengths "
            f"{', '.join(klen(x) for x in c['stack_lengths'])}"
            + (f". Above {klen(c['stack_timed_max_len'])} the stack is timed by its check pass alone (one pass; the "
               "attention layer is quadratic and one cp 1 stack pass at 128K takes minutes on 2 cores)"
               if any(x > c.get("stack_timed_max_len", 1 << 62) for x in c["stack_lengths"]) else "") + ".")
    if report.get("other_processes_cpu_share") is not None:
        lines.append(f"- Other processes used {100 * report['other_processes_cpu_share']:.0f}% of the machine's CPU "
                     "during the run (shared cores): wall times carry that noise.")

    def table(part, cell, single_cell=None, lengths=None):
        lengths = lengths or (c["lengths"] if part == "mixer" else c["stack_lengths"])
        rows = ["| cp | mode | " + " | ".join(klen(x) for x in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
        if single_cell:
            v = s[part]["1"]["single"]
            rows.append("| 1 | single | " + " | ".join(single_cell(v[str(x)]) for x in lengths) + " |")
        for cp in cps:
            for mode in modes:
                v = s[part][str(cp)][mode]
                rows.append(f"| {cp} | {mode} | " + " | ".join(cell(v[str(x)]) for x in lengths) + " |")
        return rows

    parts = [p for p in PARTS if p in s]
    for part in parts:
        lines += ["", f"## Forward+backward wall time, {part} (s, best of the timed passes; speedup over cp 1)", ""]
        lines += table(part, lambda v: f"{v['wall_s']:.3f} ({v['speedup_vs_cp1']:.2f}x)",
                       lambda v: f"{v['wall_s']:.3f}")
    for part in parts:
        lines += ["", f"## Per-rank compute, {part}: slowest rank's CPU seconds (share of cp 1's; ideal 1/cp)", ""]
        lines += table(part, lambda v: f"{v['max_rank_cpu_s']:.2f} ({v['compute_share_vs_cp1']:.2f})",
                       lambda v: f"{v['max_rank_cpu_s']:.2f}")
    for part in parts:
        lines += ["", f"## Per-rank peak memory, {part} (MiB, max over ranks; ratio vs cp 1)", ""]
        lines += table(part, lambda v: f"{mib(v['peak_bytes'])} ({v['memory_ratio_vs_cp1']:.2f}x)",
                       lambda v: mib(v["peak_bytes"]))
    lines += ["", "Peak = input shards (x, dout) + the RSS high-water increase over one forward+backward (check pass: "
                  "glibc's mmap threshold fixed at 64 KiB so freed tensors leave the RSS, free heap returned with "
                  "malloc_trim and VmHWM reset via /proc/self/clear_refs before the pass; all threads, gloo's "
                  "included). Parameters, gradients of the (small) weights and the reference outputs are outside it."]

    bpart = "mixer" if "mixer" in s else "stack"
    lines += ["", "## Bytes sent per rank per Mamba layer (KiB, forward+backward; measured / formula)", "",
              ("Measured in the mixer runs (one layer)" if bpart == "mixer" else "Measured in the stack runs (per Mamba "
               "layer)") + " by wrapping torch.distributed's collectives; state passing is flat in the length, "
              "all-to-all linear.", ""]
    lines += table(bpart, lambda v: f"{kib(v['bytes_per_mamba_layer']['total'])} "
                                    f"({v['mamba_bytes_over_formula']:.3f})")
    L = max(c["lengths"] if bpart == "mixer" else c["stack_lengths"])
    lines += ["", f"Split at {klen(L)} (KiB per rank per layer):", "",
              "| cp | mode | fwd | bwd | total | formula total | measured / formula | ops (rank 0, fwd+bwd) |",
              "|---|---|---|---|---|---|---|---|"]
    for cp in cps:
        for mode in modes:
            v = s[bpart][str(cp)][mode][str(L)]
            b, e = v["bytes_per_mamba_layer"], v["expected_mamba_bytes"]
            ops = ", ".join(f"{k} x{o['calls']}" for k, o in sorted(b["by_op_rank0"].items()))
            lines.append(f"| {cp} | {mode} | {kib(b['fwd'])} | {kib(b['bwd'])} | {kib(b['total'])} | "
                         f"{kib(e['total'])} | {b['total'] / e['total']:.3f} | {ops} |")
    lines += ["", "Formulas (per rank per layer, fp32, b batch, N = cp, l = L/N, h heads, p headdim, n d_state, "
                  "g groups, k d_conv, C = d_inner + 2gn conv channels):", "",
              "- state passing: fwd = bwd = 4b[(k-1)C + (N-1)h(pn+1)] (halo of k-1 conv rows each way; all-gather "
              "of final states h·p·n and log decays h, its backward a reduce-scatter);",
              "- all-to-all: fwd = bwd = 4bl (N-1)/N (2hp + h + 2n·max(g, N)) (x, dt and the B/C groups of a rank's "
              "heads to head shards, replicated up to N when g < N, y back; the backward reverses them)."]
    if "stack" in s:
        lines += ["", "### Stack: bytes per rank per layer (KiB, forward+backward)", "",
                  "| cp | mode | length | per Mamba layer | = mixer's? | per attention layer | attention / formula | "
                  "other |", "|---|---|---|---|---|---|---|---|"]
        for cp in cps:
            for mode in modes:
                for x in c["stack_lengths"]:
                    v = s["stack"][str(cp)][mode][str(x)]
                    mix = s["mixer"][str(cp)][mode].get(str(x)) if "mixer" in s else None
                    same = "-" if mix is None else (
                        "yes" if abs(v["bytes_per_mamba_layer"]["total"] - mix["bytes_per_mamba_layer"]["total"]) < 1
                        else "NO")
                    ratio = v.get("attention_bytes_over_formula")
                    lines.append(f"| {cp} | {mode} | {klen(x)} | {kib(v['bytes_per_mamba_layer']['total'])} | {same} | "
                                 f"{kib(v['bytes_per_attention_layer']['total'])} | "
                                 f"{'-' if ratio is None else f'{ratio:.3f}'} | {kib(v['other_bytes'])} |")
        lines += ["", f"Attention formula ({c['attn_cp_mode']}): ulysses 2 x 4(N-1)/N·l·d(2h_q + 2h_kv'), h_kv' = kv "
                      "heads replicated up to N; ring 4·l·h_kv·d[4(N-1) + 2N]."]

    cx = s["crossover"]
    lines += ["", "## Crossover: where all-to-all and state passing swap places", ""]
    if "skipped" in cx:
        lines.append(f"Skipped: {cx['skipped']}.")
    else:
        lines += ["Bytes: state passing sends a constant per layer, all-to-all grows with L; they are equal at",
                  "",
                  "    L* = N² [(k-1)C + (N-1)h(pn+1)] / ((N-1) (2hp + h + 2n·max(g, N)))",
                  "",
                  "(from the formulas above). Below L* all-to-all sends less, above it state passing does.", "",
                  "| cp | state passing bytes/layer | all-to-all bytes/token | L* (formula) | L* (measured) |",
                  "|---|---|---|---|---|"]
        for cp in cps:
            by = cx[str(cp)]["bytes"]
            meas = by.get("measured_tokens")
            lines.append(f"| {cp} | {kib(by['state_passing_bytes'])} KiB | {by['all_to_all_bytes_per_token']:.0f} B | "
                         f"{by['tokens']:,.0f} | {'-' if meas is None else f'{meas:,.0f}'} |")
        top = max(cx[str(cp)]["bytes"]["tokens"] for cp in cps)
        verdict = (f"Every measured length ({klen(c['lengths'][0])} and up) is above L*: in bytes state passing "
                   "wins throughout." if c["lengths"][0] > top else
                   "Some measured lengths are below L*: there all-to-all sends fewer bytes.")
        lines += ["", "`measured`: the measured state-passing bytes over the measured all-to-all bytes per token at the "
                      f"longest length. {verdict}",
                  "", "Time: t(all-to-all) / t(state passing) per length (best passes; < 1: all-to-all faster), on the "
                      "wall time (slowest rank) and on the slowest rank's CPU seconds (less sensitive to other load on "
                      "the machine), with a verdict from the paired repeats (repeat i of both modes ran back to back): "
                      "`sp` / `a2a` where every paired ratio is on that side of 1 and the best-time ratio is more than "
                      f"{100 * c['tie_band']:g}% away from 1, `tie` otherwise (within the noise). A crossover lies between two lengths with different verdicts (log-interpolated at "
                      "ratio 1); without one, straight-line fits t = a + b·L of both modes are intersected, reported "
                      "only where that lies outside the measured range (an extrapolation).", "",
                  "| cp | part | metric | a2a / sp per length | crossover |", "|---|---|---|---|---|"]

        short = {"all_to_all": "a2a", "state_passing": "sp", "tie": "tie"}

        def tcell(t, lengths):
            if t["crossings"]:
                return "; ".join(f"between {klen(x['between'][0])} and {klen(x['between'][1])} (~{x['tokens']:,.0f} "
                                 f"tokens): {short[x['from']]} faster below, {short[x['to']]} above"
                                 for x in t["crossings"])
            winners = sorted({w for w in t["winner"].values() if w != "tie"})
            if not winners:
                txt = f"none: a tie within the noise at every length {klen(lengths[0])}-{klen(lengths[-1])}"
            else:
                txt = (f"none in {klen(lengths[0])}-{klen(lengths[-1])}: {short[winners[0]]} faster wherever the "
                       "difference is outside the noise")
            if t.get("fit_crossing_tokens"):
                txt += f"; linear fits cross at ~{t['fit_crossing_tokens']:,.0f} tokens (extrapolated)"
            return txt

        for cp in cps:
            for part in parts:
                lengths = c["lengths"] if part == "mixer" else c["stack_lengths"]
                for label in ("wall", "cpu"):
                    t = cx[str(cp)].get(f"time_{part}_{label}")
                    if t is None:
                        continue
                    ratios = ", ".join(f"{klen(x)} {r:.2f} {short[t['winner'][x]]}"
                                       for x, r in t["ratio_a2a_over_sp"].items())
                    metric = "wall s" if label == "wall" else "CPU s"
                    lines.append(f"| {cp} | {part} | {metric} | {ratios} | {tcell(t, lengths)} |")

    g = s["guard"]
    mem_gib = f"{m['memory_bytes'] / 2 ** 30:.0f} GiB RAM" if m.get("memory_bytes") else "RAM unknown"
    lines += ["", "## Correctness guard: max |cp - cp 1| of the output (and of the input gradient)", ""]
    for part in parts:
        lines += [f"{part}:", ""]
        lines += table(part, lambda v: f"{v['max_abs_diff_vs_cp1']['out']:.1e} ({v['max_abs_diff_vs_cp1']['dx']:.1e})")
        lines.append("")
    lines += [f"Output within {g['tolerance']:.0e} everywhere: **{'yes' if g['passed'] else 'NO'}** (worst output "
              f"{g['max_abs_diff_out']:.1e}, worst input gradient {g['max_abs_diff_dx']:.1e}).", "",
              "## Method", "",
              "- One gloo process group per cp (`longtrain.tests.distributed.run_group`); the same seeded weights on "
              "every rank; the global input and output gradient seeded per length, each rank its contiguous shard.",
              "- Per (part, mode, length) one check pass (memory, bytes, correctness against the cp 1 output saved by "
              "the cp 1 group), then the timed passes. glibc malloc runs with a fixed 64 KiB mmap threshold during "
              "check passes and a fixed 32 MiB mmap / 64 MiB trim threshold (where glibc's dynamic threshold "
              "settles) during timed passes, in every group.",
              "- Input: random hidden states (batch 1) and a random output gradient, the same global tensors on every "
              "rank, each rank its contiguous shard (and, for the stack's RoPE, its global positions).",
              "- Bytes: torch.distributed's collectives wrapped during the check pass; a rank's bytes are what leaves "
              "it under the standard algorithms (all-to-all minus its own chunk, all-gather (N-1) x input, ring "
              "all-reduce 2(N-1)/N x buffer, P2P sends). In the stack, bytes are attributed to the Mamba or attention "
              "core that issued them (hooks mark the span of each core's backward); `other` must be 0.",
              f"- Plots: {', '.join(report['plots']) or 'none'}.", "",
              f"Machine: {m['cpu_count']} CPUs ({m['cpu']}), {mem_gib}, "
              f"torch {m['torch_version']}, Python {m['python']}, {m['platform']}. "
              f"Total run {report['elapsed_s'] / 60:.1f} min."
              + (" (Report rebuilt from that run's raw data with --from-json.)" if report.get("rebuilt_from_json") else "")]
    return "\n".join(lines) + "\n"


def make_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    c, s = report["config"], report["summary"]
    cps = [cp for cp in c["cps"] if cp != 1]
    parts = [p for p in PARTS if p in s]
    colors = {2: "tab:blue", 4: "tab:red", 8: "tab:green"}
    style = {"state_passing": ("-", "o"), "all_to_all": ("--", "s")}
    names = []

    def ylog(ax):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        lo, hi = ax.get_ylim()
        if hi / lo < 30:  # less than ~1.5 decades: label 2, 3, 5 x 10^k too
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else ""))
        else:
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))

    # Time (and per-rank CPU seconds) vs length.
    fig, axes = plt.subplots(2, len(parts), figsize=(6.5 * len(parts), 9.5), squeeze=False)
    for j, part in enumerate(parts):
        lengths = c["lengths"] if part == "mixer" else c["stack_lengths"]
        for row, (key, ylabel) in enumerate((("wall_s", "forward+backward wall time (s, slowest rank)"),
                                              ("max_rank_cpu_s", "slowest rank's CPU seconds"))):
            ax = axes[row][j]
            single = s[part]["1"]["single"]
            ax.plot(lengths, [single[str(x)][key] for x in lengths], color="black", linestyle=":", marker=".",
                    label="cp 1 (single device)")
            for cp in cps:
                for mode in c["modes"]:
                    v = s[part][str(cp)][mode]
                    ls, mk = style[mode]
                    ax.plot(lengths, [v[str(x)][key] for x in lengths], color=colors.get(cp, "tab:gray"),
                            linestyle=ls, marker=mk, label=f"cp {cp} {mode}")
            ylog(ax)
            ax.set_ylabel(ylabel)
            what = "one Mamba-2 mixer" if part == "mixer" else f"hybrid stack {c['stack']['pattern']}"
            ax.set_title(f"{what}: {'wall time' if row == 0 else 'per-rank compute'}"
                         + (f"\n(cp 4 = 4 ranks on {report['machine']['cpu_count']} cores)" if row == 0 else ""))
            length_axis(ax, lengths)
            ax.legend(fontsize=8)
    fig.suptitle("Mamba-2 context parallelism on CPU, fp32, batch 1, 1 thread per rank", fontsize=11)
    save_figure(fig, out / "ssm_time.png", names, dpi=100)

    # Bytes per Mamba layer vs length: measured points, formula lines over a wider range, L*.
    if "mixer" in s and cps:
        fig, ax = plt.subplots(figsize=(8.5, 6))
        lengths = c["lengths"]
        lo = min(16, lengths[0])
        grid = [2 ** (i / 4) for i in range(int(4 * math.log2(lo)), int(4 * math.log2(lengths[-1])) + 1)]
        for cp in cps:
            for mode in c["modes"]:
                v = s["mixer"][str(cp)][mode]
                ls, mk = style[mode]
                col = colors.get(cp, "tab:gray")
                ax.plot(lengths, [v[str(x)]["bytes_per_mamba_layer"]["total"] for x in lengths], color=col, linestyle="none",
                        marker=mk, markersize=7, label=f"cp {cp} {mode} (measured)")
                ax.plot(grid, [expected_mamba_bytes(mode, c, cp, x)["total"] for x in grid], color=col, linestyle=ls,
                        alpha=0.6, label=f"cp {cp} {mode} (formula)")
            cx = s["crossover"].get(str(cp), {}).get("bytes")
            if cx:
                ax.axvline(cx["tokens"], color=colors.get(cp, "tab:gray"), linestyle=":", alpha=0.8)
                ax.annotate(f"L* = {cx['tokens']:,.0f}\n(cp {cp})", (cx["tokens"], cx["state_passing_bytes"]),
                            textcoords="offset points", xytext=(6, -28 if cp == 2 else 10), fontsize=8,
                            color=colors.get(cp, "tab:gray"))
        ax.set_xscale("log", base=2)
        ticks = sorted(set([x for x in (16, 64, 256) if x >= lo] + list(lengths)))
        ax.set_xticks(ticks)
        ax.set_xticklabels([klen(x) for x in ticks])
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=4))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g} B" if y < 2 ** 10 else
                                                   f"{y / 2 ** 10:g} KiB" if y < 2 ** 20 else f"{y / 2 ** 20:g} MiB"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("bytes sent per rank per Mamba layer (fwd+bwd)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("Bytes per rank per Mamba-2 layer: state passing flat, all-to-all linear\n"
                     "(dotted verticals: L* where they cross)")
        ax.legend(fontsize=8)
        save_figure(fig, out / "ssm_bytes.png", names, dpi=100)

    # Per-rank peak memory vs length.
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 5), squeeze=False)
    for j, part in enumerate(parts):
        ax = axes[0][j]
        lengths = c["lengths"] if part == "mixer" else c["stack_lengths"]
        single = [s[part]["1"]["single"][str(x)]["peak_bytes"] / 2 ** 20 for x in lengths]
        ax.plot(lengths, single, color="black", linestyle=":", marker=".", label="cp 1")
        for cp in cps:
            ax.plot(lengths, [x / cp for x in single], color=colors.get(cp, "tab:gray"), linestyle="-.", alpha=0.4,
                    label=f"cp 1 / {cp}")
            for mode in c["modes"]:
                v = s[part][str(cp)][mode]
                ls, mk = style[mode]
                ax.plot(lengths, [v[str(x)]["peak_bytes"] / 2 ** 20 for x in lengths], color=colors.get(cp, "tab:gray"),
                        linestyle=ls, marker=mk, label=f"cp {cp} {mode}")
        ylog(ax)
        ax.set_ylabel("per-rank peak memory (MiB, max over ranks)")
        ax.set_title(f"{'one Mamba-2 mixer' if part == 'mixer' else 'hybrid stack ' + c['stack']['pattern']}: "
                     "per-rank peak memory")
        length_axis(ax, lengths)
        ax.legend(fontsize=8)
    save_figure(fig, out / "ssm_memory.png", names, dpi=100)
    return names


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), help="tiny: the smoke test's sizes (seconds)")
    p.add_argument("--min-len", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=131072)
    p.add_argument("--lengths", default=None, help="comma-separated lengths (overrides --min-len/--max-len and "
                                                   "--short-lengths)")
    p.add_argument("--short-lengths", default="1024,2048,4096",
                   help="extra mixer-only lengths below --min-len, to locate a time crossover (default 1024,2048,4096; "
                        "'' for none)")
    p.add_argument("--short-repeats", type=int, default=5, help="timed passes at the short lengths (default 5)")
    p.add_argument("--cp", type=int, default=4, help="largest cp degree: runs 1, 2, 4, ... up to it (default 4)")
    p.add_argument("--cps", default=None, help="comma-separated cp degrees (overrides --cp; 1 always runs)")
    p.add_argument("--modes", default=",".join(SSM_MODES))
    p.add_argument("--parts", default=",".join(PARTS), help="mixer,stack (default both)")
    p.add_argument("--stack-max-len", type=int, default=131072, help="longest stack length (default 131072)")
    p.add_argument("--stack-timed-max-len", type=int, default=32768,
                   help="longer stack lengths are timed by their check pass alone (default 32768)")
    p.add_argument("--pattern", default="M-M*-", help="stack pattern (default M-M*-)")
    p.add_argument("--attn-cp-mode", default="ulysses", choices=["ulysses", "ring"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--long-repeats", type=int, default=2)
    p.add_argument("--long-from", type=int, default=65536)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--headdim", type=int, default=16)
    p.add_argument("--ngroups", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--d-conv", type=int, default=4)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4, help="attention query heads of the stack")
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=172)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    p.add_argument("--tie-band", type=float, default=0.05,
                   help="time ratios within 1 +- this count as a tie in the crossover verdicts (default 0.05)")
    p.add_argument("--from-json", default=None,
                   help="no measuring: rebuild the summary, markdown and plots from the raw data of a previous run's "
                        "ssm.json (e.g. with another --tie-band)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.preset:
        given = {a.dest for a in p._actions if any(opt in (argv if argv is not None else sys.argv[1:])
                                                     for opt in a.option_strings)}
        for key, value in PRESETS[args.preset].items():
            if key not in given:
                setattr(args, key, value)

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in SSM_MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {', '.join(bad) or '(empty)'}; known: {', '.join(SSM_MODES)}")
    parts = [x for x in args.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts: use a subset of {','.join(PARTS)}")
    if args.cps:
        cps = sorted({1, *(int(x) for x in args.cps.split(",") if x)})
    else:
        cps, n = [1], 2
        while n <= args.cp:
            cps.append(n)
            n *= 2
    if args.lengths:
        lengths = sorted({int(x) for x in str(args.lengths).split(",") if x})
    else:
        lengths, n = [], args.min_len
        while n <= args.max_len:
            lengths.append(n)
            n *= 2
    if not lengths:
        p.error("no sequence length in range")
    short = []
    if not args.lengths and "mixer" in parts:
        short = sorted({int(x) for x in str(args.short_lengths or "").split(",") if x and int(x) < lengths[0]})
    stack_lengths = [L for L in lengths if L <= args.stack_max_len] if "stack" in parts else []
    lengths = sorted(set(short) | set(lengths))
    heads = args.expand * args.dim // args.headdim
    for L in lengths:
        for cp in cps:
            if L % cp or (L // cp) < args.d_conv - 1:
                p.error(f"length {L} must divide by cp {cp} into shards of at least d_conv-1 tokens")
    for cp in cps:
        if cp > 1 and "all_to_all" in modes and heads % cp:
            p.error(f"all_to_all needs the {heads} Mamba heads to divide by cp {cp}")
        if cp > 1 and "stack" in parts and args.attn_cp_mode == "ulysses" and args.n_heads % cp:
            p.error(f"--n-heads {args.n_heads} must divide by cp {cp} for Ulysses")
    if args.repeats < 1 or args.long_repeats < 1 or args.short_repeats < 1:
        p.error("--repeats, --long-repeats and --short-repeats must be at least 1")
    return args, modes, parts, cps, lengths, stack_lengths, short


def write_report(report: dict, raw: dict, out: Path, plots: bool) -> int:
    report["summary"] = summarize(report["config"], raw)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out) if plots else []
    report["raw"] = {str(cp): v for cp, v in raw.items()}
    (out / "ssm.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "ssm.md").write_text(markdown)
    print(markdown)
    return 0 if report["summary"]["guard"]["passed"] else 1


def main(argv=None) -> int:
    args, modes, parts, cps, lengths, stack_lengths, short = parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["config"]["tie_band"] = args.tie_band
        report["rebuilt_from_json"] = True
        raw = {int(cp): v for cp, v in report.pop("raw").items()}
        return write_report(report, raw, Path(args.out), not args.no_plots)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from tqdm import tqdm

    from longtrain.tests.distributed import run_group

    cfg = {"lengths": lengths, "stack_lengths": stack_lengths, "short_lengths": short, "cps": cps, "modes": modes,
           "parts": parts, "repeats": args.repeats, "long_repeats": args.long_repeats, "long_from": args.long_from,
           "short_repeats": args.short_repeats, "stack_timed_max_len": args.stack_timed_max_len,
           "batch": args.batch, "dim": args.dim, "attn_cp_mode": args.attn_cp_mode, "tolerance": args.tolerance,
           "tie_band": args.tie_band,
           "precision": "fp32", "device": "cpu", "threads_per_rank": 1, "ssm_backend": "torch",
           "mamba": {"d_state": args.d_state, "d_conv": args.d_conv, "expand": args.expand, "headdim": args.headdim,
                     "ngroups": args.ngroups, "chunk": args.chunk},
           "stack": {"pattern": args.pattern, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                     "ffn_dim": args.ffn_dim, "vocab_size": 260}}
    from longtrain.models.hybrid import HybridConfig

    hcfg = hybrid_config(cfg)
    cfg["mamba_derived"] = {"d_inner": hcfg.d_inner, "heads": hcfg.mamba_heads,
                            "params_mixer": hcfg.layer_params("M") - hcfg.dim,  # without the block's norm
                            "params_stack": hcfg.num_params(include_embedding=False)}
    del HybridConfig

    total = 0.0
    for cp in cps:
        n_modes = 1 if cp == 1 else len(modes)
        for part in parts:
            for L in (lengths if part == "mixer" else stack_lengths):
                passes = 1 + (0 if part == "stack" and L > args.stack_timed_max_len else repeats_for(cfg, L))
                total += n_modes * passes * run_weight(part, L, cp)
    start = time.time()
    load = MachineLoad()
    raw = {}
    with tempfile.TemporaryDirectory() as ref_dir, \
            tqdm(total=total, desc="ssm cp", unit="work",
                 bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}") as bar:
        def on_event(event):
            weight, label = event
            bar.set_postfix_str(label, refresh=False)
            bar.update(min(weight, max(0.0, total - bar.n)))  # the weights are estimates

        for cp in cps:
            bar.set_postfix_str(f"cp{cp} starting")
            raw[cp] = run_group(cp, ssm_worker, cfg, cp, ref_dir, on_event=on_event)
        bar.update(max(0.0, total - bar.n))
    report = {"machine": machine_info(), "config": cfg, "other_processes_cpu_share": load.other_share(),
              "elapsed_s": time.time() - start}
    return write_report(report, raw, Path(args.out), not args.no_plots)


if __name__ == "__main__":
    sys.exit(main())
