"""Named model sizes, and the recipe's `model` section resolved into a TransformerConfig (or a
HybridConfig when model.kind is hybrid)."""
from __future__ import annotations

import dataclasses

from longtrain.models.config import ModelConfig
from longtrain.models.hybrid import HybridConfig
from longtrain.models.ladder import check_residual
from longtrain.models.mla import MLAConfig
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

# Hybrid Mamba-2 / attention / MLP stacks (models/hybrid.py), selected with model.kind=hybrid.
HYBRID_SIZES: dict[str, HybridConfig] = {
    # For tests: 6 layers in two pipeline stages, ~53k parameters; 4 Mamba heads in 2 groups (so
    # tp=2 splits whole groups) and a chunk of 16, so short sequences span several chunks.
    "hybrid-tiny": HybridConfig(vocab_size=260, dim=32, pattern="M*-|M*-", n_heads=4, n_kv_heads=2, ffn_dim=64,
                                d_state=16, d_conv=4, expand=2, mamba_headdim=16, ngroups=2, chunk_size=16,
                                max_seq_len=1024),
    # The CPU debug job: about 4.5M parameters.
    "hybrid-debug": HybridConfig(vocab_size=260, dim=256, pattern="M-M*-|M-M*-", n_heads=8, n_kv_heads=4,
                                 ffn_dim=688, d_state=64, d_conv=4, expand=2, mamba_headdim=64, ngroups=2,
                                 chunk_size=64, max_seq_len=4096),
    # In the proportions of Nemotron-H-8B (NVIDIA, 2025; its hybrid_override_pattern): 52 layers,
    # 24 Mamba-2 + 4 attention + 24 MLP, d_model 4096, 32 query / 8 KV heads, Mamba-2 with 128
    # heads of 64 (expand 2), state 128, 8 groups, conv 4. Differences: Nemotron-H's MLP is a
    # 2-matrix squared-ReLU of 21504, ours SwiGLU of 14336 (3 x 14336 = 2 x 21504: same size), and
    # its attention has no RoPE, ours does. About 8.1B parameters.
    "hybrid-8b": HybridConfig(vocab_size=131072, dim=4096,
                              pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                              n_heads=32, n_kv_heads=8, ffn_dim=14336, d_state=128, d_conv=4, expand=2,
                              mamba_headdim=64, ngroups=8, chunk_size=128, max_seq_len=8192,
                              rope_theta=500000.0),
}

# Transformers with multi-head latent attention (models/mla.py), selected with model.attention=mla.
# DeepSeek's YaRN: factor 40 over an original 4K context, with its mscale knobs.
_DEEPSEEK_YARN = RopeScaling(type="yarn", factor=40.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0)
MLA_SIZES: dict[str, MLAConfig] = {
    # For tests: 4 heads (tp=2 splits whole heads), a 16-value latent plus a 4-value RoPE key.
    "mla-tiny": MLAConfig(vocab_size=260, dim=32, n_layers=4, n_heads=4, ffn_dim=64, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=1024),
    # The CPU debug job: about 3.1M parameters; latent 64 + RoPE key 16 cached per token and layer
    # (80 values, against 2 x 4 x 32 = 256 for the GQA debug size).
    "mla-debug": MLAConfig(vocab_size=260, dim=256, n_layers=4, n_heads=8, ffn_dim=688, kv_lora_rank=64,
                           qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=4096),
    # DeepSeek-V2-Lite's attention and sizes (27 layers, d_model 2048, 16 heads, full-rank query,
    # latent 512 + RoPE 64, YaRN x40 with mscale 0.707), every layer with its dense FFN of 10944 in
    # place of the MoE (so about 2.6B parameters, not V2-Lite's 15.7B total / 2.4B active).
    "deepseek-v2-lite-dense": MLAConfig(vocab_size=102400, dim=2048, n_layers=27, n_heads=16, ffn_dim=10944,
                                        norm_eps=1e-6, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                                        qk_rope_head_dim=64, v_head_dim=128, rope_scaling=_DEEPSEEK_YARN,
                                        rope_mscale=0.707, rope_mscale_all_dim=0.707, max_seq_len=163840),
    # DeepSeek-V3's attention shapes (d_model 7168, 128 heads, low-rank query 1536, latent 512 +
    # RoPE 64, YaRN x40 with mscale 1): 61 layers with V3's dense FFN (18432), about 37B parameters.
    "deepseek-v3-attn": MLAConfig(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, ffn_dim=18432,
                                  norm_eps=1e-6, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                  qk_rope_head_dim=64, v_head_dim=128, rope_scaling=_DEEPSEEK_YARN,
                                  rope_mscale=1.0, rope_mscale_all_dim=1.0, max_seq_len=163840),
}
def _shared_fields(config_type) -> tuple[str, ...]:
    """The recipe's model keys that set a field of `config_type` directly (same name, plain value);
    rope_scaling is copied apart (a nested dataclass)."""
    recipe_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    return tuple(f.name for f in dataclasses.fields(config_type) if f.name in recipe_keys and f.name != "rope_scaling")


