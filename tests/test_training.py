"""Trainer behaviour beyond layouts: resume (same and other layout), gradient accumulation,
activation checkpointing, interleaved and zero-bubble pipelines, meta initialization."""
import json

import pytest
import torch

from cases import global_batch, train_cases
from distributed import run_group

STEPS = ["train.steps=6"]


def assert_losses_close(name, got: dict, ref: dict, steps, rel=1e-4):
    for step in steps:
        a, b = got[step], ref[step]
        assert abs(a - b) <= rel * abs(b), f"{name}: step {step} loss {a} vs reference {b}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: the uninterrupted reference, and variants that must reproduce it."""
    ckpt = tmp_path_factory.mktemp("single")
    cases = [
        STEPS + global_batch(1),  # 0: reference
        {"overrides": STEPS + global_batch(1) + [f"checkpoint.dir={ckpt}/a"], "stop_after": 3},  # 1: stop at 3
        STEPS + global_batch(1) + [f"checkpoint.dir={ckpt}/a", "checkpoint.save_at_end=true"],  # 2: resume to 6
        STEPS + global_batch(1) + ["train.grad_accum=2"],  # 3
        STEPS + global_batch(1) + ["parallel.activation_checkpoint=full"],  # 4
        STEPS + global_batch(1) + ["parallel.activation_checkpoint=every_k",
                                   "parallel.activation_checkpoint_every=2"],  # 5
        STEPS + global_batch(1) + ["train.init_device=meta", "optim.lr=1e-2", "train.steps=12"],  # 6
        STEPS + global_batch(1) + [f"run.dir={ckpt}/run", "run.tensorboard=true", "train.log_every=2",
                                   "train.eval_every=3"],  # 7: what a run directory holds
    ]
    return run_group(1, train_cases, cases), ckpt


def test_resume_same_layout_is_exact(single):
    results, _ = single
    ref, first, resumed = results[0], results[1], results[2]
    assert first["last_step"] == 3 and first["stopped"]
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first["losses"][step] == ref["losses"][step]
    for step in (4, 5, 6):
        assert resumed["losses"][step] == ref["losses"][step], f"step {step} differs after resume"
    for key, w in ref["weights"].items():
        assert torch.equal(resumed["weights"][key], w), key


def test_grad_accumulation_matches(single):
    results, _ = single
    assert_losses_close("grad_accum=2", results[3]["losses"], results[0]["losses"], range(1, 7), rel=1e-5)


@pytest.mark.parametrize("index,name", [(4, "full"), (5, "every_k")])
def test_activation_checkpointing_matches(single, index, name):
    results, _ = single
    assert_losses_close(f"activation_checkpoint={name}", results[index]["losses"], results[0]["losses"],
                        range(1, 7), rel=1e-6)


def test_meta_initialization_trains(single):
    results, _ = single
    losses = results[6]["losses"]
    assert losses[12] < losses[1] - 0.1, losses


