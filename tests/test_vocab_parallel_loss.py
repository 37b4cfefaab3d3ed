"""Vocabulary-parallel chunked cross-entropy (parallel/vocab_parallel_loss.py) against the plain
full-logits loss of one process, and in the trainer under tp against train.loss_chunk_tokens=0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100


def _case(tokens: int, dim: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, dim, generator=gen)
    w = torch.randn(vocab, dim, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (2, tokens), generator=gen)
    labels[0, :5] = IGNORE
    labels[1, 10:17] = IGNORE
    return h, w, labels


def _op_shapes(fn) -> list[tuple[int, ...]]:
    """The shape of every tensor the ATen ops run by fn() return."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    shapes: list[tuple[int, ...]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Record():
        fn()
    return shapes


def _largest_logits(shapes, dim: int) -> int:
    """Elements of the largest matrix formed that is not shaped like hidden states or the weight
    (or their transposes: a dim of size `dim`): the logits and what is derived from them."""
    return max((s[0] * s[1] for s in shapes if len(s) == 2 and dim not in s), default=0)


def kernel_cases(cases: list[dict]) -> list[list[dict]]:
    """Each case {tp, sp, tokens, dim, vocab, chunk}: the vocabulary-parallel loss over a tp mesh
    (tp = the world size, or the inner axis of a (world/tp, tp) mesh) against F.cross_entropy of
    the full logits on this process; every rank's result, gathered."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from longtrain.parallel import vocab_parallel_loss as vpl

    world = dist.get_world_size()
    out = []
    for case in cases:
        tp, tokens, dim, vocab, chunk = case["tp"], case["tokens"], case["dim"], case["vocab"], case["chunk"]
        tp_mesh = (init_device_mesh("cpu", (tp,)) if tp == world
                   else init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))["tp"])
        tp_rank = tp_mesh.get_local_rank()
        h, w, labels = _case(tokens, dim, vocab, seed=case.get("seed", 0))
        if case.get("autocast"):
            out.append(_autocast_case(h, w, labels, tp_mesh, chunk))
            continue
        h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.cross_entropy(F.linear(h_ref, w_ref).flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                              reduction="sum")
        (ref * 0.37).backward()

        weight = torch.nn.Parameter(distribute_tensor(w, tp_mesh, [Shard(0)]))
        shard = slice(tp_rank * tokens // tp, (tp_rank + 1) * tokens // tp)
        hidden = (h[:, shard] if case["sp"] else h).clone().requires_grad_()
        layout = Shard(1) if case["sp"] else Replicate()
        calls = []
        inner = vpl.vocab_parallel_cross_entropy_local

        def counted(*args, **kwargs):
            calls.append(1)
            return inner(*args, **kwargs)

        vpl.vocab_parallel_cross_entropy_local = counted
        try:
            res = {}
            with CommDebugMode() as fwd:
                fwd_shapes = _op_shapes(lambda: res.setdefault("loss", vpl.vocab_parallel_linear_cross_entropy(
                    hidden, weight, labels, chunk, IGNORE, layout)))
            loss = res["loss"]
            with CommDebugMode() as bwd:
                bwd_shapes = _op_shapes(lambda: (loss * 0.37).backward())
            with torch.no_grad():
                no_grad = vpl.vocab_parallel_linear_cross_entropy(hidden, weight, labels, chunk, IGNORE, layout)
        finally:
            vpl.vocab_parallel_cross_entropy_local = inner
        grad_w = weight.grad
        ref_h = h_ref.grad[:, shard] if case["sp"] else h_ref.grad
        local_rows = vpl.vocab_shard(vocab, tp, tp_rank)[1]
        result = {
            "loss_err": abs(loss.item() - ref.item()) / abs(ref.item()),
            "no_grad_err": abs(no_grad.item() - ref.item()) / abs(ref.item()),
            "grad_h_err": (hidden.grad - ref_h).abs().max().item(),
            "grad_w_err": (grad_w.full_tensor() - w_ref.grad).abs().max().item(),
            "grad_w_dtensor": isinstance(grad_w, DTensor) and tuple(grad_w.placements) == (Shard(0),),
            "ignored_grad": (hidden.grad[0, :5].abs().max().item() if not case["sp"] or tp_rank == 0 else 0.0),
            "local_rows": weight.to_local().shape[0], "expected_rows": local_rows, "calls": len(calls),
            "fwd_comms": {str(k): v for k, v in fwd.get_comm_counts().items()},
            "bwd_comms": {str(k): v for k, v in bwd.get_comm_counts().items()},
            "largest_logits": max(_largest_logits(fwd_shapes, dim), _largest_logits(bwd_shapes, dim)),
            "full_logits_elements": 2 * tokens * vocab,
        }
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        out.append(gathered)
    return out


def _autocast_case(h, w, labels, tp_mesh, chunk: int) -> list[dict]:
    """Under bf16 autocast the local head matmuls run in bf16, as the gathered-logits path's do:
    the loss equals that path's under the same autocast, not the fp32 one."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from longtrain.parallel.vocab_parallel_loss import vocab_parallel_linear_cross_entropy

    weight = torch.nn.Parameter(distribute_tensor(w, tp_mesh, [Shard(0)]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten(), reduction="sum")
        loss = vocab_parallel_linear_cross_entropy(h, weight, labels, chunk, IGNORE, Replicate())
    fp32 = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    result = {"vs_autocast": abs(loss.item() - full.item()) / abs(full.item()),
              "vs_fp32": abs(loss.item() - fp32.item()) / abs(fp32.item()),
              "grad_w_fp32_finite": weight.grad.dtype == torch.float32 and bool(torch.isfinite(weight.grad.to_local()).all())}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return gathered


# 2 x 36 = 72 tokens in chunks of 7 (11 chunks, the last of 2); vocab 50 splits 25/25 at tp2 and
# 13/13/13/11 at tp4; vocab 6 at tp4 leaves the last rank no rows (2/2/2/0).
CASES = [dict(tp=tp, sp=sp, tokens=36, dim=8, vocab=50, chunk=7) for tp in (2, 4) for sp in (False, True)]
CASES += [dict(tp=4, sp=True, tokens=36, dim=8, vocab=6, chunk=7, seed=1),
          dict(tp=2, sp=False, tokens=36, dim=8, vocab=50, chunk=1000, seed=2)]
AUTOCAST = dict(tp=2, sp=False, tokens=64, dim=32, vocab=300, chunk=16, autocast=True)


def test_vocab_parallel_loss_equals_full_logits_and_never_forms_them():
    from distributed import run_group

    *results, autocast = run_group(4, kernel_cases, CASES + [AUTOCAST])
    for r in autocast:
        assert r["vs_autocast"] <= 1e-5 and r["vs_fp32"] > 1e-5 and r["grad_w_fp32_finite"], r  # bf16 was used
    for case, ranks in zip(CASES, results):
        n_chunks = -(-2 * case["tokens"] // case["chunk"])
        rows_per_rank = -(-case["vocab"] // case["tp"])
        for rank, r in enumerate(ranks):
            where = (case, rank)
            assert r["loss_err"] <= 1e-5 and r["no_grad_err"] <= 1e-5, (where, r)
            assert r["grad_h_err"] <= 1e-5 and r["grad_w_err"] <= 1e-5, (where, r)
            assert r["ignored_grad"] == 0.0, where
            assert r["grad_w_dtensor"], where  # FSDP, clipping and the optimizer see the head's placement
            assert r["local_rows"] == r["expected_rows"], where  # the offsets follow DTensor's split
            assert r["calls"] == 2, where  # with and without grad mode
            # One all-gather of (2, chunk) statistics a chunk; h gathered once under sequence
            # parallel; its gradient summed over tp once (reduce-scattered to the sequence shards).
            gather_h = {"c10d_functional.all_gather_into_tensor": 1} if case["sp"] else {}
            assert r["fwd_comms"] == {"c10d._allgather_base_": n_chunks, **gather_h}, (where, r["fwd_comms"])
            sum_grad = "c10d_functional.reduce_scatter_tensor" if case["sp"] else "c10d_functional.all_reduce"
            assert r["bwd_comms"] == {sum_grad: 1}, (where, r["bwd_comms"])
            # No rank forms more than a chunk x its vocabulary rows block of logits (beside the
            # gathered (tp x 2, chunk) statistics); where those are the largest, the probe saw them.
            rows = min(case["chunk"], 2 * case["tokens"])
            assert r["largest_logits"] <= max(rows * r["local_rows"], 2 * case["tp"] * rows), (where, r)
            assert r["local_rows"] <= rows_per_rank
            if r["local_rows"] >= 2 * case["tp"]:
                assert r["largest_logits"] == rows * r["local_rows"], (where, r)
            if case["chunk"] < 2 * case["tokens"]:
                assert r["largest_logits"] < r["full_logits_elements"] / case["tp"]
    assert {r["local_rows"] for r in results[4]} == {2, 0}


def test_logits_probe_sees_full_logits():
    """The probe above can fail: on the full-logits path it finds the tokens x vocab logits."""
    h, w, labels = _case(36, 8, 50, 0)
    w.requires_grad_()
    shapes = _op_shapes(lambda: F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(),
                                                reduction="sum").backward())
    assert _largest_logits(shapes, 8) == 72 * 50


def test_plain_weight_fails_fast():
    from longtrain.parallel.vocab_parallel_loss import vocab_parallel_linear_cross_entropy

    h, w, labels = _case(4, 8, 10, 0)
    with pytest.raises(ValueError, match="must be a DTensor sharded by rows"):
        vocab_parallel_linear_cross_entropy(h, w, labels, 4, IGNORE)


def test_vocab_shard_follows_torch_chunk():
    from longtrain.parallel.vocab_parallel_loss import vocab_shard

    for vocab, tp in ((50, 4), (6, 4), (260, 2), (7, 3)):
        sizes = [t.shape[0] for t in torch.arange(vocab).chunk(tp)] + [0] * tp
        starts = [int(t[0]) for t in torch.arange(vocab).chunk(tp)] + [vocab] * tp
        assert [vocab_shard(vocab, tp, r) for r in range(tp)] == list(zip(starts[:tp], sizes[:tp]))


def test_plan_counts_the_chunked_loss():
    """`longtrain plan` (parallel/memory_model.py) counts the chunked loss where the trainer runs
    it: one chunk of fp32 logits of vocab/tp columns plus the held gradients of h and the head's
    rows, not the full logits on every tp rank."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.plan import layout_of, workload_of
    from longtrain.models.sizes import SIZES
    from longtrain.parallel.memory_model import Layout, Workload, estimate_memory

    cfg = SIZES["llama3-8b"]
    full = estimate_memory(cfg, Layout(tp=2), Workload(seq_len=16384, precision="bf16"))
    chunked = estimate_memory(cfg, Layout(tp=2), Workload(seq_len=16384, precision="bf16", loss_chunk_tokens=1024))
    local_v = cfg.vocab_size / 2
    expected = (16384 * cfg.dim * 2 + local_v * cfg.dim * 4  # held grad h (bf16 stream) + fp32 grad of the rows
                + 16384 * cfg.dim * 2  # h gathered from sequence shards
                + 1024 * local_v * (4 + 2))  # one chunk's logits, bf16 and fp32
    assert chunked.parts["logits_and_loss"] == pytest.approx(expected)
    assert full.parts["logits_and_loss"] > 10 * chunked.parts["logits_and_loss"]
    # The recipe's chunk reaches the plan, except under pp (the full logits there).
    recipe = load_recipe(None, ["parallel.tp=2", "run.launch.nproc_per_node=2"])
    assert workload_of(recipe, layout_of(recipe, 2), "cpu").loss_chunk_tokens == 1024
    recipe = load_recipe(None, ["parallel.pp=2", "run.launch.nproc_per_node=2"])
    assert workload_of(recipe, layout_of(recipe, 2), "cpu").loss_chunk_tokens == 0
