"""The Mamba-2 SSD scan (state space duality, "Transformers are SSMs", Dao & Gu 2024) as
single-device compute, plus the causal depthwise convolution that precedes it.

Per head i (of h), with state H (p, n), for t = 0 .. l-1:

    H_t = exp(dt_t · A_i) · H_{t-1} + dt_t · x_t B_t^T        (x_t: p, B_t: n)
    y_t = H_t C_t + D_i · x_t

`dt` arrives after softplus(+bias) and clamping; A (h,) is negative; B and C are grouped
(b, l, g, n): head i reads group i // (h // g). H_{-1} is `initial_states` (or zero).

Documents (`seq_idx`, (b, l) integer ids): the state is reset wherever seq_idx changes from one
position to the next, i.e. at the first token of a document H_{t-1} is replaced by zero: nothing
before it, `initial_states` included, reaches it. Position 0 is never a reset in this local view:
`initial_states` always flows into the document that holds position 0 (a context-parallel caller
whose incoming state belongs to another document must zero it). Ids only need to change at
boundaries; they need not be increasing or unique (internally they become segment counters).

`ssd_scan` is the chunked algorithm (intra-chunk quadratic form, chunk states, inter-chunk
recurrence, state-to-output), vectorised over chunks; lengths that are not a multiple of the chunk
are padded internally with dt = 0 (no decay, no input), which changes nothing. Accumulation is
fp32 (fp64 for fp64 inputs); y comes back in x's dtype, final states in the accumulation dtype.
`ssd_reference` is the step-by-step recurrence above, the tests' oracle.

Context parallelism (state passing across ranks of a sequence) uses two identities, both tested:

    ssd_scan(..., initial_states=H0).y     == ssd_scan(..., None).y + initial_state_contribution(C, dt, A, seq_idx, H0)
    ssd_scan(..., initial_states=H0).final == ssd_scan(..., None).final + exp(log_decay_to_end(dt, A, seq_idx)) · H0

Backends: "torch" (this file; CPU and CUDA), "mamba_ssm" (mamba-ssm's Triton
`mamba_chunk_scan_combined`, CUDA only, optional extra `gpu`, imported lazily and checked once per
(device, dtype) against the torch path before use), "auto" (mamba_ssm when usable, else torch).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "mamba_ssm", "reference")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) document ids -> (b, l) int64 segment counters: 0 at position 0, +1 at every position
    whose id differs from the previous one. Equal counters <=> no reset in between."""
    change = torch.zeros(seq_idx.shape, dtype=torch.int64, device=seq_idx.device)
    change[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return change.cumsum(1)


def _segsum(v: torch.Tensor) -> torch.Tensor:
    """v (..., T) -> (..., T, T) with [i, j] = sum_{j < k <= i} v[k] for j <= i, -inf above the
    diagonal. Summed directly (no difference of cumulative sums), so -inf entries of v (resets)
    propagate without NaN."""
    T = v.shape[-1]
    x = v[..., None].expand(*v.shape, T)  # [i, j] = v[i]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=v.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = x.cumsum(dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=v.device), diagonal=0)
    return out.masked_fill(~lower, -math.inf)


def _check(x, dt, A, B, C, D=None, initial_states=None, seq_idx=None):
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, len, heads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"ssd: dt must be {(b, l, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"ssd: A must be ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"ssd: B and C must be (batch, len, groups, state) and equal, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    if h % B.shape[2]:
        raise ValueError(f"ssd: {h} heads do not divide into {B.shape[2]} groups")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"ssd: D must be ({h},), got {tuple(D.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, h, p, B.shape[3]):
        raise ValueError(f"ssd: initial_states must be {(b, h, p, B.shape[3])}, got {tuple(initial_states.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != (b, l):
        raise ValueError(f"ssd: seq_idx must be {(b, l)}, got {tuple(seq_idx.shape)}")


# ----------------------------------------------------------------------------------------------
# Chunked scan (PyTorch)
# ----------------------------------------------------------------------------------------------
def _ssd_torch(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    Q = int(chunk_size)
    acc = _acc_dtype(x)
    pad = (-l) % Q
    L = l + pad
    nc = L // Q

    xf, dtf = x.to(acc), dt.to(acc)
    a = dtf * A.to(acc)  # (b, l, h) log-decay of each step
    xdt = xf * dtf[..., None]
    Bf, Cf = B.to(acc), C.to(acc)
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        if seg is not None:  # padding continues the last segment: dt = 0 changes nothing
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)

    # Chunked layouts: a (b, h, c, Q); x (b, c, Q, g, r, p); B, C (b, c, Q, g, n)
    a = a.view(b, nc, Q, h).permute(0, 3, 1, 2)
    xdt = xdt.view(b, nc, Q, g, r, p)
    Bf = Bf.view(b, nc, Q, g, n)
    Cf = Cf.view(b, nc, Q, g, n)
    a_cs = a.cumsum(-1)  # (b, h, c, Q): sum of a from the chunk start to l inclusive

    if seg is not None:
        seg_c = seg.view(b, nc, Q)
        # The segment of the token before each chunk (the initial state belongs to position 0's).
        prev_last = torch.cat([seg_c[:, :1, 0], seg_c[:, :-1, -1]], dim=1)  # (b, c)

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s <= l} (C_l . B_s) exp(sum_{s<k<=l} a_k) x_s dt_s
    seg_sum = _segsum(a)  # (b, h, c, Q, Q)
    if seg is not None:
        same = seg_c[:, :, :, None] == seg_c[:, :, None, :]  # (b, c, Q, Q)
        seg_sum = seg_sum.masked_fill(~same[:, None], -math.inf)
    decay = torch.exp(seg_sum).view(b, g, r, nc, Q, Q).permute(0, 3, 1, 2, 4, 5)  # (b, c, g, r, Q, Q)
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cf, Bf)  # (b, c, g, Q, Q)
    y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, xdt)

    # 2. Each chunk's own final state (inputs of the chunk only, decayed to its end)
    # sum_{s<k<=end} a_k, summed from the chunk's end (not a difference of prefix sums, so nothing
    # before s, e.g. a previous document, enters it even by round-off)
    to_end = torch.exp(F.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1)))  # (b, h, c, Q)
    if seg is not None:
        to_end = to_end * (seg_c == seg_c[:, :, -1:])[:, None].to(acc)
    to_end = to_end.view(b, g, r, nc, Q).permute(0, 3, 4, 1, 2)  # (b, c, Q, g, r)
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bf, xdt * to_end[..., None])  # (b, c, g, r, p, n)

    # 3. Inter-chunk recurrence: each chunk's entry state and the final state
    if initial_states is None:
        init = torch.zeros(b, 1, g, r, p, n, dtype=acc, device=x.device)
    else:
        init = initial_states.to(acc).reshape(b, 1, g, r, p, n)
    states = torch.cat([init, states], dim=1)  # (b, c+1, ...)
    chunk_decay = a_cs[..., -1]  # (b, h, c)
    if seg is not None:  # a reset inside chunk c stops everything before it from passing through
        reset_inside = seg_c[:, :, -1] != prev_last  # (b, c)
        chunk_decay = chunk_decay.masked_fill(reset_inside[:, None], -math.inf)
    between = torch.exp(_segsum(F.pad(chunk_decay, (1, 0))))  # (b, h, c+1, c+1) [to, from]
    between = between.view(b, g, r, nc + 1, nc + 1)
    new_states = torch.einsum("bgrzy,bygrpn->bzgrpn", between, states)
    entry, final = new_states[:, :-1], new_states[:, -1]

    # 4. Entry state to output: y_l += C_l . entry * exp(sum_{start<=k<=l} a_k)
    from_start = torch.exp(a_cs)  # (b, h, c, Q)
    if seg is not None:
        from_start = from_start * (seg_c == prev_last[:, :, None])[:, None].to(acc)
    from_start = from_start.view(b, g, r, nc, Q).permute(0, 3, 4, 1, 2)  # (b, c, Q, g, r)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cf, entry) * from_start[..., None]

    y = (y_diag + y_off).reshape(b, L, h, p)[:, :l]
    if D is not None:
        y = y + xf * D.to(acc)[:, None]
    return y.to(x.dtype), final.reshape(b, h, p, n)


