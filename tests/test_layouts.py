"""Every parallel layout computes what one process computes: per-step losses within 1e-4
relative and matching final weights, for the same global batch and seed. Context-parallel
layouts included (cp2, cp4, dp2 x cp2, tp2 x cp2, pp2 x cp2, each with a different cp mode)."""
import pytest
import torch

from cases import global_batch, train_cases
from distributed import run_group

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

STEPS = ["train.steps=5"]

LAYOUTS = {
    2: {
        "dp2": ["parallel.dp_replicate=2", "parallel.dp_shard=1"] + global_batch(2),
        "dp_shard2": ["parallel.dp_shard=2"] + global_batch(2),
        "dp_shard2_keep_gathered": ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"] + global_batch(2),
        "tp2": ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "pp2_1f1b": ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=1f1b"] + global_batch(1),
        "cp2_ring": ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.dp_shard=1"] + global_batch(1),
        "cp2_zigzag": ["parallel.cp=2", "parallel.cp_mode=zigzag", "parallel.dp_shard=1"] + global_batch(1),
        "cp2_ring_kv_chunks3": ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.cp_kv_chunks=3",
                                "parallel.dp_shard=1"] + global_batch(1),
        "cp2_zigzag_recompute": ["parallel.cp=2", "parallel.cp_mode=zigzag", "parallel.dp_shard=1",
                                 "parallel.activation_checkpoint=full"] + global_batch(1),
    },
    4: {
        "dp2_tp2": ["parallel.dp_shard=2", "parallel.tp=2"] + global_batch(2),
        "pp2_tp2": ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "cp4_ulysses": ["parallel.cp=4", "parallel.cp_mode=ulysses", "parallel.dp_shard=1"] + global_batch(1),
        "cp4_hybrid_u2": ["parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.cp_ulysses_degree=2",
                          "parallel.dp_shard=1"] + global_batch(1),
        "dp2_cp2_zigzag": ["parallel.dp_shard=2", "parallel.cp=2", "parallel.cp_mode=zigzag"] + global_batch(2),
        "tp2_cp2_ulysses": ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ulysses",
                            "parallel.dp_shard=1"] + global_batch(1),
        "pp2_cp2_allgather": ["parallel.pp=2", "parallel.cp=2", "parallel.cp_mode=allgather",
                              "parallel.dp_shard=1"] + global_batch(1),
    },
    8: {
        "pp2_dp2_tp2": ["parallel.pp=2", "parallel.dp_shard=2", "parallel.tp=2"] + global_batch(2),
    },
}


@pytest.fixture(scope="module")
def reference():
    return run_group(1, train_cases, [STEPS + global_batch(1)])[0]


def _compare(name, got, ref):
    steps = sorted(ref["losses"])
    assert sorted(got["losses"]) == steps, name
    for step in steps:
        a, b = got["losses"][step], ref["losses"][step]
        assert abs(a - b) <= 1e-4 * abs(b), f"{name}: step {step} loss {a} vs single process {b}"
    assert set(got["weights"]) == set(ref["weights"]), name
    for key, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][key], w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_layout_matches_single_process(world_size, reference):
    names = list(LAYOUTS[world_size])
    results = run_group(world_size, train_cases, [STEPS + LAYOUTS[world_size][n] for n in names])
    for name, got in zip(names, results):
        _compare(name, got, reference)
    # the loss fell: the comparison is of a model that trains
    assert reference["losses"][5] < reference["losses"][1]
