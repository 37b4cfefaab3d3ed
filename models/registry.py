"""One entry point from a resolved model config to the model: TransformerConfig -> Transformer,
HybridConfig -> HybridModel, MLAConfig -> MLATransformer. Build under `torch.device("meta")` to defer allocation; the models
initialise themselves when built on a real device."""
from __future__ import annotations

from torch import nn

from longtrain.models.hybrid import HybridConfig, HybridModel
from longtrain.models.mla import MLAConfig, MLATransformer
from longtrain.models.transformer import Transformer, TransformerConfig


def build_model(cfg) -> nn.Module:
    if isinstance(cfg, HybridConfig):
        return HybridModel(cfg)
    if isinstance(cfg, MLAConfig):  # before TransformerConfig: an MLAConfig is one
        return MLATransformer(cfg)
    if isinstance(cfg, TransformerConfig):
        return Transformer(cfg)
    raise TypeError(f"build_model: no model for a config of type {type(cfg).__name__}")
