"""`longtrain plan RECIPE [--cluster PRESET] [--nodes N]`: the recipe's per-rank memory and predicted
step time / MFU (parallel/memory_model.py, parallel/step_time.py), then every layout of the same
world size that fits, ranked by predicted throughput.

Cluster presets are a small built-in table (one accelerator + its links). TODO(after merge): unify
with the cluster presets of the Zeppelin cost model (parallel/balance/cost.py, recipe `cluster:`).
"""
from __future__ import annotations

import dataclasses
import itertools

from longtrain.launcher.config import Recipe, RecipeError, resolve_degrees
from longtrain.models.registry import kind_of
from longtrain.models.sizes import resolve_model_config
from longtrain.parallel.memory_model import GiB, Hardware, Layout, Workload, estimate_memory
from longtrain.parallel.step_time import estimate_step_time

# Dense bf16 peaks (no sparsity); per-GPU one-way NVLink and network bandwidths. matmul_efficiency
# for h100 is fitted to the one recorded training step (benchmarks/results/gpu_training_h100.md,
# llama-1b at 16K: 26.6% MFU); attention_efficiency is flash-attn's measured causal fwd+bwd rate
# on that H100 (334 of 989 TFLOP/s, benchmarks/results/attention_kernel_cuda_bf16.md).
CLUSTERS: dict[str, Hardware] = {
    "h100": Hardware("H100 80GB SXM, NVLink 4 + 8x400G IB", peak_tflops=989.0, memory_gib=79.1, hbm_gbps=3350,
                     intra_node_gbps=450, inter_node_gbps=50, matmul_efficiency=0.40, attention_efficiency=0.34),
    "h200": Hardware("H200 141GB SXM, NVLink 4 + 8x400G IB", peak_tflops=989.0, memory_gib=139.8, hbm_gbps=4800,
                     intra_node_gbps=450, inter_node_gbps=50, matmul_efficiency=0.40, attention_efficiency=0.34),
    "a100": Hardware("A100 80GB SXM, NVLink 3 + 8x200G IB", peak_tflops=312.0, memory_gib=79.1, hbm_gbps=2039,
                     intra_node_gbps=300, inter_node_gbps=25, matmul_efficiency=0.55, attention_efficiency=0.45),
}


# A layout "fits" when its predicted peak is at most this share of the device memory: the caching
# allocator's fragmentation and the CUDA context are not in the model (it predicts allocated bytes).
HEADROOM = 0.95