_FIELDS = _shared_fields(TransformerConfig)
_MLA_FIELDS = tuple(k for k in _shared_fields(MLAConfig) if k not in _FIELDS)
_HYBRID_FIELDS = _shared_fields(HybridConfig)


def _unknown_size(name: str, known: dict) -> ValueError:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(f"model.name: unknown size {name!r}{hint}; known: {', '.join(known)}")


def ffn_dim_for(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's FFN size: 2/3 of 4 x dim, times the multiplier, rounded up to a multiple."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_dim_from_multiple_of(model_section, dim: int) -> int | None:
    multiple_of = getattr(model_section, "multiple_of", None)
    multiplier = getattr(model_section, "ffn_dim_multiplier", None)
    if multiple_of is None:
        if multiplier is not None:
            raise ValueError("model.ffn_dim_multiplier: needs model.multiple_of (the FFN size is computed from both)")
        return None
    if multiple_of < 1:
        raise ValueError(f"model.multiple_of: must be at least 1, got {multiple_of}")
    if model_section.ffn_dim is not None:
        raise ValueError("model.multiple_of: give model.ffn_dim or model.multiple_of (with ffn_dim_multiplier), "
                         "not both")
    return ffn_dim_for(dim, multiple_of, multiplier)


def resolve_hybrid_config(model_section) -> HybridConfig:
    """model.kind=hybrid: a named hybrid size (HYBRID_SIZES; "tiny" and "debug" mean hybrid-tiny and
    hybrid-debug) or the HybridConfig defaults, with the explicit fields on top. n_layers follows
    from model.pattern; a given n_layers must agree."""
    name = model_section.name
    if name in ("tiny", "debug"):  # so `model.kind=hybrid` on top of a tiny/debug recipe just works
        name = f"hybrid-{name}"
    if name is not None:
        if name in SIZES:
            raise ValueError(f"model.name: {name!r} is a transformer size; with model.kind=hybrid use one of "
                             f"{', '.join(HYBRID_SIZES)} (or model.name=null and explicit fields)")
        if name not in HYBRID_SIZES:
            raise _unknown_size(name, HYBRID_SIZES)
        base = HYBRID_SIZES[name]
    else:
        base = HybridConfig()
    over = {k: getattr(model_section, k, None) for k in _HYBRID_FIELDS}
    over = {k: v for k, v in over.items() if v is not None}
    ffn = _ffn_dim_from_multiple_of(model_section, over.get("dim", base.dim))
    if ffn is not None:
        over["ffn_dim"] = ffn
    if model_section.rope_scaling is not None:
        over["rope_scaling"] = dataclasses.replace(model_section.rope_scaling)
    mla_over = {k: getattr(model_section, k, None) for k in _MLA_FIELDS}
    mla_over = {k: v for k, v in mla_over.items() if v is not None}
    if getattr(model_section, "attention", "standard") == "mla":
        if model_section.n_kv_heads is not None:
            raise ValueError("model.n_kv_heads: MLA has one key/value head per query head; leave n_kv_heads unset")
        over["n_kv_heads"] = over.get("n_heads", base.n_heads)  # the heads the cp strategies see
        probe = dataclasses.replace(base, **over)
        over["mla"] = MLAConfig(dim=probe.dim, n_heads=probe.n_heads, n_layers=probe.n_layers, norm_eps=probe.norm_eps,
                                rope_theta=probe.rope_theta, rope_scaling=probe.rope_scaling,
                                max_seq_len=probe.max_seq_len, **mla_over)
    elif mla_over:
        raise ValueError(f"model.{next(iter(mla_over))}: an MLA key, but model.attention is standard; "
                         "set model.attention=mla")
    cfg = dataclasses.replace(base, **over)  # validates (ValueError naming model.<key>)
    if model_section.n_layers is not None and model_section.n_layers != cfg.n_layers:
        raise ValueError(f"model.n_layers: {model_section.n_layers} does not match the {cfg.n_layers} layers of "
                         f"model.pattern {cfg.pattern!r}; leave n_layers unset for hybrids")
    return cfg


def resolve_model_config(model_section) -> TransformerConfig | HybridConfig:
    """The recipe's `model` section (launcher.config.ModelConfig) -> TransformerConfig, or
    HybridConfig when model.kind is hybrid. A named size gives the defaults; explicit fields
    override. Raises ValueError naming the key."""
    if model_section.kind == "hybrid":
        return resolve_hybrid_config(model_section)
    if getattr(model_section, "attention", "standard") == "mla":
        return resolve_mla_config(model_section)
    if model_section.name in MLA_SIZES:
        raise ValueError(f"model.attention: {model_section.name!r} is an MLA size; set model.attention=mla")
    mla_keys = [k for k in _MLA_FIELDS if getattr(model_section, k, None) is not None]
    if mla_keys:
        raise ValueError(f"model.{mla_keys[0]}: an MLA key, but model.attention is standard; set model.attention=mla")
    if model_section.name in HYBRID_SIZES:
        raise ValueError(f"model.kind: {model_section.name!r} is a hybrid size; set model.kind=hybrid")
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
    ffn = _ffn_dim_from_multiple_of(model_section, cfg.dim)
    if ffn is not None:
        cfg.ffn_dim = ffn
    if model_section.rope_scaling is not None:
        cfg.rope_scaling = dataclasses.replace(model_section.rope_scaling)
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"model.dim: {cfg.dim} does not divide into model.n_heads={cfg.n_heads} heads")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"model.n_kv_heads: {cfg.n_kv_heads} does not divide model.n_heads={cfg.n_heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"model.dim: head dimension {cfg.head_dim} must be even for RoPE")
    check_residual(cfg.residual, cfg.ladder_layers, cfg.n_layers)
    return cfg


