"""Hugging Face DeepSeek-V3 checkpoints (dense layers): import into and export from MLATransformer.

Names (HF -> ours), per layer N:

    self_attn.q_proj                 attention.wq          (q_lora_rank null)
    self_attn.q_a_proj / q_a_layernorm / q_b_proj
                                     attention.wq_a / q_norm / wq_b
    self_attn.kv_a_proj_with_mqa     attention.wkv_a
    self_attn.kv_a_layernorm         attention.kv_norm
    self_attn.kv_b_proj              attention.wkv_b
    self_attn.o_proj                 attention.wo
    mlp.gate_proj / up_proj / down_proj   feed_forward.w1 / w3 / w2
    input_layernorm / post_attention_layernorm   attention_norm / ffn_norm
    model.embed_tokens, model.norm, lm_head      tok_embeddings, norm, output

RoPE layout: with `rope_interleave: true` (DeepSeek's layout, transformers' default) the RoPE rows
of q (the last qk_rope_head_dim rows of every head) and of kv_a_proj_with_mqa (its last rows) hold
interleaved pairs (x0, x1), (x2, x3)...; we use rotate-half, so import reorders those rows evens
first, then odds (transformers' own interleaved rotation is exactly that), and export writes them
back interleaved with `rope_interleave: true`. Exact: a permutation of rows shared by q and k.

Only dense layers: a layer at or past `first_k_dense_replace` is a mixture-of-experts layer and
is refused with one line. Errors name the file and the key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from longtrain.models.hf import (CONFIG_NAME, DEFAULT_MAX_SHARD_BYTES, _DTYPE_NAMES, _full_cpu, _is_nonempty_dir,
                                 _weight_files, complete_state, read_hf_config, write_hf_directory)
from longtrain.models.mla import MLAConfig, MLATransformer, yarn_mscale
from longtrain.models.transformer import RopeScaling

_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.q_a_proj": "attention.wq_a",
    "self_attn.q_a_layernorm": "attention.q_norm",
    "self_attn.q_b_proj": "attention.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attention.wkv_a",
    "self_attn.kv_a_layernorm": "attention.kv_norm",
    "self_attn.kv_b_proj": "attention.wkv_b",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_REV = {v: k for k, v in _LAYER.items()}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_TOP_REV = {v: k for k, v in _TOP.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_OURS_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")


def hf_to_ours_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m is None or m.group(2) not in _LAYER:
        return None
    return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"


def ours_to_hf_name(name: str) -> str | None:
    if name in _TOP_REV:
        return _TOP_REV[name]
    m = _OURS_LAYER_RE.match(name)
    if m is None or m.group(2) not in _LAYER_REV:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_REV[m.group(2)]}.weight"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _rope_from_hf(hf: Mapping[str, Any], source: str, max_pos: int) -> tuple[float, RopeScaling, float, float]:
    """(theta, RopeScaling, mscale, mscale_all_dim) from either config layout."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    theta = float(params.get("rope_theta", hf.get("rope_theta")) or 10000.0)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, RopeScaling(), 0.0, 0.0
    if kind != "yarn":
        raise ValueError(f"{source}: {key}.rope_type: {kind!r} is not supported for DeepSeek-V3 (default, yarn)")
    if params.get("truncate") is False:
        raise ValueError(f"{source}: {key}.truncate=false: untruncated YaRN correction ranges are not supported")
    orig = int(params.get("original_max_position_embeddings") or max_pos)
    factor = float(params.get("factor") or max_pos / orig)
    scaling = RopeScaling(type="yarn", factor=factor, original_max_position=orig,
                          beta_fast=float(params.get("beta_fast") or 32.0),
                          beta_slow=float(params.get("beta_slow") or 1.0))
    mscale, mscale_all_dim = float(params.get("mscale") or 0.0), float(params.get("mscale_all_dim") or 0.0)
    if params.get("attention_factor") is not None:
        probe = MLAConfig(rope_scaling=scaling, rope_mscale=mscale, rope_mscale_all_dim=mscale_all_dim)
        ours = probe.rope_magnitude() or yarn_mscale(factor)
        if abs(float(params["attention_factor"]) - ours) > 1e-9:
            raise ValueError(f"{source}: {key}.attention_factor: {params['attention_factor']} differs from the "
                             f"{ours} that mscale/mscale_all_dim give; an explicit one is not supported")
    return theta, scaling, mscale, mscale_all_dim


