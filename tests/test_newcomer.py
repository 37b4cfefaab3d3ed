"""Trips a newcomer met (issue 17): recipes ship with longtrain (package data) and `longtrain train
debug_cpu` finds them by name from any directory (a file at the given path still wins; an unknown
name fails with one line listing them); the resolved model is printed at start, so overriding a
field of a named size shows the fields it kept; model keys from Llama and other frameworks
(multiple_of, rope_scaling: llama3, did-you-mean for parallel.ac); no MFU against a CPU "peak"."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.launcher.cli import main
from longtrain.launcher.config import RecipeError, load_recipe, recipe_file
from longtrain.models.sizes import describe_model, resolve_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["debug_cpu", "debug_cpu.yaml", "configs/debug_cpu.yaml"])
def test_shipped_recipe_by_name_from_anywhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_file(name).resolve() == (ROOT / "configs" / "debug_cpu.yaml").resolve()
    assert load_recipe(name).run.launch.nproc_per_node == 4


def test_shipped_recipe_with_base_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("llama3_8b_128k")  # `base: llama3_8b.yaml`, relative to the shipped file
    assert recipe.data.seq_len == load_recipe(ROOT / "configs" / "llama3_8b_128k.yaml").data.seq_len
    assert main(["config", "debug_cpu", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out


def test_a_file_at_the_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug_cpu.yaml").write_text("train:\n  steps: 3\n")
    assert recipe_file("debug_cpu.yaml") == Path("debug_cpu.yaml")
    assert load_recipe("debug_cpu.yaml").train.steps == 3


def test_unknown_name_lists_the_shipped_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"^recipe file not found: debug_gpu \(recipes shipped with longtrain, "
                                          r"by name: .*debug_cpu, .*llama3_8b_128k"):
        load_recipe("debug_gpu")
    with pytest.raises(RecipeError, match="recipe file not found: elsewhere/debug_cpu.yaml"):
        load_recipe("elsewhere/debug_cpu.yaml")  # a real directory part is not a name
    assert main(["config", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtrain: error: recipe file not found: nope (")


def test_resolved_model_is_described():
    recipe = load_recipe(ROOT / "configs" / "debug_cpu.yaml", ["model.name=tiny", "model.n_layers=3"])
    assert describe_model(recipe.model, resolve_model_config(recipe.model)) == (
        "tiny with n_layers given: dim 32, 3 layers, 4 heads (2 kv, head dim 8), ffn 64, vocab 260, 0.04M parameters")
    recipe = load_recipe(ROOT / "configs" / "hybrid_debug_cpu.yaml", ["model.name=tiny"])
    assert ", pattern M*-|M*-," in describe_model(recipe.model, resolve_model_config(recipe.model))


def test_training_prints_the_resolved_model_at_start(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train", "debug_cpu", "--nproc", "1",
                           "model.name=tiny", "model.n_layers=3", "parallel.tp=1", "data.seq_len=32",
                           "data.batch_size=2", "train.steps=1", "train.eval_every=0", "run.tensorboard=false",
                           "run.progress=false", f"run.dir={tmp_path / 'run'}", "run.peak_tflops=0.001"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "longtrain: model tiny with n_layers given: dim 32, 3 layers, 4 heads (2 kv, head dim 8), ffn 64" in proc.stdout
    # MFU on CPU only against a peak the user gives (run.peak_tflops); without one it is null (test_training).
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.001)


def test_no_mfu_peak_on_cpu():
    import torch

    from longtrain.launcher.metrics import device_peak_tflops, format_line

    assert device_peak_tflops(torch.device("cpu")) == 0.0 and device_peak_tflops(torch.device("cpu"), 50.0) == 50.0
    line = format_line(dict(step=1, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_second=10.0, tflops_per_device=0.1,
                            mfu=None, peak_memory_gb=0.3))
    assert "MFU -  mem 0.30 GiB" in line


def _model(*overrides):
    recipe = load_recipe(ROOT / "configs" / "debug_cpu.yaml", list(overrides))
    return recipe, resolve_model_config(recipe.model)


def test_multiple_of_sizes_the_ffn_as_llama_does():
    # Llama's FeedForward, written out: hidden = int(2 * (4 * dim) / 3); hidden = int(multiplier * hidden);
    # hidden = multiple_of * ceil(hidden / multiple_of). Llama-3-8B's params.json (dim 4096,
    # ffn_dim_multiplier 1.3, multiple_of 1024) gives its intermediate_size 14336.
    _, cfg = _model("model.dim=4096", "model.n_heads=32", "model.n_kv_heads=8", "model.multiple_of=1024",
                    "model.ffn_dim_multiplier=1.3")
    assert cfg.ffn_dim == 14336
    _, cfg = _model("model.multiple_of=256")  # torchtitan's llama3 debugmodel: dim 256, multiple_of 256
    assert cfg.ffn_dim == 768
    from longtrain.models.registry import build_model

    _, cfg = _model("model.name=tiny", "model.multiple_of=16")  # int(2 * 128 / 3) = 85 -> 96
    model = build_model(cfg)
    ffn = [m for name, m in model.named_modules() if name.endswith("w1")]
    assert ffn and all(m.out_features == 96 for m in ffn)
    _, cfg = _model("model.kind=hybrid", "model.name=tiny", "model.multiple_of=16")
    assert cfg.ffn_dim == 96


@pytest.mark.parametrize("overrides,expected", [
    (["model.multiple_of=256", "model.ffn_dim=100"], "model.multiple_of: give model.ffn_dim or model.multiple_of"),
    (["model.ffn_dim_multiplier=1.3"], "model.ffn_dim_multiplier: needs model.multiple_of"),
    (["model.multiple_of=0"], "model.multiple_of: must be at least 1, got 0"),
    (["parallel.ac=full"], "parallel.ac: unknown key (did you mean 'activation_checkpoint'?)"),
    (["parallel.sp=true"], "parallel.sp: unknown key (did you mean 'sequence_parallel'?)"),
    (["model.intermediate_size=128"], "model.intermediate_size: unknown key (did you mean 'ffn_dim'?)"),
    (["model.rope_scaling.type=linear"], "model.rope_scaling.factor: required for rope_scaling type linear"),
    (["model.rope_scaling=yarn"], "model.rope_scaling.factor: required for rope_scaling type yarn"),
    (["model.rope_scaling=llama4"], "model.rope_scaling.type: 'llama4' is not one of"),
])
def test_model_trips_fail_with_one_line(overrides, expected):
    with pytest.raises(RecipeError) as err:
        _model(*overrides)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_rope_scaling_llama3_alone_takes_llama31_values():
    llama31 = dict(type="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0)
    for overrides in (["model.rope_scaling=llama3"], ["model.rope_scaling.type=llama3"]):
        _, cfg = _model(*overrides)
        assert {k: getattr(cfg.rope_scaling, k) for k in llama31} == llama31
    _, cfg = _model("model.rope_scaling.type=llama3", "model.rope_scaling.factor=32")
    assert cfg.rope_scaling.factor == 32.0 and cfg.rope_scaling.high_freq_factor == 4.0
    _, cfg = _model("model.rope_scaling.type=linear", "model.rope_scaling.factor=4")
    assert cfg.rope_scaling.type == "linear" and cfg.rope_scaling.factor == 4.0
