"""Multi-head latent attention (models/mla.py) against transformers' DeepseekV3 classes, and the
Hugging Face DeepSeek-V3 import/export (models/hf_deepseek.py)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from longtrain.kernels.attention import BlockMask, attention_backward, attention_forward  # noqa: E402
from longtrain.models.hf_deepseek import (config_from_hf, load_hf_deepseek, model_from_hf_deepseek,  # noqa: E402
                                          save_hf_deepseek)
from longtrain.models.mla import MLAConfig, MLATransformer  # noqa: E402

TOL = 1e-5
VOCAB, SEQ = 300, 80

ROPES = {
    "default": None,
    # DeepSeek-V3's own YaRN settings (mscale = mscale_all_dim = 1), original context 32 so SEQ runs past it
    "yarn_v3": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                "mscale_all_dim": 1.0, "original_max_position_embeddings": 32},
    # only mscale_all_dim: cos/sin get the default temperature, the softmax scale mscale_all_dim^2
    "yarn_all_dim": {"rope_type": "yarn", "factor": 8.0, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 32},
}


def hf_config(rope="default", q_lora=None, tie=False, interleave=True, layers=2, dense=None) -> DeepseekV3Config:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
              q_lora_rank=q_lora, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
              first_k_dense_replace=layers if dense is None else dense, n_routed_experts=4, num_experts_per_tok=2,
              n_group=1, topk_group=1, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
              rope_interleave=interleave, initializer_range=0.1)
    if ROPES[rope] is not None:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **ROPES[rope]}
    return DeepseekV3Config(**kw)


def hf_model(cfg: DeepseekV3Config, seed=0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from one so that a dropped or misplaced gain shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tokens(batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


CASES = [("default", None, False, True), ("yarn_v3", 24, False, True), ("yarn_all_dim", None, True, True),
         ("default", 24, False, False)]


@pytest.mark.parametrize("rope,q_lora,tie,interleave", CASES)
def test_import_equals_transformers_and_export_round_trips(tmp_path, rope, q_lora, tie, interleave):
    """An imported DeepseekV3ForCausalLM gives its logits within 1e-5 (RoPE past the original
    context, low-rank and full-rank queries, tied heads, interleaved and rotate-half RoPE rows), and
    our export loads back in transformers with the same logits."""
    ref = hf_model(hf_config(rope, q_lora, tie, interleave))
    ref.save_pretrained(tmp_path / "hf")
    ours = model_from_hf_deepseek(tmp_path / "hf").eval()
    assert type(ours.layers["0"].attention).__name__ == "MLAttention"
    x = tokens()
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    assert (got - want).abs().max() <= TOL
    save_hf_deepseek(ours.state_dict(), ours.cfg, tmp_path / "export")
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (back(x).logits - want).abs().max() <= TOL
    # and the export imports to the same weights
    cfg2, state2 = load_hf_deepseek(tmp_path / "export")
    assert cfg2 == ours.cfg
    for name, t in ours.state_dict().items():
        assert torch.equal(state2[name], t), name


def test_attention_layer_equals_deepseek_attention_with_gradients():
    """One MLA layer against DeepseekV3Attention on the same weights: output and input gradient."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hcfg = hf_config("yarn_v3", q_lora=24)
    ref = hf_model(hcfg)
    ours = MLATransformer(config_from_hf(hcfg.to_dict()))
    from longtrain.models.hf_deepseek import _permute_rope_rows, hf_to_ours_name

    state = {hf_to_ours_name(k): v for k, v in ref.state_dict().items() if hf_to_ours_name(k)}
    ours.load_state_dict({k: _permute_rope_rows(k, v, ours.cfg, True) for k, v in state.items()})
    x = torch.randn(2, SEQ, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    pos = torch.arange(SEQ)[None].expand(2, -1)
    cos, sin = DeepseekV3RotaryEmbedding(hcfg)(x, pos)
    mask = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
    want = ref.model.layers[0].self_attn(x, (cos, sin), mask)[0]
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    got = ours.layers["0"].attention(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    assert (got - want).abs().max() <= TOL
    assert (g_got - g_want).abs().max() <= 1e-4


def test_moe_layers_and_inconsistent_dims_fail_with_one_line(tmp_path):
    ref = hf_model(hf_config(layers=2, dense=1))
    ref.save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="first_k_dense_replace: layers 1..1 are mixture-of-experts") as err:
        load_hf_deepseek(tmp_path / "moe")
    assert "\n" not in str(err.value)
    ref = hf_model(hf_config())
    ref.save_pretrained(tmp_path / "dims")
    cfg = json.loads((tmp_path / "dims" / "config.json").read_text())
    cfg["kv_lora_rank"] = 16
    (tmp_path / "dims" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"self_attn\.kv_a_\w+\.weight: shape .*MLA dims inconsistent"):
        load_hf_deepseek(tmp_path / "dims")


@pytest.mark.parametrize("offsets", [(0, 0), (5, 2)])
def test_kernel_takes_a_value_head_dim_other_than_the_query_key_dim(offsets):
    """The fused backend (zero-padded to one head dim) equals the reference with dv != dqk, both ways."""
    gen = torch.Generator().manual_seed(0)
    for dqk, dv in ((24, 12), (8, 20)):
        q, k = (torch.randn(2, 16, 4, dqk, generator=gen) for _ in range(2))
        v, dout = torch.randn(2, 16, 4, dv, generator=gen), torch.randn(2, 16, 4, dv, generator=gen)
        mask = BlockMask(causal=True, q_offset=offsets[0], k_offset=offsets[1])
        ref = attention_forward(q.double(), k.double(), v.double(), scale=0.3, mask=mask, backend="reference")
        out, lse = attention_forward(q, k, v, scale=0.3, mask=mask, backend="torch")
        assert out.shape == (2, 16, 4, dv)
        assert (out.double() - ref[0]).abs().max() <= 1e-5
        assert (lse.double() - ref[1]).abs().max() <= 1e-5
        want = attention_backward(dout.double(), q.double(), k.double(), v.double(), *ref, scale=0.3, mask=mask,
                                  backend="reference")
        got = attention_backward(dout, q, k, v, out, lse, scale=0.3, mask=mask, backend="torch")
        for g, w in zip(got, want):
            assert g.shape == w.shape and (g.double() - w).abs().max() <= 1e-4


def test_mla_config_counts_parameters():
    cfg = MLAConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, ffn_dim=96, q_lora_rank=24)
    model = MLATransformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
