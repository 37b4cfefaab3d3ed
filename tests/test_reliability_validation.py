"""Bad numbers fail fast in one line naming the key (each was a traceback, or silently accepted:
train.log_every=0 divided by zero, checkpoint.every=-1 saved every step, optim.lr=nan trained on
NaN, model.dim=-8 and model.n_layers=0 reached the model code, a run.dir that is a file failed
deep inside the run)."""
import pytest

from longtrain.launcher.config import RecipeError, load_recipe
from longtrain.launcher.launch import preflight

TINY = ["model.name=tiny", "data.seq_len=32"]


@pytest.mark.parametrize("override,expected", [
    ("train.log_every=0", "train.log_every: must be at least 1, got 0"),
    ("checkpoint.every=-1", "checkpoint.every: must be at least 0 (0: only at the end), got -1"),
    ("optim.lr=nan", "optim.lr: must be a finite positive number, got nan"),
    ("optim.lr=inf", "optim.lr: must be a finite positive number, got inf"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be a finite non-negative number"),
    ("optim.betas=[0.9, 1.5]", "optim.betas: expected two numbers in [0, 1)"),
    ("train.grad_clip=nan", "train.grad_clip: must be a finite number >= 0"),
    ("model.dim=-8", "model.dim: must be at least 1, got -8"),
    ("model.n_layers=0", "model.n_layers: must be at least 1, got 0"),
    ("model.n_heads=0", "model.n_heads: must be at least 1, got 0"),
    ("model.rope_theta=0", "model.rope_theta: must be a positive number, got 0.0"),
    ("train.eval_every=-5", "train.eval_every: must be at least 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be at least 0"),
])
def test_bad_numbers_fail_naming_the_key(override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, TINY + [override])
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_run_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "notadir"
    afile.write_text("x")
    for key in ("run.dir", "checkpoint.dir"):
        recipe = load_recipe(None, TINY + [f"{key}={afile}"])
        with pytest.raises(RecipeError, match=f"{key}: {afile} exists and is not a directory"):
            preflight(recipe, "recipe", launching=False)


def test_good_numbers_still_pass():
    load_recipe(None, TINY + ["optim.weight_decay=0", "train.grad_clip=0", "checkpoint.every=0", "optim.betas=[0, 0.99]"])
