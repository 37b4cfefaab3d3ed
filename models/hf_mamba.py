"""Hugging Face Mamba2ForCausalLM checkpoints (config.json + safetensors) into a HybridModel whose
pattern is all 'M' (a Mamba-2 LM has one norm + mixer per layer, no attention or MLP layers).

Names (N: layer). transformers fuses the input projection and the convolution; they are sliced
into our per-component tensors (see models/mamba.py for why):

    backbone.embeddings.weight (or .embedding.)   tok_embeddings.weight
    backbone.layers.N.norm.weight                 layers.N.norm.weight
    backbone.layers.N.mixer.in_proj.weight        rows [z | x | B | C | dt] ->
                                                  layers.N.mixer.in_proj_{z,x,B,C,dt}.weight
    backbone.layers.N.mixer.conv1d.weight         (conv_dim, 1, k), channels [x | B | C] ->
                                                  layers.N.mixer.conv_{x,B,C}.weight (c, k)
    backbone.layers.N.mixer.conv1d.bias           layers.N.mixer.conv_{x,B,C}.bias
    backbone.layers.N.mixer.{dt_bias,A_log,D}     layers.N.mixer.{dt_bias,A_log,D}
    backbone.layers.N.mixer.norm.weight           layers.N.mixer.norm.weight
    backbone.layers.N.mixer.out_proj.weight       layers.N.mixer.out_proj.weight
    backbone.norm_f.weight                        norm.weight
    lm_head.weight                                output.weight (the embedding when tied)

Not supported (ValueError naming the key): use_bias=true (in/out projection biases), an activation
other than silu, num_heads·head_dim != expand·hidden_size. residual_in_fp32 only matters below
fp32 and is ignored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from longtrain.models.hf import CONFIG_NAME, _weight_files, complete_state, read_hf_config
from longtrain.models.hybrid import HybridConfig, HybridModel

# Mamba2Config defaults for keys a config.json may leave out.
_DEFAULTS = {
    "num_heads": 128, "head_dim": 64, "state_size": 128, "layer_norm_epsilon": 1e-5, "expand": 2,
    "conv_kernel": 4, "n_groups": 8, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
    "initializer_range": 0.1, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
    "time_step_limit": (0.0, float("inf")), "chunk_size": 256, "tie_word_embeddings": False,
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size")
_LAYER_RE = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_SIMPLE = {"norm.weight": "norm.weight", "mixer.dt_bias": "mixer.dt_bias", "mixer.A_log": "mixer.A_log",
           "mixer.D": "mixer.D", "mixer.norm.weight": "mixer.norm.weight",
           "mixer.out_proj.weight": "mixer.out_proj.weight"}


def _float(value) -> float:
    """A JSON number, or a non-finite one as written: Infinity (Python's json), "inf", or
    transformers>=5's {"__float__": "Infinity"}."""
    if isinstance(value, dict):
        value = value["__float__"]
    return float(value)


def config_from_hf_mamba2(hf_config: Mapping[str, Any], source: str = CONFIG_NAME) -> HybridConfig:
    """A Mamba2Config dict -> HybridConfig with pattern 'M' x num_hidden_layers."""
    hf = dict(hf_config)
    if hf.get("model_type") not in (None, "mamba2"):
        raise ValueError(f"{source}: model_type: {hf.get('model_type')!r} is not supported here; only 'mamba2'")
    for key in _REQUIRED:
        if hf.get(key) is None:
            raise ValueError(f"{source}: {key} is missing")

    def get(key):
        value = hf.get(key)
        return _DEFAULTS[key] if value is None else value

    if get("use_bias"):
        raise ValueError(f"{source}: use_bias: in_proj/out_proj biases are not supported")
    if get("hidden_act") not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act: {get('hidden_act')!r} is not supported; only 'silu'")
    dim, expand = int(hf["hidden_size"]), int(get("expand"))
    heads, headdim = int(get("num_heads")), int(get("head_dim"))
    if heads * headdim != expand * dim:
        raise ValueError(f"{source}: num_heads: {heads} x head_dim {headdim} != expand {expand} x hidden_size {dim}")
    n_layers = int(hf["num_hidden_layers"])
    if n_layers < 1:
        raise ValueError(f"{source}: num_hidden_layers: must be at least 1, got {n_layers}")
    limit = get("time_step_limit")
    try:
        limit = (_float(limit[0]), _float(limit[1]))
    except (TypeError, IndexError, KeyError, ValueError):
        raise ValueError(f"{source}: time_step_limit: expected [min, max], got {limit!r}") from None
    try:
        return HybridConfig(
            vocab_size=int(hf["vocab_size"]), dim=dim, pattern="M" * n_layers,
            d_state=int(get("state_size")), d_conv=int(get("conv_kernel")), expand=expand, mamba_headdim=headdim,
            ngroups=int(get("n_groups")), chunk_size=int(get("chunk_size")),
            dt_min=float(get("time_step_min")), dt_max=float(get("time_step_max")),
            dt_init_floor=float(get("time_step_floor")), dt_limit=limit, conv_bias=bool(get("use_conv_bias")),
            norm_eps=float(get("layer_norm_epsilon")), tie_embeddings=bool(get("tie_word_embeddings")),
            init_std=float(get("initializer_range")),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def expected_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes for an all-'M' HybridConfig (output.weight included)."""
    return {name: tuple(p.shape) for name, p in _meta_model(cfg).state_dict(keep_vars=True).items()}


def _meta_model(cfg: HybridConfig) -> HybridModel:
    with torch.device("meta"):
        return HybridModel(cfg)


def _split_sizes(cfg: HybridConfig):
    gn = cfg.ngroups * cfg.d_state
    return {"in_proj": [("z", cfg.d_inner), ("x", cfg.d_inner), ("B", gn), ("C", gn), ("dt", cfg.mamba_heads)],
            "conv1d": [("x", cfg.d_inner), ("B", gn), ("C", gn)]}


def load_hf_mamba2(path: str | os.PathLike) -> tuple[HybridConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Mamba2ForCausalLM directory -> (HybridConfig, state dict in our names),
    matching `HybridModel(cfg).state_dict()` key for key (output.weight is the embedding tensor
    when tied). Tensors keep the file's dtype. Errors name the file and tensor at fault."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a checkpoint directory")
    config_path, hf_config = read_hf_config(root)
    cfg = config_from_hf_mamba2(hf_config, str(config_path))
    files, listing = _weight_files(root)
    shapes = expected_shapes(cfg)
    sizes = _split_sizes(cfg)
    k = cfg.d_conv

    raw: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ValueError(f"{file}: tensor {name!r} listed in {listing.name} is not in the file")
                    raw[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file: {e}") from None

    state: dict[str, torch.Tensor] = {}
    unexpected = []

    def put(ours: str, tensor: torch.Tensor, hf_name: str):
        if ours not in shapes:
            unexpected.append(hf_name)
            return
        if tuple(tensor.shape) != shapes[ours]:
            raise ValueError(f"{files[hf_name]}: {hf_name}: shape {tuple(tensor.shape)} does not give {ours} "
                             f"{shapes[ours]} expected from {config_path.name}")
        state[ours] = tensor.contiguous()

    for name, tensor in raw.items():
        if name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
            put("tok_embeddings.weight", tensor, name)
        elif name == "backbone.norm_f.weight":
            put("norm.weight", tensor, name)
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                put("output.weight", tensor, name)
        else:
            m = _LAYER_RE.match(name)
            if m is None:
                unexpected.append(name)
                continue
            prefix, rest = f"layers.{m.group(1)}.", m.group(2)
            if rest in _SIMPLE:
                put(prefix + _SIMPLE[rest], tensor, name)
            elif rest in ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias"):
                kind = "in_proj" if "in_proj" in rest else "conv1d"
                parts = sizes[kind]
                total = sum(s for _, s in parts)
                if tensor.shape[0] != total:
                    raise ValueError(f"{files[name]}: {name}: {tensor.shape[0]} rows, expected {total} from "
                                     f"{config_path.name}")
                if rest == "mixer.conv1d.weight":
                    if tuple(tensor.shape[1:]) != (1, k):
                        raise ValueError(f"{files[name]}: {name}: shape {tuple(tensor.shape)}, expected "
                                         f"({total}, 1, {k})")
                    tensor = tensor[:, 0, :]
                pieces = torch.split(tensor, [s for _, s in parts], dim=0)
                for (part, _), piece in zip(parts, pieces):
                    if kind == "in_proj":
                        ours = f"{prefix}mixer.in_proj_{part}.weight"
                    else:
                        ours = f"{prefix}mixer.conv_{part}.{'weight' if rest.endswith('weight') else 'bias'}"
                    put(ours, piece, name)
            else:
                unexpected.append(name)
    if unexpected:
        raise ValueError(f"{listing}: unexpected tensors for a {cfg.n_layers}-layer Mamba-2 model: "
                         f"{', '.join(sorted(unexpected))}")
    return cfg, complete_state(state, shapes, cfg.tie_embeddings,
                               lambda missing: f"{listing}: missing tensors (our names): {', '.join(missing)}")


def model_from_hf_mamba2(path: str | os.PathLike, device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> HybridModel:
    """Build a HybridModel from a Hugging Face Mamba2ForCausalLM checkpoint directory."""
    cfg, state = load_hf_mamba2(path)
    model = _meta_model(cfg)
    model.to_empty(device=device or "cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model
