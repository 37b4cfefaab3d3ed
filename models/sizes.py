"""Named model sizes, and the recipe's `model` section resolved into a TransformerConfig."""
from __future__ import annotations

import dataclasses

from longtrain.models.transformer import RopeScaling, TransformerConfig

_LLAMA3_ROPE = RopeScaling(type="llama3", factor=8.0, original_max_position=8192,
                           low_freq_factor=1.0, high_freq_factor=4.0)

SIZES: dict[str, TransformerConfig] = {
    # For tests: a few tens of thousands of parameters, byte vocabulary.
    "tiny": TransformerConfig(vocab_size=260, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                              max_seq_len=1024),
    # The CPU debug job: about 3.4M parameters.
    "debug": TransformerConfig(vocab_size=260, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                               max_seq_len=4096),
    "llama-150m": TransformerConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                                    ffn_dim=2048, max_seq_len=8192, rope_theta=500000.0),
    "llama-1b": TransformerConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                  ffn_dim=8192, max_seq_len=131072, rope_theta=500000.0,
                                  rope_scaling=_LLAMA3_ROPE, tie_embeddings=True),
    "llama3-8b": TransformerConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                   ffn_dim=14336, max_seq_len=131072, rope_theta=500000.0,
                                   rope_scaling=_LLAMA3_ROPE),
    "llama3-70b": TransformerConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                    ffn_dim=28672, max_seq_len=131072, rope_theta=500000.0,
                                    rope_scaling=_LLAMA3_ROPE),
}

_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta",
           "max_seq_len", "tie_embeddings", "init_std")


def resolve_model_config(model_section) -> TransformerConfig:
    """The recipe's `model` section (launcher.config.ModelConfig) -> TransformerConfig. A named size
    gives the defaults; explicit fields override. Raises ValueError naming the key."""
    if model_section.kind != "transformer":
        raise ValueError(f"model.kind: {model_section.kind!r} models are not implemented yet; use transformer")
    if model_section.name is not None:
        if model_section.name not in SIZES:
            import difflib

            close = difflib.get_close_matches(model_section.name, list(SIZES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"model.name: unknown size {model_section.name!r}{hint}; known: {', '.join(SIZES)}")
        cfg = dataclasses.replace(SIZES[model_section.name])
    else:
        cfg = TransformerConfig()
    for key in _FIELDS:
        value = getattr(model_section, key)
        if value is not None:
            setattr(cfg, key, value)
    if model_section.rope_scaling is not None:
        cfg.rope_scaling = dataclasses.replace(model_section.rope_scaling)
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"model.dim: {cfg.dim} does not divide into model.n_heads={cfg.n_heads} heads")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"model.n_kv_heads: {cfg.n_kv_heads} does not divide model.n_heads={cfg.n_heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"model.dim: head dimension {cfg.head_dim} must be even for RoPE")
    return cfg
