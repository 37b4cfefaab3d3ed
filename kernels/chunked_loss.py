"""Chunked linear + cross-entropy: the summed token cross-entropy of `hidden @ weight^T` computed
chunk by chunk over the tokens, so that the full (tokens x vocab) fp32 logits tensor never exists.

Forward: for each chunk of `chunk_tokens` tokens, logits = h_chunk @ W^T in the compute dtype
(the autocast dtype when autocast is on, else the input dtype), upcast to fp32, and keep only
the log-sum-exp and the target logit of each token. Backward recomputes each chunk's logits
(one extra matmul per chunk instead of holding them): d logits = softmax - onehot(target),
zero on ignored tokens, times the incoming gradient; grad_h = d logits @ W in the compute dtype,
grad_W accumulated in fp32 over the chunks. Peak extra memory: one chunk of logits (compute
dtype and fp32) plus an fp32 gradient of W, instead of the whole sequence's logits.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of tokens outside the loss (padding, document boundaries)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens, ignore_index, compute_dtype):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_tokens):
                stop = min(start + chunk_tokens, h.shape[0])
                logits = (h[start:stop].to(compute_dtype) @ w.t()).float()
                lab = labels[start:stop]
                keep = lab != ignore_index
                chunk_lse = torch.logsumexp(logits, dim=-1)
                target = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
                total += torch.where(keep, chunk_lse - target, 0.0).sum()
                lse[start:stop] = chunk_lse
                del logits
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk_tokens, ctx.ignore_index, ctx.compute_dtype = chunk_tokens, ignore_index, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, labels, lse = ctx.saved_tensors
        dt, chunk_tokens = ctx.compute_dtype, ctx.chunk_tokens
        w = weight.to(dt)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        scale = grad_total.float()
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_tokens):
                stop = min(start + chunk_tokens, h.shape[0])
                h_chunk = h[start:stop].to(dt)
                lab = labels[start:stop]
                keep = lab != ctx.ignore_index
                g = (h_chunk @ w.t()).float()
                g.sub_(lse[start:stop].unsqueeze(1)).exp_()  # softmax
                g.scatter_add_(1, lab.clamp(min=0).unsqueeze(1),
                               torch.full((stop - start, 1), -1.0, dtype=g.dtype, device=g.device))
                g.mul_((keep.to(g.dtype) * scale).unsqueeze(1))
                if grad_h is not None:
                    grad_h[start:stop] = (g.to(dt) @ w).to(h.dtype)
                if grad_w is not None:
                    if dt == torch.float32:
                        grad_w.addmm_(g.t(), h_chunk)
                    else:
                        grad_w.add_((g.to(dt).t() @ h_chunk).float())
                del g
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


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
    return _ChunkedLinearCrossEntropy.apply(h, weight, lab, chunk_tokens, ignore_index, _compute_dtype(hidden))
