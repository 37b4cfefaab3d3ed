"""What a model tells parallel/ about itself, as plain data (models/ never imports torch.distributed).

- Tensor parallel: per block a `BlockTPPlan` (submodule -> how its weights split, the mixers whose
  hidden-state input is gathered from sequence shards, the norms that run on sequence shards); for
  the whole model the embedding, final norm and output head by name. parallel/tensor_parallel.py
  turns the names into DTensor styles; it knows no layer names.
- Sequence strategies: the modules whose attention core or SSM core context parallelism replaces
  subclass `AttentionMixer` / `SSMMixer`; `DecoderLM.set_sequence_cores` installs a strategy in each.
- FSDP units (`DecoderLM.fsdp_units`) and pipeline split points (`DecoderLM.pipeline_stages`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

# colwise: split by output features (heads); rowwise: split by input features, output reduced;
# replicate: every tp rank runs it whole (its parameters replicated); sum_grad: a replicated output
# each rank uses for its own heads (gradient summed over tp); shard_params: the module's own
# parameters split along dim 0 (per-channel or per-head vectors that follow a colwise split).
TPStyle = Literal["colwise", "rowwise", "replicate", "sum_grad", "shard_params"]
# embedding: split by vocabulary rows; head: split by vocabulary columns, gathered to full logits;
# sequence_norm: a norm on sequence shards (under sequence parallel).
TopTPStyle = Literal["embedding", "sequence_norm", "head"]


@dataclass
class Sublayer:
    """One pre-norm sublayer of a block: the norm (run on sequence shards under sequence parallel)
    and the mixer after it (its hidden-state input gathered from sequence shards; its other
    inputs, positions and document ids, pass as they are)."""

    norm: str
    mixer: str
    n_inputs: int


@dataclass
class BlockTPPlan:
    styles: dict[str, TPStyle] = field(default_factory=dict)  # submodule path in the block -> split
    sublayers: list[Sublayer] = field(default_factory=list)  # in the order they run


class AttentionMixer(nn.Module):
    """A module that calls `self.core_attention(q, k, v, scale, positions, doc_ids)`; context
    parallelism installs its strategy there. `tp_styles()` says how its weights split."""

    core_attention: object

    def tp_styles(self) -> dict[str, TPStyle]:
        raise NotImplementedError


class SSMMixer(nn.Module):
    """A module that calls `self.ssm_core(...)`; context parallelism installs its SSM strategy there."""

    ssm_core: object


def prefixed(prefix: str, styles: dict[str, TPStyle]) -> dict[str, TPStyle]:
    """A submodule's styles as paths in its parent ("" is the submodule itself)."""
    return {f"{prefix}.{name}" if name else prefix: style for name, style in styles.items()}


def even_layer_split(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges per pipeline stage, as even as possible; the extra layers go to the
    middle stages, since the first and last stages also carry the embedding and the output head."""
    if n_layers < n_stages:
        raise ValueError(f"model.n_layers: {n_layers} layers cannot fill {n_stages} pipeline stages")
    base, extra = divmod(n_layers, n_stages)
    order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
    sizes = [base + (1 if s in order[:extra] else 0) for s in range(n_stages)]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out
