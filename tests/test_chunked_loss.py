"""Chunked linear + cross-entropy (kernels/chunked_loss.py) against the plain full-logits loss."""
import pytest
import torch
import torch.nn.functional as F

from longtrain.kernels.chunked_loss import chunked_linear_cross_entropy


def _case(tokens=37, dim=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, dim, generator=gen, dtype=torch.float64).float()
    w = (torch.randn(vocab, dim, generator=gen) * 0.5)
    labels = torch.randint(0, vocab, (2, tokens), generator=gen)
    labels[0, :5] = -100
    labels[1, 10:20] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_equals_full_loss_and_grads(chunk):
    h, w, labels = _case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    full = F.cross_entropy(F.linear(h1, w1).flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    (full * 0.37).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h2, w2, labels, chunk)
    (loss * 0.37).backward()
    assert abs(loss.item() - full.item()) <= 1e-6 * max(1.0, abs(full.item()))
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0, atol=1e-6)
    assert h2.grad[0, :5].abs().max() == 0  # ignored tokens get no gradient


def test_plain_equations_reference():
    """Outside reference: -log softmax(h W^T)[target], written plainly in float64."""
    h, w, labels = _case(tokens=9, vocab=11)
    logits = h.double() @ w.double().t()
    keep = labels != -100
    ref = (torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1))[keep].sum()
    assert abs(chunked_linear_cross_entropy(h, w, labels, 4).item() - ref.item()) < 1e-4


def test_all_ignored_and_tied_weight():
    h, w, labels = _case(tokens=6)
    labels[:] = -100
    w = w.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, labels, 4)
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().max() == 0
    # A weight used twice (tied embedding and head) accumulates both gradients.
    h, w, labels = _case(tokens=6, dim=8, vocab=12)
    tokens = labels.clamp(min=0)
    for fn in ("full", "chunked"):
        wt = w[:, :8].clone().requires_grad_()
        hid = F.embedding(tokens, wt) + h[..., :8]
        loss = (F.cross_entropy(F.linear(hid, wt).flatten(0, 1), labels.flatten(), reduction="sum")
                if fn == "full" else chunked_linear_cross_entropy(hid, wt, labels, 5))
        loss.backward()
        if fn == "full":
            ref = wt.grad
        else:
            torch.testing.assert_close(wt.grad, ref, rtol=0, atol=1e-6)


def test_compute_dtype_under_autocast():
    """Under autocast the head's matmul runs in the autocast dtype (bf16 here), as F.linear does:
    the chunked loss matches the full path under the same autocast, not the fp32 one."""
    h, w, labels = _case(tokens=64, dim=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten(), reduction="sum")
        chunked = chunked_linear_cross_entropy(h, w.requires_grad_(), labels, 16)
    fp32 = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(), reduction="sum")
    assert abs(chunked.item() - full.item()) <= 1e-5 * abs(full.item())
    assert abs(chunked.item() - fp32.item()) > 1e-5 * abs(fp32.item())  # bf16 was used
    chunked.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_bad_chunk_fails():
    h, w, labels = _case()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(h, w, labels, 0)


# -- in the trainer ----------------------------------------------------------------------------
def chunk_cases(cases: list) -> list[dict]:
    """Train each case (recipe overrides) in this group; report losses, the loss path taken and
    how many times the chunked kernel ran."""
    import torch.distributed as dist

    import longtrain.models.transformer as transformer
    import longtrain.parallel.vocab_parallel_loss as vocab_parallel
    from cases import TINY
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    calls = [0]
    vp_calls = [0]  # the vocabulary-parallel chunked loss (under tp)
    kernel = transformer.chunked_linear_cross_entropy
    vp_kernel = vocab_parallel.vocab_parallel_cross_entropy_local

    def counted(*args, **kwargs):
        calls[0] += 1
        return kernel(*args, **kwargs)

    def vp_counted(*args, **kwargs):
        vp_calls[0] += 1
        return vp_kernel(*args, **kwargs)

    transformer.chunked_linear_cross_entropy = counted
    vocab_parallel.vocab_parallel_cross_entropy_local = vp_counted
    out = []
    for overrides in cases:
        calls[0] = vp_calls[0] = 0
        trainer = Trainer(load_recipe(None, TINY + overrides + [f"run.launch.nproc_per_node={dist.get_world_size()}"]))
        head_calls = [0]  # the output head's own forward makes the full logits
        for part in trainer.parts:
            if part.output is not None:
                part.output.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
        result = trainer.run()
        out.append({"losses": result.losses, "eval": result.eval_losses, "calls": calls[0], "vp_calls": vp_calls[0],
                    "head_calls": head_calls[0], "chunk": trainer.loss_chunk_tokens, "path": trainer.loss_path})
        dist.barrier()
    return out


