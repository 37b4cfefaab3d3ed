"""Predicted time of one training step of a layout on given hardware, and its MFU: compute by kind
(matmuls, attention, SSM scans, memory-bound elementwise work, the optimizer), collectives by the
bytes the code sends, and the pipeline bubble. Pure arithmetic (see memory_model.py for the
memory side and the shared Layout / Workload / Hardware records).

Bytes per collective are those the code moves: FSDP all-gathers parameters in the compute dtype
(twice when resharding after forward) and reduce-scatters fp32 gradients; tensor parallel with
sequence parallel all-gathers and reduce-scatters T x d per sublayer in forward and again in
backward; context parallel as derived in benchmarks/context_parallel.py `expected_bytes`
(Ulysses: four all-to-alls each way; ring: K/V N-1 hops forward, again in backward plus the
dK/dV accumulators) and, for Mamba layers, benchmarks/ssm.py `expected_mamba_bytes`. A collective
over a group that fits inside a node uses NVLink, else the inter-node link; ring-style algorithms
move (g-1)/g of the buffer per rank.
"""
from __future__ import annotations

import math

from longtrain.parallel.memory_model import (Hardware, Layout, Workload, _elem, _param_count, _sublayers,
                                             _tp_sharded_fraction, layer_activation, layer_kinds, stage_layers)


def _group_bw(hw: Hardware, group: int, stride: int) -> float:
    """Bytes/s per rank for a group of `group` ranks whose members are `stride` ranks apart."""
    if group <= 1:
        return float("inf")
    inside = group * stride <= hw.gpus_per_node
    return (hw.intra_node_gbps if inside else hw.inter_node_gbps) * 1e9


def model_flops_per_token(cfg, seq_len: int) -> float:
    """The FLOPs per token the trainer reports MFU with (cfg.flops_per_token)."""
    return float(cfg.flops_per_token(seq_len))


def cp_attention_bytes(mode: str, tokens: float, hq: float, hkv: float, head_dim: int, cp: int,
                       ulysses: int = 1, elem: int = 4) -> float:
    """Bytes one rank sends per attention layer, forward + backward, under context parallel
    (benchmarks/context_parallel.py `expected_bytes` "derived_total"): `tokens` local tokens, heads
    per tp rank; kv heads replicated up to the Ulysses degree when fewer."""
    n, x_kv = cp, tokens * hkv * head_dim * elem

    def rep(u):
        return hkv if hkv % u == 0 else hkv * (u / math.gcd(u, int(hkv)))

    if n == 1:
        return 0.0
    if mode == "ulysses":
        return 2 * 2 * (n - 1) / n * tokens * (hq + rep(n)) * head_dim * elem
    if mode in ("ring", "zigzag"):
        return 2 * (n - 1) * x_kv + 2 * (n - 1) * x_kv + 2 * n * x_kv
    if mode == "allgather":
        return 4 * (n - 1) * x_kv
    if mode == "hybrid":
        u = ulysses
        ring, h = n // u, rep(u)
        a2a = 2 * (u - 1) / u * tokens * (hq + h) * head_dim * elem
        p2p = 2 * (ring - 1) * tokens * h * head_dim * elem
        return 2 * a2a + 2 * p2p + (2 * ring * tokens * h * head_dim * elem if ring > 1 else 0)
    raise ValueError(f"cp mode {mode!r}")


def cp_mamba_bytes(rows: int, cp: int, heads: float, headdim: int, d_state: int, groups: float, d_conv: int,
                   d_inner: float, elem: int = 4) -> float:
    """Bytes one rank sends per Mamba-2 layer, forward + backward, under state passing
    (benchmarks/ssm.py `expected_mamba_bytes`): the conv halo and the all-gathered final states."""
    if cp == 1:
        return 0.0
    channels = d_inner + 2 * groups * d_state
    return 2 * elem * rows * ((d_conv - 1) * channels + (cp - 1) * heads * (headdim * d_state + 1))


