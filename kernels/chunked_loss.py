"""Chunked linear + cross-entropy: the summed token cross-entropy of `hidden @ weight^T` computed
chunk by chunk over the tokens, so that the full (tokens x vocab) fp32 logits tensor never exists.

Forward: for each chunk of `chunk_tokens` tokens, logits = h_chunk @ W^T in the compute dtype
(the autocast dtype when autocast is on, else the input dtype), upcast to fp32; the chunk's
log-sum-exp and target logit give its loss, and, when gradients will be needed, the same logits
give d logits = softmax - onehot(target) (zero on ignored tokens; formed in place in the logits'
buffer) and from it grad_h = d logits @ W (compute dtype) and grad_W accumulated in fp32 over the
chunks, before the chunk's logits are dropped. The backward only scales the two by the incoming
gradient: three head matmuls per chunk in all, as with full logits (recomputing the logits in the
backward would take four). Peak extra memory: one chunk of logits (one fp32 buffer, plus its
compute-dtype copy under autocast) plus grad_h and an fp32 gradient of W, instead of the whole
sequence's logits.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of tokens outside the loss (padding, document boundaries)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def add_chunk_grads(grad_logits: torch.Tensor, h_chunk: torch.Tensor, w: torch.Tensor, grad_h, grad_w, start: int,
                    compute_dtype: torch.dtype) -> None:
    """A chunk's share of the head's gradients from d loss / d logits (chunk, rows): its rows of
    grad_h (from `start`) = grad_logits @ w, and grad_w (fp32) += grad_logits^T @ h_chunk."""
    if grad_h is not None:
        grad_h[start:start + grad_logits.shape[0]] = (grad_logits.to(compute_dtype) @ w).to(grad_h.dtype)
    if grad_w is not None:
        if compute_dtype == torch.float32:
            grad_w.addmm_(grad_logits.t(), h_chunk)
        else:
            grad_w.add_((grad_logits.to(compute_dtype).t() @ h_chunk).float())


def scaled_grads(ctx, grad_total: torch.Tensor, what: str) -> tuple:
    """backward of a loss whose forward saved (grad_h, grad_w): them times the incoming gradient."""
    grad_h, grad_w = ctx.saved_tensors
    if (grad_h is None and ctx.needs_input_grad[0]) or (grad_w is None and ctx.needs_input_grad[1]):
        raise RuntimeError(f"{what}: gradients were not computed in the forward (it ran without grad mode or "
                           "without inputs requiring grad)")
    scale = grad_total.float()
    out_h = (grad_h.float() * scale).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
    out_w = (grad_w * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    return out_h, out_w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens, ignore_index, compute_dtype, want_h, want_w):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_tokens):
                stop = min(start + chunk_tokens, h.shape[0])
                h_chunk = h[start:stop].to(compute_dtype)
                logits = (h_chunk @ w.t()).float()
                lab = labels[start:stop]
                keep = lab != ignore_index
                target = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
                row_max = logits.amax(dim=-1)
                # In place, the chunk's only (chunk, vocab) fp32 buffer: logits <- exp(logits - row max)
                sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=-1)
                chunk_lse = sum_exp.log().add_(row_max)
                total += torch.where(keep, chunk_lse - target, 0.0).sum()
                if want_h or want_w:  # d loss / d logits = softmax - onehot(target), zero on ignored tokens
                    logits.div_(sum_exp.unsqueeze(1))  # in place: softmax, then its gradient
                    logits.scatter_add_(1, lab.clamp(min=0).unsqueeze(1),
                                        torch.full((stop - start, 1), -1.0, dtype=logits.dtype, device=logits.device))
                    logits.mul_(keep.to(logits.dtype).unsqueeze(1))
                    add_chunk_grads(logits, h_chunk, w, grad_h, grad_w, start, compute_dtype)
                del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return scaled_grads(ctx, grad_total, "chunked loss") + (None,) * 6


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_tokens: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of `hidden @ weight.T` against `labels`, skipping
    `ignore_index`; hidden (..., dim), labels (...), weight (vocab, dim). Equal to
    F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") up to summation
    order, with at most chunk_tokens x vocab logits alive at once."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if lab.shape[0] != h.shape[0]:
        raise ValueError(f"labels hold {lab.shape[0]} tokens, hidden states {h.shape[0]}")
    # Gradients are formed in the forward, chunk by chunk, while each chunk's logits exist (no
    # recomputation in the backward); only those the autograd graph will ask for.
    grad_mode = torch.is_grad_enabled()
    want_h, want_w = grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad
    return _ChunkedLinearCrossEntropy.apply(h, weight, lab, chunk_tokens, ignore_index, _compute_dtype(hidden),
                                            want_h, want_w)
