"""Parallelize a single-device model, in a fixed order:

    pipeline split -> tensor parallel (+ sequence parallel) -> context parallel (attention
    strategy) -> activation checkpointing -> torch.compile -> FSDP2 over `fsdp` (HSDP with dp_replicate)

The result holds this rank's model parts (one, or one per pipeline stage it owns), the pipeline
schedule when pp > 1, and the switches the trainer needs (gradient sync, autocast).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.distributed.fsdp import FSDPModule

import torch.distributed as dist

from longtrain.models.transformer import DecoderLM, PlainAttention
from longtrain.parallel.balance.cost import routing_enabled
from longtrain.parallel.balance.engine import BalancedAttention
from longtrain.parallel.balance.ssm import BalancedSSMCore
from longtrain.parallel.config import ClusterConfig, ParallelConfig, compile_blocks, pp_microbatches
from longtrain.parallel.activation_checkpoint import apply_activation_checkpoint
from longtrain.parallel.context.ssm import build_ssm_core
from longtrain.parallel.context.strategy import build_strategy
from longtrain.parallel.data_parallel import apply_fsdp
from longtrain.parallel.mesh import Mesh
from longtrain.parallel.pipeline import Pipeline, build_stage_module, stage_ids_for_rank
from longtrain.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelModel:
    parts: list[DecoderLM]
    pipeline: Pipeline | None
    pp_group: object
    cp_strategy: object
    param_dtype: torch.dtype
    use_autocast: bool
    device: torch.device
    balance_engine: object = None  # parallel.balance: the attention engine the trainer hands each step's layout
    # Called once per optimizer step after the last backward, before clipping (a ladder model's
    # tensor-parallel norm weight gradients are summed over tp there: parallel/ladder.py).
    gradient_finishers: list = field(default_factory=list)

    def finish_gradients(self) -> None:
        for finish in self.gradient_finishers:
            finish()

    def set_gradient_sync(self, enabled: bool) -> None:
        """Skip FSDP's reduce-scatter on all but the last gradient-accumulation micro-batch."""
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(enabled)

    def autocast(self):
        if self.use_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def precision(parallel: ParallelConfig, device: torch.device) -> torch.dtype:
    mode = parallel.mixed_precision
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallelize(model: DecoderLM, mesh: Mesh, parallel: ParallelConfig, *, device: torch.device, loss_fn: Callable,
                balance: str = "none", cluster: ClusterConfig | None = None,
                contiguous_sequence: bool = False) -> ParallelModel:
    """`model` (one process's, as built) parallelized over `mesh`. `balance`: the resolved
    parallel.balance strategy (parallel/config.py: resolve_balance); `cluster`: the machines its
    routing models; `contiguous_sequence`: the model's context-parallel shards must be contiguous
    (models/registry.py says so of scan-based models)."""
    p = parallel
    dims = mesh.dims
    if dims.pp > 1:
        n_stages = dims.pp * p.pp_stages_per_rank
        stage_ids = stage_ids_for_rank(mesh.pp_rank, dims.pp, p.pp_stages_per_rank)
        parts: list[DecoderLM] = [build_stage_module(model, sid, n_stages, p.pp_split) for sid in stage_ids]
    else:
        parts, stage_ids, n_stages = [model], [0], 1

    param_dtype = precision(p, device)
    cfg = model.cfg
    ssm = None
    balance_engine = None
    attention: object  # the attention core: plain, context parallel, or balanced
    if balance != "none":  # varlen sequences balanced over the data x context ranks
        cluster = cluster or ClusterConfig()
        group = mesh["loss"].get_group()
        routing = routing_enabled(cluster.routing, cluster.preset, cluster.gpus_per_node, dims.dp * dims.cp)
        balance_engine = attention = BalancedAttention(group, dist.get_process_group_ranks(group),
                                                       backend=p.attention_backend, kv_chunks=p.cp_kv_chunks,
                                                       routing=routing)
        if contiguous_sequence:  # scan-based layers: each sequence's ring group is its scan group
            ssm = BalancedSSMCore(balance_engine)
    elif dims.cp > 1:
        attention = build_strategy(mesh, p.cp_mode, cfg.n_heads // dims.tp, cfg.n_kv_heads // dims.tp,
                                   p.cp_ulysses_degree, p.attention_backend, tp=dims.tp,
                                   contiguous=contiguous_sequence, kv_chunks=p.cp_kv_chunks)
        ssm = build_ssm_core(p.ssm_cp_mode, mesh)
    else:
        attention = PlainAttention(p.attention_backend)
    sharded = False
    on_meta = next(model.parameters()).is_meta
    finishers = []
    for part in parts:
        if not on_meta:  # meta parts are materialized after sharding (Trainer._materialize)
            part.to(device)
        if dims.tp > 1:
            finish = apply_tensor_parallel(part, mesh["tp"], sequence_parallel=p.sequence_parallel,
                                           ladder_overlap=p.ladder_overlap)
            if finish is not None:
                finishers.append(finish)
        part.set_sequence_cores(attention=attention, ssm=ssm)  # plain, context parallel or balanced
        apply_activation_checkpoint(part, p.activation_checkpoint, p.activation_checkpoint_every)
        if compile_blocks(p, device.type):
            for name, block in part.layers.items():
                part.layers[name] = torch.compile(block)  # type: ignore[assignment]  # an OptimizedModule
        sharded = apply_fsdp(part, mesh, param_dtype=param_dtype, reduce_dtype=torch.float32,
                             reshard_after_forward=p.reshard_after_forward)
        if not sharded and param_dtype != torch.float32 and device.type != "cuda":
            raise ValueError("parallel.mixed_precision: bf16 without FSDP is only supported on CUDA (autocast)")

    pipeline = None
    if dims.pp > 1:
        pipeline = Pipeline(parts, stage_ids, n_stages, mesh["pp"], device, p.pp_schedule, pp_microbatches(p),
                            loss_fn)
    use_autocast = param_dtype != torch.float32 and not sharded
    return ParallelModel(parts=parts, pipeline=pipeline, pp_group=mesh["pp"].get_group(),
                         cp_strategy=attention if dims.cp > 1 and balance_engine is None else None,
                         balance_engine=balance_engine,
                         param_dtype=param_dtype, use_autocast=use_autocast, device=device,
                         gradient_finishers=finishers)
