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

- Mamba-2 mixers (models.mamba.Mamba2Mixer, hybrid 'M' layers): `MambaState` replaces
  `ssm_core`; it keeps the recurrent state of every row: the last d_conv-1 raw conv inputs (the
  conv window) and the SSM state H (heads, headdim, d_state). The prefill runs the chunked scan
  and keeps its final state; each later call continues the conv from the window (as a halo) and
  the recurrence from H (kernels.ssd.ssd_reference with initial_states: the exact recurrence).

Prompts of different lengths decode in one batch, left-padded: `left_pad` gives the padded
tokens and their lengths; every row's real tokens take positions 0, 1, ... (RoPE sees what it
would see unbatched), and the prefill passes document ids (-1 on padding, 0 on the prompt) so
that no cache lets a padding token reach a real one: the KV and latent caches keep the ids of
their keys and mask padding keys out of every later step; the Mamba state resets at the first
real token and its conv window holds zeros for padding.

`generate(model, prompts, max_new_tokens)` runs the prefill and then one token at a time (greedy,
or sampled with a temperature and top-p), batched. Nothing here is parallel: under tensor
parallelism (parallel/decode.py) the same loop runs on every rank over a sharded model, and
`sync_tokens` makes the ranks agree on each sampled token.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

from longtrain.kernels.attention import BlockMask, attention_forward
from longtrain.kernels.ssd import causal_conv1d, ssd_reference, ssd_scan
from longtrain.models.mamba import Mamba2Mixer, local
from longtrain.models.mla import MLAttention
from longtrain.models.transformer import Attention

LatentNorm = Literal["exact", "local"]


def _key_docs(cache_docs, doc_ids, bsz: int, seqlen: int, device):
    """The document ids of the new keys (doc_ids, or zeros after a padded prefill; None while no
    call carried ids), and the ids of all keys so far."""
    if doc_ids is None and cache_docs is None:
        return None, None
    new = doc_ids if doc_ids is not None else torch.zeros(bsz, seqlen, dtype=torch.long, device=device)
    if cache_docs is None:
        return new, new
    return new, torch.cat([cache_docs, new.to(cache_docs.dtype)], dim=1)


def _padded_mask(past: int, seqlen: int, q_doc: torch.Tensor, k_doc: torch.Tensor) -> BlockMask:
    """Causal over cache indices, and only within a document: padding (id -1) reaches nothing."""
    bsz, total = k_doc.shape
    index = torch.arange(total, device=k_doc.device)[None].expand(bsz, -1)
    return BlockMask(causal=True, q_pos=index[:, past:past + seqlen], k_pos=index, q_doc=q_doc, k_doc=k_doc)


