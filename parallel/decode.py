"""Decoding under tensor parallelism: the single-device decode loop (models/decode.py) run on every
rank of a tp group over a model sharded for it.

- Standard, ladder and hybrid models (GQA attention, MLP, Mamba-2): parallel/tensor_parallel.py's
  plan without sequence parallel (apply_tensor_parallel): each rank holds its heads' projections
  and so only its heads' KV cache and its Mamba heads' conv window and SSM state (the caches take
  their sizes from the local tensors); each sublayer ends in an all-reduce. A ladder model
  launches those all-reduces asynchronously and waits where the model reads the pending output
  (parallel/ladder.py), after the next sublayer has computed: decode overlaps them exactly as the
  training forward does; `ladder_overlap=False` waits at once, to measure it.
- MLA, exact absorbed decode (`decode="absorbed"`): head-split like training (the attention's
  tp_styles: up-projections by heads, latent down-projection replicated), so every rank caches
  the whole latent of every token (the cache does not shrink with tp: what TPLA is for).
- MLA with TPLA (`decode="tpla"`): every rank holds the whole model and only its 1/tp slice of
  each token's latent (parallel/tpla.py); one plain-sum all-reduce per layer and step.
- Every rank samples from identical logits with an identically seeded generator; rank 0's tokens
  are broadcast each step all the same (`sync_tokens`), so the ranks can never drift apart.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from longtrain.models.decode import generate
from longtrain.models.hybrid import HybridConfig
from longtrain.models.mla import MLAConfig, MLAttention
from longtrain.parallel.ladder import SublayerReductions


def has_mla(model_or_cfg) -> bool:
    """Whether a model (or its config) has multi-head latent attention layers."""
    if isinstance(model_or_cfg, nn.Module):
        return any(isinstance(m, MLAttention) for m in model_or_cfg.modules())
    return mla_config(model_or_cfg) is not None


def mla_config(cfg) -> MLAConfig | None:
    """The MLA sizes of a model config: its own (an MLA transformer) or its attention layers' (a hybrid)."""
    if isinstance(cfg, MLAConfig):
        return cfg
    if isinstance(cfg, HybridConfig):
        return cfg.mla
    return None


def check_tp_decode(cfg, tp: int, decode: str) -> None:
    """One line naming what does not fit `tp` decode ranks."""
    if tp < 1:
        raise ValueError(f"--nproc: {tp} must be at least 1")
    if has_mla(cfg) and decode == "tpla":
        rank = mla_config(cfg).kv_lora_rank
        if rank % tp:
            raise ValueError(f"model.kv_lora_rank: {rank} does not divide by the TPLA degree {tp} (--nproc)")
        return
    if tp == 1:
        return
    kinds = set(cfg.layer_kinds)
    if "T" in kinds:  # a transformer block: attention and MLP
        kinds |= {"*", "-"}
    if "*" in kinds:
        if cfg.n_heads % tp:
            raise ValueError(f"model.n_heads: {cfg.n_heads} heads do not divide by --nproc {tp}")
        if cfg.n_kv_heads % tp:
            raise ValueError(f"model.n_kv_heads: {cfg.n_kv_heads} kv heads do not divide by --nproc {tp}")
    if "-" in kinds and cfg.ffn_dim % tp:
        raise ValueError(f"model.ffn_dim: {cfg.ffn_dim} does not divide by --nproc {tp}")
    if isinstance(cfg, HybridConfig) and "M" in kinds and (cfg.mamba_heads % tp or cfg.ngroups % tp):
        raise ValueError(f"--nproc: {tp} must divide the Mamba heads ({cfg.mamba_heads}) and model.ngroups "
                         f"({cfg.ngroups})")


class TokenBroadcast:
    """sync_tokens for generate: every rank takes rank 0's tokens (counts the broadcasts)."""

    def __init__(self, group):
        self.group, self.src, self.calls = group, dist.get_global_rank(group, 0), 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=self.src, group=self.group)
        self.calls += 1
        return tokens


def shard_for_decode(model: nn.Module, tp_group, *, decode: str = "absorbed", latent_norm: str = "exact",
                     ladder_overlap: bool = True, backend: str = "auto"):
    """Prepare `model` (the whole single-device model, identical on every rank) for decoding over
    `tp_group`, in place. Returns (make_latent_cache or None, what counts the communication: the
    ladder's SublayerReductions, TPLA's all-reduce, or None)."""
    tp = dist.get_world_size(tp_group)
    check_tp_decode(model.cfg, tp, decode)
    if has_mla(model) and decode == "tpla":
        from longtrain.parallel.tpla import tpla_cache_factory

        return tpla_cache_factory(tp, tp_group, latent_norm, backend)
    if tp == 1:
        return None, None
    from torch.distributed.device_mesh import DeviceMesh

    from longtrain.parallel.tensor_parallel import apply_tensor_parallel

    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(tp_group, device.type, mesh_dim_names=("tp",))
    apply_tensor_parallel(model, mesh, sequence_parallel=False, ladder_overlap=ladder_overlap)
    sync = model.residual_sync  # a ladder model's reductions (launches, waits, the order of both)
    return None, sync if isinstance(sync, SublayerReductions) else None


def tp_generate(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, tp_group, *,
                prompt_lengths: torch.Tensor | None = None, decode: str = "absorbed", latent_norm: str = "exact",
                ladder_overlap: bool = True, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                eos_id: int | None = None, backend: str = "auto") -> dict:
    """Shard `model` over `tp_group` and generate; every rank returns the same tokens, plus its
    cache bytes and communication counts."""
    make, comm = shard_for_decode(model, tp_group, decode=decode, latent_norm=latent_norm,
                                  ladder_overlap=ladder_overlap, backend=backend)
    sync = TokenBroadcast(tp_group) if dist.get_world_size(tp_group) > 1 else None
    tokens, caches = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                              generator=torch.Generator().manual_seed(seed), make_latent_cache=make,
                              backend=backend, eos_id=eos_id, prompt_lengths=prompt_lengths, sync_tokens=sync)
    counts = None
    if comm is not None:
        counts = dict(comm.counts) if isinstance(comm, SublayerReductions) else {"all_reduce": comm.calls}
    return {"tokens": tokens, "cache_bytes": sum(c.nbytes() for c in caches), "comm": counts,
            "broadcasts": 0 if sync is None else sync.calls}