def hardware(name: str) -> Hardware:
    if name not in CLUSTERS:
        import difflib

        close = difflib.get_close_matches(name, list(CLUSTERS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"--cluster: unknown preset {name!r}{hint}; known: {', '.join(CLUSTERS)}")
    return CLUSTERS[name]


def precision_of(recipe: Recipe, device: str, fsdp: bool) -> str:
    """The memory model's precision regime for what parallel/parallelize.py will do."""
    mode = recipe.parallel.mixed_precision
    bf16 = mode == "bf16" or (mode == "auto" and device == "cuda")
    if not bf16:
        return "fp32"
    return "bf16" if fsdp else "autocast"


def layout_of(recipe: Recipe, world: int) -> Layout:
    p = recipe.parallel
    degrees = resolve_degrees(p, world)
    cfg = resolve_model_config(recipe.model)
    mode, u = "ulysses", 1
    if degrees["cp"] > 1:
        from longtrain.parallel.context.strategy import resolve_mode

        mode, shape = resolve_mode(p.cp_mode, degrees["cp"], cfg.n_heads // degrees["tp"],
                                   cfg.n_kv_heads // degrees["tp"], p.cp_ulysses_degree, degrees["tp"],
                                   contiguous=kind_of(cfg).contiguous_sequence, kv_chunks=p.cp_kv_chunks)
        u = shape.ulysses
    return Layout(tp=degrees["tp"], cp=degrees["cp"], pp=degrees["pp"], dp_shard=degrees["dp_shard"],
                  dp_replicate=degrees["dp_replicate"], sequence_parallel=p.sequence_parallel,
                  activation_checkpoint=p.activation_checkpoint,
                  activation_checkpoint_every=p.activation_checkpoint_every, pp_schedule=p.pp_schedule,
                  pp_microbatches=p.pp_microbatches, pp_stages_per_rank=p.pp_stages_per_rank, cp_mode=mode,
                  cp_ulysses_degree=u, cp_kv_chunks=p.cp_kv_chunks, reshard_after_forward=p.reshard_after_forward)


def workload_of(recipe: Recipe, lay: Layout, device: str) -> Workload:
    fsdp = lay.fsdp * lay.dp_replicate > 1
    fused = recipe.optim.fused != "off"
    return Workload(seq_len=recipe.data.seq_len, batch_size=recipe.data.batch_size,
                    grad_accum=recipe.train.grad_accum, precision=precision_of(recipe, device, fsdp),
                    fused_optimizer=fused, loss_chunk_tokens=recipe.train.loss_chunk_tokens if lay.pp == 1 else 0)


def _splits_into(cfg, n_stages: int) -> bool:
    try:
        cfg.pipeline_stages(n_stages)
        return True
    except ValueError:
        return False


def _candidates(recipe: Recipe, world: int, cfg) -> list[Layout]:
    """Layouts of `world` ranks worth considering: tp within a node (divides the heads), cp, pp
    dividing the layers, the rest FSDP; activation checkpointing none / every 2nd / full."""
    base = layout_of(recipe, world)
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    out = []
    kind = kind_of(cfg)
    for tp, cp, pp in itertools.product(divisors, divisors, divisors):
        if world % (tp * cp * pp) or tp > 8 or cfg.n_heads % tp or cfg.n_kv_heads % tp:
            continue
        if recipe.data.seq_len % (cp * 2) and cp > 1 or pp > cfg.n_layers:
            continue
        if pp > 1 and not _splits_into(cfg, pp):
            continue
        if pp > 1 and (recipe.data.batch_size % pp or cfg.tie_embeddings):
            continue
        mode, u = "ulysses", 1
        if cp > 1:
            from longtrain.parallel.context.strategy import CPConfigError, resolve_mode

            try:
                mode, shape = resolve_mode("auto", cp, cfg.n_heads // tp, cfg.n_kv_heads // tp, 0, tp,
                                           contiguous=kind.contiguous_sequence)
            except CPConfigError:
                continue
            u = shape.ulysses
        for ac in ("none", "every_k", "full"):
            out.append(dataclasses.replace(base, tp=tp, cp=cp, pp=pp, dp_shard=world // (tp * cp * pp), dp_replicate=1,
                                           activation_checkpoint=ac, activation_checkpoint_every=2, cp_mode=mode,
                                           cp_ulysses_degree=u, pp_schedule="1f1b", pp_microbatches=0,
                                           pp_stages_per_rank=1))
    return out


def plan(recipe: Recipe, cluster: str = "h100", nodes: int | None = None, top: int = 8) -> dict:
    """The recipe's layout and the ranked layouts that fit, as a dict (printed by format_plan)."""
    hw = hardware(cluster)
    launch = recipe.run.launch
    gpus = launch.nproc_per_node
    if nodes is not None and nodes < 1:
        raise RecipeError(f"--nodes: must be at least 1, got {nodes}")
    nodes = nodes or launch.nnodes
    world = nodes * gpus
    cfg = resolve_model_config(recipe.model)
    device = "cuda"
    try:
        current = layout_of(recipe, world)
    except RecipeError:
        current = None  # the recipe's degrees do not fit this world size: rank the alternatives only
    hw = dataclasses.replace(hw, gpus_per_node=gpus)

    def evaluate(lay: Layout) -> dict:
        work = workload_of(recipe, lay, device)
        mem = estimate_memory(cfg, lay, work)
        t = estimate_step_time(cfg, lay, work, hw)
        return {"layout": lay.describe(), "degrees": dataclasses.asdict(lay), "precision": work.precision,
                "memory": {"peak_gib": mem.peak_gib, "phase": mem.phase, "pp_rank": mem.pp_rank,
                           "parts_gib": {k: v / GiB for k, v in mem.parts.items()}},
                "fits": mem.peak_gib <= HEADROOM * hw.memory_gib, **t}

    result = {"model": f"{recipe.model.name or recipe.model.kind}: {cfg.num_params() / 1e9:.2f}B parameters",
              "cluster": cluster, "hardware": hw.name, "nodes": nodes, "gpus_per_node": gpus, "world": world,
              "seq_len": recipe.data.seq_len, "batch_size": recipe.data.batch_size,
              "memory_gib": hw.memory_gib, "recipe": evaluate(current) if current is not None else None}
    ranked = [evaluate(lay) for lay in _candidates(recipe, world, cfg)]
    fits = sorted((r for r in ranked if r["fits"]), key=lambda r: -r["tokens_per_second"])
    result["fitting"] = fits[:top]
    result["considered"] = len(ranked)
    result["fitting_count"] = len(fits)
    return result


def _row(r: dict) -> str:
    return (f"{r['layout']:<46} {r['memory']['peak_gib']:7.1f} GiB  {r['step_s']:8.2f} s  "
            f"{r['tokens_per_second']:>10,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%")


def format_plan(result: dict) -> str:
    lines = [f"model {result['model']}; {result['nodes']} x {result['gpus_per_node']} {result['hardware']} "
             f"({result['memory_gib']:.0f} GiB each); seq {result['seq_len']:,}, batch {result['batch_size']} per data rank"]
    rec = result["recipe"]
    if rec is None:
        lines.append("the recipe's degrees do not fit this world size")
    else:
        m = rec["memory"]
        lines += ["", f"recipe layout: {rec['layout']} ({rec['precision']})",
                  f"  per-rank peak memory {m['peak_gib']:.1f} GiB (pipeline rank {m['pp_rank']}, at the {m['phase']})"
                  f" -- {'fits' if rec['fits'] else 'DOES NOT FIT'}"]
        for key, value in m["parts_gib"].items():
            lines.append(f"    {key:<22} {value:8.2f} GiB")
        comp = ", ".join(f"{k} {v:.2f}" for k, v in rec["compute_s"].items())
        comm = ", ".join(f"{k} {v:.2f}" for k, v in rec["comm_s"].items() if not k.endswith("_total")) or "none"
        lines += [f"  step {rec['step_s']:.2f} s: compute ({comp}) s; exposed communication ({comm}) s; "
                  f"bubble {rec['bubble_s']:.2f} s",
                  f"  {rec['tokens_per_second']:,.0f} tokens/s, MFU {100 * rec['mfu']:.1f}%"]
    lines += ["", f"layouts that fit in {HEADROOM:.0%} of the memory ({result['fitting_count']} of "
                  f"{result['considered']} considered), fastest first:"]
    lines += [f"  {i + 1:>2}. {_row(r)}" for i, r in enumerate(result["fitting"])]
    if not result["fitting"]:
        lines.append("  none: more nodes, a shorter sequence or a smaller model")
    return "\n".join(lines)
