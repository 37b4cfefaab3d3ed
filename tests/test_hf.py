"""Hugging Face Llama import/export, checked against transformers' own LlamaForCausalLM."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longtrain.models import hf  # noqa: E402
from longtrain.models.hf import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    load_into_model,
    model_from_hf,
    save_hf_checkpoint,
)
from longtrain.models.transformer import RopeScaling, Transformer, TransformerConfig, rope_inv_freq  # noqa: E402

TOL = 1e-5
VOCAB, SEQ = 300, 96  # SEQ runs past ORIG_MAX so scaled RoPE is exercised beyond the original context
ORIG_MAX = 32

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG_MAX},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "original_max_position_embeddings": ORIG_MAX},
}
OUR_ROPES = {
    "default": RopeScaling(),
    "linear": RopeScaling(type="linear", factor=4.0),
    "llama3": RopeScaling(type="llama3", factor=4.0, original_max_position=ORIG_MAX, low_freq_factor=1.0,
                          high_freq_factor=4.0),
    "yarn": RopeScaling(type="yarn", factor=4.0, original_max_position=ORIG_MAX, beta_fast=32.0, beta_slow=1.0),
}
# (rope, tied): GQA (4 heads, 2 kv heads) everywhere; tied/untied across the rope types.
CASES = [("default", False), ("default", True), ("linear", False), ("llama3", True), ("llama3", False),
         ("yarn", False), ("yarn", True)]


def hf_config(rope="default", tie=False, **over) -> LlamaConfig:
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, intermediate_size=128, tie_word_embeddings=tie, initializer_range=0.1,
              max_position_embeddings=4 * ORIG_MAX, rms_norm_eps=1e-5, rope_theta=10000.0)
    if ROPES[rope] is not None:
        kw["rope_scaling"] = dict(ROPES[rope])
    kw.update(over)
    return LlamaConfig(**kw)


def our_config(rope="default", tie=False) -> TransformerConfig:
    return TransformerConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                             norm_eps=1e-5, rope_theta=10000.0, rope_scaling=OUR_ROPES[rope],
                             max_seq_len=4 * ORIG_MAX, tie_embeddings=tie, init_std=0.1)


def perturb_norms(model: torch.nn.Module, seed: int):
    """Norm weights start at one; make them distinct so a swapped norm mapping would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def make_hf_model(rope="default", tie=False, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(rope, tie)).float().eval()
    perturb_norms(model, seed)
    return model


def make_our_model(rope="default", tie=False, seed=0) -> Transformer:
    model = Transformer(our_config(rope, tie))
    model.init_weights(seed=seed)
    perturb_norms(model, seed)
    return model.eval()


def input_ids(seed=123):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids):
    return model(input_ids=ids).logits


def assert_close(a, b, tol=TOL):
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs logit difference {diff:.3g} > {tol}"
    assert a.abs().max().item() > 0.5, "logits too small for the comparison to mean anything"


# ----------------------------------------------------------------------------------------------
# Import: transformers -> ours
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope,tie", CASES)
def test_import_matches_transformers(tmp_path, rope, tie):
    ref = make_hf_model(rope, tie)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    cfg, state = load_hf_checkpoint(tmp_path / "hf")
    assert cfg == our_config(rope, tie)
    assert cfg.n_kv_heads == 2 and cfg.n_heads == 4  # GQA
    assert ("output.weight" in state) and (state["output.weight"] is state["tok_embeddings.weight"]) == tie

    model = Transformer(cfg).eval()
    load_into_model(model, tmp_path / "hf")
    ids = input_ids()
    with torch.no_grad():
        ours = model(ids)
    assert_close(ours, hf_logits(ref, ids))

    built = model_from_hf(tmp_path / "hf").eval()
    if tie:
        assert built.output.weight is built.tok_embeddings.weight
    with torch.no_grad():
        assert_close(built(ids), hf_logits(ref, ids))


def test_tolerance_catches_a_wrong_mapping(tmp_path):
    """Swapping gate and up projections must break the comparison, or the checks above are vacuous."""
    ref = make_hf_model("llama3")
    ref.save_pretrained(tmp_path / "hf")
    cfg, state = load_hf_checkpoint(tmp_path / "hf")
    state["layers.0.feed_forward.w1.weight"], state["layers.0.feed_forward.w3.weight"] = (
        state["layers.0.feed_forward.w3.weight"], state["layers.0.feed_forward.w1.weight"])
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    ids = input_ids()
    with torch.no_grad():
        assert (model(ids) - hf_logits(ref, ids)).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------------------------
