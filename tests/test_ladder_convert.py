"""`longtrain convert HF_LLAMA_DIR --ladder-layers K`: a Hugging Face Llama (transformers'
LlamaForCausalLM, tiny, saved to a temporary directory) turned into a ladder model with its upper
K layers converted. K = 0 gives transformers' logits; K > 0 leaves the first n_layers - K layers'
hidden states as transformers computes them and rewires the rest as the paper's equations say.
The recipes: the llama3-8b adaptation (validated and planned, not run) and the debug one (run here
under tp2 from a converted checkpoint). A converted checkpoint loaded as a standard model, and a
Hugging Face Llama loaded into a ladder model, are refused in one line."""
import json
from pathlib import Path

import pytest
import torch

from longtrain.launcher.cli import main
from longtrain.models.transformer import RopeScaling, Transformer, TransformerConfig, split_qkv

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
DEBUG = dict(vocab_size=260, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4)  # models/sizes.py "debug"


def _llama(path: Path, sizes: dict):
    cfg = transformers.LlamaConfig(**sizes, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _convert(hf_dir: Path, k: int, out: Path) -> int:
    return main(["convert", str(hf_dir), "--ladder-layers", str(k), "--out", str(out)])


def _load_converted(out: Path) -> tuple[Transformer, dict]:
    """Our model from the converted checkpoint: config from meta.json, weights from the DCP shards."""
    import warnings

    import torch.distributed.checkpoint as dcp

    step = out / (out / "latest").read_text().strip()
    meta = json.loads((step / "meta.json").read_text())
    fields = {k: v for k, v in meta["model"].items() if k != "kind"}
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    model = Transformer(TransformerConfig(**fields))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "loading in a single process": it is
        dcp.load(state, checkpoint_id=str(step))
    model.load_state_dict(state["model"])
    return model.eval(), meta


def _stream_after_each_layer(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after each layer (in carry form: the stream plus the pending output)."""
    seen = []

    def hook(module, args, out):
        seen.append(out[0] + out[1] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(hook) for layer in model.layers.values()]
    logits = model(tokens)
    for h in handles:
        h.remove()
    return seen, logits


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return root, _llama(root / "llama", TINY)


def test_k0_reproduces_the_original_logits(tiny_llama, tmp_path):
    hf_dir, reference = tiny_llama[0] / "llama", tiny_llama[1]
    assert _convert(hf_dir, 0, tmp_path / "k0") == 0
    ours, meta = _load_converted(tmp_path / "k0")
    assert (meta["model"]["residual"], meta["model"]["ladder_layers"]) == ("ladder", 0)
    assert not ours.ladder_residual  # ladder_layers 0 is the standard model
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_upper_k_layers_converted_the_rest_unchanged(tiny_llama, tmp_path, k):
    from test_ladder_model import paper_equations

    hf_dir, reference = tiny_llama[0] / "llama", tiny_llama[1]
    assert _convert(hf_dir, k, tmp_path / "conv") == 0
    ours, meta = _load_converted(tmp_path / "conv")
    n = TINY["num_hidden_layers"]
    assert (meta["model"]["residual"], meta["model"]["ladder_layers"]) == ("ladder", k) and ours.ladder_residual
    assert meta["converted_from"]["ladder_layers"] == k
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(tokens, output_hidden_states=True).hidden_states  # [embedding, layer 0, ...]
        got, logits = _stream_after_each_layer(ours, tokens)
        for i in range(n - k):  # the standard layers: what transformers computes
            torch.testing.assert_close(got[i], want[i + 1], rtol=1e-5, atol=1e-5)
        # the first converted layer computes something else (the last entry of `want` is normed)
        assert (got[n - k] - want[n - k + 1]).abs().max() > 1e-3
        # and the converted model is the section 2.1 equations with its first ladder sublayer fed
        # the stream after the last standard layer's attention
        torch.testing.assert_close(logits, paper_equations(ours, tokens, 2 * (n - k) + 1), rtol=0, atol=1e-5)
        assert (logits - reference(tokens).logits).abs().max() > 1e-3


def test_bad_input_fails_in_one_line(tiny_llama, tmp_path, capsys):
    hf_dir = tiny_llama[0] / "llama"
    assert _convert(hf_dir, 5, tmp_path / "a") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--ladder-layers: 5 must be between 0 and the checkpoint's 4 layers" in err
    assert _convert(tmp_path / "missing", 1, tmp_path / "b") == 2
    assert "not a Hugging Face checkpoint directory" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert _convert(hf_dir, 1, tmp_path / "full") == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep me"
    assert main(["convert", str(hf_dir), "--ladder-layers", "1", "--out", str(tmp_path / "c"), "model.dim=8"]) == 2
    assert "recipe overrides (model.dim=8) do not apply" in capsys.readouterr().err


def test_a_hugging_face_llama_is_not_loaded_into_a_ladder_model(tiny_llama):
    from longtrain.models.hf import config_from_hf, load_into_model

    hf_dir = tiny_llama[0] / "llama"
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    load_into_model(Transformer(cfg), hf_dir)  # the standard model: fine
    import dataclasses

    with pytest.raises(ValueError, match=r"model\.residual: the model is a ladder model, the checkpoint a "
                                         r"standard Llama \(convert it: longtrain convert"):
        load_into_model(Transformer(dataclasses.replace(cfg, residual="ladder", ladder_layers=2)), hf_dir)


def test_llama3_8b_adaptation_recipe():
    """Validated and planned for its cluster (2 x 8 H100), not run: the paper's adaptation."""
    from longtrain.launcher.config import load_recipe
    from longtrain.models.sizes import resolve_model_config

    recipe = load_recipe(str(REPO / "configs/llama3_8b_ladder.yaml"), [])
    cfg = resolve_model_config(recipe.model)
    assert (cfg.n_layers, cfg.residual, cfg.ladder_layers) == (32, "ladder", 16)  # the upper 16 of 32
    assert (recipe.optim.lr, recipe.optim.warmup_steps) == (5e-6, 200)
    assert recipe.checkpoint.init_from and recipe.model.hf_checkpoint is None
    assert recipe.parallel.tp == 2 and recipe.parallel.ladder_overlap
    world = recipe.run.launch.nproc_per_node * recipe.run.launch.nnodes
    tokens = recipe.train.steps * world // recipe.parallel.tp * recipe.data.batch_size * recipe.data.seq_len
    assert 2.9e9 < tokens < 3.2e9  # about 3B tokens, as the paper
    assert main(["plan", str(REPO / "configs/llama3_8b_ladder.yaml"), "--nodes", "2"]) == 0  # fits its GPUs


def test_debug_adaptation_recipe_runs_from_a_converted_checkpoint(tmp_path):
    from distributed import run_group
    from ladder_cases import finetune_from_converted

    reference = _llama(tmp_path / "hf", DEBUG)
    assert _convert(tmp_path / "hf", 2, tmp_path / "converted") == 0
    overrides = ["train.steps=3", "data.seq_len=64", "data.batch_size=2", f"run.dir={tmp_path / 'run'}",
                 "checkpoint.save_at_end=false", "run.progress=false", "run.tensorboard=false", "data.num_workers=0",
                 "train.eval_every=0"]
    out = run_group(2, finetune_from_converted, str(REPO / "configs/ladder_debug_cpu.yaml"),
                    str(tmp_path / "converted"), overrides)
    assert out["refused"] is not None and "\n" not in out["refused"]
    assert "holds a ladder (last 2 layers) model but model.residual/model.ladder_layers ask for a standard one" \
        in out["refused"]
    hf = reference.state_dict()
    wq, wk, wv = split_qkv(out["start"]["layers.3.attention.wqkv.weight"], reference.config.num_attention_heads,
                           reference.config.num_key_value_heads)
    for ours, theirs in [(wq, "model.layers.3.self_attn.q_proj.weight"), (wk, "model.layers.3.self_attn.k_proj.weight"),
                         (wv, "model.layers.3.self_attn.v_proj.weight"),
                         (out["start"]["layers.0.ffn_norm.weight"], "model.layers.0.post_attention_layernorm.weight"),
                         (out["start"]["output.weight"], "lm_head.weight")]:
        torch.testing.assert_close(ours, hf[theirs], rtol=0, atol=0)
    losses = list(out["losses"].values())
    assert out["ladder_layers"] == 2 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert out["counts"]["grad_deferred"] > 0  # trained with the backward overlap on
