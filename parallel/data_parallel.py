"""FSDP2 over the `fsdp` submesh (dp_shard x cp), HSDP when dp_replicate > 1.

Each unit the model names (`fsdp_units`: its blocks) is sharded on its own (its parameters are
gathered just before it runs and freed after), then the root module takes what is left (embeddings,
final norm, output head). Gradients are reduced by plain sum: the loss is already normalized by the
global token count of the step.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from longtrain.models.transformer import DecoderLM
from longtrain.parallel.mesh import Mesh


def apply_fsdp(model: DecoderLM, mesh: Mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> bool:
    """Shard `model` in place. Returns False (and does nothing) when there is nothing to shard or
    replicate over, that is when dp_replicate x dp_shard x cp is 1."""
    dims = mesh.dims
    if dims.dp_replicate * dims.fsdp == 1:
        return False
    dp_mesh = mesh.hsdp() if dims.dp_replicate > 1 else mesh["fsdp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in model.fsdp_units():
        fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the loss is normalized by the global token count
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return True
