"""Ladder Residual on one device: the models against the paper's equations written out plainly
(research notes section 2.1), ladder_layers=0 against the standard model bit for bit, and the
one-line refusals (bad keys, a checkpoint of the other architecture)."""
import dataclasses
from pathlib import Path

import pytest
import torch

from longtrain.launcher.checkpoint import CheckpointError, check_residual_architecture
from longtrain.launcher.config import RecipeError, load_recipe
from longtrain.models.hybrid import HybridConfig, HybridModel
from longtrain.models.transformer import Transformer, TransformerConfig

TCFG = TransformerConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48)
HCFG = HybridConfig(vocab_size=64, dim=32, pattern="M*-M*-", n_heads=4, n_kv_heads=2, ffn_dim=48, d_state=8,
                    mamba_headdim=16, ngroups=1, chunk_size=8)


def _sublayers(model, positions):
    """The sublayer functions f_j(x) = mixer(norm(x)) in order, j = 1..N."""
    out = []
    for block in model.layers.values():
        if hasattr(block, "kind"):  # hybrid: one sublayer per block
            if block.kind == "-":
                out.append(lambda x, b=block: b.mixer(b.norm(x)))
            else:
                out.append(lambda x, b=block: b.mixer(b.norm(x), positions, None))
        else:
            out.append(lambda x, b=block: b.attention(b.attention_norm(x), positions, None))
            out.append(lambda x, b=block: b.feed_forward(b.ffn_norm(x)))
    return out


def paper_equations(model, tokens, first_ladder_sublayer):
    """h_0 = embedding; sublayer j (1-based) reads h_{j-1} when standard and h_{max(j-2, 0)} when
    ladder (j >= first_ladder_sublayer); h_j = h_{j-1} + f_j(read); logits = out(norm(h_N))."""
    positions = torch.arange(tokens.shape[1])[None]
    f = _sublayers(model, positions)
    h = [model.tok_embeddings(tokens)]
    for j in range(1, len(f) + 1):
        read = h[j - 1] if j < first_ladder_sublayer else h[max(j - 2, 0)]
        h.append(h[j - 1] + f[j - 1](read))
    return model.output(model.norm(h[-1]))


def _pair(cls, cfg, **ladder):
    torch.manual_seed(0)
    standard = cls(cfg).double()
    standard.init_weights(seed=1)
    ladder_model = cls(dataclasses.replace(cfg, residual="ladder", **ladder)).double()
    ladder_model.load_state_dict(standard.state_dict())
    return standard, ladder_model


@pytest.mark.parametrize("kind", ["transformer", "hybrid"])
@pytest.mark.parametrize("k", [None, 1, 2, 4])
def test_ladder_forward_equals_the_paper_equations(kind, k):
    cls, cfg, per_layer = (Transformer, TCFG, 2) if kind == "transformer" else (HybridModel, HCFG, 1)
    n_layers = cfg.n_layers
    k_eff = n_layers if k is None else k
    standard, ladder = _pair(cls, cfg, ladder_layers=k)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    got = ladder(tokens)
    first = per_layer * (n_layers - k_eff) + 1
    want = paper_equations(ladder, tokens, first)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the same weights as a standard model compute something else: the rewrite is active
    assert (got - standard(tokens)).abs().max() > 1e-4
    # and the equations with no ladder sublayer are the standard model
    torch.testing.assert_close(paper_equations(standard, tokens, 10 ** 6), standard(tokens), rtol=0, atol=1e-6)
    # gradients flow to every parameter
    got.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ladder.parameters())


@pytest.mark.parametrize("cls,cfg", [(Transformer, TCFG), (HybridModel, HCFG)])
def test_zero_ladder_layers_is_the_standard_model_bit_for_bit(cls, cfg):
    standard, ladder = _pair(cls, dataclasses.replace(cfg), ladder_layers=0)
    standard, ladder = standard.float(), ladder.float()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    assert not ladder.ladder_residual
    assert torch.equal(standard(tokens), ladder(tokens))


def test_pipeline_stage_hands_on_stream_and_pending():
    """A model cut into two stages (as the pipeline cuts it) computes the same logits."""
    _, ladder = _pair(Transformer, TCFG, ladder_layers=3)
    tokens = torch.randint(0, TCFG.vocab_size, (2, 12))
    import copy

    first, last = copy.deepcopy(ladder), copy.deepcopy(ladder)
    for name in ("2", "3"):
        del first.layers[name]
    for name in ("0", "1"):
        del last.layers[name]
    first.norm = first.output = None
    last.tok_embeddings = None
    h, pending = first(tokens)
    torch.testing.assert_close(last(h, pending=pending), ladder(tokens), rtol=0, atol=1e-12)


