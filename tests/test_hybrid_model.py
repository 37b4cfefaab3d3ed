"""The Mamba-2 mixer and the hybrid model: equal to transformers' Mamba2Mixer (torch path) and
Mamba2ForCausalLM on imported weights, documents of a packed row independent (conv and scan),
tensor-parallel-shaped shards, training on CPU, configs and pattern errors."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from longtrain.models import build_model
from longtrain.models.hybrid import HybridConfig, HybridModel, parse_pattern
from longtrain.models.mamba import LocalSSMCore, Mamba2Mixer, MambaConfig
from longtrain.models.sizes import HYBRID_SIZES, resolve_model_config
from longtrain.models.transformer import Transformer, TransformerConfig

TOL = 1e-5
# transformers' CUDA kernels (mamba-ssm, causal-conv1d) would replace its torch path; CPU tests
# compare against that torch path, the slow reference.
_HF_KERNELS = any(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))


def _hf():
    transformers = pytest.importorskip("transformers")
    if _HF_KERNELS:
        pytest.skip("mamba-ssm/causal-conv1d installed: transformers would not run its torch path")
    return transformers


def tiny(**over) -> HybridConfig:
    base = dict(vocab_size=97, dim=32, pattern="M*M-", n_heads=4, n_kv_heads=2, ffn_dim=64, d_state=16,
                d_conv=4, expand=2, mamba_headdim=8, ngroups=2, chunk_size=16)
    base.update(over)
    return HybridConfig(**base)


def randomize(module: torch.nn.Module, seed: int = 0):
    """Weights away from their init so every term matters (D, conv bias, norms included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 - 1.5)
            elif name.endswith("norm.weight") or name.endswith(".D") or name == "D":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def hf_mamba2_config(**over):
    from transformers import Mamba2Config

    kw = dict(hidden_size=32, num_heads=8, head_dim=8, state_size=16, n_groups=2, expand=2, conv_kernel=4,
              chunk_size=16, num_hidden_layers=2, vocab_size=97, layer_norm_epsilon=1e-5, tie_word_embeddings=False)
    kw.update(over)
    return Mamba2Config(**kw)


def fused_to_ours(sd: dict, d_inner: int, gn: int, heads: int, prefix: str = "") -> dict:
    """transformers' mixer state dict -> ours (slicing the fused in_proj and conv1d)."""
    z, x, B, C, dt = sd[prefix + "in_proj.weight"].split([d_inner, d_inner, gn, gn, heads])
    cw, cb = sd[prefix + "conv1d.weight"][:, 0], sd[prefix + "conv1d.bias"]
    cws, cbs = cw.split([d_inner, gn, gn]), cb.split([d_inner, gn, gn])
    out = {"in_proj_z.weight": z, "in_proj_x.weight": x, "in_proj_B.weight": B, "in_proj_C.weight": C,
           "in_proj_dt.weight": dt}
    for part, w, b in zip("xBC", cws, cbs):
        out[f"conv_{part}.weight"], out[f"conv_{part}.bias"] = w, b
    for k in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
        out[k] = sd[prefix + k]
    return out


# ----------------------------------------------------------------------------------------------
# The mixer against transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,seq", [(1, 45), (2, 45), (4, 32), (2, 7)])
def test_mixer_matches_transformers(groups, seq):
    _hf()
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    hc = hf_mamba2_config(n_groups=groups)
    hf = HFMixer(hc, layer_idx=0).eval()
    randomize(hf)
    ours = Mamba2Mixer(MambaConfig(dim=32, d_state=16, d_conv=4, expand=2, headdim=8, ngroups=groups,
                                   chunk_size=16, norm_eps=1e-5))
    ours.load_state_dict(fused_to_ours(hf.state_dict(), 64, groups * 16, 8), strict=True)

    x = torch.randn(2, seq, 32, generator=torch.Generator().manual_seed(1))
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y_ours = hf(x_hf), ours(x_ours)
    assert (y_hf - y_ours).abs().max().item() < TOL
    g = torch.randn_like(y_hf)
    (y_hf * g).sum().backward()
    (y_ours * g).sum().backward()
    assert (x_hf.grad - x_ours.grad).abs().max().item() < TOL
    # Parameter gradients: the fused in_proj's gradient equals our pieces' gradients concatenated.
    ours_in = torch.cat([getattr(ours, f"in_proj_{p}").weight.grad for p in ("z", "x", "B", "C", "dt")])
    # Summed over batch and sequence, these are O(10): compare relative to their size.
    for a, b in ((hf.in_proj.weight.grad, ours_in), (hf.A_log.grad, ours.A_log.grad),
                 (hf.dt_bias.grad, ours.dt_bias.grad), (hf.D.grad, ours.D.grad)):
        assert (a - b).abs().max().item() < TOL * max(1.0, a.abs().max().item())


