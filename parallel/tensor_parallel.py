"""Tensor parallel with Megatron-style sequence parallel, as DTensor plans over the `tp` axis.

Per block: the norms run on sequence shards (Shard(1)); the attention input is all-gathered,
wq/wk/wv and w1/w3 split by output features (heads), wo and w2 split by input features and
reduce-scattered back to sequence shards. The embedding is split by rows (vocabulary); the output
head by columns, gathered to replicated logits so the loss sees every vocabulary entry.
Without sequence parallel, activations between blocks stay replicated.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) in place over `tp_mesh`."""
    between = Shard(1) if sequence_parallel else Replicate()
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel() if sequence_parallel else None
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(input_layouts=between, output_layouts=Replicate(), use_local_output=True)
    top_plan = {k: v for k, v in top_plan.items() if v is not None}
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)

    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(between, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between),
            "feed_forward": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
