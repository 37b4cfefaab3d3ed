"""Multi-head latent attention (MLA, DeepSeek-V2/V3) as single-device code, and the decoder built
of it (`MLATransformer`: the Llama-style transformer with MLA in place of GQA).

Per token, with h the (normed) hidden state:

    query   q = W_Q h                                      (q_lora_rank = 0)
            q = W_UQ RMSNorm(W_DQ h)                       (low-rank query, q_lora_rank > 0)
            q = [q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)] per head
    latent  [c | k_rope] = W_DKV h;  c = RMSNorm(c)        (kv_lora_rank + qk_rope_head_dim values:
                                                            what a decoder caches per token)
    keys    k = [W_UK c (per head) | RoPE(k_rope) (shared by all heads)]
    values  v = W_UV c (per head, v_head_dim)
    out     W_O concat_h softmax(q·k · scale) v

Module names follow DeepSeek's reference code: wq (or wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b
(W_UK and W_UV interleaved per head: rows [head0 nope | head0 v | head1 nope | ...]), wo.
The RoPE part is rotate-half (as our GQA attention); DeepSeek checkpoints store it interleaved and
models/hf_deepseek.py permutes those rows on import (and back on export), which is exact.

YaRN as DeepSeek uses it: RopeScaling(type=yarn) for the frequencies, plus two knobs of its own:
`rope_mscale` and `rope_mscale_all_dim` (DeepSeek's `mscale`, `mscale_all_dim`). When both are
set, cos/sin are multiplied by mscale(s, rope_mscale) / mscale(s, rope_mscale_all_dim) and the
softmax scale by mscale(s, rope_mscale_all_dim)^2, with mscale(s, m) = 0.1·m·ln(s) + 1; when
unset, cos/sin carry the plain YaRN temperature 0.1·ln(s) + 1 and the scale is 1/sqrt(qk head dim).

Hooks that parallel/ and the decoder install (one device: the defaults):
- `core_attention(q, k, v, scale, positions, doc_ids)`: the sequence strategy (plain, or context
  parallel), over expanded q/k (qk head dim) and v (v head dim);
- `rope_key_sync`: identity; tensor parallel makes it sum the shared RoPE key's gradient over
  tp ranks (each rank's heads use it);
- `latent_cache`: None; when a models.decode.LatentCache is set, forward attends over the cached
  latents of earlier calls (prefill exactly, decode absorbed: see models/decode.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longtrain.models.parallel_plan import AttentionMixer, TPStyle
from longtrain.models.transformer import (DecoderLM, PlainAttention, RMSNorm, RotaryEmbedding,
                                          Transformer, TransformerBlock, TransformerConfig, apply_rope)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN magnitude: 0.1·mscale·ln(factor) + 1 (1 when the factor is at most 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class MLAConfig(TransformerConfig):
    """A TransformerConfig whose attention is MLA. n_kv_heads is unused (every head has its own
    keys and values, expanded from the shared latent) and kept equal to n_heads."""
    q_lora_rank: int = 0  # 0: full-rank query projection (DeepSeek-V2-Lite); > 0: low-rank query (V3: 1536)
    kv_lora_rank: int = 64  # d_c, the latent cached per token (V3: 512)
    qk_nope_head_dim: int = 32  # per-head key/query part without position (V3: 128)
    qk_rope_head_dim: int = 16  # decoupled RoPE part, the key shared by all heads (V3: 64)
    v_head_dim: int = 32  # (V3: 128)
    rope_mscale: float = 0.0  # DeepSeek YaRN `mscale` (0: unset)
    rope_mscale_all_dim: float = 0.0  # DeepSeek YaRN `mscale_all_dim` (0: unset)
    latent_norm_eps: float = 1e-6  # eps of q_norm and kv_norm (DeepSeek's default, not norm_eps)
    # TPLA-aware training: > 1 makes the forward compute TPLA's attention over this many latent
    # slices (each slice's keys/values from its part of the latent, its own softmax, outputs summed),
    # so that a model adapts to TPLA decoding; 1 is exact MLA.
    tpla_degree: int = 1

    def __post_init__(self):
        self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        """One line naming the key for sizes MLA cannot run."""
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_heads", "dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}: {getattr(self, key)} must be positive for MLA")
        if self.q_lora_rank < 0:
            raise ValueError(f"model.q_lora_rank: {self.q_lora_rank} must be 0 (full-rank query) or positive")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim: {self.qk_rope_head_dim} must be even for RoPE")
        if self.tpla_degree < 1 or self.kv_lora_rank % self.tpla_degree:
            raise ValueError(f"model.tpla_degree: {self.tpla_degree} must be at least 1 and divide "
                             f"model.kv_lora_rank={self.kv_lora_rank}")

    @property
    def head_dim(self) -> int:  # the query/key head dim (what the softmax scale is about)
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        s = self.rope_scaling
        if s.type == "yarn" and self.rope_mscale_all_dim:
            scale *= yarn_mscale(s.factor, self.rope_mscale_all_dim) ** 2
        return scale

    def rope_magnitude(self) -> float | None:
        """cos/sin multiplier when DeepSeek's mscale knobs are set (None: the RoPE default)."""
        s = self.rope_scaling
        if s.type == "yarn" and self.rope_mscale and self.rope_mscale_all_dim:
            return yarn_mscale(s.factor, self.rope_mscale) / yarn_mscale(s.factor, self.rope_mscale_all_dim)
        return None

    def attention_params(self) -> int:
        h, d = self.n_heads, self.dim
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def num_params(self, include_embedding: bool = True) -> int:
        per_layer = self.attention_params() + 3 * self.dim * self.ffn_dim + 2 * self.dim
        emb = self.vocab_size * self.dim
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.dim + out + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """6 x parameters plus causal attention: 2·2·H·(qk + v head dims)·S/2 forward per layer, x3."""
        attention = 3 * self.n_layers * self.n_heads * (self.qk_head_dim + self.v_head_dim) * seq_len
        return float(6 * self.num_params(include_embedding=False) + attention)


