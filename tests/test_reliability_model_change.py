"""Resume refuses another model in one line naming the field (it resumed silently into a model
with other n_layers, tie_embeddings, n_heads or rope_theta); deliberate changes go through
checkpoint.init_from (weights only, new optimizer, step 0)."""
import pytest

from distributed import run_group
from reliability_cases import resume_into_other_models

SAME = ["checkpoint.dir=CKPT", "train.steps=3"]
REFUSED = [(["model.n_layers=2"], "model.n_layers is 4 there, 2 in this recipe"),
           (["model.tie_embeddings=true"], "model.tie_embeddings is False there, True"),
           (["model.n_heads=2", "model.n_kv_heads=1"], "model.n_heads is 4 there, 2"),
           (["model.rope_theta=500000"], "model.rope_theta is 10000.0 there, 500000.0"),
           (["model.rope_scaling={type: linear, factor: 2.0}"], "model.rope_scaling.factor is 1.0 there, 2.0"),
           (["model.kind=hybrid"], "model.kind is 'transformer' there, 'hybrid'")]
INIT_FROM = ["checkpoint.init_from=CKPT", "checkpoint.dir=ROOT/extended", "model.rope_theta=500000", "train.steps=2"]
CASES = [SAME] + [SAME + o for o, _ in REFUSED] + [INIT_FROM,
                                                   ["checkpoint.init_from=CKPT", "checkpoint.dir=ROOT/y",
                                                    "model.dim=64", "model.ffn_dim=128"],
                                                   ["checkpoint.init_from=CKPT", "checkpoint.dir=ROOT/x",
                                                    "model.n_layers=2"]]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_group(1, resume_into_other_models, str(tmp_path_factory.mktemp("models")), CASES)


def test_same_model_resumes(outcomes):
    assert outcomes[0]["error"] is None and outcomes[0]["step"] == 2 and outcomes[0]["same_weights"], outcomes[0]


@pytest.mark.parametrize("i", range(len(REFUSED)), ids=[o[0] for o, _ in REFUSED])
def test_another_model_is_refused_naming_the_field(outcomes, i):
    error = outcomes[1 + i]["error"]
    assert error is not None and error.startswith("CheckpointError: checkpoint: ") and REFUSED[i][1] in error, error
    assert "checkpoint.init_from" in error and "\n" not in error


def test_init_from_takes_weights_only(outcomes):
    out = outcomes[1 + len(REFUSED)]
    assert out["error"] is None, out
    assert out["step"] == 0 and out["same_weights"] and out["optim_state"] == 0, out
    assert sorted(out["losses"]) == [1, 2]


def test_init_from_a_model_of_other_shapes_fails_in_one_line(outcomes):
    error = outcomes[-1]["error"]
    assert error is not None and error.startswith("CheckpointError: checkpoint") and "\n" not in error, error
    assert "no place for (model.layers.2." in error, error


def test_init_from_other_shapes_fails_in_one_line(outcomes):
    error = outcomes[-2]["error"]
    assert error is not None and error.startswith("CheckpointError: checkpoint: ") and "\n" not in error, error
    assert "could not load into this model" in error and "size" in error.lower(), error