def estimate_step_time(cfg, lay: Layout, work: Workload, hw: Hardware) -> dict:
    kinds = layer_kinds(cfg)
    n_stages = lay.pp * lay.pp_stages_per_rank
    stages = stage_layers(cfg, n_stages)
    c, r = _elem(work.precision)
    peak = hw.peak_tflops * 1e12
    S = work.seq_len
    tokens = work.batch_size * S / lay.cp  # this rank's tokens per optimizer step (all micro-batches)
    micro = lay.microbatches if lay.pp > 1 else work.grad_accum
    # the busiest pipeline rank: most layers (pipeline stages run in lockstep)
    per_rank_layers = [[i for k in range(lay.pp_stages_per_rank) for i in stages[p + k * lay.pp]]
                       for p in range(lay.pp)]
    layers = max(per_rank_layers, key=len)
    hd = cfg.dim // cfg.n_heads if cfg.n_heads else 0
    recompute = {i: (lay.activation_checkpoint == "full" or
                     (lay.activation_checkpoint == "every_k" and i % lay.activation_checkpoint_every == 0))
                 for i in layers}
    mm_flops, attn_flops, scan_flops, act_bytes = 0.0, 0.0, 0.0, 0.0
    for i in layers:
        kind = kinds[i]
        factor = 4 / 3 if recompute[i] else 1.0  # a recomputed forward: 8 instead of 6 per parameter
        p_local = _param_count(cfg, kind) * (1 - _tp_sharded_fraction(cfg, kind) * (1 - 1 / lay.tp))
        mm_flops += 6 * p_local * tokens * factor
        for sub in _sublayers(kind):
            if sub == "*":
                # causal: 4 S d per token forward over the whole sequence, halved; x3 for training
                attn_flops += 6 * S * cfg.dim / lay.tp * tokens * factor
            if sub == "M":
                E = cfg.d_inner / lay.tp
                scan_flops += 6 * E * (cfg.chunk_size + 2 * cfg.d_state) * tokens * factor
        saved, _ = layer_activation(cfg, kind, tokens / micro, lay, work.precision)
        act_bytes += 3 * saved * micro * factor  # written in forward, read in backward, gradients
    last = any((n_stages - 1) == p + k * lay.pp for p in range(lay.pp) for k in range(lay.pp_stages_per_rank)
               if per_rank_layers[p] is layers)
    head_flops = 6 * cfg.vocab_size * cfg.dim / lay.tp * tokens if (last or lay.pp == 1) else 0.0
    mm_flops += head_flops
    logits_bytes = (6 * tokens * cfg.vocab_size * 4) if (last or lay.pp == 1) else 0.0
    t_mm = mm_flops / (peak * hw.matmul_efficiency)
    t_attn = attn_flops / (peak * hw.attention_efficiency)
    t_scan = scan_flops / (peak * hw.attention_efficiency)
    t_mem = (act_bytes + logits_bytes) / (hw.hbm_gbps * 1e9)
    fsdp = lay.fsdp * lay.dp_replicate > 1
    params_local = sum(_param_count(cfg, kinds[i]) * (1 - _tp_sharded_fraction(cfg, kinds[i]) * (1 - 1 / lay.tp))
                       for i in layers) + 2 * cfg.vocab_size * cfg.dim / lay.tp / max(1, lay.pp)
    shard = lay.fsdp if fsdp else 1
    t_optim = 4 * 16 * params_local / shard / (hw.hbm_gbps * 1e9) * (0.5 if work.fused_optimizer else 1.0)
    compute = t_mm + t_attn + t_scan + t_mem

    comm = {}
    # tensor parallel (+SP): all-gather and reduce-scatter of T x d per sublayer, forward and backward
    if lay.tp > 1:
        n_sub = sum(len(_sublayers(kinds[i])) for i in layers)
        per = (lay.tp - 1) / lay.tp * tokens * cfg.dim * c
        comm["tp"] = 4 * per * n_sub / _group_bw(hw, lay.tp, 1) + 4 * n_sub * micro * hw.collective_latency_s
    if lay.cp > 1:
        n = lay.cp
        tl = tokens / micro
        hq, hkv = cfg.n_heads / lay.tp, cfg.n_kv_heads / lay.tp
        bw = _group_bw(hw, lay.cp, lay.tp)
        n_attn = sum(1 for i in layers for s in _sublayers(kinds[i]) if s == "*")
        n_mamba = sum(1 for i in layers if kinds[i] == "M")
        per_layer = cp_attention_bytes(lay.cp_mode, tl, hq, hkv, hd, n, lay.cp_ulysses_degree, c) if n_attn else 0.0
        t_cp = per_layer * n_attn * micro / bw
        if lay.cp_mode in ("ring", "zigzag"):  # overlapped with the attention blocks it feeds
            t_cp = max(0.0, t_cp - t_attn)
        if n_mamba:
            rows = work.batch_size / micro
            sp = cp_mamba_bytes(rows, n, cfg.mamba_heads / lay.tp, cfg.mamba_headdim, cfg.d_state,
                                cfg.ngroups / lay.tp, cfg.d_conv, cfg.d_inner / lay.tp)
            t_cp += sp * n_mamba * micro / bw + 4 * n_mamba * micro * hw.collective_latency_s
        comm["cp"] = t_cp
    if fsdp:
        g = lay.fsdp
        gathers = 2 if lay.reshard_after_forward else 1
        volume = (g - 1) / g * params_local * (gathers * c + 4) if g > 1 else 0.0
        t_fsdp = volume / _group_bw(hw, g, lay.tp) if g > 1 else 0.0
        if lay.dp_replicate > 1:
            rr = lay.dp_replicate
            t_fsdp += 2 * (rr - 1) / rr * params_local / g * 4 / _group_bw(hw, rr, g * lay.tp)
        comm["fsdp"] = max(0.0, t_fsdp - 0.8 * compute)  # prefetched: hidden behind compute where it fits
        comm["fsdp_total"] = t_fsdp
    if lay.pp > 1:
        p2p = 2 * tokens * cfg.dim * c / _group_bw(hw, lay.pp, lay.world // lay.pp)
        comm["pp"] = p2p
    exposed = sum(v for k, v in comm.items() if not k.endswith("_total"))
    busy = compute + exposed
    bubble = 0.0
    if lay.pp > 1:
        v = lay.pp_stages_per_rank
        bubble = (lay.pp - 1) / (micro * v) * busy
    step = busy + bubble + t_optim
    global_tokens = work.batch_size * S * lay.dp_shard * lay.dp_replicate
    mfu = model_flops_per_token(cfg, S) * global_tokens / lay.world / step / peak
    return {"step_s": step, "mfu": mfu, "tokens_per_second": global_tokens / step,
            "compute_s": {"matmul": t_mm, "attention": t_attn, "ssm_scan": t_scan, "memory_bound": t_mem,
                          "optimizer": t_optim},
            "comm_s": comm, "bubble_s": bubble}
