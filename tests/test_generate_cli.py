"""`longtrain generate`: a run's checkpoint (or the seeded init) continues prompts of different
lengths, for a GQA and an MLA transformer; greedy output equals the full forward's argmax; bad
TPLA settings fail with one line."""
import torch

from longtrain.launcher.cli import main
from longtrain.launcher.config import load_recipe
from longtrain.launcher.generate import load_model
from longtrain.data.tokenizers import ByteTokenizer

RECIPE = "configs/debug_cpu.yaml"


def _greedy(model, text, n):
    ids = ByteTokenizer().encode(text, True, False)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return text + ByteTokenizer().decode(ids[len(text) + 1:])


def test_generate_matches_full_forward_greedy(capsys, tmp_path):
    for over in (["model.name=tiny"], ["model.name=mla-tiny", "model.attention=mla"]):
        over = over + [f"run.dir={tmp_path}"]
        rc = main(["generate", RECIPE, *over, "--prompt", "def f(x):", "--prompt", "import", "--max-new-tokens", "6"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        model = load_model(load_recipe(RECIPE, over), log=lambda m: None)
        assert out.out.splitlines() == [_greedy(model, "def f(x):", 6), _greedy(model, "import", 6)]
        assert "seeded init (untrained)" in out.err


def test_generate_bad_tpla_settings_fail_with_one_line(capsys, tmp_path):
    over = ["model.name=mla-tiny", "model.attention=mla", f"run.dir={tmp_path}"]
    assert main(["generate", RECIPE, *over, "--prompt", "a", "--decode", "tpla", "--tpla-degree", "3"]) == 2
    assert capsys.readouterr().err.strip().endswith("model.kv_lora_rank: 16 does not divide by the TPLA degree 3")
    assert main(["generate", RECIPE, f"run.dir={tmp_path}", "model.name=tiny", "--prompt", "a", "--decode", "tpla"]) == 2
    assert "need an MLA model" in capsys.readouterr().err


def test_convert_writes_an_exact_rotated_deepseek_checkpoint(capsys, tmp_path):
    """convert: PCA-reparameterised export; it is the same MLA model (same logits), its latent
    weights differ, and a standard-attention recipe is refused with one line."""
    from longtrain.models.hf_deepseek import model_from_hf_deepseek

    over = ["model.name=mla-tiny", "model.attention=mla", f"run.dir={tmp_path / 'run'}", "data.seq_len=32"]
    assert main(["convert", RECIPE, *over, "--out", str(tmp_path / "pca"), "--calibration-batches", "2"]) == 0
    original = load_model(load_recipe(RECIPE, over), log=lambda m: None)
    converted = model_from_hf_deepseek(tmp_path / "pca").eval()
    x = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (converted(x) - original(x)).abs().max() <= 1e-5
    a, b = (m.layers["0"].attention.wkv_a.weight for m in (original, converted))
    assert not torch.allclose(a, b)
    capsys.readouterr()
    assert main(["convert", RECIPE, "model.name=tiny", f"run.dir={tmp_path / 'run'}", "--out", str(tmp_path / "x")]) == 2
    assert "model.attention: convert reparameterises MLA models" in capsys.readouterr().err


def test_eval_reports_mla_and_tpla_rows_and_retrieval_prompts_hold_the_key(tmp_path, capsys):
    import json

    from longtrain.launcher.evaluate import retrieval_prompts

    over = ["model.name=mla-tiny", "model.attention=mla", f"run.dir={tmp_path / 'run'}"]
    out = tmp_path / "rows.json"
    assert main(["eval", RECIPE, *over, "--eval-seqs", "1", "--eval-len", "40", "--prefill", "8", "--tpla-degrees", "2",
                 "--rotations", "none,hadamard", "--retrieval-lengths", "96", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["rotation"]) for r in rows] == [("mla", "-"), ("tpla_g2", "none"), ("tpla_g2", "hadamard")]
    assert all(set(r["retrieval"]) == {"96"} and 0 <= r["retrieval"]["96"] <= 1 for r in rows)
    assert rows[1]["max_abs_logit_delta"] > 0  # TPLA is not exact
    tok = ByteTokenizer()
    for ids, start, count, question in retrieval_prompts(load_recipe(RECIPE, over), tok, 200):
        text = tok.decode(ids[0].tolist())
        key = tok.decode(ids[0, start:start + count].tolist())
        assert ids.shape[1] == 200 and len(key) == 6 and text.endswith("The secret key is " + key)
        assert text.count(f"The secret key is {key}.") == 1  # stated once in the filler, asked at the end
        assert tok.decode(ids[0, start - question:start].tolist()) == " The secret key is "
