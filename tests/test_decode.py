"""Decoding with caches (models/decode.py) and TPLA's reparameterisation (models/tpla.py), one
process: cached decoding equals full recomputation; absorbed MLA decode equals it; TPLA with g=1
equals absorbed decode, with g>1 it is an approximation that the sharded runs must reproduce."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from longtrain.models import build_model
from longtrain.models.decode import LatentCache, cached_logits, generate
from longtrain.models.mla import MLATransformer
from longtrain.models.sizes import MLA_SIZES, SIZES
from longtrain.models.tpla import hadamard, latent_second_moments, pca_rotation, reparameterize

TOL = 1e-5


def mla_model(seed=0, **over) -> MLATransformer:
    cfg = dataclasses.replace(MLA_SIZES["mla-tiny"], **over)
    model = MLATransformer(cfg).eval()
    model.init_weights(seed)
    with torch.no_grad():  # larger weights so attention is far from uniform, and non-unit latent gains
        for name, p in model.named_parameters():
            if "kv_norm" in name:
                p.uniform_(0.5, 1.5)
            elif "wkv" in name or "wq" in name:
                p.mul_(8)
    return model


def tokens(batch=2, length=40, seed=1):
    return torch.randint(0, 260, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_standard_transformer_kv_cache_decode_equals_full_forward():
    model = build_model(SIZES["tiny"]).eval()
    model.init_weights(0)
    x = tokens()
    with torch.no_grad():
        full = model(x)
    for step in (1, 3):
        assert (cached_logits(model, x, 17, step=step) - full).abs().max() <= TOL
    out, caches = generate(model, x[:, :10], 6)
    assert out.shape == (2, 16) and len(caches) == 4 and len(caches[0]) == 15  # the last token is never fed
    with torch.no_grad():  # greedy: each new token is the argmax of the full forward at its position
        again = model(out)
    assert torch.equal(out[:, 10:], again[:, 9:-1].argmax(-1))
    assert type(model.layers["0"].attention.core_attention).__name__ == "PlainAttention"  # caches removed


@pytest.mark.parametrize("q_lora", [0, 8])
def test_mla_absorbed_decode_equals_full_recomputation(q_lora):
    model = mla_model(q_lora_rank=q_lora)
    x = tokens()
    with torch.no_grad():
        full = model(x)
    got = cached_logits(model, x, 9)  # prefill exact, then 31 absorbed steps
    assert (got - full).abs().max() <= TOL
    got = cached_logits(model, x, 9, step=4)  # several new tokens per call: causal inside the call
    assert (got - full).abs().max() <= TOL
    caches = []
    cached_logits(model, x, 9, make_latent_cache=lambda: caches.append(LatentCache()) or caches[-1])
    cfg = model.cfg  # the cache holds latents + RoPE keys, not keys and values
    assert caches[0].c.shape == (2, 40, cfg.kv_lora_rank) and caches[0].k_rope.shape == (2, 40, cfg.qk_rope_head_dim)


def test_tpla_degree_one_equals_mla_decode_and_degree_two_approximates():
    model = mla_model()
    x = tokens()
    exact = cached_logits(model, x, 9)
    g1 = cached_logits(model, x, 9, make_latent_cache=lambda: LatentCache("tpla", 1))
    assert (g1 - exact).abs().max() <= TOL
    g2 = cached_logits(model, x, 9, make_latent_cache=lambda: LatentCache("tpla", 2))
    assert (g2[:, :9] - exact[:, :9]).abs().max() <= TOL  # prefill stays exact MLA
    assert (g2[:, 9:] - exact[:, 9:]).abs().max() > 1e-2  # decode is TPLA's approximation
    local = cached_logits(model, x, 9, make_latent_cache=lambda: LatentCache("tpla", 2, latent_norm="local"))
    assert (local[:, 9:] - g2[:, 9:]).abs().max() > 1e-4  # the local RMSNorm is another approximation


@pytest.mark.parametrize("rotation", ["none", "hadamard", "pca"])
def test_reparameterisation_is_exact_for_mla(rotation):
    """With the gain folded and the Hadamard or PCA rotation in, MLA's logits (full forward and
    absorbed decode) equal the original within 1e-5; the weights did change."""
    model = mla_model()
    x = tokens()
    with torch.no_grad():
        want = model(x)
    before = model.layers["0"].attention.wkv_a.weight.clone()
    calibration = [tokens(seed=s) for s in (5, 6)]
    reparameterize(model, rotation, calibration)
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() <= TOL
    assert (cached_logits(model, x, 9) - want).abs().max() <= TOL
    assert torch.all(model.layers["0"].attention.kv_norm.weight == 1)
    changed = not torch.allclose(model.layers["0"].attention.wkv_a.weight, before)
    assert changed == (rotation != "none")


def test_rotations_are_orthogonal_and_pca_orders_energy():
    h = hadamard(16)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=h.dtype), atol=1e-12)
    model = mla_model()
    reparameterize(model, "none")
    moment = latent_second_moments(model, [tokens(seed=5)])[0]
    r = pca_rotation(moment)
    energy = torch.diagonal(r.T @ moment @ r)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-12)  # descending: the first slice holds the most
    with pytest.raises(ValueError, match="kv_lora_rank: 12 is not a power of two"):
        hadamard(12)


def test_tpla_errors_name_the_key():
    model = mla_model(kv_lora_rank=12)
    with pytest.raises(ValueError, match="model.kv_lora_rank: 12 does not divide by the TPLA degree 5"):
        cached_logits(model, tokens(), 9, make_latent_cache=lambda: LatentCache("tpla", 5))
    with pytest.raises(ValueError, match="exceed model.max_seq_len"):
        generate(model, tokens(length=1000), 100)


def test_tpla_aware_training_forward_equals_tpla_decoding():
    """model.tpla_degree=g: the full forward computes, at every position, what TPLA decoding with g
    slices computes (prefill of one token, then every token decoded), and it trains (gradients)."""
    model = mla_model()
    x = tokens()
    want = cached_logits(model, x, 1, make_latent_cache=lambda: LatentCache("tpla", 2))
    tpla_model = MLATransformer(dataclasses.replace(model.cfg, tpla_degree=2))
    tpla_model.load_state_dict(model.state_dict())
    got = tpla_model(x)
    assert (got - want).abs().max() <= TOL
    assert (got - model(x)).abs().max() > 1e-2  # not MLA
    got.sum().backward()
    assert tpla_model.layers["0"].attention.wkv_b.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.tpla_degree: 3 must be at least 1 and divide model.kv_lora_rank=16"):
        dataclasses.replace(model.cfg, tpla_degree=3)