# Export: ours -> transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope,tie", CASES)
def test_export_matches_transformers(tmp_path, rope, tie):
    model = make_our_model(rope, tie, seed=5)
    out = save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "export")
    assert out == tmp_path / "export"
    names = sorted(os.listdir(out))
    assert names == ["config.json", "model.safetensors"]
    written = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in written) == (not tie)

    ref = LlamaForCausalLM.from_pretrained(out).float().eval()
    assert ref.config.num_key_value_heads == 2
    assert ref.config.tie_word_embeddings == tie
    ids = input_ids(7)
    with torch.no_grad():
        assert_close(hf_logits(ref, ids), model(ids))

    # And back: the exported directory imports to the same config and tensors.
    cfg, state = load_hf_checkpoint(out)
    assert cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_sharded_export_round_trip(tmp_path):
    model = make_our_model("yarn", tie=False, seed=3)
    limit = 40_000  # bytes; the embedding and head are 76,800 bytes each, so they get shards of their own
    out = save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "sharded", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert len(shards) > 2 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        tensors = load_file(out / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == 2 + 2 * 9 + 1  # embed, head, 9 per layer, norm

    cfg, state = load_hf_checkpoint(out)
    assert cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name

    ref = LlamaForCausalLM.from_pretrained(out).float().eval()
    ids = input_ids(9)
    with torch.no_grad():
        assert_close(hf_logits(ref, ids), model(ids))

    # Re-export the imported weights unsharded: identical tensors.
    save_hf_checkpoint(state, cfg, tmp_path / "single")
    cfg2, state2 = load_hf_checkpoint(tmp_path / "single")
    assert cfg2 == cfg and all(torch.equal(state2[k], state[k]) for k in state)


def test_transformers_sharded_checkpoint_imports(tmp_path):
    ref = make_hf_model("default", tie=False, seed=2)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = model_from_hf(tmp_path / "hf").eval()
    ids = input_ids()
    with torch.no_grad():
        assert_close(model(ids), hf_logits(ref, ids))


def test_export_dtype(tmp_path):
    model = make_our_model("default", tie=True)
    out = save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    cfg, state = load_hf_checkpoint(out)
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16
    fresh = Transformer(cfg)
    load_into_model(fresh, out)  # casts into the fp32 parameters
    assert fresh.output.weight is fresh.tok_embeddings.weight


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
    """Some exports of tied models still store lm_head.weight; it is the embedding and is ignored."""
    ref = make_hf_model("default", tie=True)
    ref.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old buffer, ignored
    save_file(tensors, path, metadata={"format": "pt"})
    model = model_from_hf(tmp_path / "hf").eval()
    ids = input_ids()
    with torch.no_grad():
        assert_close(model(ids), hf_logits(ref, ids))


# ----------------------------------------------------------------------------------------------
# RoPE: our inverse frequencies against transformers' definitions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim,theta,max_pos,params", [
    (128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    (128, 500000.0, 32768, {"rope_type": "linear", "factor": 4.0}),
    (128, 1000000.0, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    (64, 10000.0, 65536, {"rope_type": "yarn", "factor": 16.0, "beta_fast": 16.0, "beta_slow": 2.0,
                          "original_max_position_embeddings": 4096}),
    (16, 10000.0, 128, dict(ROPES["yarn"])),
    (16, 10000.0, 128, dict(ROPES["llama3"])),
])
def test_rope_inv_freq_matches_transformers(head_dim, theta, max_pos, params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_theta=theta, rope_scaling=dict(params))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    cfg = config_from_hf(config.to_dict())
    inv, scale = rope_inv_freq(head_dim, cfg.rope_theta, cfg.rope_scaling)
    # transformers computes in fp32, we in fp64 rounded once: a couple of ulps apart.
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Config mapping
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", list(ROPES))
def test_config_round_trip(rope):
    cfg = our_config(rope, tie=rope == "llama3")
    out = config_to_hf(cfg)
    assert out["architectures"] == ["LlamaForCausalLM"] and out["model_type"] == "llama"
    assert out["torch_dtype"] == "float32"
    assert config_from_hf(out) == cfg
    # transformers accepts the dict as it is and reads the same RoPE settings back.
    hf_cfg = LlamaConfig.from_dict(out)
    assert config_from_hf(hf_cfg.to_dict()) == cfg


def test_config_legacy_and_defaults():
    legacy = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "vocab_size": 300, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = config_from_hf(legacy)
    assert cfg.n_kv_heads == 4 and cfg.norm_eps == 1e-6 and cfg.max_seq_len == 2048
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == RopeScaling(type="linear", factor=2.0)
    assert not cfg.tie_embeddings
    # transformers>=5 layout; original_max_position_embeddings defaults to max_position_embeddings.
    new = {**legacy, "rope_scaling": None, "max_position_embeddings": 4096,
           "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}
    cfg = config_from_hf(new)
    assert cfg.rope_theta == 1e6
    assert cfg.rope_scaling == RopeScaling(type="yarn", factor=2.0, original_max_position=4096)


BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300}


@pytest.mark.parametrize("change,key", [
    ({"head_dim": 32}, "head_dim"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.0}}, "attention factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_config_rejects_unsupported(change, key):
    with pytest.raises(ValueError) as err:
        config_from_hf({**BASE, **change}, source="ckpt/config.json")
    assert key in str(err.value) and "ckpt/config.json" in str(err.value)


def test_unsupported_config_in_checkpoint_names_file(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["attention_bias"] = True
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="attention_bias") as err:
        load_hf_checkpoint(tmp_path / "hf")
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# Import errors
# ----------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_hf_checkpoint(missing)
    assert str(missing) in str(err.value)


def test_missing_config(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        load_hf_checkpoint(tmp_path / "hf")
    assert str(tmp_path / "hf" / "config.json") in str(err.value)


def test_missing_weights(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.safetensors") as err:
        load_hf_checkpoint(tmp_path / "hf")
    assert "pytorch_model.bin" in str(err.value) and str(tmp_path / "hf") in str(err.value)


def _edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_missing_tensor(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    path = _edit_weights(tmp_path / "hf", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight") as err:
        load_hf_checkpoint(tmp_path / "hf")
    assert str(path) in str(err.value)


def test_missing_lm_head_when_untied(tmp_path):
    make_hf_model(tie=False).save_pretrained(tmp_path / "hf")
    _edit_weights(tmp_path / "hf", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing tensors: lm_head.weight"):
        load_hf_checkpoint(tmp_path / "hf")


def test_unexpected_tensor(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    path = _edit_weights(tmp_path / "hf", lambda t: t.update({
        "model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64),  # a third layer in a 2-layer config
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match="unexpected tensors") as err:
        load_hf_checkpoint(tmp_path / "hf")
    msg = str(err.value)
    assert str(path) in msg and "model.layers.2.mlp.up_proj.weight" in msg and "q_proj.bias" in msg


def test_shape_mismatch(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["intermediate_size"] = 96
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight: shape .* does not match") as err:
        load_hf_checkpoint(tmp_path / "hf")
    assert str(tmp_path / "hf" / "model.safetensors") in str(err.value)


def test_missing_shard(tmp_path):
    model = make_our_model()
    out = save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json") as err:
        load_hf_checkpoint(out)
    assert str(victim) in str(err.value)


def test_load_into_model_mismatch(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    other = Transformer(dataclasses.replace(our_config(), norm_eps=1e-6))
    with pytest.raises(ValueError, match="norm_eps") as err:
        load_into_model(other, tmp_path / "hf")
    assert "config.json" in str(err.value)

    pipeline_stage = Transformer(our_config())
    pipeline_stage.norm = None  # as a pipeline stage without the head would have
    with pytest.raises(ValueError, match="unsharded"):
        load_into_model(pipeline_stage, tmp_path / "hf")


# ----------------------------------------------------------------------------------------------
# Export safety
# ----------------------------------------------------------------------------------------------
def test_export_rejects_bad_state_dict(tmp_path):
    model = make_our_model()
    state = model.state_dict()
    state.pop("layers.1.ffn_norm.weight")
    with pytest.raises(ValueError, match="missing layers.1.ffn_norm.weight"):
        save_hf_checkpoint(state, model.cfg, tmp_path / "out")
    state = model.state_dict()
    state["layers.0.attention.wqkv.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv\.weight: shape"):
        save_hf_checkpoint(state, model.cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_export_refuses_to_overwrite(tmp_path):
    model = make_our_model(seed=1)
    dest = tmp_path / "out"
    dest.mkdir()  # an empty directory is fine to fill
    save_hf_checkpoint(model.state_dict(), model.cfg, dest)
    before = (dest / "model.safetensors").read_bytes()
    other = make_our_model(seed=2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_checkpoint(other.state_dict(), other.cfg, dest)
    assert (dest / "model.safetensors").read_bytes() == before
    save_hf_checkpoint(other.state_dict(), other.cfg, dest, overwrite=True)
    _, state = load_hf_checkpoint(dest)
    assert torch.equal(state["layers.0.attention.wqkv.weight"], other.state_dict()["layers.0.attention.wqkv.weight"])
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup directories left


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = make_our_model(seed=1)
    good = save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "good")
    good_files = {p.name: p.read_bytes() for p in good.iterdir()}

    calls = {"n": 0}
    real_save = hf.save_file

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save)
    other = make_our_model(seed=2)
    with pytest.raises(OSError, match="disk full"):  # sharded export dies on its second shard
        save_hf_checkpoint(other.state_dict(), other.cfg, tmp_path / "good", max_shard_bytes=40_000,
                           overwrite=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_files
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(other.state_dict(), other.cfg, tmp_path / "new", max_shard_bytes=40_000)
    assert sorted(os.listdir(tmp_path)) == ["good"]


def test_load_into_model_ignores_unused_rope_fields(tmp_path):
    """A linear-scaled model whose config carries an (unused) original_max_position still loads."""
    make_hf_model("linear").save_pretrained(tmp_path / "hf")
    cfg = our_config("linear")
    cfg.rope_scaling = dataclasses.replace(cfg.rope_scaling, original_max_position=12345)
    load_into_model(Transformer(cfg), tmp_path / "hf")