class KVCache:
    """core_attention for standard attention while decoding: keys/values of every token so far
    (and their document ids after a padded prefill: padding keys stay masked out)."""

    def __init__(self, backend: str = "auto"):
        self.k = self.v = self.docs = None
        self.backend = backend

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def __call__(self, q, k, v, scale: float, positions=None, doc_ids=None):
        past = len(self)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        q_doc, self.docs = _key_docs(self.docs, doc_ids, q.shape[0], q.shape[1], q.device)
        if self.docs is None:
            mask = BlockMask(causal=True, q_offset=past, k_offset=0)
        else:
            mask = _padded_mask(past, q.shape[1], q_doc, self.docs)
        return attention_forward(q, self.k, self.v, scale=scale, mask=mask, backend=self.backend)[0]

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class MambaState:
    """ssm_core of a Mamba-2 mixer while decoding: per row, the conv window (the last d_conv-1 raw
    [x | B | C] inputs, zeros where there were none or only padding) and the SSM state H
    (b, heads, headdim, d_state), both of this process's heads (a tensor-parallel shard keeps
    its own). Called as LocalSSMCore is: (xBC raw, dt, mixer=, doc_ids=) -> y (b, l, h, p)."""

    def __init__(self, backend: str = "auto"):
        self.window = self.state = None
        self.backend = backend
        self.tokens = 0

    def __len__(self) -> int:
        return self.tokens

    def nbytes(self) -> int:
        return 0 if self.state is None else self.window.nbytes + self.state.nbytes

    def __call__(self, xBC: torch.Tensor, dt: torch.Tensor, *, mixer: Mamba2Mixer,
                 doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = mixer.conv_params()
        width = weight.shape[-1] - 1
        A, D = mixer.scan_params()
        if self.state is None:  # prefill: the chunked scan from a zero state
            conv = causal_conv1d(xBC, weight, bias, doc_ids=doc_ids, activation="silu")
            x, B, C = mixer.split_xBC(conv, dt.shape[-1])
            y, self.state = ssd_scan(x, dt, A, B, C, chunk_size=mixer.chunk_size, D=D, seq_idx=doc_ids,
                                     backend=self.backend)
            keep = xBC if doc_ids is None else xBC * (doc_ids == doc_ids[:, -1:])[..., None].to(xBC.dtype)
            history = torch.cat([xBC.new_zeros(xBC.shape[0], width, xBC.shape[-1]), keep], dim=1)
        else:  # decode: the conv continues from the window, the recurrence from H
            if doc_ids is not None and bool((doc_ids != 0).any()):
                raise ValueError("decode: Mamba state cannot take document ids after the prefill")
            conv = causal_conv1d(xBC, weight, bias, halo=self.window, activation="silu")
            x, B, C = mixer.split_xBC(conv, dt.shape[-1])
            y, self.state = ssd_reference(x, dt, A, B, C, D=D, initial_states=self.state)
            history = torch.cat([self.window, xBC], dim=1)
        self.window = history[:, history.shape[1] - width:]
        self.tokens += xBC.shape[1]
        return y


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
        self.c = self.k_rope = self.docs = None

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
            c = local(module.kv_norm(c_raw))
            return c if self.decode != "tpla" or self.shard is None else c[..., self._slices(c.shape[-1])[0]]
        norm = module.kv_norm
        parts = []
        for sl in self._slices(c_raw.shape[-1]):
            piece = local(c_raw)[..., sl].float()
            piece = piece * torch.rsqrt(piece.pow(2).mean(-1, keepdim=True) + norm.eps)
            parts.append((piece * local(norm.weight)[sl].float()).to(c_raw.dtype))
        return torch.cat(parts, dim=-1)

    def attend(self, module: MLAttention, q_nope, q_rope, c_raw, k_rope, positions, doc_ids=None) -> torch.Tensor:
        """q_nope (B, S, H, nope), q_rope (B, S, H, r) rotated, c_raw (B, S, d_c) before the norm,
        k_rope (B, S, 1, r) rotated, doc_ids (B, S) (-1: padding) or None -> this layer's output
        (B, S, dim) after W_O."""
        past = len(self)
        q_doc, self.docs = _key_docs(self.docs, doc_ids, q_nope.shape[0], q_nope.shape[1], q_nope.device)
        prefill = past == 0
        if prefill and self.decode == "tpla" and self.shard is not None:
            full = local(module.kv_norm(c_raw))  # prefill is exact MLA over the whole latent...
        c = self._normed(module, c_raw)  # ...and writes only this shard's slice
        k_rope = k_rope[:, :, 0]
        self.c = c if self.c is None else torch.cat([self.c, c], dim=1)
        self.k_rope = k_rope if self.k_rope is None else torch.cat([self.k_rope, k_rope], dim=1)
        bsz, seqlen = q_nope.shape[:2]
        if prefill:
            latent = full if self.decode == "tpla" and self.shard is not None else local(module.kv_norm(c_raw))
            k_nope, v = module.expand(latent)
            heads = k_nope.shape[2]
            q = torch.cat([q_nope, q_rope], dim=-1)
            k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, heads, -1)], dim=-1)
            mask = BlockMask(causal=True) if self.docs is None else _padded_mask(0, seqlen, q_doc, self.docs)
            out = attention_forward(q, k, v, scale=module.scale, mask=mask, backend=self.backend)[0]
            return module.wo(out.reshape(bsz, seqlen, -1))
        w = local(module.wkv_b.weight).view(-1, module.nope + module.v_dim, module.rank)  # (local H, nope + v, d_c)
        w_uk, w_uv = w[:, : module.nope], w[:, module.nope:]
        mask = (BlockMask(causal=True, q_offset=past, k_offset=0) if self.docs is None
                else _padded_mask(past, seqlen, q_doc, self.docs))
        allowed = mask.allowed(seqlen, len(self), q_nope.device)
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
    """Give every attention module (and Mamba-2 mixer) of `model` a fresh cache, keeping the
    strategy it replaces for remove_caches; returns the caches (one per layer, in order)."""
    caches = []
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.latent_cache = make_latent_cache() if make_latent_cache else LatentCache(backend=backend)
            caches.append(module.latent_cache)
        elif isinstance(module, Attention):
            module._strategy_before_decode = module.core_attention
            module.core_attention = KVCache(backend)
            caches.append(module.core_attention)
        elif isinstance(module, Mamba2Mixer):
            module._strategy_before_decode = module.ssm_core
            module.ssm_core = MambaState(backend)
            caches.append(module.ssm_core)
    if not caches:
        raise ValueError(f"decode: {type(model).__name__} has no attention or Mamba layers to cache")
    return caches


