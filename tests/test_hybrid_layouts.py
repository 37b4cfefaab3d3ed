"""A hybrid Mamba/attention stack computes what one process computes under context parallel
(both SSM modes), tensor parallel, pipeline stages from the pattern's '|' marks, and their
combinations, and FSDP: per-step losses within 1e-4 relative over 5 steps."""
import pytest

from cases import global_batch, train_cases
from distributed import run_group

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

HYBRID = ["model.kind=hybrid", "model.name=hybrid-tiny", "train.steps=5"]

LAYOUTS = {
    2: {
        "cp2_state_passing": ["parallel.cp=2", "parallel.dp_shard=1"] + global_batch(1),
        "cp2_all_to_all_ring": ["parallel.cp=2", "parallel.ssm_cp_mode=all_to_all", "parallel.cp_mode=ring",
                                "parallel.dp_shard=1"] + global_batch(1),
        "tp2": ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "fsdp2": ["parallel.dp_shard=2"] + global_batch(2),
        "pp2_by_pattern": ["parallel.pp=2", "parallel.dp_shard=1"] + global_batch(1),
    },
    4: {
        "tp2_cp2": ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"] + global_batch(1),
        "pp2_cp2": ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1"] + global_batch(1),
        "cp4_hybrid_attention": ["parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.cp_ulysses_degree=2",
                                 "parallel.dp_shard=1"] + global_batch(1),
    },
}


@pytest.fixture(scope="module")
def reference():
    return run_group(1, train_cases, [HYBRID + global_batch(1)], False)[0]


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_hybrid_layouts_match_single_process(world_size, reference):
    names = list(LAYOUTS[world_size])
    results = run_group(world_size, train_cases, [HYBRID + LAYOUTS[world_size][n] for n in names], False)
    for name, got in zip(names, results):
        for step, want in reference["losses"].items():
            assert abs(got["losses"][step] - want) <= 1e-4 * abs(want), f"{name}: step {step}: {got['losses']} vs {reference['losses']}"
    assert reference["losses"][5] < reference["losses"][1]
