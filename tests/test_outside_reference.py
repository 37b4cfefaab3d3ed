"""longtrain trains like an outside reference: transformers' LlamaForCausalLM / Mamba2ForCausalLM
with torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ in a plain loop, from the same Hugging
Face checkpoint on the same batches. Losses, pre-clip gradient norms and final weights agree within
1e-4 on one process, tp2 and dp_shard2, with clipping active at every step, weight decay on
matrices only, warmup then cosine decay, gradient accumulation and ignored labels (the loss is
the mean over the step's non-ignored tokens). Every layout already equals one process; this is the
check that would catch a mistake they all share (it caught clipping that never clipped)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from distributed import run_group  # noqa: E402
from reference_cases import IGNORE, STEPS, make_batches, train_on_batches  # noqa: E402

TOL = 1e-4
LR, WARMUP, MIN_LR_RATIO, WD, BETAS, EPS, CLIP = 3e-3, 2, 0.1, 0.1, (0.9, 0.95), 1e-8, 0.3
TRAIN = [f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}", f"optim.min_lr_ratio={MIN_LR_RATIO}",
         f"optim.weight_decay={WD}", f"optim.betas=[{BETAS[0]}, {BETAS[1]}]", f"optim.eps={EPS}",
         "optim.schedule=cosine", f"train.grad_clip={CLIP}", f"train.steps={STEPS}", "train.log_every=1",
         "data.seq_len=32", "data.batch_size=8", "checkpoint.save_at_end=false", "run.progress=false",
         "run.tensorboard=false", "parallel.mixed_precision=fp32"]


def lr_at(step: int) -> float:
    """Linear warmup to LR over WARMUP steps, then cosine down to MIN_LR_RATIO x LR at the last step."""
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    floor = LR * MIN_LR_RATIO
    return floor + (LR - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def reference_training(model: torch.nn.Module) -> dict:
    """The plain loop: one forward over the step's whole batch, mean cross-entropy over the
    non-ignored labels, clip_grad_norm_, AdamW with decay on matrices (ndim >= 2) only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    model.train()
    losses, norms = {}, {}
    for step, batch in enumerate(make_batches(), start=1):
        opt.zero_grad()
        logits = model(input_ids=batch["tokens"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        loss.backward()
        norms[step] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        losses[step] = float(loss.detach())
    return {"losses": losses, "grad_norms": norms}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Vectors (norms, Mamba's A_log/dt_bias/D) start at constants; make them distinct."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def compare(ours: dict, ref: dict, ref_weights: dict, label: str) -> None:
    assert sorted(ours["losses"]) == list(range(1, STEPS + 1)), label
    for step in range(1, STEPS + 1):
        assert ref["grad_norms"][step] > CLIP, f"clipping must be active at step {step}"
        assert abs(ours["losses"][step] - ref["losses"][step]) < TOL, (label, step, ours["losses"], ref["losses"])
        assert abs(ours["grad_norms"][step] - ref["grad_norms"][step]) < TOL, \
            (label, step, ours["grad_norms"], ref["grad_norms"])
    assert set(ours["weights"]) == set(ref_weights), (label, set(ours["weights"]) ^ set(ref_weights))
    worst = max(float((ours["weights"][k] - ref_weights[k]).abs().max()) for k in ref_weights)
    assert worst < TOL, (label, worst)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtrain.models.hf import load_hf_checkpoint

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, intermediate_size=128, tie_word_embeddings=False, initializer_range=0.1,
                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(config).float()
    perturb(model, 1)
    model.save_pretrained(root / "start")
    ref = reference_training(model)
    model.save_pretrained(root / "end")
    _, ref_weights = load_hf_checkpoint(root / "end")
    recipe = TRAIN + ["model.name=tiny", "model.vocab_size=300", "model.dim=64", "model.n_layers=2",
                      "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128", "model.max_seq_len=128",
                      "model.norm_eps=1e-5", "model.rope_theta=10000", "model.tie_embeddings=false",
                      f"model.hf_checkpoint={root / 'start'}"]
    return recipe, ref, ref_weights


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from longtrain.models.hf_mamba import load_hf_mamba2

    root = tmp_path_factory.mktemp("mamba")
    torch.manual_seed(0)
    config = Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=16, n_groups=2, expand=2,
                          conv_kernel=4, chunk_size=16, num_hidden_layers=2, vocab_size=300, layer_norm_epsilon=1e-5,
                          tie_word_embeddings=False)
    model = Mamba2ForCausalLM(config).float()
    perturb(model, 2)
    model.save_pretrained(root / "start")
    ref = reference_training(model)
    model.save_pretrained(root / "end")
    _, ref_weights = load_hf_mamba2(root / "end")
    recipe = TRAIN + ["model.kind=hybrid", "model.name=null", "model.vocab_size=300", "model.dim=32",
                      "model.pattern=MM", "model.d_state=16", "model.d_conv=4", "model.expand=2",
                      "model.mamba_headdim=8", "model.ngroups=2", "model.chunk_size=16", "model.norm_eps=1e-5",
                      "model.tie_embeddings=false", f"model.hf_checkpoint={root / 'start'}"]
    return recipe, ref, ref_weights


@pytest.mark.parametrize("which", ["llama", "mamba"])
def test_one_process_with_and_without_accumulation(which, request):
    recipe, ref, ref_weights = request.getfixturevalue(which)
    whole, accumulated = run_group(1, train_on_batches, [recipe, recipe + ["train.grad_accum=2"]])
    compare(whole, ref, ref_weights, f"{which} one process")
    compare(accumulated, ref, ref_weights, f"{which} grad_accum=2")


@pytest.mark.parametrize("which", ["llama", "mamba"])
def test_tp2_and_dp_shard2(which, request):
    recipe, ref, ref_weights = request.getfixturevalue(which)
    tp, dp = run_group(2, train_on_batches, [recipe + ["parallel.tp=2", "parallel.dp_shard=1"],
                                             recipe + ["parallel.dp_shard=2"]])
    compare(tp, ref, ref_weights, f"{which} tp2")
    compare(dp, ref, ref_weights, f"{which} dp_shard2")