def describe_model(model_section, cfg) -> str:
    """The resolved model in one line, printed at start: the named size and the fields given over
    it, then every dimension, so an override that keeps the size's other fields shows what it kept."""
    given = [k for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "multiple_of", "vocab_size", "pattern")
             if getattr(model_section, k, None) is not None]
    name = model_section.name or "defaults"
    origin = f"{name}" + (f" with {', '.join(given)} given" if given else "")
    shape = (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv, head dim "
             f"{cfg.dim // cfg.n_heads}), ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    if getattr(cfg, "pattern", None):
        shape += f", pattern {cfg.pattern}"
    return f"{origin}: {shape}, {cfg.num_params() / 1e6:,.2f}M parameters"


def resolve_mla_config(model_section) -> MLAConfig:
    """model.attention=mla: a named MLA size (MLA_SIZES; "tiny" and "debug" mean mla-tiny and
    mla-debug) or the MLAConfig defaults, with the explicit fields on top. n_kv_heads does not apply."""
    name = model_section.name
    if name in ("tiny", "debug"):
        name = f"mla-{name}"
    if name is not None:
        if name in SIZES or name in HYBRID_SIZES:
            raise ValueError(f"model.name: {name!r} is not an MLA size; with model.attention=mla use one of "
                             f"{', '.join(MLA_SIZES)} (or model.name=null and explicit fields)")
        if name not in MLA_SIZES:
            raise _unknown_size(name, MLA_SIZES)
        base = MLA_SIZES[name]
    else:
        base = MLAConfig()
    if model_section.n_kv_heads is not None:
        raise ValueError("model.n_kv_heads: MLA has one key/value head per query head (expanded from the latent); "
                         "leave n_kv_heads unset")
    over = {k: getattr(model_section, k) for k in _FIELDS + _MLA_FIELDS if k != "n_kv_heads"}
    over = {k: v for k, v in over.items() if v is not None}
    if model_section.rope_scaling is not None:
        over["rope_scaling"] = dataclasses.replace(model_section.rope_scaling)
    return dataclasses.replace(base, **over)  # validates (ValueError naming model.<key>)
