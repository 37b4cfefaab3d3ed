"""Hugging Face Llama checkpoints: import into and export from our `Transformer`.

A Hugging Face Llama checkpoint is a directory with `config.json` and either one
`model.safetensors` or a sharded set described by `model.safetensors.index.json`. The weights map
one to one onto ours (both use the rotate-half RoPE convention, so q/k need no permutation), except
that our Q, K and V projections are one fused tensor, its rows grouped per KV head
(models.transformer.fuse_qkv; import fuses, export splits):

    model.embed_tokens.weight                        tok_embeddings.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight     layers.N.attention.wqkv.weight (fused)
    model.layers.N.self_attn.o_proj.weight           layers.N.attention.wo.weight
    model.layers.N.mlp.gate_proj.weight              layers.N.feed_forward.w1.weight
    model.layers.N.mlp.up_proj.weight                layers.N.feed_forward.w3.weight
    model.layers.N.mlp.down_proj.weight              layers.N.feed_forward.w2.weight
    model.layers.N.input_layernorm.weight            layers.N.attention_norm.weight
    model.layers.N.post_attention_layernorm.weight   layers.N.ffn_norm.weight
    model.norm.weight                                norm.weight
    lm_head.weight                                   output.weight (absent when tied)

Both the transformers<5 config layout (`rope_theta` + `rope_scaling`) and the transformers>=5 one
(`rope_parameters` holding `rope_type` and `rope_theta`) are read; exports write both so either
generation of transformers loads them.

Functions take and return full (unsharded, CPU) state dicts; gather a parallel model's state dict
before exporting. Errors name the file and the key at fault.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from longtrain.models.ladder import is_ladder
from longtrain.models.transformer import RopeScaling, Transformer, TransformerConfig, fuse_qkv, split_qkv

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's conventional "5GB"

# LlamaConfig defaults for the keys a config.json may leave out.
_HF_DEFAULTS = {
    "num_key_value_heads": None,  # -> num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

_LAYER_RE = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj|input_layernorm|"
    r"post_attention_layernorm)\.weight$"
)
# q/k/v map to per-projection names (attention.wq/wk/wv) that exist only between the file and
# the fused attention.wqkv (_fuse_layers / _split_layers).
_HF_TO_OURS_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_OURS_TO_HF_LAYER = {v: k for k, v in _HF_TO_OURS_LAYER.items()}
_OURS_LAYER_RE = re.compile(r"^layers\.(\d+)\.(" + "|".join(re.escape(k) for k in _OURS_TO_HF_LAYER) + r")\.weight$")
_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_TOP_LEVEL_REV = {v: k for k, v in _TOP_LEVEL.items()}

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------
def hf_to_ours_name(name: str) -> str | None:
    """A Hugging Face Llama tensor name -> ours, or None when it is not a Llama weight."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return f"layers.{m.group(1)}.{_HF_TO_OURS_LAYER[m.group(2)]}.weight"


def ours_to_hf_name(name: str) -> str | None:
    """One of our parameter names -> the Hugging Face Llama name, or None when unknown."""
    if name in _TOP_LEVEL_REV:
        return _TOP_LEVEL_REV[name]
    m = _OURS_LAYER_RE.match(name)
    if m is None:
        return None
    return f"model.layers.{m.group(1)}.{_OURS_TO_HF_LAYER[m.group(2)]}.weight"


_UNFUSED = ("wq", "wk", "wv")


def expected_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape for `cfg`, `output.weight` included even when tied."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in _unfused_shapes(cfg).items():
        layer, _, rest = name.rpartition(".attention.")
        if rest == "wq.weight":  # the three projections become one, in wq's place
            shapes[f"{layer}.attention.wqkv.weight"] = ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim)
        elif rest not in ("wk.weight", "wv.weight"):
            shapes[name] = shape
    return shapes


