"""The Mamba-2 mixer as single-device code, numerically the same as transformers' Mamba2Mixer
(its torch path) and loadable from its weights (models/hf_mamba.py).

    hidden (b, l, d) -> z (d_inner), xBC (d_inner + 2·g·n), dt (h)           input projections
    xBC -> causal depthwise conv (kernel d_conv, bias) -> SiLU -> x, B, C    \\  `ssm_core`:
    dt = clamp(softplus(dt + dt_bias), dt_limit); A = -exp(A_log)            |  everything that
    y = SSD scan(x, dt, A, B, C) + D·x                                       /  runs along l
    y -> gated RMSNorm: norm(y · silu(z)) in groups of d_inner/g -> out_proj (d)

Layout for tensor parallelism. transformers fuses the input projection into one `in_proj`
([z | x | B | C | dt] rows) and the convolution into one `conv1d` ([x | B | C] channels). An even
split of those fused rows would hand a rank pieces of different components, so here every
component has its own projection and its own conv weights: `in_proj_z`, `in_proj_x`, `in_proj_B`,
`in_proj_C`, `in_proj_dt` (nn.Linear, column-parallel), `conv_x`, `conv_B`, `conv_C` (weight (c, k),
bias (c,), split along channels), `dt_bias`, `A_log`, `D` (per head), `norm.weight` (per channel,
its groups never straddle a rank when ngroups % tp == 0) and `out_proj` (row-parallel). The fused
Hugging Face tensors are sliced at import. All head and group counts in forward come from the
local tensor shapes (heads from dt's width, groups from the rest of xBC), and parameters used
functionally go through `local()` (DTensor -> its local shard), so a tensor-parallel split by
heads (and by groups for B, C) needs no change here.

Context parallelism replaces `ssm_core` (default `LocalSSMCore()`), called as
`ssm_core(xBC, dt, mixer=self, doc_ids=doc_ids) -> y (b, l, h_local, headdim)` with xBC the raw
projection (before the conv), dt after softplus/bias/limit, and y including D·x. The mixer's
helpers `conv_params`, `split_xBC` and `scan_params` give a core what it needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.kernels.ssd import causal_conv1d, ssd_scan
from longtrain.models.parallel_plan import SSMMixer, TPStyle


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (differentiable), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class MambaConfig:
    dim: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    norm_eps: float = 1e-5
    conv_bias: bool = True

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.headdim


class GatedRMSNorm(nn.Module):
    """norm(y · silu(z)) · weight with the RMS taken per group of `group_size` channels, exactly as
    transformers' MambaRMSNormGated (norm_before_gate=False). The group count comes from the input
    width, so a tensor-parallel shard of whole groups works unchanged."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = y.dtype
        h = y.float()
        if z is not None:
            h = h * F.silu(z.float())
        *prefix, width = h.shape
        hg = h.view(*prefix, width // self.group_size, self.group_size)
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + self.eps)
        return local(self.weight) * hg.view(*prefix, width).to(dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class CausalDepthwiseConv(nn.Module):
    """Parameters of a depthwise causal conv1d: weight (channels, kernel), bias (channels,). The
    computation lives in the SSM core (kernels.ssd.causal_conv1d)."""

    def __init__(self, channels: int, kernel: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight.is_meta:
            return
        bound = 1.0 / math.sqrt(self.weight.shape[1])  # nn.Conv1d's default (fan_in = kernel)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LocalSSMCore:
    """Single-device core: conv over the whole local sequence (dropping taps across documents),
    SiLU, then the chunked scan with resets at document boundaries. Returns y (b, l, h, p), D·x
    included. `backend` is the ssd_scan backend ("auto": mamba-ssm on CUDA when installed)."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, xBC: torch.Tensor, dt: torch.Tensor, *, mixer: "Mamba2Mixer",
                 doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = mixer.conv_params()
        xBC = causal_conv1d(xBC, weight, bias, doc_ids=doc_ids, activation="silu")
        x, B, C = mixer.split_xBC(xBC, dt.shape[-1])
        A, D = mixer.scan_params()
        y, _ = ssd_scan(x, dt, A, B, C, chunk_size=mixer.chunk_size, D=D, seq_idx=doc_ids, backend=self.backend)
        return y


class Mamba2Mixer(SSMMixer):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        if cfg.d_inner % cfg.headdim:
            raise ValueError(f"model.mamba_headdim: {cfg.headdim} does not divide expand*dim = {cfg.d_inner}")
        if cfg.n_heads % cfg.ngroups:
            raise ValueError(f"model.ngroups: {cfg.ngroups} does not divide the {cfg.n_heads} Mamba heads")
        self.cfg = cfg
        self.dim, self.d_inner, self.n_heads = cfg.dim, cfg.d_inner, cfg.n_heads
        self.head_dim, self.d_state, self.ngroups = cfg.headdim, cfg.d_state, cfg.ngroups
        self.d_conv, self.chunk_size, self.dt_limit = cfg.d_conv, cfg.chunk_size, tuple(cfg.dt_limit)
        gn = cfg.ngroups * cfg.d_state
        self.in_proj_z = nn.Linear(cfg.dim, cfg.d_inner, bias=False)
        self.in_proj_x = nn.Linear(cfg.dim, cfg.d_inner, bias=False)
        self.in_proj_B = nn.Linear(cfg.dim, gn, bias=False)
        self.in_proj_C = nn.Linear(cfg.dim, gn, bias=False)
        self.in_proj_dt = nn.Linear(cfg.dim, cfg.n_heads, bias=False)
        self.conv_x = CausalDepthwiseConv(cfg.d_inner, cfg.d_conv, cfg.conv_bias)
        self.conv_B = CausalDepthwiseConv(gn, cfg.d_conv, cfg.conv_bias)
        self.conv_C = CausalDepthwiseConv(gn, cfg.d_conv, cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(cfg.n_heads))
        self.A_log = nn.Parameter(torch.empty(cfg.n_heads))
        self.D = nn.Parameter(torch.empty(cfg.n_heads))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.dim, bias=False)
        self.ssm_core = LocalSSMCore()
        if not self.A_log.is_meta:
            self.reset_ssm_parameters()

    # -- initialisation (Mamba-2: S4D-real A in [1, 16], dt log-uniform in [dt_min, dt_max]) ------
    @torch.no_grad()
    def tp_styles(self) -> dict[str, TPStyle]:
        """Heads split across tp: the input projections by output features (z, x and dt by heads, B
        and C by groups), the output projection by input features; the per-channel convs, the
        per-head dt_bias/A_log/D (this module's own parameters) and the gated norm's weight split
        alike, so each rank runs whole heads and whole norm groups."""
        styles: dict[str, TPStyle] = {f"in_proj_{p}": "colwise" for p in ("z", "x", "B", "C", "dt")}
        return {**styles, "out_proj": "rowwise", "conv_x": "shard_params", "conv_B": "shard_params",
                "conv_C": "shard_params", "": "shard_params", "norm": "shard_params"}

    def reset_ssm_parameters(self, generator: torch.Generator | None = None):
        for name in ("A_log", "dt_bias", "D"):
            init_ssm_param(name, getattr(self, name), self.cfg, generator)

    # -- helpers for SSM cores -------------------------------------------------------------------
    def conv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The local conv weight (c, k) and bias (c,) over the local xBC channels [x | B | C]."""
        convs = (self.conv_x, self.conv_B, self.conv_C)
        weight = torch.cat([local(c.weight) for c in convs], dim=0)
        bias = None if self.conv_x.bias is None else torch.cat([local(c.bias) for c in convs], dim=0)
        return weight, bias

    def split_xBC(self, xBC: torch.Tensor, n_heads: int):
        """xBC (b, l, h·p + 2·g·n) -> x (b, l, h, p), B, C (b, l, g, n); h = local heads."""
        b, l, width = xBC.shape
        d_inner = n_heads * self.head_dim
        gn = (width - d_inner) // 2
        if gn <= 0 or gn % self.d_state or d_inner + 2 * gn != width:
            raise ValueError(f"Mamba2Mixer: xBC width {width} does not fit {n_heads} heads of {self.head_dim} "
                             f"and groups of state {self.d_state}")
        x, B, C = torch.split(xBC, [d_inner, gn, gn], dim=-1)
        g = gn // self.d_state
        return (x.reshape(b, l, n_heads, self.head_dim), B.reshape(b, l, g, self.d_state),
                C.reshape(b, l, g, self.d_state))

    def scan_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A = -exp(A_log) (fp32) and D for the local heads."""
        return -torch.exp(local(self.A_log).float()), local(self.D)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (b, l, dim); positions unused (the SSM is position-free, accepted for a uniform
        mixer signature); doc_ids (b, l) document ids of packed rows (-1: padding) or None: the
        conv and the scan do not cross a change of id."""
        b, l, _ = hidden.shape
        z = self.in_proj_z(hidden)
        xBC = torch.cat([self.in_proj_x(hidden), self.in_proj_B(hidden), self.in_proj_C(hidden)], dim=-1)
        dt = F.softplus(self.in_proj_dt(hidden) + local(self.dt_bias))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        y = self.ssm_core(xBC, dt, mixer=self, doc_ids=doc_ids)
        y = self.norm(y.flatten(2), z)  # (not reshape(b, l, -1): l may be 0 in a balanced step)
        return self.out_proj(y.to(hidden.dtype))


@torch.no_grad()
def init_ssm_param(name: str, p: torch.Tensor, cfg: MambaConfig, generator: torch.Generator | None = None):
    """Mamba-2 initialisation of one per-head parameter, in place: A_log = log(U[1, 16]);
    dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] floored at dt_init_floor;
    D = 1. With a generator the draw is made on the CPU (deterministic) and copied; without one it
    runs in place (works for DTensor and is a no-op on meta tensors)."""
    if name == "D":
        nn.init.ones_(p)
        return
    if generator is not None:
        u = torch.rand(p.shape, generator=generator, dtype=torch.float32)
    else:
        u = p
        u.uniform_(0.0, 1.0)
    if name == "A_log":
        val = (u * 15.0 + 1.0).log()
    elif name == "dt_bias":
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = (u * (hi - lo) + lo).exp().clamp(min=cfg.dt_init_floor)
        val = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    else:
        raise ValueError(f"init_ssm_param: unknown parameter {name!r}")
    p.copy_(val.to(p.dtype) if generator is not None else val)
