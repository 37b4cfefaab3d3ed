"""Autoregressive decoding with caches, as single-device code over the models' own forward.

Nothing in the model changes for decoding: the caches are strategies installed into the hooks the
attention modules already have, and each forward call passes the tokens' true positions.
- Standard attention (models.transformer.Attention, hybrid '*' layers): `KVCache` replaces
  `core_attention`; it appends the new keys/values and attends the new queries to everything
  cached (causal, offset by the cached length).
- MLA (models.mla.MLAttention): `LatentCache` is set as `latent_cache`; it keeps, per token, the
  latent c (kv_lora_rank) and the rotated RoPE key (qk_rope_head_dim), not keys and values.
  A call on an empty cache (the prefill) is exact MLA: keys and values expanded from the latents.
  Later calls (decode) are absorbed: the query goes through W_UK into latent space, attention
  runs over the cached latents, W_UV comes after:
      q_lat_h = q_nope_h W_UK,h            s_h,t = (q_lat_h·c_t + q_rope_h·k_rope_t)·scale
      o_h = (Σ_t softmax(s_h)_t c_t) W_UV,h,   y = W_O concat_h o_h
  With `tpla_degree` g > 1 the decode is TPLA (arXiv 2508.15881): the latent is cut into g
  contiguous slices; slice i attends with every head on its own slice (scores from its part of
  the latent plus the whole RoPE key), its own softmax, and its own W_UV/W_O product; the g
  outputs are summed (plain sum, no log-sum-exp merge: an approximation of MLA). `shard` = i
  keeps only slice i in the cache (one tp rank's share; `reduce` sums over ranks, installed by
  parallel/tpla.py); shard None computes all g slices in this process (the one-process reference).

`generate(model, prompts, max_new_tokens)` runs the prefill and then one token at a time (greedy,
or sampled with a temperature), batched over prompts of one length.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

from longtrain.kernels.attention import BlockMask, attention_forward
from longtrain.models.mla import MLAttention
from longtrain.models.transformer import Attention

LatentNorm = Literal["exact", "local"]


class KVCache:
    """core_attention for standard attention while decoding: keys/values of every token so far."""

    def __init__(self, backend: str = "auto"):
        self.k = self.v = None
        self.backend = backend

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def __call__(self, q, k, v, scale: float, positions=None, doc_ids=None):
        if doc_ids is not None:
            raise ValueError("decode: packed rows (doc_ids) cannot be decoded with a KV cache")
        past = len(self)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        mask = BlockMask(causal=True, q_offset=past, k_offset=0)
        return attention_forward(q, self.k, self.v, scale=scale, mask=mask, backend=self.backend)[0]

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class LatentCache:
    """MLA's cache: latents (B, T, d_c or d_c/g) and rotated RoPE keys (B, T, d_r).

    decode: absorbed (exact MLA over the latents) or tpla; tpla_degree g; shard: the slice this
    process keeps (None: all g, computed one after another); latent_norm: exact (the RMSNorm of
    the whole latent, then sliced) or local (each slice normalised by its own RMS: TPLA's
    parallel RMSNorm); reduce: sums the per-shard outputs over ranks (identity in one process)."""

    def __init__(self, decode: Literal["absorbed", "tpla"] = "absorbed", tpla_degree: int = 1,
                 shard: int | None = None, latent_norm: LatentNorm = "exact",
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, backend: str = "auto"):
        if decode not in ("absorbed", "tpla"):
            raise ValueError(f"decode: unknown latent decode {decode!r} (absorbed, tpla)")
        if latent_norm not in ("exact", "local"):
            raise ValueError(f"decode.latent_norm: {latent_norm!r} is not exact or local")
        if tpla_degree < 1 or (shard is not None and not 0 <= shard < tpla_degree):
            raise ValueError(f"decode: shard {shard} of TPLA degree {tpla_degree}")
        self.decode, self.g, self.shard, self.latent_norm = decode, tpla_degree, shard, latent_norm
        self.reduce, self.backend = reduce, backend
        self.c = self.k_rope = None

    def __len__(self) -> int:
        return 0 if self.c is None else self.c.shape[1]

    def nbytes(self) -> int:
        return 0 if self.c is None else self.c.nbytes + self.k_rope.nbytes

    def _slices(self, rank: int) -> list[slice]:
        if rank % self.g:
            raise ValueError(f"model.kv_lora_rank: {rank} does not divide by the TPLA degree {self.g}")
        width = rank // self.g
        shards = range(self.g) if self.shard is None else [self.shard]
        return [slice(i * width, (i + 1) * width) for i in shards]

    def _normed(self, module: MLAttention, c_raw: torch.Tensor) -> torch.Tensor:
        """The latent to cache: all of it (normed exactly), or this shard's slice (exact or local norm)."""
        if self.decode != "tpla" or self.latent_norm == "exact":
            c = module.kv_norm(c_raw)
            return c if self.decode != "tpla" or self.shard is None else c[..., self._slices(c.shape[-1])[0]]
        norm = module.kv_norm
        parts = []
        for sl in self._slices(c_raw.shape[-1]):
            piece = c_raw[..., sl].float()
            piece = piece * torch.rsqrt(piece.pow(2).mean(-1, keepdim=True) + norm.eps)
            parts.append((piece * norm.weight[sl].float()).to(c_raw.dtype))
        return torch.cat(parts, dim=-1)

    def attend(self, module: MLAttention, q_nope, q_rope, c_raw, k_rope, positions) -> torch.Tensor:
        """q_nope (B, S, H, nope), q_rope (B, S, H, r) rotated, c_raw (B, S, d_c) before the norm,
        k_rope (B, S, 1, r) rotated -> this layer's output (B, S, dim) after W_O."""
        past = len(self)
        prefill = past == 0
        if prefill and self.decode == "tpla" and self.shard is not None:
            full = module.kv_norm(c_raw)  # prefill is exact MLA over the whole latent...
        c = self._normed(module, c_raw)  # ...and writes only this shard's slice
        k_rope = k_rope[:, :, 0]
        self.c = c if self.c is None else torch.cat([self.c, c], dim=1)
        self.k_rope = k_rope if self.k_rope is None else torch.cat([self.k_rope, k_rope], dim=1)
        bsz, seqlen = q_nope.shape[:2]
        if prefill:
            latent = full if self.decode == "tpla" and self.shard is not None else module.kv_norm(c_raw)
            k_nope, v = module.expand(latent)
            heads = k_nope.shape[2]
            q = torch.cat([q_nope, q_rope], dim=-1)
            k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, heads, -1)], dim=-1)
            out = attention_forward(q, k, v, scale=module.scale, mask=BlockMask(causal=True), backend=self.backend)[0]
            return module.wo(out.reshape(bsz, seqlen, -1))
        w = module.wkv_b.weight.view(-1, module.nope + module.v_dim, module.rank)  # (H, nope + v, d_c)
        w_uk, w_uv = w[:, : module.nope], w[:, module.nope:]
        allowed = BlockMask(causal=True, q_offset=past, k_offset=0).allowed(seqlen, len(self), q_nope.device)
        rope_scores = torch.einsum("bshr,btr->bsht", q_rope.float(), self.k_rope.float())
        if self.decode == "absorbed":
            pieces = [(slice(None), self.c, w_uk, w_uv)]
        else:
            slices = self._slices(module.rank)
            width = module.rank // self.g
            pieces = [(sl, self.c[..., j * width:(j + 1) * width] if self.shard is None else self.c,
                       w_uk[..., sl], w_uv[..., sl]) for j, sl in enumerate(slices)]
        y = None
        for _, cache_c, uk, uv in pieces:
            q_lat = torch.einsum("bshn,hnc->bshc", q_nope.float(), uk.float())
            scores = (torch.einsum("bshc,btc->bsht", q_lat, cache_c.float()) + rope_scores) * module.scale
            scores = scores.masked_fill(~allowed[:, :, None, :], -math.inf)
            probs = torch.softmax(scores, dim=-1)
            latent_out = torch.einsum("bsht,btc->bshc", probs, cache_c.float())
            o = torch.einsum("bshc,hvc->bshv", latent_out, uv.float()).to(q_nope.dtype)
            part = module.wo(o.reshape(bsz, seqlen, -1))
            y = part if y is None else y + part
        if self.reduce is not None:
            y = self.reduce(y)
        return y