STEPS = ["train.steps=4", "train.eval_every=2", "data.eval_batches=1"]


def _pair(results, i):
    off, on = results[i], results[i + 1]
    assert off["chunk"] == 0 and off["calls"] == 0
    assert on["chunk"] == 7 and on["calls"] > 0 and on["head_calls"] == 0, on["path"]
    assert off["head_calls"] > 0
    for step, loss in off["losses"].items():
        assert abs(on["losses"][step] - loss) <= 1e-6, (step, on["losses"][step], loss)
    for step, loss in off["eval"].items():
        assert abs(on["eval"][step] - loss) <= 1e-6
    assert len(off["losses"]) == 4 and len(off["eval"]) == 2


def test_trainer_losses_equal_with_chunking_one_process(tmp_path):
    from distributed import run_group

    base = STEPS + ["data.batch_size=4", f"run.dir={tmp_path}/r"]
    cases = [base + ["train.loss_chunk_tokens=0"], base + ["train.loss_chunk_tokens=7"],
             base + ["model.tie_embeddings=true", "train.loss_chunk_tokens=0"],
             base + ["model.tie_embeddings=true", "train.loss_chunk_tokens=7"],
             base + ["train.grad_accum=2", "train.loss_chunk_tokens=0"],
             base + ["train.grad_accum=2", "train.loss_chunk_tokens=7"],
             base + ["model.kind=hybrid", "train.loss_chunk_tokens=0"],
             base + ["model.kind=hybrid", "train.loss_chunk_tokens=7"],
             base + ["model.attention=mla", "model.name=mla-tiny", "train.loss_chunk_tokens=0"],
             base + ["model.attention=mla", "model.name=mla-tiny", "train.loss_chunk_tokens=7"]]
    results = run_group(1, chunk_cases, cases)
    for i in (0, 2, 4, 6, 8):
        _pair(results, i)


def _pair_tp(results, i, tp=2):
    """Full logits (loss_chunk_tokens: 0) against the vocabulary-parallel chunks under tp: the same
    per-step losses within 1e-5 relative; the chunked run never calls the head for logits."""
    off, on = results[i], results[i + 1]
    assert off["chunk"] == 0 and off["vp_calls"] == 0 and off["head_calls"] > 0
    assert on["chunk"] == 7 and on["vp_calls"] > 0 and on["calls"] == 0 and on["head_calls"] == 0, on["path"]
    assert f"vocabulary-parallel over tp={tp}" in on["path"], on["path"]
    for step, loss in off["losses"].items():
        assert abs(on["losses"][step] - loss) <= 1e-5 * abs(loss), (step, on["losses"][step], loss)
    for step, loss in off["eval"].items():
        assert abs(on["eval"][step] - loss) <= 1e-5 * abs(loss)
    assert len(off["losses"]) == 4 and len(off["eval"]) == 2