def config_from_hf(hf_config: Mapping[str, Any], source: str = CONFIG_NAME) -> MLAConfig:
    hf = dict(hf_config)
    if hf.get("model_type") not in (None, "deepseek_v3"):
        raise ValueError(f"{source}: model_type: {hf.get('model_type')!r} is not 'deepseek_v3'")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if hf.get(key) is None:
            raise ValueError(f"{source}: {key} is missing")
    n_layers, n_heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    dense = hf.get("first_k_dense_replace")
    dense = 3 if dense is None else int(dense)  # transformers' default
    if dense < n_layers:
        raise ValueError(f"{source}: first_k_dense_replace: layers {dense}..{n_layers - 1} are mixture-of-experts "
                         f"layers (num_hidden_layers={n_layers}); only dense DeepSeek-V3 layers are supported")
    n_kv = hf.get("num_key_value_heads")
    if n_kv is not None and int(n_kv) != n_heads:
        raise ValueError(f"{source}: num_key_value_heads: {n_kv} differs from num_attention_heads={n_heads}; "
                         "MLA has one key/value head per query head")
    if hf.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias: biases are not supported")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act: {hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU) is")
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    theta, scaling, mscale, mscale_all_dim = _rope_from_hf(hf, source, max_pos)
    return MLAConfig(
        vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_heads, ffn_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=max_pos,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range") or 0.02),
        q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
        v_head_dim=int(hf["v_head_dim"]), rope_mscale=mscale, rope_mscale_all_dim=mscale_all_dim)


def config_to_hf(cfg: MLAConfig, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    dtype_name = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    s = cfg.rope_scaling
    if s.type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": float(cfg.rope_theta), "factor": float(s.factor),
                "original_max_position_embeddings": int(s.original_max_position), "beta_fast": float(s.beta_fast),
                "beta_slow": float(s.beta_slow)}
        if cfg.rope_mscale:
            rope["mscale"] = float(cfg.rope_mscale)
        if cfg.rope_mscale_all_dim:
            rope["mscale_all_dim"] = float(cfg.rope_mscale_all_dim)
    elif s.type != "none":
        raise ValueError(f"model.rope_scaling.type: {s.type!r} cannot be written as a DeepSeek-V3 config "
                         "(default or yarn)")
    if cfg.latent_norm_eps != 1e-6:
        raise ValueError(f"model.latent_norm_eps: {cfg.latent_norm_eps}: DeepSeek-V3 fixes its latent norms' eps at 1e-6")
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "first_k_dense_replace": cfg.n_layers,  # every layer dense
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope, "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0,
        "use_cache": True, "torch_dtype": dtype_name, "dtype": dtype_name,
    }


