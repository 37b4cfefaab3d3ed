"""The model kinds: each resolved config type with its model class and what parallel/ and the
recipe checks must know of it. Adding a model kind touches models/ and this table only.

Build under `torch.device("meta")` to defer allocation; the models initialise themselves when
built on a real device."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from longtrain.models.hybrid import HybridConfig, HybridModel
from longtrain.models.mla import MLAConfig, MLATransformer
from longtrain.models.transformer import Transformer, TransformerConfig


@dataclass(frozen=True)
class ModelKind:
    name: str
    config_type: type
    model_type: type
    # Context-parallel shards must be contiguous pieces of the sequence (Mamba's scans pass their
    # state from one shard to the next), so zigzag layouts do not apply.
    contiguous_sequence: bool = False


KINDS = (
    ModelKind("transformer", TransformerConfig, Transformer),
    ModelKind("mla", MLAConfig, MLATransformer),
    ModelKind("hybrid", HybridConfig, HybridModel, contiguous_sequence=True),
)


def kind_of(cfg) -> ModelKind:
    """The kind of a resolved model config (by its exact type)."""
    for kind in KINDS:
        if type(cfg) is kind.config_type:
            return kind
    raise TypeError(f"no model kind for a config of type {type(cfg).__name__}")


def build_model(cfg) -> nn.Module:
    return kind_of(cfg).model_type(cfg)