# ----------------------------------------------------------------------------------------------
# Step-by-step recurrence: the oracle
# ----------------------------------------------------------------------------------------------
def ssd_reference(x, dt, A, B, C, *, chunk_size: int | None = None, D=None, initial_states=None, seq_idx=None):
    """The recurrence, one token at a time (slow; for tests). Same contract as `ssd_scan`;
    `chunk_size` is accepted and ignored."""
    _check(x, dt, A, B, C, D, initial_states, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = _acc_dtype(x)
    xf, dtf, Af = x.to(acc), dt.to(acc), A.to(acc)
    Bh = B.to(acc).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(acc).repeat_interleave(h // g, dim=2)
    state = (initial_states.to(acc) if initial_states is not None
             else torch.zeros(b, h, p, n, dtype=acc, device=x.device))
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    ys = []
    for t in range(l):
        if seg is not None and t > 0:
            keep = (seg[:, t] == seg[:, t - 1]).to(acc)
            state = state * keep[:, None, None, None]
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        inp = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inp
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + D.to(acc)[:, None] * xf[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    return y.to(x.dtype), state


# ----------------------------------------------------------------------------------------------
# mamba-ssm backend (CUDA, optional)
# ----------------------------------------------------------------------------------------------
_MAMBA_OK: dict[tuple, bool] = {}
_MAMBA_FN: list = []  # [fn or None] once looked up


def _mamba_fn():
    if not _MAMBA_FN:
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        except Exception:  # not installed, or built without CUDA
            mamba_chunk_scan_combined = None
        _MAMBA_FN.append(mamba_chunk_scan_combined)
    return _MAMBA_FN[0]


def _ssd_mamba(fn, x, dt, A, B, C, chunk_size, D, initial_states, seq_idx):
    seg = segment_ids(seq_idx).to(torch.int32).contiguous() if seq_idx is not None else None
    y, final = fn(x, dt, A.float(), B, C, chunk_size, D=D, initial_states=initial_states, seq_idx=seg,
                  return_final_states=True)
    return y.to(x.dtype), final.float()


def _mamba_usable(x) -> bool:
    if not x.is_cuda:
        return False
    fn = _mamba_fn()
    if fn is None:
        return False
    key = (x.device.index, x.dtype)
    if key not in _MAMBA_OK:
        # Checked once per (device, dtype) against the torch path, on a small input with
        # documents, an initial state and a length that is not a multiple of the chunk.
        gen = torch.Generator(device="cpu").manual_seed(0)
        b, l, h, p, g, n, q = 2, 80, 4, 16, 2, 16, 32

        def rnd(*s):
            return torch.randn(*s, generator=gen).to(device=x.device)

        xs, Bs, Cs = rnd(b, l, h, p).to(x.dtype), rnd(b, l, g, n).to(x.dtype), rnd(b, l, g, n).to(x.dtype)
        dts = F.softplus(rnd(b, l, h) - 2).to(x.dtype)
        As, Ds, h0 = -torch.exp(rnd(h)), rnd(h), rnd(b, h, p, n)
        sidx = torch.zeros(b, l, dtype=torch.int64, device=x.device)
        sidx[:, 50:] = 1
        ok = True
        try:
            with torch.no_grad():
                for s0, si in ((h0, None), (None, sidx), (h0, sidx)):
                    y1, f1 = _ssd_mamba(fn, xs, dts, As, Bs, Cs, q, Ds, s0, si)
                    y2, f2 = _ssd_torch(xs, dts, As, Bs, Cs, q, Ds, s0, si)
                    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
                    scale = 1.0 + y2.float().abs().max().item()
                    if not ((y1.float() - y2.float()).abs().max().item() <= tol * scale
                            and (f1 - f2.float()).abs().max().item() <= tol * (1.0 + f2.abs().max().item())):
                        ok = False
            if not ok:
                warnings.warn("ssd: mamba_ssm backend disagrees with the torch scan; using the torch scan")
        except Exception as e:  # noqa: BLE001 - any failure means: do not use it
            warnings.warn(f"ssd: mamba_ssm backend failed its self-check ({e}); using the torch scan")
            ok = False
        _MAMBA_OK[key] = ok
    return _MAMBA_OK[key]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
             chunk_size: int, D: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
             seq_idx: torch.Tensor | None = None, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked Mamba-2 SSD scan.

    x (b, l, h, p); dt (b, l, h) after softplus/bias/limits; A (h,) negative; B, C (b, l, g, n)
    with h % g == 0; D (h,) or None (y += D·x); initial_states (b, h, p, n) or None; seq_idx
    (b, l) integer document ids or None. Returns y (b, l, h, p) in x's dtype (D·x included) and
    final_states (b, h, p, n) in fp32 (fp64 for fp64 x): the state after the last token, which
    holds only the last document when one starts inside. Differentiable (plain autograd)."""
    _check(x, dt, A, B, C, D, initial_states, seq_idx)
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be positive, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"ssd: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "reference":
        return ssd_reference(x, dt, A, B, C, D=D, initial_states=initial_states, seq_idx=seq_idx)
    if backend == "mamba_ssm" or (backend == "auto" and x.shape[1] > 0):
        if _mamba_usable(x):
            if backend == "mamba_ssm":
                return _ssd_mamba(_mamba_fn(), x, dt, A, B, C, chunk_size, D, initial_states, seq_idx)
            try:
                return _ssd_mamba(_mamba_fn(), x, dt, A, B, C, chunk_size, D, initial_states, seq_idx)
            except Exception as e:  # noqa: BLE001 - a shape the kernel refuses: fall back for good
                warnings.warn(f"ssd: mamba_ssm backend failed ({e}); using the torch scan")
                _MAMBA_OK[(x.device.index, x.dtype)] = False
        elif backend == "mamba_ssm":
            raise RuntimeError("ssd: the mamba_ssm backend needs CUDA tensors and mamba-ssm installed "
                               "(extra `gpu`), and it must pass its self-check")
    if x.shape[1] == 0:
        b, _, h, p = x.shape
        acc = _acc_dtype(x)
        final = (initial_states.to(acc) if initial_states is not None
                 else torch.zeros(b, h, p, B.shape[3], dtype=acc, device=x.device))
        return x.new_zeros(x.shape), final
    return _ssd_torch(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx)


def log_decay_to_end(dt: torch.Tensor, A: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(b, h) log of the factor by which an incoming initial state is multiplied on its way to the
    final state: sum_t dt_t·A over the whole local sequence, or -inf (factor 0) where a document
    starts inside it (seq_idx changes at some position > 0). Position 0 is not a reset here (see
    the module docstring). fp32 (fp64 for fp64 dt); exp() of it is the factor."""
    acc = _acc_dtype(dt)
    total = (dt.to(acc) * A.to(acc)).sum(dim=1)  # (b, h)
    if seq_idx is not None and seq_idx.shape[1] > 1:
        reset = (seq_idx[:, 1:] != seq_idx[:, :-1]).any(dim=1)  # (b,)
        total = total.masked_fill(reset[:, None], -math.inf)
    return total


def initial_state_contribution(C: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, seq_idx: torch.Tensor | None,
                               initial_states: torch.Tensor, ngroups: int | None = None) -> torch.Tensor:
    """(b, l, h, p): the exact term `initial_states` (b, h, p, n) adds to y:
    C_t · (exp(sum_{s<=t} dt_s·A) · H0) for t in the document holding position 0, zero from the
    first reset on. C (b, l, g, n) grouped as in `ssd_scan` (`ngroups`, if given, must equal its
    g). In fp32 (fp64 for fp64 inputs)."""
    b, l, g, n = C.shape
    if ngroups is not None and ngroups != g:
        raise ValueError(f"ssd: ngroups={ngroups} but C has {g} groups")
    h = dt.shape[2]
    p = initial_states.shape[2]
    if h % g or tuple(initial_states.shape) != (b, h, p, n):
        raise ValueError(f"ssd: initial_states {tuple(initial_states.shape)} does not fit C {tuple(C.shape)} "
                         f"and dt {tuple(dt.shape)}")
    acc = torch.float64 if torch.float64 in (C.dtype, dt.dtype, initial_states.dtype) else torch.float32
    decay = torch.exp((dt.to(acc) * A.to(acc)).cumsum(dim=1))  # (b, l, h)
    if seq_idx is not None:
        decay = decay * (segment_ids(seq_idx) == 0).to(acc)[..., None]
    h0 = initial_states.to(acc).view(b, g, h // g, p, n)
    y = torch.einsum("blgn,bgrpn->blgrp", C.to(acc), h0) * decay.view(b, l, g, h // g)[..., None]
    return y.reshape(b, l, h, p)


# ----------------------------------------------------------------------------------------------
# Causal depthwise convolution (the conv1d in front of the scan)
# ----------------------------------------------------------------------------------------------
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  doc_ids: torch.Tensor | None = None, halo: torch.Tensor | None = None,
                  halo_doc_ids: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution along the sequence, channels last.

    x (b, l, c); weight (c, k) (or nn.Conv1d's (c, 1, k)); bias (c,) or None:
    out_t = bias + sum_{j=0}^{k-1} weight[:, k-1-j] · x_{t-j}, with x_{t-j} = 0 before the
    sequence (or taken from `halo`, (b, k-1, c): the k-1 inputs that precede x, e.g. the previous
    context-parallel rank's last inputs), and with taps that cross a document boundary dropped when
    `doc_ids` (b, l) are given (a change of id between t-j and t; `halo_doc_ids` (b, k-1) are then
    needed with a halo). activation: None or "silu". Output in x's dtype (computed in the weight's
    dtype, as transformers does)."""
    b, l, c = x.shape
    k = weight.shape[-1]
    w = weight.reshape(c, k)
    if halo is not None:
        if tuple(halo.shape) != (b, k - 1, c):
            raise ValueError(f"causal_conv1d: halo must be {(b, k - 1, c)}, got {tuple(halo.shape)}")
        if doc_ids is not None and halo_doc_ids is None:
            raise ValueError("causal_conv1d: halo_doc_ids are required with a halo and doc_ids")
        xe = torch.cat([halo.to(x.dtype), x], dim=1)
    else:
        xe = F.pad(x, (0, 0, k - 1, 0))
    xe = xe.to(w.dtype)
    if doc_ids is None:
        out = F.conv1d(xe.transpose(1, 2), w[:, None, :], bias, groups=c).transpose(1, 2)
    else:
        if halo is not None:
            seg = segment_ids(torch.cat([halo_doc_ids.to(doc_ids.dtype), doc_ids], dim=1))
        else:  # the zero padding contributes nothing, its segment does not matter
            seg = F.pad(segment_ids(doc_ids), (k - 1, 0), value=-1)
        seg_t = seg[:, k - 1:]
        out = None
        for j in range(k):  # tap j reads x_{t-j}
            start = k - 1 - j
            term = xe[:, start:start + l] * w[:, k - 1 - j]
            term = term * (seg[:, start:start + l] == seg_t)[..., None].to(term.dtype)
            out = term if out is None else out + term
        if bias is not None:
            out = out + bias
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}")
    return out.to(x.dtype)
