"""Recipes: inheritance, overrides, types, and one clear line per mistake."""
import pytest

from longtrain.launcher.config import RecipeError, load_recipe, resolve_degrees
from longtrain.launcher.launch import slurm_master_addr
from longtrain.models.parallel_plan import even_layer_split as layer_split


def write(path, text):
    path.write_text(text)
    return path


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  name: tiny\ntrain:\n  steps: 5\n  seed: 3\noptim:\n  lr: 1e-3\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n  steps: 9\n")
    recipe = load_recipe(child, ["train.seed=4", "parallel.pp_schedule=gpipe"])
    assert recipe.train.steps == 9 and recipe.train.seed == 4 and recipe.model.name == "tiny"
    assert recipe.optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; it is a number here
    assert recipe.parallel.pp_schedule == "gpipe"


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="base: inheritance forms a cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "optim.lrr: unknown key (did you mean 'lr'?)"),
    (["train.grad_clip=big"], "train.grad_clip: expected a number, got str 'big'"),
    (["run.tensorboard=3"], "run.tensorboard: expected true or false, got 3"),
    (["model=3"], "model: expected a section (mapping), got int 3"),
    (["parallel.pp_schedule=1f1b_interleaved"], "parallel.pp_schedule: '1f1b_interleaved' is not one of"),
    (["train.grad_accum=3"], "train.grad_accum: 3 must divide data.batch_size=4"),
    (["data.seq_len=100000", "model.name=tiny"], "data.seq_len: 100000 exceeds model.max_seq_len=1024"),
    (["model.name=tiny", "model.tie_embeddings=true", "parallel.pp=2", "run.launch.nproc_per_node=2"],
     "model.tie_embeddings: tied input/output embeddings cannot be split across pipeline stages"),
    (["parallel.cp=8", "parallel.cp_mode=ulysses", "model.name=tiny", "run.launch.nproc_per_node=8"],
     "parallel.cp_mode: ulysses needs the attention heads per tensor-parallel rank (model.n_heads / parallel.tp = "
     "4 / 1 = 4) to divide by the Ulysses degree 8"),
    (["parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.cp_kv_chunks=2", "model.name=tiny",
      "run.launch.nproc_per_node=2"],
     "parallel.cp_kv_chunks: 2 pieces of K/V need a ring, but cp_mode ulysses (ring 1 x ulysses 2) has none"),
    (["parallel.pp_schedule=interleaved_1f1b", "parallel.pp=2", "run.launch.nproc_per_node=2"],
     "parallel.pp_stages_per_rank: interleaved_1f1b needs at least 2 stages per rank"),
    (["model.name=llama3-8"], "model.name: unknown size 'llama3-8' (did you mean 'llama3-8b'?)"),
    (["train.steps"], "override 'train.steps': expected key=value"),
])
def test_one_line_errors(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_degrees_fill_and_mismatch():
    recipe = load_recipe(None, ["parallel.tp=2", "parallel.pp=2", "run.launch.nproc_per_node=8"])
    assert resolve_degrees(recipe.parallel, 8) == dict(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2)
    with pytest.raises(RecipeError, match="do not divide the world size 6"):
        resolve_degrees(recipe.parallel, 6)


def test_layer_split_is_balanced_and_complete():
    assert [len(r) for r in layer_split(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in layer_split(4, 4)] == [1, 1, 1, 1]
    assert sum((list(r) for r in layer_split(32, 6)), []) == list(range(32))
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        layer_split(3, 4)


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[003-005,009],cpu1", "gpu003"), ("node17", "node17"), ("a1,a2", "a1"), ("rack2-n[10-12]", "rack2-n10"),
])
def test_slurm_master_address(nodelist, first):
    assert slurm_master_addr(nodelist) == first


def test_shipped_recipes_validate():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(configs.glob("*.yaml")):
        load_recipe(path)


def test_on_off_keys_accept_yaml_booleans(tmp_path):
    """YAML 1.1 reads a bare `off` as false: `optim.fused: off` must mean off, not fail."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  fused: off\n")
    assert load_recipe(recipe).optim.fused == "off"
    assert load_recipe(None, ["optim.fused=on"]).optim.fused == "on"


def test_sublayer_pipeline_split_is_for_transformers():
    with pytest.raises(RecipeError, match="parallel.pp_split: sublayers splits transformer blocks"):
        load_recipe(None, ["model.kind=hybrid", "model.pattern=M*-M*-", "parallel.pp=2", "parallel.pp_split=sublayers",
                           "run.launch.nproc_per_node=2"])
    assert load_recipe(None, ["parallel.pp=2", "parallel.pp_split=sublayers", "run.launch.nproc_per_node=2",
                              "data.batch_size=2"]).parallel.pp_split == "sublayers"