# ----------------------------------------------------------------------------------------------
# RoPE rows: interleaved (DeepSeek) <-> rotate-half (ours)
# ----------------------------------------------------------------------------------------------
def _deinterleave(rope_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def _permute_rope_rows(name: str, t: torch.Tensor, cfg: MLAConfig, to_ours: bool) -> torch.Tensor:
    """Reorder the RoPE rows of q (per head) and of wkv_a (its last rows); other tensors as they are."""
    perm = _deinterleave(cfg.qk_rope_head_dim)
    if not to_ours:
        perm = torch.argsort(perm)
    if name.endswith(("attention.wq.weight", "attention.wq_b.weight")):
        heads = t.view(cfg.n_heads, cfg.qk_head_dim, -1)
        heads = torch.cat([heads[:, : cfg.qk_nope_head_dim], heads[:, cfg.qk_nope_head_dim:][:, perm]], dim=1)
        return heads.reshape(t.shape).contiguous()
    if name.endswith("attention.wkv_a.weight"):
        return torch.cat([t[: cfg.kv_lora_rank], t[cfg.kv_lora_rank:][perm]]).contiguous()
    return t


def expected_shapes(cfg: MLAConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MLATransformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


# ----------------------------------------------------------------------------------------------
# Import / export
# ----------------------------------------------------------------------------------------------
def load_hf_deepseek(path: str | os.PathLike) -> tuple[MLAConfig, dict[str, torch.Tensor]]:
    """A Hugging Face DeepSeek-V3 checkpoint directory (dense layers) -> (MLAConfig, our state dict)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a checkpoint directory")
    config_path, hf_config = read_hf_config(root)
    cfg = config_from_hf(hf_config, source=str(config_path))
    interleaved = hf_config.get("rope_interleave", True) is not False
    files, listing = _weight_files(root)
    shapes = expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for hf_name, file in files.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        ours = hf_to_ours_name(hf_name)
        if ours is None or ours not in shapes:
            moe = re.search(r"\.mlp\.(experts|gate|shared_experts)\.", hf_name)
            unexpected.append(f"{hf_name} (a mixture-of-experts tensor: only dense layers are supported)" if moe
                              else hf_name)
            continue
        if ours == "output.weight" and cfg.tie_embeddings:
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(hf_name)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
        if tuple(tensor.shape) != shapes[ours]:
            raise ValueError(f"{file}: {hf_name}: shape {tuple(tensor.shape)} does not match {shapes[ours]} expected "
                             f"from {config_path.name} (MLA dims inconsistent with the checkpoint)")
        state[ours] = _permute_rope_rows(ours, tensor, cfg, to_ours=True) if interleaved else tensor
    if unexpected:
        raise ValueError(f"{listing}: unexpected tensors: {', '.join(sorted(unexpected)[:4])}"
                         + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""))
    return cfg, complete_state(state, shapes, cfg.tie_embeddings, lambda missing: (
        f"{listing}: missing tensors: {', '.join(ours_to_hf_name(m) or m for m in missing)}"))


def check_same_architecture(model_cfg: MLAConfig, cfg: MLAConfig, source: str) -> None:
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "norm_eps", "rope_theta", "rope_scaling",
              "tie_embeddings", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "rope_mscale", "rope_mscale_all_dim")
    diffs = [f"{f}: model {getattr(model_cfg, f)!r} vs checkpoint {getattr(cfg, f)!r}" for f in fields
             if getattr(model_cfg, f) != getattr(cfg, f)]
    if diffs:
        raise ValueError(f"{source}: checkpoint does not match the model's config: " + "; ".join(diffs))


def load_into_mla_model(model: MLATransformer, path: str | os.PathLike) -> MLAConfig:
    cfg, state = load_hf_deepseek(path)
    check_same_architecture(model.cfg, cfg, str(Path(path) / CONFIG_NAME))
    model.load_state_dict(state, strict=True)
    return cfg


def model_from_hf_deepseek(path: str | os.PathLike) -> MLATransformer:
    cfg, state = load_hf_deepseek(path)
    model = MLATransformer(cfg)
    model.load_state_dict(state, strict=True)
    return model


def save_hf_deepseek(state_dict: Mapping[str, torch.Tensor], cfg: MLAConfig, path: str | os.PathLike,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Our (full) MLATransformer state dict -> a DeepSeek-V3 checkpoint directory (all layers
    dense, RoPE rows interleaved), written atomically as models.hf.save_hf_checkpoint does."""
    dest = Path(path)
    if _is_nonempty_dir(dest) and not overwrite:
        raise FileExistsError(f"{dest}: exists and is not empty; pass overwrite=True to replace it")
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(state_dict) - ({"output.weight"} if cfg.tie_embeddings else set()))
    unexpected = sorted(set(state_dict) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the MLA config: missing {missing}, unexpected {unexpected}")
    tensors: dict[str, torch.Tensor] = {}
    for ours in shapes:
        if ours == "output.weight" and cfg.tie_embeddings:
            continue
        t = _full_cpu(state_dict[ours])
        if tuple(t.shape) != shapes[ours]:
            raise ValueError(f"state dict: {ours}: shape {tuple(t.shape)} does not match {shapes[ours]}")
        t = _permute_rope_rows(ours, t, cfg, to_ours=False)
        t = t.to(dtype) if dtype is not None else t.clone()
        tensors[ours_to_hf_name(ours)] = t
    out_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    return write_hf_directory(tensors, config_to_hf(cfg, out_dtype), dest, max_shard_bytes, overwrite)
