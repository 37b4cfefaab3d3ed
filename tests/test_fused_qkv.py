"""The fused Q/K/V projection (models/transformer.py Attention.wqkv): one matmul, rows grouped per
KV head, so that a plain split of its rows over tp ranks hands each rank whole groups.

Outside references: the attention written plainly here from separate Q, K, V projections (GQA
pairing query head h with KV head h // (n_heads / n_kv_heads), as transformers' repeat_kv does);
transformers' LlamaForCausalLM logits are checked in test_hf.py through the fusing importer."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longtrain.models.transformer import (Attention, Transformer, TransformerConfig, apply_rope, fuse_qkv,
                                          split_qkv)


def _cfg(n_heads=6, n_kv_heads=2) -> TransformerConfig:
    return TransformerConfig(vocab_size=64, dim=48, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=64)


def _plain_attention(x, wq, wk, wv, wo, module: Attention, n_heads, n_kv_heads):
    """Separate projections, K/V repeated per query head, causal softmax attention."""
    bsz, seqlen, _ = x.shape
    hd = module.head_dim
    q = (x @ wq.T).view(bsz, seqlen, n_heads, hd)
    k = (x @ wk.T).view(bsz, seqlen, n_kv_heads, hd)
    v = (x @ wv.T).view(bsz, seqlen, n_kv_heads, hd)
    cos, sin = module.rope(torch.arange(seqlen)[None])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = n_heads // n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(bsz, seqlen, -1)
    return out @ wo.T


@pytest.mark.parametrize("n_heads,n_kv_heads", [(6, 2), (4, 4), (4, 1)])
def test_fused_attention_equals_separate_projections(n_heads, n_kv_heads):
    torch.manual_seed(0)
    cfg = _cfg(n_heads, n_kv_heads)
    module = Attention(cfg)
    hd = cfg.head_dim
    wq, wk, wv = (torch.randn(h * hd, cfg.dim) * 0.2 for h in (n_heads, n_kv_heads, n_kv_heads))
    with torch.no_grad():
        module.wqkv.weight.copy_(fuse_qkv(wq, wk, wv, n_kv_heads))
    x = torch.randn(2, 10, cfg.dim)
    expected = _plain_attention(x, wq, wk, wv, module.wo.weight.detach(), module, n_heads, n_kv_heads)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_one_projection_matmul_and_no_separate_weights():
    """The fusion is applied: the attention holds wqkv (no wq/wk/wv) and a forward runs exactly two
    linear layers (wqkv, wo)."""
    model = Transformer(_cfg())
    attention = model.layers["0"].attention
    names = {name for name, _ in attention.named_parameters()}
    assert names == {"wqkv.weight", "wo.weight"}
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(m)) for m in attention.modules()
             if isinstance(m, nn.Linear)]
    attention(torch.randn(1, 5, 48))
    for h in hooks:
        h.remove()
    assert calls == [attention.wqkv, attention.wo]
    assert attention.tp_styles() == {"wqkv": "colwise", "wo": "rowwise"}


@pytest.mark.parametrize("tp", [1, 2])
def test_row_split_over_tp_gives_each_rank_whole_kv_groups(tp):
    """A colwise split (Shard(0), equal row chunks) of wqkv is, on each rank, the fused weight of
    that rank's own query heads and KV heads: what tensor parallel and checkpoint resharding rely on."""
    n_heads, n_kv_heads = 8, 4
    cfg = _cfg(n_heads, n_kv_heads)
    hd = cfg.head_dim
    wq, wk, wv = (torch.randn(h * hd, cfg.dim) for h in (n_heads, n_kv_heads, n_kv_heads))
    fused = fuse_qkv(wq, wk, wv, n_kv_heads)
    for rank, chunk in enumerate(fused.chunk(tp, dim=0)):
        q_rows, kv_rows = n_heads * hd // tp, n_kv_heads * hd // tp
        local = fuse_qkv(wq[rank * q_rows:(rank + 1) * q_rows], wk[rank * kv_rows:(rank + 1) * kv_rows],
                         wv[rank * kv_rows:(rank + 1) * kv_rows], n_kv_heads // tp)
        assert torch.equal(chunk, local)


def test_split_inverts_fuse_and_rows_are_grouped():
    cfg = _cfg(6, 2)
    hd = cfg.head_dim
    wq, wk, wv = (torch.randn(h * hd, cfg.dim) for h in (6, 2, 2))
    fused = fuse_qkv(wq, wk, wv, 2)
    assert fused.shape == ((6 + 2 * 2) * hd, cfg.dim)
    # group 1 starts after group 0's three query heads, k_0 and v_0
    group = (3 + 2) * hd
    assert torch.equal(fused[group: group + 3 * hd], wq[3 * hd: 6 * hd])
    assert torch.equal(fused[group + 3 * hd: group + 4 * hd], wk[hd: 2 * hd])
    assert torch.equal(fused[2 * group - hd:], wv[hd:])
    for got, want in zip(split_qkv(fused, 6, 2), (wq, wk, wv)):
        assert torch.equal(got, want)


def test_gradients_flow_to_every_group():
    cfg = _cfg(6, 2)
    module = Attention(cfg)
    x = torch.randn(2, 7, cfg.dim)
    F.mse_loss(module(x), torch.zeros(2, 7, cfg.dim)).backward()
    wq, wk, wv = split_qkv(module.wqkv.weight.grad, 6, 2)
    assert all(g.abs().sum() > 0 for g in (wq, wk, wv))
