"""A Llama-style decoder as single-device code: RMSNorm, RoPE (with long-context scaling), GQA,
SwiGLU, tied or untied embeddings.

Parallelism is applied from outside (longtrain.parallel): tensor parallel shards the projections
(so the attention infers its local head count from tensor shapes), the pipeline deletes layers
and sets `tok_embeddings` / `norm` / `output` to None on the stages that do not own them, and
context parallelism replaces `Attention.core_attention` with a strategy object.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.kernels.attention import BlockMask, attention
from longtrain.kernels.chunked_loss import IGNORE_INDEX, chunked_linear_cross_entropy
from longtrain.models.parallel_plan import (
    AttentionMixer,
    BlockTPPlan,
    SSMMixer,
    Sublayer,
    TopTPStyle,
    TPStyle,
    even_layer_split,
    prefixed,
)
from longtrain.models.ladder import LocalSync, Residual, check_residual, first_ladder_layer, is_ladder, ladder_step


@dataclass
class RopeScaling:
    # none: plain RoPE; linear: positions divided by factor; llama3: Llama-3.1 frequency-band
    # scaling; yarn: NTK-by-parts interpolation with attention temperature.
    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = 1.0
    original_max_position: int = 8192
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn


@dataclass
class TransformerConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Ladder Residual (models/ladder.py): the last `ladder_layers` layers (None: all) read the
    # stream without the preceding sublayer's output.
    residual: Residual = "standard"
    ladder_layers: int | None = None

    @property
    def layer_kinds(self) -> list[str]:
        """One entry per layer: 'T', an attention + MLP block (hybrids: 'M', '*', '-')."""
        return ["T"] * self.n_layers

    def pipeline_stages(self, n_stages: int) -> list[range]:
        return even_layer_split(self.n_layers, n_stages)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, include_embedding: bool = True) -> int:
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer + self.dim + out
        return total + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (non-embedding params + output head) plus causal attention
        (12 x layers x dim x seq_len / 2 for the causal half), the PaLM-style count."""
        dense = 6 * (self.num_params(include_embedding=False))
        attention = 6 * self.n_layers * self.dim * seq_len  # 12·L·d·S, halved by the causal mask
        return float(dense + attention)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings
# ----------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) after long-context scaling, and the attention
    temperature multiplier applied to cos/sin (1.0 except for YaRN)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling.type
    if kind == "none":
        return inv_freq.float(), 1.0
    if kind == "linear":
        return (inv_freq / scaling.factor).float(), 1.0
    if kind == "llama3":
        # Llama-3.1: keep high frequencies, divide low frequencies by factor, blend in between.
        old = scaling.original_max_position
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled).float(), 1.0
    if kind == "yarn":
        # YaRN (NTK-by-parts): interpolate dimensions whose wavelength exceeds the original
        # context, extrapolate fast ones, ramp in between; scale attention by 0.1 ln(s) + 1.
        old = scaling.original_max_position
        dims = torch.arange(0, head_dim, 2, dtype=torch.float64)

        def correction_dim(n_rot):
            return head_dim * math.log(old / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((dims / 2 - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv_freq / scaling.factor) * (1 - extrapolation) + inv_freq * extrapolation
        mscale = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
        return inv.float(), mscale
    raise ValueError(f"model.rope_scaling.type: unknown RoPE scaling {kind!r}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        inv_freq, self.mscale = rope_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self):
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) or (1, S) -> cos, sin (B or 1, S, head_dim) in fp32."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos() * self.mscale, angles.sin() * self.mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D); rotate-half convention (as Hugging Face Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32 (RMSNorm's forward; parallel/ladder.py calls it with the
    weight's gradient summed over tensor parallel)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class PlainAttention:
    """The single-device attention strategy: causal attention over the whole local sequence, per
    document when `doc_ids` are given (packed rows). Context parallelism installs other
    strategies with the same call signature."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, q, k, v, scale: float, positions=None, doc_ids=None):
        # q (B, S, H, D), k/v (B, S, Hkv, D) -> (B, S, H, D)
        if doc_ids is None and self.backend == "auto":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
            return out.transpose(1, 2)
        mask = BlockMask(causal=True)
        if doc_ids is not None:
            mask = BlockMask(causal=True, q_pos=positions, k_pos=positions, q_doc=doc_ids, k_doc=doc_ids)
        return attention(q, k, v, scale=scale, mask=mask, backend=self.backend)


class Attention(AttentionMixer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # One fused Q/K/V projection (one matmul), rows grouped per KV head (see fuse_qkv): a split
        # of its output rows over tp ranks hands each rank whole groups.
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.core_attention = PlainAttention()

    def forward(self, x, positions=None, doc_ids=None):
        """x (B, S, dim); positions (B, S) token positions (restarting per document in packed
        rows), or None for 0..S-1; doc_ids (B, S) document ids of packed rows (-1: padding), or
        None for one document per row. S is the sequence this module sees: under sequence
        parallel the input arrives all-gathered, under context parallel it is this rank's shard."""
        bsz, seqlen, _ = x.shape
        # Head counts come from the (possibly tensor-parallel) projection outputs.
        # (explicit sizes, not -1: a rank may hold no tokens in a balanced step, S = 0)
        qkv = self.wqkv(x)
        kv_heads = qkv.shape[-1] // ((self.q_per_kv + 2) * self.head_dim)
        qkv = qkv.view(bsz, seqlen, kv_heads, self.q_per_kv + 2, self.head_dim)  # (B, S, Hkv, group, D)
        q = qkv[:, :, :, :self.q_per_kv].reshape(bsz, seqlen, kv_heads * self.q_per_kv, self.head_dim)  # head g·q_per_kv + j
        # v is copied out: the attention saves it for the backward, and a view would keep all of qkv alive
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1].contiguous()
        if positions is None:
            positions = torch.arange(seqlen, device=x.device)[None]
        cos, sin = self.rope(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core_attention(q, k, v, self.scale, positions=positions, doc_ids=doc_ids)
        return self.wo(out.flatten(2))

    def tp_styles(self) -> dict[str, TPStyle]:
        """Heads split across tp ranks: the projections to heads by output features, wo by input features."""
        return {"wqkv": "colwise", "wo": "rowwise"}


def fuse_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Separate Q (n_heads·D, dim), K and V (n_kv_heads·D, dim) projection weights -> the fused
    `wqkv` weight, rows grouped per KV head: for each KV head g, the rows of its query heads
    g·r .. g·r + r - 1 (r = n_heads / n_kv_heads, as GQA pairs them), then k_g, then v_g."""
    dim = wq.shape[-1]
    groups = (wq.reshape(n_kv_heads, -1, dim), wk.reshape(n_kv_heads, -1, dim), wv.reshape(n_kv_heads, -1, dim))
    return torch.cat(groups, dim=1).reshape(-1, dim)


def split_qkv(wqkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused `wqkv` weight -> (wq, wk, wv), the inverse of fuse_qkv."""
    dim = wqkv.shape[-1]
    head_dim = wqkv.shape[0] // (n_heads + 2 * n_kv_heads)
    r = n_heads // n_kv_heads
    grouped = wqkv.reshape(n_kv_heads, (r + 2) * head_dim, dim)
    wq = grouped[:, : r * head_dim].reshape(n_heads * head_dim, dim)
    wk = grouped[:, r * head_dim: (r + 1) * head_dim].reshape(n_kv_heads * head_dim, dim)
    wv = grouped[:, (r + 1) * head_dim:].reshape(n_kv_heads * head_dim, dim)
    return wq, wk, wv


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def tp_styles(self) -> dict[str, TPStyle]:
        return {"w1": "colwise", "w3": "colwise", "w2": "rowwise"}


class TransformerBlock(nn.Module):
    attention_class = Attention  # models/mla.py's MLABlock sets MLAttention

    def __init__(self, cfg: TransformerConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = self.attention_class(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        # Ladder models run every block in carry form (models/ladder.py); `ladder` marks this one's
        # sublayers as ladder sublayers; `residual_sync` reads a pending output (parallel/ swaps it).
        self.carry, self.ladder = is_ladder(cfg), layer_id >= first_ladder_layer(cfg)
        self.residual_sync = LocalSync()

    SUBLAYERS = ("attention", "feed_forward")  # in the order they run; a pipeline stage may keep one

    def forward(self, x, positions=None, doc_ids=None, pending=None):
        if self.carry:  # (h, pending) -> (h, pending)
            h = x
            if self.attention is not None:
                h, pending = ladder_step(h, pending,
                                         lambda t: self.attention(self.attention_norm(t), positions, doc_ids),
                                         self.ladder, self.residual_sync)
            if self.feed_forward is not None:
                h, pending = ladder_step(h, pending, lambda t: self.feed_forward(self.ffn_norm(t)), self.ladder,
                                         self.residual_sync)
            return h, pending
        h = x
        if self.attention is not None:
            h = h + self.attention(self.attention_norm(h), positions, doc_ids)
        if self.feed_forward is not None:
            h = h + self.feed_forward(self.ffn_norm(h))
        return h

    def keep_sublayers(self, names: set[str]) -> None:
        """Drop the sublayers (and their norms) not in `names`: a pipeline stage boundary between
        this block's attention and its MLP. Parameter names of what stays are unchanged."""
        if "attention" not in names:
            self.attention = self.attention_norm = None
        if "feed_forward" not in names:
            self.feed_forward = self.ffn_norm = None

    def tensor_parallel_plan(self) -> BlockTPPlan:
        styles: dict[str, TPStyle] = {}
        sublayers = []
        if self.attention is not None:
            styles.update(prefixed("attention", self.attention.tp_styles()))
            sublayers.append(Sublayer("attention_norm", "attention", 3))
        if self.feed_forward is not None:
            styles.update(prefixed("feed_forward", self.feed_forward.tp_styles()))
            sublayers.append(Sublayer("ffn_norm", "feed_forward", 1))
        return BlockTPPlan(styles=styles, sublayers=sublayers)


def seeded_normal_(p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, std) into p: from `generator` on CPU when given (the same draws whatever the
    device or layout), else in place (DTensor and meta parameters work)."""
    if generator is None:
        nn.init.normal_(p, 0.0, std)
    else:
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std).to(p.dtype))


class DecoderLM(nn.Module):
    """The decoder skeleton every model shares: embedding, `layers` (a ModuleDict keyed by the
    global layer index, so parameter names stay stable when the pipeline removes layers from a
    stage and checkpoints reshard across layouts), final norm and output head, any of which a
    pipeline stage may set to None. forward(tokens or hidden states, positions, doc_ids) -> logits
    or hidden states. Subclasses build the layers and define init_weights(seed)."""

    layers: nn.ModuleDict
    tok_embeddings: nn.Embedding | None  # None on pipeline stages after the first
    norm: RMSNorm | None  # None on pipeline stages before the last
    output: nn.Linear | None

    def __init__(self, cfg, layers: nn.ModuleDict):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = layers
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Ladder Residual: layers pass (stream, pending output); a pipeline stage hands both on.
        check_residual(cfg.residual, cfg.ladder_layers, cfg.n_layers)
        self.ladder_residual = is_ladder(cfg)
        self.residual_sync = LocalSync()
        # The chunked loss of a split head (parallel/ installs it), else the single-device one
        self.head_loss: Callable[..., torch.Tensor] | None = None
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if not self.output.weight.is_meta:
            self.init_weights()

    # -- what parallel/ asks the model (models/parallel_plan.py) ----------------------------------
    def tensor_parallel_top_plan(self) -> dict[str, TopTPStyle]:
        """The embedding, final norm and output head this model (or pipeline stage) holds."""
        top: dict[str, TopTPStyle] = {"tok_embeddings": "embedding", "norm": "sequence_norm", "output": "head"}
        return {name: style for name, style in top.items() if getattr(self, name) is not None}

    def block_tp_plans(self) -> dict[str, BlockTPPlan]:
        """Each layer's plan, keyed by its name in `layers`."""
        return {key: block.tensor_parallel_plan() for key, block in self.layers.items()}

    def fsdp_units(self) -> list[nn.Module]:
        """Modules sharded as their own FSDP unit (gathered just before they run); the root takes the rest."""
        return list(self.layers.values())

    def pipeline_stages(self, n_stages: int) -> list[range]:
        """Layer ids per pipeline stage (the config decides: an even split, or a hybrid's '|' marks)."""
        return self.cfg.pipeline_stages(n_stages)

    def pipeline_sublayer_stages(self, n_stages: int) -> list[dict[str, set[str]]]:
        """Per pipeline stage, {layer key: the sublayers it runs}, from an even split of all the
        sublayers in order: a stage boundary may fall between a block's attention and its MLP
        (parallel.pp_split: sublayers)."""
        units = [(key, name) for key, block in self.layers.items() for name in block.SUBLAYERS]
        stages: list[dict[str, set[str]]] = []
        for span in even_layer_split(len(units), n_stages):
            stage: dict[str, set[str]] = {}
            for key, name in (units[i] for i in span):
                stage.setdefault(key, set()).add(name)
            stages.append(stage)
        return stages

    def set_sequence_cores(self, attention=None, ssm=None) -> None:
        """Install a sequence strategy (context parallel, balanced varlen, decoding caches) as the
        attention core of every attention mixer and, when given, the SSM core of every SSM mixer."""
        for module in self.modules():
            if attention is not None and isinstance(module, AttentionMixer):
                module.core_attention = attention
            if ssm is not None and isinstance(module, SSMMixer):
                module.ssm_core = ssm

    def set_residual_sync(self, sync) -> None:
        """Ladder models: how a pending sublayer output is read (parallel/ladder.py waits for its reduction)."""
        self.residual_sync = sync
        for block in self.layers.values():
            block.residual_sync = sync

    def set_head_loss(self, loss: Callable[..., torch.Tensor]) -> None:
        """How the chunked loss is computed from the final hidden states and the output head's
        weight, loss(h, weight, labels, chunk_tokens, ignore_index): tensor parallel installs a
        vocabulary-parallel one (parallel/vocab_parallel_loss.py)."""
        self.head_loss = loss

    def reset_rope_buffers(self) -> None:
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, pending: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_chunk_tokens: int = 0) -> torch.Tensor:
        """With `labels` (and a model that holds the output head): the summed token cross-entropy
        (fp32 scalar), computed in chunks of `loss_chunk_tokens` tokens without the full logits
        (kernels/chunked_loss.py), instead of the logits."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if self.ladder_residual:
            for layer in self.layers.values():
                h, pending = layer(h, positions, doc_ids, pending=pending)
            if self.norm is None:  # a pipeline stage before the last: the stream and the pending output
                return h, self.residual_sync(pending)
            h = h + self.residual_sync(pending)  # the last two outputs meet before the final norm
            return self._head(self.norm(h), labels, loss_chunk_tokens)
        for layer in self.layers.values():
            h = layer(h, positions, doc_ids)
        h = self.norm(h) if self.norm is not None else h
        return self._head(h, labels, loss_chunk_tokens)

    def _head(self, h: torch.Tensor, labels: torch.Tensor | None, loss_chunk_tokens: int) -> torch.Tensor:
        if self.output is None:
            return h
        if labels is None:
            return self.output(h)
        loss = self.head_loss if self.head_loss is not None else chunked_linear_cross_entropy
        return loss(h, self.output.weight, labels, loss_chunk_tokens, IGNORE_INDEX)


class Transformer(DecoderLM):
    """Decoder-only language model of TransformerBlocks (see DecoderLM)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)}))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Normal(0, init_std) for projections and embeddings, with output projections of each
        residual branch scaled by 1/sqrt(2·n_layers); norms to one."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                seeded_normal_(p, out_std, gen)
            else:
                seeded_normal_(p, std, gen)
        self.reset_rope_buffers()