def test_mamba2_import_matches_transformers_logits(tmp_path):
    _hf()
    from transformers import Mamba2ForCausalLM

    from longtrain.models.hf_mamba import load_hf_mamba2, model_from_hf_mamba2

    # The default time_step_limit (0, inf) is written by transformers>=5 as {"__float__": "Infinity"}.
    for tie, limit in ((False, (0.0, float("inf"))), (True, (0.0, 5.0))):
        torch.manual_seed(0)
        hf = Mamba2ForCausalLM(hf_mamba2_config(tie_word_embeddings=tie, time_step_limit=limit)).eval()
        randomize(hf)
        if tie:
            hf.tie_weights()
        path = tmp_path / f"tie{int(tie)}"
        hf.save_pretrained(path)
        cfg, state = load_hf_mamba2(path)
        assert cfg.pattern == "MM" and cfg.tie_embeddings == tie and cfg.dt_limit == limit
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)
        model.eval()
        tokens = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = hf(tokens).logits
            ours = model(tokens)
            ours2 = model_from_hf_mamba2(path)(tokens)
        assert (ref - ours).abs().max().item() < TOL, tie
        assert (ref - ours2).abs().max().item() < TOL, tie


def test_mamba2_import_errors(tmp_path):
    from longtrain.models.hf_mamba import config_from_hf_mamba2

    with pytest.raises(ValueError, match="use_bias"):
        config_from_hf_mamba2({"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 10, "num_heads": 8,
                               "head_dim": 8, "use_bias": True})
    with pytest.raises(ValueError, match="num_heads"):
        config_from_hf_mamba2({"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 10, "num_heads": 4,
                               "head_dim": 8})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf_mamba2({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 10})


# ----------------------------------------------------------------------------------------------
# Packed documents: no leakage through the conv or the scan
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["MM", "M*M-"])
def test_packed_documents_match_alone(pattern):
    torch.manual_seed(0)
    model = HybridModel(tiny(pattern=pattern)).eval()
    randomize(model)
    gen = torch.Generator().manual_seed(3)
    # Row 0: documents of 5, 1, 20 and 11 tokens (one of a single token, one crossing chunks).
    # Row 1: 30 tokens then padding (-1).
    lengths = [[5, 1, 20, 11], [30]]
    L = 37
    tokens = torch.randint(0, 97, (2, L), generator=gen)
    doc_ids = torch.full((2, L), -1, dtype=torch.long)
    positions = torch.zeros(2, L, dtype=torch.long)
    spans = []
    for row, lens in enumerate(lengths):
        start = 0
        for d, n in enumerate(lens):
            doc_ids[row, start:start + n] = d
            positions[row, start:start + n] = torch.arange(n)
            spans.append((row, start, start + n))
            start += n
    with torch.no_grad():
        packed = model(tokens, positions, doc_ids)
        for row, s, e in spans:
            alone = model(tokens[row:row + 1, s:e])
            assert (packed[row:row + 1, s:e] - alone).abs().max().item() < TOL, (row, s, e)


def test_mixer_doc_ids_block_conv_and_scan():
    # A change anywhere in document 0 must not move any output of document 1, and vice versa.
    mixer = Mamba2Mixer(MambaConfig(dim=32, d_state=16, headdim=8, ngroups=2, chunk_size=8))
    randomize(mixer)
    x = torch.randn(1, 30, 32)
    doc = torch.zeros(1, 30, dtype=torch.long)
    doc[:, 13:] = 1
    x2 = x.clone()
    x2[:, 12] += 5.0  # the last token of document 0, right before the boundary
    with torch.no_grad():
        y, y2 = mixer(x, doc_ids=doc), mixer(x2, doc_ids=doc)
        y_nodoc, y2_nodoc = mixer(x), mixer(x2)
    assert (y[:, 13:] - y2[:, 13:]).abs().max().item() == 0.0
    assert (y_nodoc[:, 13:] - y2_nodoc[:, 13:]).abs().max().item() > 1e-3  # without doc_ids it leaks