def test_trainer_losses_equal_with_chunking_two_ranks(tmp_path):
    """dp2 (FSDP: the head's weight is gathered inside the model's forward) and cp2 (each rank's
    sequence shard) chunk; tp2, with and without sequence parallel, with tied embeddings and with a
    vocabulary that does not divide by tp, chunks over its vocabulary shards (parallel/vocab_parallel_loss.py); pp2 keeps the full
    logits and says why."""
    from distributed import run_group

    base = STEPS + ["data.batch_size=2", f"run.dir={tmp_path}/r"]
    cases = [base + ["parallel.dp_shard=2", "train.loss_chunk_tokens=0"],
             base + ["parallel.dp_shard=2", "train.loss_chunk_tokens=7"],
             base + ["parallel.pp=2", "data.batch_size=4", "train.loss_chunk_tokens=7"],
             base + ["parallel.cp=2", "data.batch_size=4", "train.loss_chunk_tokens=0"],
             base + ["parallel.cp=2", "data.batch_size=4", "train.loss_chunk_tokens=7"]]
    for extra in (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=false"],
                  ["model.tie_embeddings=true"],  # tied: the embedding's and the head's gradients meet
                  ["model.vocab_size=261"]):  # split 131 / 130 over the two ranks
        cases += [base + ["parallel.tp=2", "data.batch_size=4", f"train.loss_chunk_tokens={chunk}"] + extra
                  for chunk in (0, 7)]
    results = run_group(2, chunk_cases, cases)
    _pair(results, 0)
    _pair(results, 3)
    _pair_tp(results, 5)
    _pair_tp(results, 7)
    _pair_tp(results, 9)
    _pair_tp(results, 11)
    fallback = results[2]
    assert fallback["chunk"] == 0 and fallback["calls"] == 0 and "parallel.pp" in fallback["path"]
    for step, loss in results[0]["losses"].items():
        assert abs(fallback["losses"][step] - loss) <= 1e-5 * abs(loss), step
    for tp_run in (results[5], results[7]):  # tp2 computes what dp2 does (the same global batch)
        for step, loss in results[0]["losses"].items():
            assert abs(tp_run["losses"][step] - loss) <= 1e-5 * abs(loss), step


def test_trainer_vocab_parallel_chunks_with_dp_and_cp_four_ranks(tmp_path):
    """tp2 combined with FSDP (dp2: the head's weight gathered by FSDP is a DTensor over tp) and
    with context parallel (cp2: each rank's sequence shard, sequence parallel inside tp)."""
    from distributed import run_group

    base = STEPS + [f"run.dir={tmp_path}/r", "parallel.tp=2"]
    cases = [base + layout + [f"train.loss_chunk_tokens={chunk}"]
             for layout in (["parallel.dp_shard=2", "data.batch_size=2"], ["parallel.cp=2", "data.batch_size=4"])
             for chunk in (0, 7)]
    results = run_group(4, chunk_cases, cases)
    _pair_tp(results, 0)
    _pair_tp(results, 2)
    for step, loss in results[0]["losses"].items():  # both layouts train on the same 4 sequences a step
        assert abs(results[2]["losses"][step] - loss) <= 1e-5 * abs(loss), step


def test_negative_chunk_tokens_is_one_line_naming_the_key():
    from longtrain.launcher.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="train.loss_chunk_tokens: must be 0"):
        load_recipe(None, ["train.loss_chunk_tokens=-1"])
    assert load_recipe(None, []).train.loss_chunk_tokens == 1024


def _matmuls(fn) -> int:
    """Matrix products run by fn(), counted at the ATen level."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_gradients_formed_in_forward_without_recomputing_logits():
    """Three head matmuls per chunk in all (logits, grad_h, grad_W), none in the backward; without
    grad mode only the logits' one."""
    h, w, labels = _case(tokens=32)
    h.requires_grad_(), w.requires_grad_()
    chunks = 64 // 16
    out = {}
    assert _matmuls(lambda: out.setdefault("loss", chunked_linear_cross_entropy(h, w, labels, 16))) == 3 * chunks
    assert _matmuls(lambda: out["loss"].backward()) == 0
    with torch.no_grad():
        assert _matmuls(lambda: chunked_linear_cross_entropy(h, w, labels, 16)) == chunks
    w_only = torch.randn_like(w).requires_grad_()
    assert _matmuls(lambda: chunked_linear_cross_entropy(h.detach(), w_only, labels, 16)) == 2 * chunks