def remove_caches(model: nn.Module) -> None:
    """Put back what install_caches replaced."""
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.latent_cache = None
        elif isinstance(module, Attention):
            module.core_attention = module.__dict__.pop("_strategy_before_decode", module.core_attention)
        elif isinstance(module, Mamba2Mixer):
            module.ssm_core = module.__dict__.pop("_strategy_before_decode", module.ssm_core)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> (B, longest) token ids left-padded with pad_id, and the lengths (B,)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return tokens, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def check_sampling(temperature: float, top_p: float) -> None:
    """One line for sampling settings that mean nothing."""
    if temperature < 0:
        raise ValueError(f"generate: temperature {temperature} must be at least 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p {top_p} must be in (0, 1]")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B, 1). temperature 0: argmax. Otherwise softmax(logits / T)
    cut to the nucleus (top-p, Holtzman et al. 2019): the most likely tokens whose probabilities,
    taken in descending order, first reach a total of top_p (the most likely token always stays),
    renormalised, then one draw per row from `generator` (on the CPU, so every process that holds
    the same generator and logits draws the same token)."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def check_length(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """One line when the longest prompt and the new tokens do not fit the model's context."""
    limit = getattr(model.cfg, "max_seq_len", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"generate: a prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceed "
                         f"model.max_seq_len={limit}")


@torch.no_grad()
def generate(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             make_latent_cache: Callable[[], LatentCache] | None = None, backend: str = "auto",
             eos_id: int | None = None, prompt_lengths: torch.Tensor | None = None,
             sync_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, list]:
    """prompts (B, S) token ids -> (B, S + n) tokens, and the caches. With `prompt_lengths` (B,)
    the rows are left-padded (see left_pad): row b's prompt is its last prompt_lengths[b] tokens.
    Greedy when temperature is 0, else sampled (sample_next) with `generator`. `sync_tokens`
    (identity when None) maps each step's chosen tokens (B, 1) to the ones every process uses."""
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"generate: prompts must be (batch, length >= 1) token ids, got shape {tuple(prompts.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens} must be at least 0")
    bsz, length = prompts.shape
    device = prompts.device
    if prompt_lengths is None:
        prompt_lengths = torch.full((bsz,), length, dtype=torch.long)
    prompt_lengths = prompt_lengths.to(device)
    if prompt_lengths.shape != (bsz,) or bool((prompt_lengths < 1).any() | (prompt_lengths > length).any()):
        raise ValueError(f"generate: prompt_lengths must be ({bsz},) values in 1..{length}")
    check_length(model, int(prompt_lengths.max()), max_new_tokens)
    check_sampling(temperature, top_p)
    caches = install_caches(model, make_latent_cache, backend)
    try:
        index = torch.arange(length, device=device)[None]
        start = (length - prompt_lengths)[:, None]  # first real token of every row
        positions = (index - start).clamp(min=0)
        doc_ids = None
        if bool((start > 0).any()):
            doc_ids = torch.where(index >= start, 0, -1)
        logits = model(prompts, positions, doc_ids)
        tokens = prompts
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_p, generator)
            if sync_tokens is not None:
                nxt = sync_tokens(nxt)
            if eos_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                done |= nxt[:, 0] == eos_id
            tokens = torch.cat([tokens, nxt], dim=1)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = model(nxt, (prompt_lengths + step)[:, None])
        return tokens, caches
    finally:
        remove_caches(model)


@torch.no_grad()
def cached_logits(model: nn.Module, tokens: torch.Tensor, prompt_len: int, *,
                  make_latent_cache: Callable[[], LatentCache] | None = None, backend: str = "auto",
                  step: int = 1) -> torch.Tensor:
    """Logits (B, T, V) of every position of `tokens` (B, T) computed as a decoder does: a prefill
    of the first `prompt_len` tokens, then the rest `step` tokens per call through the caches
    (teacher-forced). Equal to model(tokens) for exact decoding; TPLA's error shows here."""
    if not 1 <= prompt_len <= tokens.shape[1]:
        raise ValueError(f"cached_logits: prompt_len {prompt_len} outside 1..{tokens.shape[1]}")
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
        remove_caches(model)
