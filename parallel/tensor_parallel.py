"""Tensor parallel with Megatron-style sequence parallel, as DTensor plans over the `tp` axis.

Per block: the norms run on sequence shards (Shard(1)); the attention input is all-gathered,
wq/wk/wv and w1/w3 split by output features (heads), wo and w2 split by input features and
reduce-scattered back to sequence shards. The embedding is split by rows (vocabulary); the output
head by columns, gathered to replicated logits so the loss sees every vocabulary entry.
Without sequence parallel, activations between blocks stay replicated.

An attention that states its own split (`TP_LAYOUT`, e.g. MLA: up-projections colwise by heads,
latent down-projections and their norms replicated, the shared RoPE key's gradient summed over
tp) gets that plan instead of the wq/wk/wv/wo one.
"""
from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from longtrain.parallel.ladder import (LadderMixerInput, LadderRowwiseParallel, LadderSublayerInput,
                                       SublayerReductions)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
                          ladder_overlap: bool = True):
    """Shard `model` (a Transformer or a pipeline stage of one) in place over `tp_mesh`. A ladder
    model's output projections launch their reductions asynchronously (parallel/ladder.py); for
    one, returns what to call once per step after backward (its norm weight gradients summed over
    tp), else None."""
    between = Shard(1) if sequence_parallel else Replicate()
    row = lambda name: RowwiseParallel(output_layouts=between)  # noqa: E731
    reductions = None
    if model.ladder_residual:
        reductions = SublayerReductions(tp_mesh.get_group(), sequence_parallel, ladder_overlap)
        row = partial(LadderRowwiseParallel, reductions)
        for module in model.modules():  # the model reads pending outputs through it
            if hasattr(module, "residual_sync"):
                module.residual_sync = reductions
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

    for key, block in model.layers.items():
        row_in = lambda name, key=key: row(f"layers.{key}.{name}")  # noqa: E731
        attention_plan = _attention_plan("attention", row_in)
        layout = getattr(getattr(block, "attention", None), "TP_LAYOUT", None)
        if layout is not None:  # an attention that states its own split (models/mla.py)
            attention_plan = _layout_plan("attention", block.attention, layout, row_in)
        plan = _hybrid_block_plan(block, tp_mesh, between, row_in) if hasattr(block, "kind") else {
            "attention": _mixer_input(between, 3),
            **attention_plan,
            "feed_forward": _mixer_input(between, 1),
            **_mlp_plan("feed_forward", row_in),
        }
        if reductions is not None:  # ladder: input gradients reduced late (parallel/ladder.py)
            for norm, mixer in (("attention_norm", "attention"), ("ffn_norm", "feed_forward"), ("norm", "mixer")):
                if isinstance(getattr(block, norm, None), nn.Module):
                    plan[norm] = LadderSublayerInput(reductions, f"layers.{key}.{mixer}")
                    plan[mixer] = LadderMixerInput()
        elif sequence_parallel:
            for norm in ("attention_norm", "ffn_norm", "norm"):
                if isinstance(getattr(block, norm, None), nn.Module):
                    plan[norm] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
    return reductions.finish_gradients if reductions is not None else None


def _mixer_input(between, n_inputs: int) -> PrepareModuleInput:
    """Gather the sequence-sharded hidden states in front of a mixer (its other inputs, positions
    and document ids, pass as they are)."""
    rest = (None,) * (n_inputs - 1)
    return PrepareModuleInput(input_layouts=(between, *rest), desired_input_layouts=(Replicate(), *rest))


def _attention_plan(prefix: str, row) -> dict:
    return {f"{prefix}.wq": ColwiseParallel(), f"{prefix}.wk": ColwiseParallel(), f"{prefix}.wv": ColwiseParallel(),
            f"{prefix}.wo": row(f"{prefix}.wo")}


class _Replicated(ParallelStyle):
    """Parameters replicated over tp as DTensors (a projection every rank runs whole: MLA's
    latent down-projections and their norms); inputs arrive as replicated DTensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, device_mesh, [Replicate()])))
        return module


class _SumGradOverTP(ParallelStyle):
    """The module's (replicated) output goes on as a local tensor whose gradient, partial on each
    rank (each uses it for its own heads), is summed over tp in backward: MLA's shared RoPE key."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module, _inputs, out):
            if not isinstance(out, DTensor):
                out = DTensor.from_local(out, device_mesh, [Replicate()], run_check=False)
            return out.to_local(grad_placements=[Partial()])

        module.register_forward_hook(hook)
        return module


_STYLES = {"colwise": ColwiseParallel, "replicate": _Replicated, "sum_grad": _SumGradOverTP}


def _layout_plan(prefix: str, attention: nn.Module, layout: dict, row) -> dict:
    """An attention's TP_LAYOUT (submodule -> colwise | rowwise | replicate | sum_grad) as a plan;
    submodules the attention does not have (a full-rank query has no wq_a) are skipped."""
    plan = {}
    for name, kind in layout.items():
        if getattr(attention, name, None) is None:
            continue
        style = row(f"{prefix}.{name}") if kind == "rowwise" else _STYLES[kind]()
        plan[f"{prefix}.{name}"] = style
    return plan


def _mlp_plan(prefix: str, row) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(), f"{prefix}.w2": row(f"{prefix}.w2")}


def _hybrid_block_plan(block: nn.Module, tp_mesh: DeviceMesh, between, row) -> dict:
    """A block of a hybrid stack: attention, MLP, or Mamba-2 (heads split across tp: the input
    projections by output features — z, x and dt by heads, B and C by groups — the output
    projection by input features; the per-channel conv, per-head dt_bias/A_log/D and the gated
    norm's weight sharded alike, so each rank runs whole heads and whole norm groups)."""
    if block.kind == "*":
        layout = getattr(block.mixer, "TP_LAYOUT", None)  # MLA states its own split
        plan = _attention_plan("mixer", row) if layout is None else _layout_plan("mixer", block.mixer, layout, row)
        return {"mixer": _mixer_input(between, 3), **plan}
    if block.kind == "-":
        return {"mixer": _mixer_input(between, 1), **_mlp_plan("mixer", row)}
    mixer = block.mixer
    for owner in (mixer.conv_x, mixer.conv_B, mixer.conv_C, mixer, mixer.norm):
        for name, param in list(owner.named_parameters(recurse=False)):
            owner.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(0)])))
    plan = {"mixer": _mixer_input(between, 3), "mixer.out_proj": row("mixer.out_proj")}
    for proj in ("in_proj_z", "in_proj_x", "in_proj_B", "in_proj_C", "in_proj_dt"):
        plan[f"mixer.{proj}"] = ColwiseParallel()
    return plan