def test_checkpoint_directory_layout(single):
    _, ckpt = single
    root = ckpt / "a"
    assert (root / "latest").read_text().strip() == "step_00000006"
    meta = json.loads((root / "step_00000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["layout"] == "single"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert not list(root.glob(".tmp_*"))


def test_interleaved_and_zero_bubble_pipelines(single):
    ref = single[0][0]
    cases = {
        "interleaved_1f1b": ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"],
        "zero_bubble": ["parallel.pp_schedule=zero_bubble", "parallel.pp_stages_per_rank=2"],
        "gpipe": ["parallel.pp_schedule=gpipe"],
    }
    common = STEPS + global_batch(1) + ["parallel.pp=2", "parallel.dp_shard=1"]
    results = run_group(2, train_cases, [common + c for c in cases.values()])
    for name, got in zip(cases, results):
        assert_losses_close(name, got["losses"], ref["losses"], range(1, 7))
        for key, w in ref["weights"].items():
            torch.testing.assert_close(got["weights"][key], w, rtol=1e-4, atol=1e-5)


def test_resume_under_other_layouts(single, tmp_path):
    """Saved at step 3 under dp2 x tp2; resumed under pp2 x tp2 and on one process."""
    ref = single[0][0]
    ckpt = f"checkpoint.dir={tmp_path}/x"
    save = {"overrides": STEPS + global_batch(2) + ["parallel.dp_shard=2", "parallel.tp=2", ckpt], "stop_after": 3}
    resume_pp = STEPS + global_batch(1) + ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1",
                                           f"checkpoint.resume={tmp_path}/x", f"checkpoint.dir={tmp_path}/pp"]
    saved, resumed_pp = run_group(4, train_cases, [save, resume_pp])
    assert_losses_close("dp2xtp2 before save", saved["losses"], ref["losses"], [1, 2, 3])
    assert_losses_close("resumed as pp2xtp2", resumed_pp["losses"], ref["losses"], [4, 5, 6])
    resume_one = STEPS + global_batch(1) + [f"checkpoint.resume={tmp_path}/x", f"checkpoint.dir={tmp_path}/one"]
    (resumed_one,) = run_group(1, train_cases, [resume_one])
    assert sorted(resumed_one["losses"]) == [4, 5, 6]
    assert_losses_close("resumed on one process", resumed_one["losses"], ref["losses"], [4, 5, 6])
    for key, w in ref["weights"].items():
        torch.testing.assert_close(resumed_one["weights"][key], w, rtol=1e-4, atol=1e-5)


def test_run_directory_contents(single):
    results, ckpt = single
    run = ckpt / "run"
    assert "model:" in (run / "recipe.yaml").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_second", "tflops_per_device", "peak_memory_gb"):
            assert isinstance(r[key], (int, float)), key
        assert r["tokens_per_second"] > 0 and r["mfu"] is None  # a CPU has no peak to measure MFU against
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert results[7]["losses"] == results[0]["losses"]  # logging and eval do not change training
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_hf_weights_load_into_a_sharded_meta_model(single, tmp_path):
    """model.hf_checkpoint on the CPU path and on the meta path (rank 0 reads, shards are
    broadcast) start from the same weights: same losses under tp2 and FSDP2."""
    from longtrain.models.hf import save_hf_checkpoint
    from longtrain.models.sizes import SIZES
    from longtrain.models.transformer import Transformer

    model = Transformer(SIZES["tiny"])
    model.init_weights(seed=1234)
    save_hf_checkpoint(model.state_dict(), SIZES["tiny"], tmp_path / "hf")
    hf = f"model.hf_checkpoint={tmp_path / 'hf'}"
    (ref,) = run_group(1, train_cases, [STEPS + global_batch(1) + [hf]], False)
    assert ref["losses"][1] != single[0][0]["losses"][1]  # the imported weights were used
    cases = [STEPS + global_batch(1) + [hf, "train.init_device=meta", "parallel.tp=2", "parallel.dp_shard=1"],
             STEPS + global_batch(2) + [hf, "train.init_device=meta", "parallel.dp_shard=2"]]
    for name, got in zip(["tp2", "dp_shard2"], run_group(2, train_cases, cases, False)):
        assert_losses_close(f"meta + hf_checkpoint, {name}", got["losses"], ref["losses"], range(1, 7))


def test_features_are_applied_not_only_loss_equal():
    """Losses are identical whether activation checkpointing, reshard_after_forward or sequence
    parallel is applied or not, so the layout tests alone cannot see one silently dropped."""
    from cases import applied_features

    seq = ["data.seq_len=32"]
    one = run_group(1, applied_features, [seq, seq + ["parallel.activation_checkpoint=full"],
                                          seq + ["parallel.activation_checkpoint=every_k",
                                                 "parallel.activation_checkpoint_every=2"]])
    assert [r["checkpoint_wrapped"] for r in one] == [0, one[0]["blocks"], one[0]["blocks"] // 2]
    two = run_group(2, applied_features, [
        seq + ["parallel.dp_shard=2"],
        seq + ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"],
        seq + ["parallel.tp=2", "parallel.dp_shard=1"],
        seq + ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=false"],
    ])
    assert two[0]["sharded_after_forward"] and not two[1]["sharded_after_forward"]
    assert two[2]["norm_seq_len"] == 16, "sequence parallel: norms run on the tp shard of the sequence"
    assert two[3]["norm_seq_len"] == 32, "without sequence parallel the norms see the whole sequence"


def test_fused_adamw_is_used_by_default_and_matches_foreach():
    """optim.fused: auto builds torch's fused AdamW on CPU too; its losses equal the foreach
    implementation's within fp32 rounding."""
    from cases import optimizer_settings

    kinds = run_group(1, optimizer_settings, [[], ["optim.fused=off"]])
    assert kinds == [{"fused": True, "foreach": False}, {"fused": False, "foreach": True}]
    fused, foreach = run_group(1, train_cases, [STEPS + global_batch(1), STEPS + global_batch(1) + ["optim.fused=off"]])
    assert_losses_close("fused vs foreach AdamW", fused["losses"], foreach["losses"], range(1, 7), rel=1e-5)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """parallel.compile: on wraps every block in torch.compile and trains to the eager losses within
    1e-5 (auto is off on CPU: building costs more than a short CPU job saves)."""
    from cases import compiled_blocks

    assert run_group(1, compiled_blocks, ["parallel.compile=on"]) == 4
    assert run_group(1, compiled_blocks, []) == 0  # auto on CPU
    steps = ["train.steps=3"] + global_batch(1)
    compiled, eager = run_group(1, train_cases, [steps + ["parallel.compile=on"], steps])
    assert_losses_close("compiled vs eager", compiled["losses"], eager["losses"], range(1, 4), rel=1e-5)