def test_recipe_keys_fail_in_one_line():
    with pytest.raises(RecipeError, match=r"model\.ladder_layers: 5 must be between 0 and model\.n_layers=4"):
        load_recipe(None, ["model.name=tiny", "model.residual=ladder", "model.ladder_layers=5"])
    with pytest.raises(RecipeError, match=r"model\.ladder_layers: 2 is set but model\.residual is standard"):
        load_recipe(None, ["model.name=tiny", "model.ladder_layers=2"])
    with pytest.raises(RecipeError, match=r"model\.residual: 'laddder' is not one of"):
        load_recipe(None, ["model.name=tiny", "model.residual=laddder"])
    with pytest.raises(RecipeError, match=r"model\.ladder_layers: 7 must be between 0 and model\.n_layers=6"):
        load_recipe(None, ["model.kind=hybrid", "model.name=tiny", "model.residual=ladder", "model.ladder_layers=7"])
    r = load_recipe(None, ["model.name=tiny", "model.residual=ladder", "model.ladder_layers=2",
                           "parallel.ladder_overlap=false"])
    assert (r.model.residual, r.model.ladder_layers, r.parallel.ladder_overlap) == ("ladder", 2, False)


def test_checkpoint_of_the_other_architecture_is_refused():
    where = Path("ckpt/step_00000005")
    ladder_all = dataclasses.replace(TCFG, residual="ladder")
    standard_meta = {"model": {"residual": "standard", "ladder_layers": None}}
    with pytest.raises(CheckpointError, match=r"holds a standard model but .* ask for a ladder \(last 4 layers\) one"):
        check_residual_architecture(standard_meta, ladder_all, where)
    with pytest.raises(CheckpointError, match=r"holds a ladder \(last 4 layers\) model but .* standard one"):
        check_residual_architecture({"model": {"residual": "ladder", "ladder_layers": None}}, TCFG, where)
    with pytest.raises(CheckpointError, match=r"last 2 layers"):
        check_residual_architecture({"model": {"residual": "ladder", "ladder_layers": 2}}, ladder_all, where)
    # the same architecture, spelled differently, loads; so does an old checkpoint without the flag
    check_residual_architecture({"model": {"residual": "ladder", "ladder_layers": 4}}, ladder_all, where)
    check_residual_architecture({"model": {}}, TCFG, where)
    check_residual_architecture({"model": {"residual": "ladder", "ladder_layers": 0}}, TCFG, where)


class _PlainKVCache:
    """A core_attention that keeps every key/value seen so far (written out here, independent of
    any decode module): new queries attend causally to the cache plus themselves."""

    def __init__(self):
        self.k = self.v = None

    def __call__(self, q, k, v, scale, positions=None, doc_ids=None):
        past = 0 if self.k is None else self.k.shape[1]
        self.k = k if self.k is None else torch.cat([self.k, k], 1)
        self.v = v if self.v is None else torch.cat([self.v, v], 1)
        rep = q.shape[2] // k.shape[2]
        keys, values = self.k.repeat_interleave(rep, 2), self.v.repeat_interleave(rep, 2)
        scores = torch.einsum("bshd,bthd->bhst", q, keys) * scale
        allowed = torch.arange(keys.shape[1])[None, :] <= (past + torch.arange(q.shape[1]))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), values)


@pytest.mark.parametrize("k", [None, 2])
def test_ladder_decodes_token_by_token_with_a_kv_cache(k):
    """Decoding needs nothing ladder-specific: the carry form is per token, so a ladder model's
    own forward with KV caches in its attention hooks (what `generate` installs) fed one token
    at a time with its positions gives the logits of the full forward."""
    _, ladder = _pair(Transformer, TCFG, ladder_layers=k)
    tokens = torch.randint(0, TCFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    full = ladder(tokens)
    for module in ladder.modules():
        if hasattr(module, "core_attention"):
            module.core_attention = _PlainKVCache()
    steps = [ladder(tokens[:, :4], torch.arange(4)[None])]  # prefill
    for t in range(4, tokens.shape[1]):
        steps.append(ladder(tokens[:, t:t + 1], torch.tensor([[t]])))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-9)


def test_ladder_model_is_not_exported_as_a_llama():
    from longtrain.models.hf import config_to_hf

    config_to_hf(dataclasses.replace(TCFG, residual="ladder", ladder_layers=0))  # the standard model: fine
    with pytest.raises(ValueError, match=r"model\.residual: a ladder model has no Hugging Face Llama equivalent"):
        config_to_hf(dataclasses.replace(TCFG, residual="ladder", ladder_layers=1))


def test_trainer_refuses_to_resume_a_ladder_checkpoint_as_standard(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from distributed import run_group
    from ladder_cases import resume_across_residuals

    out = run_group(1, resume_across_residuals, str(tmp_path / "ckpt"))
    assert out["refused"] is not None and "\n" not in out["refused"]
    assert "holds a ladder (last 2 layers) model but model.residual/model.ladder_layers ask for a standard one" \
        in out["refused"]
    assert out["resumed_step"] == 1