def install_caches(model: nn.Module, make_latent_cache: Callable[[], LatentCache] | None = None,
                   backend: str = "auto") -> list:
    """Give every attention module of `model` a fresh cache; returns them (one per layer)."""
    caches = []
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.latent_cache = make_latent_cache() if make_latent_cache else LatentCache(backend=backend)
            caches.append(module.latent_cache)
        elif isinstance(module, Attention):
            module.core_attention = KVCache(backend)
            caches.append(module.core_attention)
    if not caches:
        raise ValueError(f"decode: {type(model).__name__} has no attention layers to cache")
    return caches


def remove_caches(model: nn.Module, backend: str = "auto") -> None:
    from longtrain.models.transformer import PlainAttention

    for module in model.modules():
        if isinstance(module, MLAttention):
            module.latent_cache = None
        elif isinstance(module, Attention):
            module.core_attention = PlainAttention(backend)


def _check_decodable(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "ssm_core"):
            raise ValueError("decode: Mamba layers have no decode state yet; generate needs an attention-only model")


@torch.no_grad()
def generate(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             generator: torch.Generator | None = None,
             make_latent_cache: Callable[[], LatentCache] | None = None, backend: str = "auto",
             eos_id: int | None = None) -> tuple[torch.Tensor, list]:
    """prompts (B, S) token ids of one length -> (B, S + n) tokens, and the caches. Greedy when
    temperature is 0, else sampled from softmax(logits / temperature) with `generator`."""
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"generate: prompts must be (batch, length >= 1) token ids, got shape {tuple(prompts.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens} must be at least 0")
    limit = getattr(model.cfg, "max_seq_len", None)
    if limit is not None and prompts.shape[1] + max_new_tokens > limit:
        raise ValueError(f"generate: {prompts.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                         f"model.max_seq_len={limit}")
    _check_decodable(model)
    caches = install_caches(model, make_latent_cache, backend)
    try:
        tokens = prompts
        bsz, length = prompts.shape
        positions = torch.arange(length, device=prompts.device)[None].expand(bsz, -1)
        logits = model(prompts, positions)
        done = torch.zeros(bsz, dtype=torch.bool, device=prompts.device)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(prompts.device)
            else:
                nxt = last.argmax(-1, keepdim=True)
            if eos_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                done |= nxt[:, 0] == eos_id
            tokens = torch.cat([tokens, nxt], dim=1)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            pos = torch.full((bsz, 1), length + step, device=prompts.device)
            logits = model(nxt, pos)
        return tokens, caches
    finally:
        remove_caches(model, backend)


@torch.no_grad()
def cached_logits(model: nn.Module, tokens: torch.Tensor, prompt_len: int, *,
                  make_latent_cache: Callable[[], LatentCache] | None = None, backend: str = "auto",
                  step: int = 1) -> torch.Tensor:
    """Logits (B, T, V) of every position of `tokens` (B, T) computed as a decoder does: a prefill
    of the first `prompt_len` tokens, then the rest `step` tokens per call through the caches
    (teacher-forced). Equal to model(tokens) for exact decoding; TPLA's error shows here."""
    if not 1 <= prompt_len <= tokens.shape[1]:
        raise ValueError(f"cached_logits: prompt_len {prompt_len} outside 1..{tokens.shape[1]}")
    _check_decodable(model)
    install_caches(model, make_latent_cache, backend)
    try:
        bsz, total = tokens.shape
        positions = torch.arange(total, device=tokens.device)[None].expand(bsz, -1)
        outs = [model(tokens[:, :prompt_len], positions[:, :prompt_len])]
        for start in range(prompt_len, total, step):
            stop = min(start + step, total)
            outs.append(model(tokens[:, start:stop], positions[:, start:stop]))
        return torch.cat(outs, dim=1)
    finally:
        remove_caches(model, backend)
