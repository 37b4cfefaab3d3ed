"""TPLA's offline reparameterisation of MLA weights (arXiv 2508.15881, section "reparameterisation";
the mechanics are reconstructed, see the notes in README's MLA section):

1. fold the latent RMSNorm's gain into the up-projection: W_UKV <- W_UKV diag(gamma), gamma <- 1.
   Exact: the norm's output times gamma is what W_UKV multiplied.
2. rotate the latent by an orthogonal R (d_c x d_c): W_DKV <- R^T W_DKV (the latent rows of
   wkv_a), W_UKV <- W_UKV R. Exact for MLA: a gain-free RMSNorm commutes with R (it keeps norms),
   so the new latent is c R and (c R) R^T = c.
   - hadamard: the normalised Sylvester Hadamard matrix (d_c a power of two): spreads every
     channel's energy over all slices, data-free;
   - pca: per layer, the eigenvectors of the calibration latents' second moment E[c^T c]
     (c after the gain-free norm), in descending eigenvalue order, so that the leading slice
     holds the principal components.
After this, TPLA's slices of the latent are the slices of c R. Only the attention's latent
weights change; everything else (and MLA's output) is unchanged.
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn

from longtrain.models.mla import MLAttention

Rotation = Literal["none", "hadamard", "pca"]


def mla_layers(model: nn.Module) -> list[MLAttention]:
    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    if not layers:
        raise ValueError(f"tpla: {type(model).__name__} has no MLA layers (model.attention must be mla)")
    return layers


@torch.no_grad()
def fold_latent_norm(attention: MLAttention) -> None:
    gamma = attention.kv_norm.weight.detach().float()
    w = attention.wkv_b.weight
    w.copy_((w.float() * gamma[None, :]).to(w.dtype))
    attention.kv_norm.weight.fill_(1.0)


def hadamard(size: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of `size` (a power of two)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"model.kv_lora_rank: {size} is not a power of two; the Hadamard rotation needs one "
                         "(use tpla.rotation=pca)")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size ** 0.5


@torch.no_grad()
def rotate_latent(attention: MLAttention, rotation: torch.Tensor) -> None:
    """W_DKV <- R^T W_DKV, W_UKV <- W_UKV R (the latent norm's gain must be folded first)."""
    if not torch.all(attention.kv_norm.weight == 1):
        raise ValueError("tpla: fold the latent norm's gain (fold_latent_norm) before rotating the latent")
    r = rotation.double()
    a, b = attention.wkv_a.weight, attention.wkv_b.weight
    a[: attention.rank].copy_((r.T @ a[: attention.rank].double()).to(a.dtype))
    b.copy_((b.double() @ r).to(b.dtype))


@torch.no_grad()
def latent_second_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per MLA layer, E[c^T c] (d_c x d_c, fp64) of the gain-free normed latents over calibration
    batches of token ids (B, S)."""
    layers = mla_layers(model)
    sums = [torch.zeros(a.rank, a.rank, dtype=torch.float64) for a in layers]
    counts = [0] * len(layers)
    handles = []
    for i, attention in enumerate(layers):
        def hook(module, args, i=i):
            c = module.latent(args[0])[0].float()
            c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + module.kv_norm.eps)  # gain-free
            flat = c.reshape(-1, c.shape[-1]).double().cpu()
            sums[i] += flat.T @ flat
            counts[i] += flat.shape[0]
        handles.append(attention.register_forward_pre_hook(hook))
    try:
        n = 0
        for batch in batches:
            model(batch)
            n += 1
        if n == 0:
            raise ValueError("tpla: PCA needs at least one calibration batch")
    finally:
        for h in handles:
            h.remove()
    return [s / c for s, c in zip(sums, counts)]


def pca_rotation(second_moment: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of E[c^T c] as columns, descending eigenvalue."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    return vectors[:, values.argsort(descending=True)]


@torch.no_grad()
def reparameterize(model: nn.Module, rotation: Rotation, calibration: Iterable[torch.Tensor] | None = None) -> None:
    """Fold every MLA layer's latent-norm gain, then rotate its latent (none | hadamard | pca).
    PCA's calibration batches go through the model as it is after the fold."""
    if rotation not in ("none", "hadamard", "pca"):
        raise ValueError(f"tpla.rotation: {rotation!r} is not none, hadamard or pca")
    layers = mla_layers(model)
    for attention in layers:
        fold_latent_norm(attention)
    if rotation == "hadamard":
        for attention in layers:
            rotate_latent(attention, hadamard(attention.rank))
    elif rotation == "pca":
        if calibration is None:
            raise ValueError("tpla.rotation: pca needs calibration batches")
        for attention, moment in zip(layers, latent_second_moments(model, calibration)):
            rotate_latent(attention, pca_rotation(moment))
