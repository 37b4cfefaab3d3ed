"""Vocabulary-parallel chunked cross-entropy: the loss of an output head split by vocabulary rows
over tp, chunk by chunk over the tokens, so that no rank ever holds more than
chunk_tokens x vocab/tp logits (the full-logits path gathers tokens x vocab fp32 logits on every
rank: 64 GB for 128K tokens of Llama-3's 128K vocabulary).

Per chunk each rank forms its logits against its own rows W_r (vocabulary entries
[start_r, start_r + V_r)), upcast to fp32, and reduces them to two numbers per token: the
log-sum-exp of its entries and the target's logit where it owns the target (else 0). One
all-gather of those (2 x chunk floats a rank) gives every rank the global log-sum-exp (the
log-sum-exp of the ranks' ones: exact, no overflow) and the target logit (the sum), so each rank
holds the same loss = lse - target over the tokens that are not `ignore_index`.

As in kernels/chunked_loss.py the gradients are formed in the forward while the chunk's logits
exist (three head matmuls a chunk in all, none recomputed), in place in the logits' buffer (one
chunk x V/tp fp32 buffer alive, not three): d logits_r = softmax_r - onehot_r,
grad W_r = sum over chunks of d logits_r^T h (each rank owns its rows: no communication) and
grad h = d logits_r W_r, a partial sum over tp. The backward scales both by the incoming gradient.

Communication, by the head's input layout (what ColwiseParallel would do for the full logits):
- sequence parallel (h sharded by sequence over tp): one all-gather of h before the chunks,
  one reduce-scatter of its gradient back to sequence shards;
- replicated h: one all-reduce of its gradient;
- per chunk, one all-gather of (2, chunk) fp32 statistics.
The weight is a DTensor Shard(0) over the tp mesh (as the head style and FSDP2 hand it over);
its gradient is a DTensor of the same placement, so FSDP, clipping and the optimizer see what
they see on the full-logits path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from longtrain.kernels.chunked_loss import _compute_dtype, add_chunk_grads, scaled_grads


def vocab_shard(vocab_size: int, tp_degree: int, tp_rank: int) -> tuple[int, int]:
    """(first row, row count) of this rank's share of a Shard(0) vocabulary: DTensor splits rows
    as torch.chunk does (ceil(V/tp) a rank, the last ones shorter, possibly empty)."""
    per_rank = -(-vocab_size // tp_degree)
    start = min(tp_rank * per_rank, vocab_size)
    return start, min(per_rank, vocab_size - start)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w_local, labels, chunk_tokens, ignore_index, compute_dtype, want_h, want_w, group,
                vocab_start):
        tp_degree = dist.get_world_size(group)
        rows = w_local.shape[0]
        w = w_local.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w_local.shape, dtype=torch.float32, device=w_local.device) if want_w else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_tokens):
                stop = min(start + chunk_tokens, h.shape[0])
                h_chunk = h[start:stop].to(compute_dtype)
                logits = (h_chunk @ w.t()).float()  # (chunk, V / tp): the largest tensor formed
                lab = labels[start:stop]
                keep = lab != ignore_index
                local = lab - vocab_start
                owned = keep & (local >= 0) & (local < rows)
                local = torch.where(owned, local, 0)
                stats = torch.zeros((2, stop - start), dtype=torch.float32, device=h.device)
                if rows:  # an empty shard (vocab < tp x ceil(vocab/tp)) adds exp(-inf) = 0 and no target
                    stats[1] = torch.where(owned, logits.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
                    row_max = logits.amax(dim=-1)
                    # In place, the chunk's only (chunk, V/tp) buffer: logits <- exp(logits - row max)
                    logits.sub_(row_max.unsqueeze(1)).exp_()
                    stats[0] = logits.sum(dim=-1).log_().add_(row_max)
                else:
                    stats[0] = float("-inf")
                gathered = torch.empty((tp_degree * 2, stop - start), dtype=torch.float32, device=h.device)
                dist.all_gather_single(gathered, stats, group=group)  # ranks' stats stacked along dim 0
                gathered = gathered.view(tp_degree, 2, stop - start)
                chunk_lse = torch.logsumexp(gathered[:, 0], dim=0)
                total += torch.where(keep, chunk_lse - gathered[:, 1].sum(0), 0.0).sum()
                if (want_h or want_w) and rows:
                    # In place: logits <- softmax - onehot on this rank's columns (exp(logits - row max) x
                    # exp(row max - global lse)), zero on ignored tokens: d loss / d logits
                    logits.mul_(torch.exp(row_max - chunk_lse).unsqueeze(1))
                    logits.scatter_add_(1, local.unsqueeze(1), -owned.to(logits.dtype).unsqueeze(1))
                    logits.mul_(keep.to(logits.dtype).unsqueeze(1))
                    add_chunk_grads(logits, h_chunk, w, grad_h, grad_w, start, compute_dtype)
                elif grad_h is not None:
                    grad_h[start:stop] = 0
                del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = w_local.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return scaled_grads(ctx, grad_total, "vocabulary-parallel loss") + (None,) * 8


def vocab_parallel_cross_entropy_local(hidden: torch.Tensor, weight_local: torch.Tensor, labels: torch.Tensor,
                                       chunk_tokens: int, ignore_index: int, group, vocab_start: int) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar, the same on every rank of `group`) of hidden @ W^T, where
    this rank holds rows [vocab_start, vocab_start + len(weight_local)) of W. hidden (..., dim) is
    the same on every rank; the gradient it receives is this rank's partial sum (sum it over the
    group). Labels outside this rank's rows count through the rank that owns them."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if lab.shape[0] != h.shape[0]:
        raise ValueError(f"labels hold {lab.shape[0]} tokens, hidden states {h.shape[0]}")
    grad_mode = torch.is_grad_enabled()
    want_h, want_w = grad_mode and hidden.requires_grad, grad_mode and weight_local.requires_grad
    return _VocabParallelCrossEntropy.apply(h, weight_local, lab, chunk_tokens, ignore_index, _compute_dtype(hidden),
                                            want_h, want_w, group, vocab_start)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                        chunk_tokens: int, ignore_index: int,
                                        input_layout: Placement = Replicate()) -> torch.Tensor:
    """The head loss under tensor parallel (installed in the model by apply_tensor_parallel):
    `weight` is the head's DTensor, Shard(0) over the tp mesh; `hidden` a DTensor, or a local
    tensor in `input_layout` (Shard(1): sequence parallel; Replicate()); labels cover the whole
    sequence. Equal to the full-logits loss; no rank forms more than chunk_tokens x V/tp logits."""
    if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError("vocabulary-parallel loss: the output head's weight must be a DTensor sharded by rows "
                         f"(Shard(0)) over the 1-D tp mesh, got {type(weight).__name__} "
                         f"{getattr(weight, 'placements', '')}")
    mesh = weight.device_mesh
    group = mesh.get_group()
    vocab_size = weight.shape[0]
    vocab_start, rows = vocab_shard(vocab_size, mesh.size(), mesh.get_local_rank())
    w_local = weight.to_local()  # its gradient goes back as a DTensor Shard(0): each rank's rows
    if w_local.shape[0] != rows:
        raise ValueError(f"vocabulary-parallel loss: tp rank {mesh.get_local_rank()} holds {w_local.shape[0]} of the "
                         f"{vocab_size} vocabulary rows, expected {rows} (torch.chunk split over tp={mesh.size()})")
    if not isinstance(hidden, DTensor):
        hidden = DTensor.from_local(hidden, mesh, [input_layout], run_check=False)
    # Gather sequence shards once (as ColwiseParallel would); the local gradient is a partial sum
    # over tp, reduce-scattered back to the shards (or all-reduced when h was replicated).
    h_full = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    return vocab_parallel_cross_entropy_local(h_full, w_local, labels, chunk_tokens, ignore_index, group, vocab_start)
