"""The recipe's `model` section: a named size (models/sizes.py) and the fields that override it.

Resolved by models/sizes.py into the config of the model kind (TransformerConfig, MLAConfig or
HybridConfig); models/registry.py says which kinds there are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from longtrain.models.ladder import Residual
from longtrain.models.transformer import RopeScaling

ModelKindName = Literal["transformer", "hybrid"]
AttentionKind = Literal["standard", "mla"]


@dataclass
class ModelConfig:
    # A named size (models/sizes.py); explicit fields below override it when set.
    name: Optional[str] = "debug"
    kind: ModelKindName = "transformer"  # transformer (Llama-style, models/transformer.py) or hybrid (Mamba-2/attention/MLP stack)
    # Attention of a transformer's layers: standard (MHA/GQA) or mla (multi-head latent attention,
    # models/mla.py; sized by the MLA keys below, which a named MLA size sets).
    attention: AttentionKind = "standard"
    vocab_size: Optional[int] = None  # vocabulary size (embedding rows, output columns)
    dim: Optional[int] = None  # hidden size of the residual stream
    n_layers: Optional[int] = None  # transformer blocks (hybrids: from model.pattern)
    n_heads: Optional[int] = None  # query heads
    n_kv_heads: Optional[int] = None  # key/value heads (GQA; unset for MLA)
    ffn_dim: Optional[int] = None  # hidden size of the SwiGLU MLP
    norm_eps: Optional[float] = None  # RMSNorm epsilon
    rope_theta: Optional[float] = None  # RoPE base frequency
    rope_scaling: Optional[RopeScaling] = None  # RoPE scaling: {type: none/linear/llama3/yarn, factor, ...} or just a type (llama3 takes Llama-3.1 values)
    max_seq_len: Optional[int] = None  # longest sequence the model is built for (RoPE tables, validation of data.seq_len)
    tie_embeddings: Optional[bool] = None  # the output head shares the embedding matrix
    init_std: Optional[float] = None  # standard deviation of the normal initialisation
    # The FFN size from dim, as Llama does, when ffn_dim is not given: multiple_of x
    # ceil(int(ffn_dim_multiplier x int(8 dim / 3)) / multiple_of) (models/sizes.py).
    multiple_of: Optional[int] = None
    ffn_dim_multiplier: Optional[float] = None  # see multiple_of
    # kind=hybrid (models/hybrid.py): one symbol per layer, M Mamba-2, * attention, - MLP, and | a
    # pipeline stage boundary (n_layers follows from it); the Mamba-2 layer sizes.
    pattern: Optional[str] = None
    d_state: Optional[int] = None  # Mamba-2 state size per head
    d_conv: Optional[int] = None  # Mamba-2 causal conv width
    expand: Optional[int] = None  # Mamba-2 inner size = expand x dim
    mamba_headdim: Optional[int] = None  # Mamba-2 head dimension
    ngroups: Optional[int] = None  # Mamba-2 B/C groups
    chunk_size: Optional[int] = None  # Mamba-2 SSD scan chunk length
    # Ladder Residual (models/ladder.py): standard | ladder; ladder_layers: the last k layers become
    # ladder layers (unset: all; 0: the standard model). Checkpoints of one do not load into the other.
    residual: Optional[Residual] = None
    ladder_layers: Optional[int] = None  # the last k layers are ladder layers (unset: all)
    # attention=mla: low-rank query (0: full rank), the cached latent, the per-head query/key parts
    # without and with position (the RoPE key is shared by the heads), the value head dim, and
    # DeepSeek's two YaRN magnitude knobs (mscale, mscale_all_dim; 0 = unset).
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None  # MLA: the cached latent size
    qk_nope_head_dim: Optional[int] = None  # MLA: per-head query/key part without position
    qk_rope_head_dim: Optional[int] = None  # MLA: per-head query/key part with RoPE (the key part shared by the heads)
    v_head_dim: Optional[int] = None  # MLA: value head dimension
    rope_mscale: Optional[float] = None  # MLA YaRN magnitude knob (0: unset)
    rope_mscale_all_dim: Optional[float] = None  # MLA YaRN magnitude knob for all dims (0: unset)
    # attention=mla: TPLA-aware training, the forward computes TPLA over this many latent slices
    # (models/mla.py; 1 or unset: exact MLA).
    tpla_degree: Optional[int] = None
    # Import weights from a Hugging Face Llama (or, with attention=mla, DeepSeek-V3) directory (config.json + safetensors) at start.
    hf_checkpoint: Optional[str] = None


