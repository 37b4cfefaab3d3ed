"""A non-finite loss or gradient norm is caught before the optimizer step and before any save
(it was caught after the step's checkpoint, so a NaN model became `latest`; the gradient norm was
not checked at all). train.on_nonfinite: stop (default) | skip_step | rollback."""
import pytest

from cases import global_batch
from distributed import run_group
from reliability_cases import nonfinite_cases

BASE = ["train.steps=5", "checkpoint.every=1", "checkpoint.keep=10"] + global_batch(1)
CASES = {
    "stop_loss": {"overrides": BASE, "bad_steps": {3: "loss"}},
    "stop_grad": {"overrides": BASE, "bad_steps": {3: "grad"}},
    "skip_step": {"overrides": BASE + ["train.on_nonfinite=skip_step"], "bad_steps": {3: "grad"}},
    "rollback": {"overrides": ["train.steps=5", "checkpoint.every=2", "train.on_nonfinite=rollback"] + global_batch(1),
                 "bad_steps": {3: "loss"}},
    "rollback_twice": {"overrides": ["train.steps=5", "checkpoint.every=2", "train.on_nonfinite=rollback"]
                       + global_batch(1), "bad_steps": {3: "loss"}, "times": 2},
    "rollback_nothing": {"overrides": ["train.steps=5", "train.on_nonfinite=rollback"] + global_batch(1),
                         "bad_steps": {2: "loss"}},
    "clean": {"overrides": ["train.steps=5", "checkpoint.every=2"] + global_batch(1), "bad_steps": {}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    return dict(zip(CASES, run_group(1, nonfinite_cases, str(root), list(CASES.values()))))


@pytest.mark.parametrize("name,what", [("stop_loss", "non-finite loss at step 3"),
                                       ("stop_grad", "non-finite gradient norm at step 3")])
def test_stop_before_the_update_and_before_the_save(runs, name, what):
    out = runs[name]
    assert out["error"] is not None and out["error"].startswith("NonFiniteError: ") and what in out["error"], out
    assert "\n" not in out["error"]
    assert out["latest"] == "step_00000002", out  # the step-3 checkpoint was never written
    assert out["optimizer_steps"] == [2] and out["finite"], out  # step 3 applied nothing


def test_skip_step_drops_the_update_and_goes_on(runs):
    out = runs["skip_step"]
    assert out["error"] is None and out["nonfinite"] == [(3, "skip_step")], out
    assert sorted(out["losses"]) == [1, 2, 4, 5] and out["all_losses_finite"] and out["finite"], out
    assert out["optimizer_steps"] == [4], out  # four updates in five steps
    assert out["latest"] == "step_00000004"  # checkpoints go on (TINY saves nothing at the end)


def test_rollback_reloads_and_skips_the_batch(runs):
    out, clean = runs["rollback"], runs["clean"]
    assert out["error"] is None and out["nonfinite"] == [(3, "rollback")], out
    assert sorted(out["losses"]) == [1, 2, 3, 4, 5] and out["all_losses_finite"] and out["finite"], out
    assert out["optimizer_steps"] == [5], out  # steps 3-5 trained once after the reload
    assert out["losses"][2] == clean["losses"][2]
    assert out["losses"][3] != clean["losses"][3]  # step 3 trained on the next batch instead


def test_rollback_gives_up_when_the_step_fails_again_or_has_no_checkpoint(runs):
    again = runs["rollback_twice"]["error"]
    assert again is not None and "again after rolling back" in again and "\n" not in again, again
    none = runs["rollback_nothing"]["error"]
    assert none is not None and "found no checkpoint" in none and "checkpoint.every" in none, none