def _fuse_layers(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> None:
    """Per-projection attention.wq/wk/wv tensors -> attention.wqkv, in place."""
    for i in range(cfg.n_layers):
        p = f"layers.{i}.attention."
        state[p + "wqkv.weight"] = fuse_qkv(*(state.pop(f"{p}{w}.weight") for w in _UNFUSED), cfg.n_kv_heads)


def _split_layers(state: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """attention.wqkv -> per-projection attention.wq/wk/wv, in the file's order."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".attention.wqkv.weight"):
            p = name.removesuffix("wqkv.weight")
            parts = split_qkv(tensor, cfg.n_heads, cfg.n_kv_heads)
            out.update({f"{p}{w}.weight": t.contiguous() for w, t in zip(_UNFUSED, parts)})
        else:
            out[name] = tensor
    return out


def _unfused_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """As a Hugging Face file holds them, in our names: Q, K and V projections separate."""
    hd = cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (cfg.n_heads * hd, cfg.dim)
        shapes[p + "attention.wk.weight"] = (cfg.n_kv_heads * hd, cfg.dim)
        shapes[p + "attention.wv.weight"] = (cfg.n_kv_heads * hd, cfg.dim)
        shapes[p + "attention.wo.weight"] = (cfg.dim, cfg.n_heads * hd)
        shapes[p + "attention_norm.weight"] = (cfg.dim,)
        shapes[p + "ffn_norm.weight"] = (cfg.dim,)
        shapes[p + "feed_forward.w1.weight"] = (cfg.ffn_dim, cfg.dim)
        shapes[p + "feed_forward.w3.weight"] = (cfg.ffn_dim, cfg.dim)
        shapes[p + "feed_forward.w2.weight"] = (cfg.dim, cfg.ffn_dim)
    shapes["norm.weight"] = (cfg.dim,)
    shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_from_hf(hf: Mapping[str, Any], source: str, max_pos: int) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from either config layout."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if not params:
        params, key = hf.get("rope_scaling"), "rope_scaling"
    params = dict(params or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{source}: {key}: per-layer-type RoPE parameters ({', '.join(params)}) are not "
                         "supported by the Llama import")
    theta = params.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    if theta is None:
        theta = _HF_DEFAULTS["rope_theta"]
    theta = float(theta)
    prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={prf}: partial rotary embeddings are not supported")
    kind = params.get("rope_type", params.get("type")) or "default"

    def need(name):
        if params.get(name) is None:
            raise ValueError(f"{source}: {key}.{name} is required for rope_type {kind!r}")
        return params[name]

    orig = params.get("original_max_position_embeddings")
    orig = int(orig) if orig is not None else max_pos
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(need("factor")))
    if kind == "llama3":
        scaling = RopeScaling(type="llama3", factor=float(need("factor")), original_max_position=orig,
                              low_freq_factor=float(need("low_freq_factor")),
                              high_freq_factor=float(need("high_freq_factor")))
        return theta, scaling
    if kind == "yarn":
        factor = params.get("factor")
        factor = float(factor) if factor is not None else max_pos / orig  # as transformers does
        if params.get("truncate") is False:
            raise ValueError(f"{source}: {key}.truncate=false: untruncated YaRN correction ranges are not supported")
        expected = _yarn_mscale(factor)
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        if attention_factor is not None and abs(float(attention_factor) - expected) > 1e-9:
            raise ValueError(f"{source}: {key}: a YaRN attention factor of {attention_factor} (from "
                             "attention_factor / mscale / mscale_all_dim) is not supported; only the default "
                             f"0.1*ln(factor)+1 = {expected} is")
        scaling = RopeScaling(type="yarn", factor=factor, original_max_position=orig,
                              beta_fast=float(params.get("beta_fast") or 32.0),
                              beta_slow=float(params.get("beta_slow") or 1.0))
        return theta, scaling
    raise ValueError(f"{source}: {key}.rope_type: unsupported RoPE type {kind!r} "
                     "(supported: default, linear, llama3, yarn)")


def config_from_hf(hf_config: Mapping[str, Any], source: str = CONFIG_NAME) -> TransformerConfig:
    """A Hugging Face Llama config.json (as a dict) -> TransformerConfig. Raises ValueError naming
    `source` and the key for anything our model cannot reproduce exactly."""
    hf = dict(hf_config)
    model_type = hf.get("model_type")
    if model_type is not None and model_type != "llama":
        raise ValueError(f"{source}: model_type: {model_type!r} is not supported; only 'llama' checkpoints are")
    for key in _REQUIRED_KEYS:
        if hf.get(key) is None:
            raise ValueError(f"{source}: {key} is missing")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if dim % n_heads:
        raise ValueError(f"{source}: hidden_size: {dim} does not divide into num_attention_heads={n_heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise ValueError(f"{source}: head_dim: {head_dim} differs from hidden_size/num_attention_heads = "
                         f"{dim // n_heads}; a decoupled head dimension is not supported")
    n_kv = hf.get("num_key_value_heads")
    n_kv = n_heads if n_kv is None else int(n_kv)
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"{source}: num_key_value_heads: {n_kv} does not divide num_attention_heads={n_heads}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{source}: {key}: biases are not supported (the model has bias-free projections)")
    act = hf.get("hidden_act", _HF_DEFAULTS["hidden_act"])
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act: {act!r} is not supported; only 'silu' (SwiGLU) is")
    if (dim // n_heads) % 2:
        raise ValueError(f"{source}: hidden_size: head dimension {dim // n_heads} must be even for RoPE")

    def get(key):
        value = hf.get(key)
        return _HF_DEFAULTS[key] if value is None else value

    max_pos = int(get("max_position_embeddings"))
    theta, scaling = _rope_from_hf(hf, source, max_pos)
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_dim=int(hf["intermediate_size"]),
        norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_pos,
        tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=float(get("initializer_range")),
    )


def _rope_params_to_hf(cfg: TransformerConfig) -> dict[str, Any] | None:
    s = cfg.rope_scaling
    if s.type == "none":
        return None
    if s.type == "linear":
        return {"rope_type": "linear", "factor": float(s.factor)}
    if s.type == "llama3":
        return {"rope_type": "llama3", "factor": float(s.factor), "low_freq_factor": float(s.low_freq_factor),
                "high_freq_factor": float(s.high_freq_factor),
                "original_max_position_embeddings": int(s.original_max_position)}
    if s.type == "yarn":
        return {"rope_type": "yarn", "factor": float(s.factor), "beta_fast": float(s.beta_fast),
                "beta_slow": float(s.beta_slow), "original_max_position_embeddings": int(s.original_max_position)}
    raise ValueError(f"model.rope_scaling.type: unknown RoPE scaling {s.type!r}")


def config_to_hf(cfg: TransformerConfig, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    """TransformerConfig -> a LlamaConfig dict for config.json. Carries the RoPE settings both as
    `rope_theta` + `rope_scaling` (transformers<5) and as `rope_parameters` (transformers>=5)."""
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"model: dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads} do not "
                         "describe a valid Llama attention layout")
    if is_ladder(cfg):  # the same tensors would compute another function in LlamaForCausalLM
        raise ValueError("model.residual: a ladder model has no Hugging Face Llama equivalent; it cannot be exported")
    dtype_name = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    scaling = _rope_params_to_hf(cfg)
    rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if scaling is not None:
        rope_parameters = {**scaling, "rope_theta": float(cfg.rope_theta)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def _weight_files(root: Path) -> tuple[dict[str, Path], Path]:
    """HF tensor name -> file holding it, and the file that lists them (for messages)."""
    single, index = root / WEIGHTS_NAME, root / INDEX_NAME
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: single for k in f.keys()}, single
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{single}: not a readable safetensors file: {e}") from None
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: weight_map is missing or empty")
        files: dict[str, Path] = {}
        for name, shard in weight_map.items():
            shard_path = root / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{shard_path}: shard listed in {index} for {name!r} does not exist")
            files[name] = shard_path
        return files, index
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(others)}; convert it to safetensors first)" if others else ""
    raise FileNotFoundError(f"{root}: no weights: neither {WEIGHTS_NAME} nor {INDEX_NAME} exists{hint}")


def read_hf_config(root: Path) -> tuple[Path, dict]:
    """config.json of a Hugging Face checkpoint directory, as a dict; errors name the file."""
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; a Hugging Face checkpoint needs {CONFIG_NAME}")
    hf_config = _read_json(config_path)
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    return config_path, hf_config


def complete_state(state: dict[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], tie_embeddings: bool,
                   missing_message) -> dict[str, torch.Tensor]:
    """The imported tensors in `shapes`' order, the output head taken from the embedding when tied;
    raises ValueError(missing_message(sorted missing names)) when any expected tensor is absent."""
    if tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ValueError(missing_message(missing))
    return {name: state[name] for name in shapes}


def load_hf_checkpoint(path: str | os.PathLike) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama checkpoint directory -> (config, state dict in our names).

    The state dict matches `Transformer(cfg).state_dict()` key for key, with `output.weight` the
    same tensor as `tok_embeddings.weight` when the embeddings are tied. Tensors keep the file's
    dtype. Raises FileNotFoundError / ValueError naming the file at fault."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: checkpoint directory does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory; expected a Hugging Face checkpoint directory")
    config_path, hf_config = read_hf_config(root)
    cfg = config_from_hf(hf_config, source=str(config_path))
    files, listing = _weight_files(root)
    shapes = _unfused_shapes(cfg)

    wanted: dict[Path, list[tuple[str, str]]] = {}
    unexpected: list[str] = []
    for hf_name, file in files.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old exports carry; recomputed from the config
        ours = hf_to_ours_name(hf_name)
        if ours is None or ours not in shapes:
            unexpected.append(f"{hf_name} (in {file.name})")
            continue
        if ours == "output.weight" and cfg.tie_embeddings:
            continue  # tied: the head is the embedding, as transformers does
        wanted.setdefault(file, []).append((hf_name, ours))
    if unexpected:
        raise ValueError(f"{listing}: unexpected tensors for a {cfg.n_layers}-layer Llama: "
                         f"{', '.join(sorted(unexpected))}")
    found = {ours for items in wanted.values() for _, ours in items}
    required = set(shapes) - ({"output.weight"} if cfg.tie_embeddings else set())
    missing = sorted(required - found)
    if missing:
        names = ", ".join(ours_to_hf_name(m) or m for m in missing)
        raise ValueError(f"{listing}: missing tensors: {names}")

    state: dict[str, torch.Tensor] = {}
    for file, items in wanted.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                for hf_name, ours in items:
                    if hf_name not in present:
                        raise ValueError(f"{file}: tensor {hf_name!r} listed in {listing.name} is not in the file")
                    tensor = f.get_tensor(hf_name)
                    if tuple(tensor.shape) != shapes[ours]:
                        raise ValueError(f"{file}: {hf_name}: shape {tuple(tensor.shape)} does not match "
                                         f"{shapes[ours]} expected from {config_path.name}")
                    state[ours] = tensor
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    _fuse_layers(state, cfg)
    ordered = {name: state[name] for name in expected_shapes(cfg)}
    return cfg, ordered


_ROPE_FIELDS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow"),
}


def _rope_signature(s: RopeScaling) -> tuple:
    return (s.type,) + tuple(getattr(s, f) for f in _ROPE_FIELDS.get(s.type, ("factor",)))


def check_same_architecture(model_cfg: TransformerConfig, cfg: TransformerConfig, source: str):
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta",
              "rope_scaling", "tie_embeddings")
    def norm(field, value):  # only the RoPE fields the scaling type uses take part
        return _rope_signature(value) if field == "rope_scaling" else value

    diffs = [f"{f}: model {getattr(model_cfg, f)!r} vs checkpoint {getattr(cfg, f)!r}" for f in fields
             if norm(f, getattr(model_cfg, f)) != norm(f, getattr(cfg, f))]
    if is_ladder(model_cfg) and not is_ladder(cfg):  # a Hugging Face Llama is a standard model
        diffs.append("model.residual: the model is a ladder model, the checkpoint a standard Llama (convert it: "
                     "longtrain convert DIR --ladder-layers K --out CKPT, then checkpoint.init_from=CKPT)")
    if diffs:
        raise ValueError(f"{source}: checkpoint does not match the model's config: " + "; ".join(diffs))


def load_into_model(model: Transformer, path: str | os.PathLike) -> TransformerConfig:
    """Load a Hugging Face Llama checkpoint into a full (single-device, unsharded) model with
    strict name/shape checking; the model's config must describe the same architecture (RoPE and
    norm epsilon included, since a mismatch there would silently change the outputs). Returns the
    checkpoint's config."""
    cfg, state = load_hf_checkpoint(path)
    config_path = str(Path(path) / CONFIG_NAME)
    model_cfg = getattr(model, "cfg", None)
    if model_cfg is not None:
        check_same_architecture(model_cfg, cfg, config_path)
    # Checked here as well because load_state_dict(strict=True) lets keys of a submodule that
    # was set to None (a pipeline stage's missing norm/head) pass silently.
    model_keys = set(model.state_dict())
    missing, unexpected = sorted(set(state) - model_keys), sorted(model_keys - set(state))
    if missing or unexpected:
        parts = ([f"the model has no {', '.join(missing)}"] if missing else []) + \
                ([f"the checkpoint has no {', '.join(unexpected)}"] if unexpected else [])
        raise ValueError(f"{path}: cannot load the checkpoint into {type(model).__name__} (a full, unsharded "
                         f"model is required): " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: cannot load the checkpoint into {type(model).__name__} (a full, unsharded "
                         f"model is required): {e}") from None
    return cfg


def model_from_hf(path: str | os.PathLike, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Transformer:
    """Build our Transformer from a Hugging Face Llama checkpoint directory."""
    cfg, state = load_hf_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device or "cpu")
    if cfg.tie_embeddings:  # to_empty gives each module its own tensor; tie again
        model.output.weight = model.tok_embeddings.weight
    model.load_state_dict(state, strict=True)
    model.reset_rope_buffers()  # RoPE buffers were left uninitialised on the meta device
    if dtype is not None:
        model.to(dtype)
    return model


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def _hf_tensors(state_dict: Mapping[str, torch.Tensor], cfg: TransformerConfig,
                dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    shapes = expected_shapes(cfg)
    required = set(shapes) - ({"output.weight"} if cfg.tie_embeddings else set())
    missing = sorted(required - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
        raise ValueError("state dict does not match the model config: " + "; ".join(parts))
    full: dict[str, torch.Tensor] = {}
    for ours in shapes:
        if ours == "output.weight" and cfg.tie_embeddings:
            continue  # tied heads are not stored, as transformers does
        tensor = _full_cpu(state_dict[ours])
        if tuple(tensor.shape) != shapes[ours]:
            raise ValueError(f"state dict: {ours}: shape {tuple(tensor.shape)} does not match {shapes[ours]} "
                             "expected from the model config")
        full[ours] = tensor
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for ours, tensor in _split_layers(full, cfg).items():
        if dtype is not None:
            tensor = tensor.to(dtype)
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[ours_to_hf_name(ours)] = tensor
    return out


def _write_json(path: Path, obj: Any):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_hf_checkpoint(state_dict: Mapping[str, torch.Tensor], cfg: TransformerConfig, path: str | os.PathLike,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, dtype: torch.dtype | None = None,
                       overwrite: bool = False) -> Path:
    """Write our (full, unsharded) state dict as a Hugging Face Llama checkpoint directory:
    config.json plus model.safetensors, or model-0000i-of-0000n.safetensors shards and
    model.safetensors.index.json when the weights exceed `max_shard_bytes`.

    Everything is written to a temporary sibling directory which is then renamed into place, so a
    failed export leaves neither a partial directory nor a damaged previous export. A non-empty
    existing `path` is refused unless overwrite=True. `dtype` casts the weights (e.g. bfloat16).
    Returns the directory."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest}: exists and is not a directory")
    if _is_nonempty_dir(dest) and not overwrite:
        raise FileExistsError(f"{dest}: exists and is not empty; pass overwrite=True to replace it")
    tensors = _hf_tensors(state_dict, cfg, dtype)  # validates before anything touches the disk
    out_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    return write_hf_directory(tensors, config_to_hf(cfg, out_dtype), dest, max_shard_bytes, overwrite)


def write_hf_directory(tensors: dict[str, torch.Tensor], config: dict, dest: Path, max_shard_bytes: int,
                       overwrite: bool) -> Path:
    """config.json and the safetensors file(s) of `tensors` (Hugging Face names) into `dest`,
    atomically: written to a temporary sibling directory, then renamed into place (a previous
    export moves aside and comes back on failure)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        _write_json(tmp / CONFIG_NAME, config)
        shards = _shard(tensors, max_shard_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=metadata)
            _fsync(tmp / WEIGHTS_NAME)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=metadata)
                _fsync(tmp / name)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

        # Swap into place. An existing good export moves aside first and comes back on failure.
        old = None
        if dest.exists():
            if _is_nonempty_dir(dest):
                if not overwrite:
                    raise FileExistsError(f"{dest}: exists and is not empty; pass overwrite=True to replace it")
                old = dest.parent / f".{dest.name}.old-{tag}"
                os.rename(dest, old)
            else:
                dest.rmdir()
        try:
            os.rename(tmp, dest)
        except BaseException:
            if old is not None:
                os.rename(old, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