# ----------------------------------------------------------------------------------------------
# Hooks for parallelism
# ----------------------------------------------------------------------------------------------
def test_ssm_core_hook_and_layer_structure():
    model = HybridModel(tiny(pattern="M*-M"))
    kinds = {name: block.kind for name, block in model.layers.items()}
    assert kinds == {"0": "M", "1": "*", "2": "-", "3": "M"}
    assert hasattr(model.layers["1"].mixer, "core_attention")
    assert isinstance(model.layers["0"].mixer.ssm_core, LocalSSMCore)

    calls = []

    class Recording:
        def __init__(self):
            self.inner = LocalSSMCore()

        def __call__(self, xBC, dt, *, mixer, doc_ids=None):
            calls.append((tuple(xBC.shape), tuple(dt.shape)))
            return self.inner(xBC, dt, mixer=mixer, doc_ids=doc_ids)

    tokens = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        ref = model(tokens)
        for i in ("0", "3"):
            model.layers[i].mixer.ssm_core = Recording()
        out = model(tokens)
    assert torch.equal(ref, out)
    assert calls == [((2, 19, 64 + 2 * 2 * 16), (2, 19, 8))] * 2


def test_head_sharded_mixer_sums_to_full():
    # What tensor parallel does, by hand: rank r keeps heads [r·h/2, (r+1)·h/2) of z, x, dt,
    # dt_bias, A_log, D, groups [r·g/2, ...) of B, C, the matching conv channels and gated-norm
    # weights, and columns of out_proj; the partial outputs sum to the full output.
    cfg = MambaConfig(dim=32, d_state=16, headdim=8, ngroups=2, chunk_size=8)
    full = Mamba2Mixer(cfg)
    randomize(full)
    tp, H, G, P, N = 2, cfg.n_heads, cfg.ngroups, cfg.headdim, cfg.d_state
    x = torch.randn(2, 21, 32)
    doc = torch.zeros(2, 21, dtype=torch.long)
    doc[0, 9:] = 1
    with torch.no_grad():
        ref = full(x, doc_ids=doc)
        total = torch.zeros_like(ref)
        for r in range(tp):
            heads = slice(r * H // tp * P, (r + 1) * H // tp * P)
            per_head = slice(r * H // tp, (r + 1) * H // tp)
            groups = slice(r * G // tp * N, (r + 1) * G // tp * N)
            shard = Mamba2Mixer(cfg)
            rows = {"z": heads, "x": heads, "B": groups, "C": groups, "dt": per_head}
            for part, sl in rows.items():
                lin = getattr(shard, f"in_proj_{part}")
                lin.weight = torch.nn.Parameter(getattr(full, f"in_proj_{part}").weight[sl].clone())
            for part, sl in (("x", heads), ("B", groups), ("C", groups)):
                conv, ref_conv = getattr(shard, f"conv_{part}"), getattr(full, f"conv_{part}")
                conv.weight = torch.nn.Parameter(ref_conv.weight[sl].clone())
                conv.bias = torch.nn.Parameter(ref_conv.bias[sl].clone())
            for name in ("dt_bias", "A_log", "D"):
                setattr(shard, name, torch.nn.Parameter(getattr(full, name)[per_head].clone()))
            shard.norm.weight = torch.nn.Parameter(full.norm.weight[heads].clone())
            shard.out_proj.weight = torch.nn.Parameter(full.out_proj.weight[:, heads].clone())
            total += shard(x, doc_ids=doc)
    assert (total - ref).abs().max().item() < TOL


# ----------------------------------------------------------------------------------------------
# Model: training, init, configs
# ----------------------------------------------------------------------------------------------
def test_hybrid_trains_on_cpu():
    torch.manual_seed(0)
    cfg = dataclasses.replace(HYBRID_SIZES["hybrid-tiny"])
    model = build_model(cfg)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=gen)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_init_is_deterministic_and_meta_friendly():
    cfg = tiny(pattern="M*-", tie_embeddings=True)
    a, b = HybridModel(cfg), HybridModel(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.output.weight is a.tok_embeddings.weight
    m = a.layers["0"].mixer
    A = -torch.exp(m.A_log)
    assert (A <= -1).all() and (A >= -16).all() and torch.equal(m.D, torch.ones_like(m.D))
    dt = F.softplus(m.dt_bias)
    assert (dt >= cfg.dt_init_floor * 0.999).all() and (dt <= cfg.dt_max * 1.001).all()
    with torch.device("meta"):
        meta = HybridModel(cfg)
    meta.init_weights()  # no-op on meta, must not fail
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    for (n, p), (_, q) in zip(meta.named_parameters(), a.named_parameters()):
        if n != "output.weight":  # to_empty unties; the values still match the embedding
            assert torch.equal(p, q), n


def test_pipeline_stage_interface():
    cfg = tiny(pattern="M*|M-")
    model = HybridModel(cfg).eval()
    assert cfg.stage_boundaries == [2] and [list(r) for r in cfg.stages] == [[0, 1], [2, 3]]
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        first = HybridModel(cfg).eval()
        first.load_state_dict(model.state_dict())
        second = HybridModel(cfg).eval()
        second.load_state_dict(model.state_dict())
        for i in ("2", "3"):
            del first.layers[i]
        for i in ("0", "1"):
            del second.layers[i]
        first.norm = first.output = None
        second.tok_embeddings = None
        staged = second(first(tokens))
    assert torch.equal(full, staged)


def test_num_params_and_flops():
    for cfg in (tiny(), tiny(tie_embeddings=True, pattern="MM-*|-M"), HYBRID_SIZES["hybrid-tiny"],
                HYBRID_SIZES["hybrid-debug"]):
        model = HybridModel(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters()), cfg.pattern
        assert cfg.num_params(include_embedding=False) == cfg.num_params() - cfg.vocab_size * cfg.dim
    cfg = tiny()
    dense = 6 * cfg.num_params(include_embedding=False)
    assert cfg.flops_per_token(1024) > cfg.flops_per_token(128) > dense
    # Only '*' layers grow with the sequence past the chunk; an all-Mamba model does not.
    mamba_only = tiny(pattern="MMMM")
    assert mamba_only.flops_per_token(4096) == mamba_only.flops_per_token(1024)
    big = HYBRID_SIZES["hybrid-8b"]
    assert big.n_layers == 52 and big.layer_kinds.count("M") == 24 and big.layer_kinds.count("*") == 4
    assert 7.5e9 < big.num_params() < 8.7e9


@pytest.mark.parametrize("pattern,needle", [
    ("M*X-", "unknown symbol 'X' at position 2"),
    ("M* -", "unknown symbol ' ' at position 2"),
    ("", "has no layers"),
    ("||", "has no layers"),
    ("|M*", "position 0"),
    ("M*||-", "position 3"),
    ("M*-|", "position 3"),
])
def test_pattern_errors_are_one_line(pattern, needle):
    with pytest.raises(ValueError) as err:
        HybridConfig(pattern=pattern)
    msg = str(err.value)
    assert msg.startswith("model.pattern:") and needle in msg and "\n" not in msg, msg
    with pytest.raises(ValueError):
        parse_pattern(pattern)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^model\.mamba_headdim:"):
        tiny(mamba_headdim=5)
    with pytest.raises(ValueError, match=r"^model\.ngroups:"):
        tiny(ngroups=3)
    with pytest.raises(ValueError, match=r"^model\.n_kv_heads:"):
        tiny(n_kv_heads=3)


def test_resolve_and_build():
    from longtrain.launcher.config import ModelConfig

    cfg = resolve_model_config(ModelConfig(name="hybrid-tiny", kind="hybrid", d_state=8, pattern="MM*"))
    assert isinstance(cfg, HybridConfig) and cfg.d_state == 8 and cfg.n_layers == 3
    assert isinstance(build_model(cfg), HybridModel)
    assert isinstance(resolve_model_config(ModelConfig(name="debug", kind="hybrid")), HybridConfig)
    tcfg = resolve_model_config(ModelConfig(name="tiny"))
    assert isinstance(tcfg, TransformerConfig) and isinstance(build_model(tcfg), Transformer)
    with pytest.raises(ValueError, match=r"^model\.kind:"):
        resolve_model_config(ModelConfig(name="hybrid-tiny"))
    with pytest.raises(ValueError, match=r"^model\.name:"):
        resolve_model_config(ModelConfig(name="llama3-8b", kind="hybrid"))
    with pytest.raises(ValueError, match=r"^model\.n_layers:"):
        resolve_model_config(ModelConfig(name="hybrid-tiny", kind="hybrid", n_layers=9))
    with pytest.raises(ValueError, match=r"^model\.pattern:"):
        resolve_model_config(ModelConfig(name=None, kind="hybrid", pattern="M?"))