class MLAttention(AttentionMixer):

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        h, qk = cfg.n_heads, cfg.qk_head_dim
        self.nope, self.rope_dim, self.v_dim, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                           cfg.v_head_dim, cfg.kv_lora_rank)
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, h * qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(h * cfg.v_head_dim, cfg.dim, bias=False)
        self.rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        magnitude = cfg.rope_magnitude()
        if magnitude is not None:
            self.rope.mscale = magnitude
        self.scale = cfg.softmax_scale()
        self.rope_key_sync = nn.Identity()
        self.core_attention = PlainAttention()
        self.latent_cache = None

    def tp_styles(self) -> dict[str, TPStyle]:
        """Heads by the output features of the up-projections and the input features of wo; the
        down-projections and their norms replicated; the shared RoPE key's gradient summed over tp."""
        query: dict[str, TPStyle] = ({"wq_a": "replicate", "q_norm": "replicate", "wq_b": "colwise"}
                                     if self.cfg.q_lora_rank else {"wq": "colwise"})
        return {**query, "wkv_a": "replicate", "kv_norm": "replicate", "wkv_b": "colwise", "wo": "rowwise",
                "rope_key_sync": "sum_grad"}

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, local heads, qk head dim), before RoPE."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.q_lora_rank else self.wq(x)
        return q.view(*x.shape[:2], q.shape[-1] // self.cfg.qk_head_dim, self.cfg.qk_head_dim)  # (S may be 0)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c (B, S, kv_lora_rank) before kv_norm, k_rope (B, S, qk_rope_head_dim) before RoPE)."""
        c, k_rope = torch.split(self.wkv_a(x), [self.rank, self.rope_dim], dim=-1)
        return c, self.rope_key_sync(k_rope)

    def expand(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, T, d_c) -> per-head k_nope (B, T, H, nope) and v (B, T, H, v)."""
        kv = self.wkv_b(c)
        kv = kv.view(*c.shape[:2], kv.shape[-1] // (self.nope + self.v_dim), self.nope + self.v_dim)  # (S may be 0)
        return torch.split(kv, [self.nope, self.v_dim], dim=-1)

    def forward(self, x, positions=None, doc_ids=None):
        bsz, seqlen, _ = x.shape
        if positions is None:
            positions = torch.arange(seqlen, device=x.device)[None]
        cos, sin = self.rope(positions)
        q = self.query(x)
        q_nope, q_rope = torch.split(q, [self.nope, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c, k_rope = self.latent(x)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)  # (B, S, 1, rope)
        if self.latent_cache is not None:  # decoding: the cache attends and applies wo
            return self.latent_cache.attend(self, q_nope, q_rope, c, k_rope, positions, doc_ids)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = None
        for latent in self.latent_slices(self.kv_norm(c)):
            k_nope, v = self.expand(latent)
            k = torch.cat([k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
            part = self.core_attention(q, k, v, self.scale, positions=positions, doc_ids=doc_ids)
            out = part if out is None else out + part
        return self.wo(out.flatten(2))

    def latent_slices(self, c: torch.Tensor) -> list[torch.Tensor]:
        """[c] for MLA; for TPLA-aware training (tpla_degree g > 1) g copies of c, each zero outside
        one contiguous slice: expanding copy i gives slice i's keys/values (W_UK c_i, W_UV c_i)
        exactly, and attending with each separately is TPLA's per-slice softmax."""
        g = self.cfg.tpla_degree
        if g == 1:
            return [c]
        width = self.rank // g
        return [torch.cat([torch.zeros_like(c[..., : i * width]), c[..., i * width:(i + 1) * width],
                           torch.zeros_like(c[..., (i + 1) * width:])], dim=-1) for i in range(g)]


class MLABlock(TransformerBlock):
    attention_class = MLAttention


class MLATransformer(Transformer):
    """The decoder of MLABlocks (pre-norm MLA + SwiGLU); init as Transformer (norms to one,
    projections normal, output projections wo and w2 scaled by 1/sqrt(2·n_layers))."""

    def __init__(self, cfg: MLAConfig):
        DecoderLM.__init__(self, cfg, nn.ModuleDict({str(i): MLABlock(cfg, i) for i in range(cfg.n_layers)}))


__all__ = ["MLAConfig", "MLAttention", "MLABlock", "MLATransformer", "yarn_mscale"]
