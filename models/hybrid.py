"""Hybrid Mamba-2 / attention / MLP stacks described by a pattern string (Megatron-core and
Nemotron-H style), as single-device code with the same interface as models.transformer.Transformer.

Pattern symbols, one per layer, each a pre-norm residual block `x + mixer(norm(x))`:
    M   Mamba-2 mixer (models/mamba.py)
    *   attention: models.transformer.Attention (RoPE, GQA, its `core_attention` hook)
    -   SwiGLU MLP: models.transformer.FeedForward
    |   a pipeline stage boundary (not a layer)
e.g. "M-M-M*-|M-M-M*-". Each block exposes `.kind` ('M', '*', '-'), `.norm` and `.mixer`, so
parallel/ finds attention at `block.mixer.core_attention` (kind '*') and the SSM at
`block.mixer.ssm_core` (kind 'M').
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from longtrain.models.ladder import LocalSync, Residual, check_residual, first_ladder_layer, is_ladder, ladder_step
from longtrain.models.mamba import MambaConfig, Mamba2Mixer, init_ssm_param
from longtrain.models.mla import MLAConfig, MLAttention
from longtrain.models.parallel_plan import BlockTPPlan, Sublayer, even_layer_split, prefixed
from longtrain.models.transformer import (Attention, DecoderLM, FeedForward, RMSNorm, RopeScaling,
                                          seeded_normal_)

SYMBOLS = {"M": "Mamba-2", "*": "attention", "-": "MLP"}


def parse_pattern(pattern: str) -> tuple[list[str], list[int]]:
    """pattern -> (layer kinds, first layer index of every stage after the first). Raises a one-line
    ValueError naming model.pattern and the offending symbol or position."""
    if not isinstance(pattern, str) or not pattern.replace("|", ""):
        raise ValueError(f"model.pattern: {pattern!r} has no layers; use one symbol per layer "
                         "(M Mamba-2, * attention, - MLP, | stage boundary)")
    kinds: list[str] = []
    boundaries: list[int] = []
    stage_start = 0
    for pos, sym in enumerate(pattern):
        if sym == "|":
            if len(kinds) == stage_start:
                raise ValueError(f"model.pattern: the '|' at position {pos} of {pattern!r} leaves pipeline stage "
                                 f"{len(boundaries)} empty")
            boundaries.append(len(kinds))
            stage_start = len(kinds)
        elif sym in SYMBOLS:
            kinds.append(sym)
        else:
            raise ValueError(f"model.pattern: unknown symbol {sym!r} at position {pos} of {pattern!r} "
                             "(known: M Mamba-2, * attention, - MLP, | stage boundary)")
    if len(kinds) == stage_start:
        raise ValueError(f"model.pattern: the '|' at position {pattern.rfind('|')} of {pattern!r} leaves the "
                         f"last pipeline stage ({len(boundaries)}) empty")
    return kinds, boundaries


@dataclass
class HybridConfig:
    vocab_size: int = 260
    dim: int = 64
    pattern: str = "M*M-"
    # attention ('*') and MLP ('-') layers
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    # Mamba-2 ('M') layers: d_inner = expand·dim, heads = d_inner / mamba_headdim
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mamba_headdim: int = 16
    ngroups: int = 1
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    conv_bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Ladder Residual (models/ladder.py): every block is one sublayer; the last `ladder_layers`
    # blocks (None: all) read the stream without the preceding block's output.
    residual: Residual = "standard"
    ladder_layers: int | None = None
    # model.attention=mla: the '*' layers are multi-head latent attention of these sizes (its dim,
    # heads and RoPE are this config's; models/mla.py); None: standard GQA attention.
    mla: MLAConfig | None = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raises a one-line ValueError naming the model.* key at fault."""
        parse_pattern(self.pattern)
        check_residual(self.residual, self.ladder_layers, self.n_layers)
        kinds = set(self.layer_kinds)
        if "*" in kinds:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise ValueError(f"model.dim: {self.dim} does not divide into model.n_heads={self.n_heads} heads")
            if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
                raise ValueError(f"model.n_kv_heads: {self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
            if self.head_dim % 2:
                raise ValueError(f"model.dim: head dimension {self.head_dim} must be even for RoPE")
        if "M" in kinds:
            if self.mamba_headdim <= 0 or self.d_inner % self.mamba_headdim:
                raise ValueError(f"model.mamba_headdim: {self.mamba_headdim} does not divide "
                                 f"model.expand x model.dim = {self.d_inner}")
            if self.ngroups <= 0 or self.mamba_heads % self.ngroups:
                raise ValueError(f"model.ngroups: {self.ngroups} does not divide the {self.mamba_heads} Mamba heads")
            for key in ("d_state", "d_conv", "chunk_size"):
                if getattr(self, key) < 1:
                    raise ValueError(f"model.{key}: must be positive, got {getattr(self, key)}")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def layer_kinds(self) -> list[str]:
        return parse_pattern(self.pattern)[0]

    @property
    def n_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def stage_boundaries(self) -> list[int]:
        """Global index of the first layer of every pipeline stage after the first ('|' marks);
        [] when the pattern has none. "MM*-|M*M-" -> [4]."""
        return parse_pattern(self.pattern)[1]

    @property
    def stages(self) -> list[range]:
        """Layer ranges per pipeline stage from the '|' marks."""
        cuts = [0, *self.stage_boundaries, self.n_layers]
        return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:])]

    def pipeline_stages(self, n_stages: int) -> list[range]:
        """The '|' marks when the pattern has them (their count must equal n_stages), else an even split."""
        marked = self.stages
        if len(marked) > 1:
            if len(marked) != n_stages:
                raise ValueError(f"model.pattern: its '|' marks make {len(marked)} pipeline stages, but parallel.pp x "
                                 f"parallel.pp_stages_per_rank = {n_stages}")
            return marked
        return even_layer_split(self.n_layers, n_stages)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim

    @property
    def mamba_heads(self) -> int:
        return self.d_inner // self.mamba_headdim

    def mamba_config(self) -> MambaConfig:
        return MambaConfig(dim=self.dim, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                           headdim=self.mamba_headdim, ngroups=self.ngroups, chunk_size=self.chunk_size,
                           dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=self.dt_init_floor,
                           dt_limit=tuple(self.dt_limit), norm_eps=self.norm_eps, conv_bias=self.conv_bias)

    # -- size and cost ---------------------------------------------------------------------------
    def layer_params(self, kind: str) -> int:
        d = self.dim
        if kind == "M":
            gn, h, di = self.ngroups * self.d_state, self.mamba_heads, self.d_inner
            conv_dim = di + 2 * gn
            in_proj = d * (2 * di + 2 * gn + h)
            conv = conv_dim * self.d_conv + (conv_dim if self.conv_bias else 0)
            return d + in_proj + conv + 3 * h + di + di * d
        if kind == "*":
            if self.mla is not None:
                return d + self.mla.attention_params()
            return d + d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if kind == "-":
            return d + 3 * d * self.ffn_dim
        raise ValueError(f"model.pattern: unknown symbol {kind!r}")

    def num_params(self, include_embedding: bool = True) -> int:
        layers = sum(self.layer_params(k) for k in self.layer_kinds)
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        emb = self.vocab_size * self.dim
        return layers + self.dim + out + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward):
        - 6 x (non-embedding parameters + output head), the dense matmuls;
        - per '*' layer, causal attention 6·(n_heads·head_dim)·seq_len (12·d·S halved by the mask),
          as Transformer.flops_per_token;
        - per 'M' layer, the chunked SSD scan with Q = min(chunk_size, seq_len), forward
          2·(Q/2)·(g·n + d_inner) for the causal intra-chunk C·B^T and its product with x, plus
          2·2·d_inner·n for the chunk states and state-to-output terms: times 3 for training.
        Convolutions, norms and the inter-chunk recurrence (per chunk, not per token) are left out."""
        dense = 6 * self.num_params(include_embedding=False)
        kinds = self.layer_kinds
        attention = 6 * kinds.count("*") * self.n_heads * self.head_dim * seq_len
        q = min(self.chunk_size, max(seq_len, 1))
        scan_fwd = q * (self.ngroups * self.d_state + self.d_inner) + 4 * self.d_inner * self.d_state
        scan = 3 * kinds.count("M") * scan_fwd
        return float(dense + attention + scan)


class HybridBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)). `kind` is 'M', '*' or '-'."""

    SUBLAYERS = ("mixer",)  # one sublayer: a pipeline stage holds the block whole

    def __init__(self, cfg: HybridConfig, kind: str, layer_id: int):
        super().__init__()
        self.kind, self.layer_id = kind, layer_id
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if kind == "M":
            self.mixer = Mamba2Mixer(cfg.mamba_config())
        elif kind == "*":
            self.mixer = Attention(cfg) if cfg.mla is None else MLAttention(cfg.mla)
        elif kind == "-":
            self.mixer = FeedForward(cfg)
        else:
            raise ValueError(f"model.pattern: unknown symbol {kind!r} for layer {layer_id}")
        # Ladder models run every block in carry form (models/ladder.py).
        self.carry, self.ladder = is_ladder(cfg), layer_id >= first_ladder_layer(cfg)
        self.residual_sync = LocalSync()

    def forward(self, x, positions=None, doc_ids=None, pending=None):
        if self.carry:  # (h, pending) -> (h, pending)
            def sublayer(t):
                return self.mixer(self.norm(t)) if self.kind == "-" else self.mixer(self.norm(t), positions, doc_ids)

            return ladder_step(x, pending, sublayer, self.ladder, self.residual_sync)
        if self.kind == "-":
            return x + self.mixer(self.norm(x))
        return x + self.mixer(self.norm(x), positions, doc_ids)

    def tensor_parallel_plan(self) -> BlockTPPlan:
        """Attention and MLP as in a transformer block; Mamba-2 with its heads split across tp (see
        Mamba2Mixer.tp_styles)."""
        inputs = 1 if self.kind == "-" else 3
        return BlockTPPlan(styles=prefixed("mixer", self.mixer.tp_styles()), sublayers=[Sublayer("norm", "mixer", inputs)])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class HybridModel(DecoderLM):
    """Decoder-only LM over a hybrid pattern, with Transformer's interface (see DecoderLM).
    mamba-ssm keeps A_log, D and dt_bias out of weight decay; an optimizer that wants the same
    should select them by name."""

    def __init__(self, cfg: HybridConfig):
        cfg.validate()
        super().__init__(cfg, nn.ModuleDict({str(i): HybridBlock(cfg, kind, i)
                                             for i, kind in enumerate(cfg.layer_kinds)}))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Normal(0, init_std) for projections and embeddings; the output projection of every
        residual branch (attention wo, MLP w2, Mamba out_proj) scaled by 1/sqrt(2·n_layers); norms
        and D to one; Mamba conv weights U(±1/sqrt(d_conv)) with zero bias; A_log and dt_bias as
        Mamba-2 (see models.mamba.init_ssm_param). With a seed, every draw comes from one CPU
        generator in parameter order (deterministic across devices and layouts); without, in place
        (DTensor and meta parameters work)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        mcfg = self.cfg.mamba_config()

        def uniform(p, bound):
            if gen is None:
                nn.init.uniform_(p, -bound, bound)
            else:
                p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound).to(p.dtype))

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif ".mixer." in name and leaf in ("A_log", "dt_bias", "D"):
                init_ssm_param(leaf, p, mcfg, gen)
            elif ".mixer.conv_" in name:
                if leaf == "weight":
                    uniform(p, 1.0 / math.sqrt(p.shape[-1]))
                else:
                    nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight", "out_proj.weight")):
                seeded_normal_(p, out_std, gen)
            else:
                seeded_normal_(p, std, gen)
        self.reset_rope_buffers()
