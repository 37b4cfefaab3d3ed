"""Tensor parallel with Megatron-style sequence parallel, as DTensor plans over the `tp` axis.

Per block: the norms run on sequence shards (Shard(1)); the attention input is all-gathered,
the fused Q/K/V projection and w1/w3 split by output features (heads), wo and w2 split by input features and
reduce-scattered back to sequence shards. The embedding is split by rows (vocabulary); the output
head by columns: called for logits it gathers them replicated, while the training loss runs
vocabulary-parallel chunk by chunk on the local columns (parallel/vocab_parallel_loss.py).
Without sequence parallel, activations between blocks stay replicated.

The model says how each of its modules splits (models/parallel_plan.py: `tensor_parallel_top_plan`,
`block_tp_plans`, as style names); this module turns the names into DTensor styles and knows no
layer names.
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

from longtrain.models.transformer import DecoderLM
from longtrain.parallel.ladder import (LadderMixerInput, LadderRowwiseParallel, LadderSublayerInput,
                                       SublayerReductions)
from longtrain.parallel.vocab_parallel_loss import vocab_parallel_linear_cross_entropy


def apply_tensor_parallel(model: DecoderLM, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
                          ladder_overlap: bool = True):
    """Shard `model` (a DecoderLM or a pipeline stage of one) in place over `tp_mesh`, as its plan
    says. A ladder model's output projections launch their reductions asynchronously and its
    sublayers' input gradients are reduced late (parallel/ladder.py); for one, returns what to call
    once per step after backward (its norm weight gradients summed over tp), else None."""
    between = Shard(1) if sequence_parallel else Replicate()
    row = lambda label: RowwiseParallel(output_layouts=between)  # noqa: E731 (label: ladder's reduction name)
    reductions = None
    if model.ladder_residual:
        reductions = SublayerReductions(tp_mesh.get_group(), sequence_parallel, ladder_overlap)
        row = partial(LadderRowwiseParallel, reductions)
        model.set_residual_sync(reductions)  # the model reads pending outputs through it
    top = {"embedding": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
           "sequence_norm": lambda: SequenceParallel() if sequence_parallel else None,
           "head": lambda: ColwiseParallel(input_layouts=between, output_layouts=Replicate(), use_local_output=True)}
    styled = {name: top[style]() for name, style in model.tensor_parallel_top_plan().items()}
    top_plan: dict[str, ParallelStyle] = {k: v for k, v in styled.items() if v is not None}
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)
    if "head" in model.tensor_parallel_top_plan().values():  # the chunked loss, without gathering the logits
        model.set_head_loss(partial(vocab_parallel_linear_cross_entropy, input_layout=between))

    styles = {"colwise": ColwiseParallel, "replicate": _Replicated, "sum_grad": _SumGradOverTP}
    for key, block_plan in model.block_tp_plans().items():
        block = model.layers[key]
        plan: dict[str, ParallelStyle] = {sub.mixer: _mixer_input(between, sub.n_inputs)
                                          for sub in block_plan.sublayers}
        for path, style in block_plan.styles.items():
            if style == "shard_params":  # the module's own vectors, split like the heads they follow
                _shard_own_params(block.get_submodule(path), tp_mesh)
            elif style == "rowwise":
                plan[path] = row(f"layers.{key}.{path}")
            else:
                plan[path] = styles[style]()
        if reductions is not None:  # ladder: input gradients reduced late (parallel/ladder.py)
            for sub in block_plan.sublayers:
                plan[sub.norm] = LadderSublayerInput(reductions, f"layers.{key}.{sub.mixer}")
                plan[sub.mixer] = LadderMixerInput()
        elif sequence_parallel:
            plan.update({sub.norm: SequenceParallel() for sub in block_plan.sublayers})
        parallelize_module(block, tp_mesh, plan)
    return reductions.finish_gradients if reductions is not None else None


def _shard_own_params(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(0)])))


def _mixer_input(between, n_inputs: int) -> PrepareModuleInput:
    """Gather the sequence-sharded hidden states in front of a mixer (its other inputs, positions
    and document ids, pass as they are)."""
    rest = (None,) * (n_inputs - 1)
    return PrepareModuleInput(input_layouts=(between, *rest), desired_input_layouts=(Replicate(), *rest))


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
