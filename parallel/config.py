"""The recipe's `parallel` section (degrees, sequence strategies, sharding, pipeline schedule,
balancing) and `cluster` section (the machines the balance planner models), with the facts derived
from them alone: the filled degrees, the pipeline's micro-batch count, the balance strategy.

Each mode vocabulary is the Literal of the module that implements it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from longtrain.kernels.attention import AttentionBackend
from longtrain.parallel.activation_checkpoint import ACMode
from longtrain.parallel.balance.planner import Strategy as BalanceStrategy
from longtrain.parallel.context.ssm import SSMCPMode
from longtrain.parallel.context.strategy import CPMode
from longtrain.parallel.pipeline import PPSchedule, PPSplit


class DegreesError(ValueError):
    """Parallel degrees that do not fit the world size; str() is one line naming them."""


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # data-parallel replicas (HSDP outer axis)
    dp_shard: int = -1  # -1 fills what the other degrees leave of the world size
    cp: int = 1  # context-parallel degree (sequence split across ranks)
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree
    # Context-parallel attention (parallel/context/strategy.py); auto: ulysses when cp <= 8 and the
    # heads per tp rank divide by cp, else hybrid.
    cp_mode: Literal["auto", CPMode] = "auto"
    # Mamba layers of hybrid stacks: state_passing (no head-count limit) or all_to_all.
    ssm_cp_mode: SSMCPMode = "state_passing"
    # ring/zigzag/hybrid: K/V goes round the ring in this many pieces (in-flight buffers shrink by
    # this factor; more, smaller messages and kernel calls). A memory knob for the longest sequences.
    cp_kv_chunks: int = 1
    cp_ulysses_degree: int = 0  # hybrid: ranks per Ulysses group (0: the largest divisor of cp <= 8 that fits the heads)
    pp_schedule: PPSchedule = "1f1b"  # pipeline schedule
    pp_microbatches: int = 0  # 0: as many as pipeline stages (pp x pp_stages_per_rank)
    pp_stages_per_rank: int = 1  # >1 for the interleaved and zero-bubble schedules
    # Where pipeline stages split: between layers (the model decides: even, or a hybrid's '|'
    # marks), or sublayers (an even split of all attention and MLP sublayers: a stage may end after a
    # block's attention; transformers only).
    pp_split: PPSplit = "layers"
    sequence_parallel: bool = True  # Megatron-style SP on norms when tp > 1
    # Ladder models under tp: keep each sublayer's output all-reduce (reduce-scatter with sequence
    # parallel) in flight while the next sublayer computes (parallel/ladder.py); false waits at once.
    ladder_overlap: bool = True
    # FSDP: free gathered parameters after forward (ZeRO-3, least memory) or keep them until
    # backward (ZeRO-2 style: one all-gather per step instead of two).
    reshard_after_forward: bool = True
    activation_checkpoint: ACMode = "none"  # recompute activations of no block, every block, or every k-th block
    activation_checkpoint_every: int = 2  # every_k: k
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # torch.compile each block. auto: on CUDA, off on CPU: measured on this project's 2-core CPU
    # (debug model, seq 256, batch 4) compiled blocks run forward+backward 2.0x faster once built,
    # but building takes about a minute per process, more than a short CPU job saves.
    compile: Literal["auto", "on", "off"] = "auto"
    attention_backend: AttentionBackend = "auto"  # attention kernel: auto picks flash_attn on CUDA when installed, else torch; reference is the plain PyTorch kernel
    # Varlen batches over the data x context ranks (parallel/balance/): auto = zeppelin when
    # data.packing is varlen and cp > 1, else none (the loader's per-data-rank bins as they come).
    balance: Literal["auto", "none", BalanceStrategy] = "auto"
    # zeppelin: equal tokens per rank outside core attention (remap.py). null (auto): per step, when
    # the cost model says the linear work it saves exceeds its exchanges' cost (remap_pays); true or
    # false to choose.
    balance_remap: Optional[bool] = None
    # Varlen bins of data.token_budget the balancing group shares per step (0: one per data rank).
    # Fixed, it keeps the global batch (and exact resume) the same at any group size.
    balance_bins: int = 0


@dataclass
class ClusterConfig:
    # The machines the balance planner and simulator model (parallel/balance/cost.py): A, B, C (the
    # Zeppelin paper's clusters), h100x8, local (written by `longtrain probe`) or a preset .yaml file.
    preset: str = "local"
    gpus_per_node: int = 0  # 0: the preset's; on CPU a smaller value simulates several nodes
    # Balance routing layer (parallel/balance/routing.py): a ring's inter-node hop split over proxy
    # ranks, one per NIC. null (auto): on when the preset has several NICs per node and the group
    # spans nodes (never for `local`); true or false to choose.
    routing: Optional[bool] = None


def compile_blocks(p: ParallelConfig, device_type: str) -> bool:
    """parallel.compile resolved for a device type (auto: on CUDA only)."""
    return p.compile == "on" or (p.compile == "auto" and device_type == "cuda")


def pp_microbatches(p: ParallelConfig) -> int:
    if p.pp_microbatches:
        return p.pp_microbatches
    return p.pp * p.pp_stages_per_rank


def resolve_balance(p: ParallelConfig, packing: str) -> str:
    """parallel.balance with auto resolved: zeppelin for varlen batches (data.packing) under cp > 1, else none."""
    if p.balance == "auto":
        return "zeppelin" if packing == "varlen" and p.cp > 1 else "none"
    return p.balance


def resolve_degrees(p: ParallelConfig, world_size: int) -> dict:
    """Degrees with dp_shard=-1 filled; DegreesError (one line naming the degrees) when they do not fit."""
    others = p.dp_replicate * p.cp * p.tp * p.pp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise DegreesError(
                f"parallel degrees dp_replicate={p.dp_replicate} x cp={p.cp} x tp={p.tp} x pp={p.pp} "
                f"= {others} do not divide the world size {world_size}")
        dp_shard = world_size // others
    product = others * dp_shard
    if product != world_size:
        raise DegreesError(
            f"parallel degrees pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={dp_shard} x "
            f"cp={p.cp} x tp={p.tp} = {product}, but the world size is {world_size}")
    return dict(pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=dp_shard, cp=p.cp, tp=p.tp)
