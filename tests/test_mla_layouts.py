"""An MLA transformer (models/mla.py) computes what one process computes under tensor parallel
(heads split, latent down-projections replicated, the shared RoPE key's gradient summed), context
parallel in every mode (q/k head dim != v head dim through ring, zigzag, Ulysses), FSDP, pipeline
stages and activation checkpointing: per-step losses within 1e-4 relative over 5 steps and the
same final weights."""
import pytest
import torch

from cases import global_batch, train_cases
from distributed import run_group

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

MLA = ["model.attention=mla", "model.name=mla-tiny", "train.steps=5"]
LOW_RANK_Q = ["model.q_lora_rank=8"]
TPLA2 = ["model.tpla_degree=2"]  # TPLA-aware training
# A hybrid Mamba/attention stack whose attention layers are MLA (kind=hybrid overrides the name)
HYBRID = ["model.kind=hybrid", "model.name=hybrid-tiny", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
          "model.qk_rope_head_dim=4", "model.v_head_dim=8"]

LAYOUTS = {
    2: {
        "tp2": ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "tp2_low_rank_q": LOW_RANK_Q + ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "hybrid_tp2": HYBRID + ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "hybrid_cp2": HYBRID + ["parallel.cp=2", "parallel.dp_shard=1"] + global_batch(1),
        "tp2_tpla2": TPLA2 + ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "cp2_ring": ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.dp_shard=1"] + global_batch(1),
        "cp2_ulysses": ["parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.dp_shard=1"] + global_batch(1),
        "dp_shard2": ["parallel.dp_shard=2"] + global_batch(2),
        "pp2": ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=1f1b"] + global_batch(1),
    },
    4: {
        "cp4_zigzag_recompute": ["parallel.cp=4", "parallel.cp_mode=zigzag", "parallel.dp_shard=1",
                                 "parallel.activation_checkpoint=full"] + global_batch(1),
        "tp2_cp2_ring": ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ring",
                         "parallel.dp_shard=1"] + global_batch(1),
        "dp_shard2_tp2_low_rank_q": LOW_RANK_Q + ["parallel.dp_shard=2", "parallel.tp=2"] + global_batch(2),
    },
}


@pytest.fixture(scope="module")
def references():
    cases = [MLA + global_batch(1), MLA + LOW_RANK_Q + global_batch(1), MLA + TPLA2 + global_batch(1),
             MLA + HYBRID + global_batch(1)]
    return run_group(1, train_cases, cases)


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_mla_layouts_match_single_process(world_size, references):
    names = list(LAYOUTS[world_size])
    results = run_group(world_size, train_cases, [MLA + LAYOUTS[world_size][n] for n in names])
    for name, got in zip(names, results):
        kind = next((i for i, k in enumerate(("low_rank", "tpla", "hybrid"), 1) if k in name), 0)
        ref = references[kind]
        assert any(".wkv_b." in k for k in got["weights"]), name  # an MLA model was trained
        for step, want in ref["losses"].items():
            assert abs(got["losses"][step] - want) <= 1e-4 * abs(want), f"{name}: step {step}: {got['losses']} vs {ref['losses']}"
        for key, w in ref["weights"].items():
            torch.testing.assert_close(got["weights"][key], w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
    assert references[0]["losses"][5] < references[0]["losses"][1]
    assert references[2]["losses"][2] != references[0]["losses"][2]  # TPLA-aware training is not MLA
