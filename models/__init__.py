"""Single-device model code. `build_model(cfg)` picks the model class for a resolved config."""


def build_model(cfg):
    """TransformerConfig -> Transformer, HybridConfig -> HybridModel (see models/registry.py)."""
    from longtrain.models.registry import build_model as _build

    return _build(cfg)
