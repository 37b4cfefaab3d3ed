"""Context parallelism for Mamba-2 layers, installed as the mixer's `ssm_core` (the conv1d and
the SSD scan: everything in the layer that looks along the sequence).

Both modes keep each rank's shard contiguous: a scan needs its tokens in order.

state passing (`parallel.ssm_cp_mode: state_passing`, the default; no head-count limit):
  1. conv1d: rank r receives rank r-1's last d_conv-1 inputs (a halo; its gradient goes back);
  2. every rank scans its shard from a zero state, giving y0 and its final state S_r, and the
     factor its shard multiplies an incoming state by, exp(sum dt·A) (0 if a document starts
     inside the shard);
  3. ranks all-gather (S_r, log factor) — communication independent of sequence length — and
     rank r composes its true initial state h_r = S_{r-1} + factor_{r-1}·h_{r-1} (zero where a
     document starts exactly at the shard boundary);
  4. y = y0 + C_t·(decay to t)·h_r for the tokens of the shard's first document.
  Gradients flow back through the all-gather to the ranks whose states were used.

all-to-all (`all_to_all`; valid when the Mamba heads per tp rank divide by cp and each rank's
heads fall in whole groups): the inputs of the conv are redistributed by all-to-all from sequence
shards to head shards: x and dt by head, B and C by group, each rank receiving only the group(s)
its heads use: g/cp whole groups when g >= cp; when g < cp (several ranks share a group) the
groups are first replicated up to cp, so rank j gets group ⌊j·g/cp⌋ (as Megatron-core sends
2·n·max(g, cp) B/C channels). Each rank convolves only the channels it received (the matching
rows of the conv weight) and scans whole sequences for its heads, and the output goes back to
sequence shards. The document ids (no gradient) are all-gathered.

Packed documents work in both: the conv drops taps across documents and the scan resets at every
document start, also when a document spans ranks.
"""
from __future__ import annotations

import typing
from typing import Literal

import torch

from longtrain.kernels.ssd import causal_conv1d, initial_state_contribution, log_decay_to_end, ssd_scan
from longtrain.parallel.context.comm import GatherSeq, HeadsToSeq, P2PTag, RingExchange, SeqToHeads, gather_seq

SSMCPMode = Literal["state_passing", "all_to_all"]
SSM_MODES = typing.get_args(SSMCPMode)


class _Halo(torch.autograd.Function):
    """Rank r gets rank r-1's `tail` (rank 0 gets zeros); the gradient of what a rank received
    goes back to the rank it came from."""

    @staticmethod
    def forward(ctx, tail, group, is_first):
        ctx.group, ctx.is_first = group, is_first
        (received,) = RingExchange.finish(RingExchange(group).start([tail], tag=P2PTag.SSM_STATE))
        return torch.zeros_like(received) if is_first else received

    @staticmethod
    def backward(ctx, grad):
        grad = torch.zeros_like(grad) if ctx.is_first else grad
        (received,) = RingExchange.finish(RingExchange(ctx.group, reverse=True).start([grad.contiguous()], tag=P2PTag.SSM_STATE_GRAD))
        return received, None, None


def _exchange_ids(tail_ids: torch.Tensor, group, is_first: bool) -> torch.Tensor:
    (received,) = RingExchange.finish(RingExchange(group).start([tail_ids], tag=P2PTag.SSM_DOC_IDS))
    return torch.full_like(received, -2) if is_first else received  # -2: no document


class StatePassingSSMCore:
    def __init__(self, cp_group, cp_rank: int, cp: int, backend: str = "auto"):
        self.group, self.rank, self.cp, self.backend = cp_group, cp_rank, cp, backend

    def __call__(self, xBC, dt, *, mixer, doc_ids=None):
        weight, bias = mixer.conv_params()
        k = weight.shape[-1]
        if xBC.shape[1] < k - 1:
            raise ValueError(f"parallel.cp: shards of {xBC.shape[1]} tokens are shorter than the conv window "
                             f"d_conv-1={k - 1}; use fewer cp ranks or longer sequences")
        first = self.rank == 0
        halo = _Halo.apply(xBC[:, xBC.shape[1] - (k - 1):].contiguous(), self.group, first) if k > 1 else None
        halo_ids = None
        if doc_ids is not None and k > 1:
            halo_ids = _exchange_ids(doc_ids[:, doc_ids.shape[1] - (k - 1):].contiguous(), self.group, first)
        xBC = causal_conv1d(xBC, weight, bias, doc_ids=doc_ids, halo=halo, halo_doc_ids=halo_ids, activation="silu")
        x, B, C = mixer.split_xBC(xBC, dt.shape[-1])
        A, D = mixer.scan_params()
        y, final = ssd_scan(x, dt, A, B, C, chunk_size=mixer.chunk_size, D=D, seq_idx=doc_ids, backend=self.backend)
        log_factor = log_decay_to_end(dt, A, doc_ids)  # (b, h)

        # One all-gather of every rank's final state and factor (autograd: gradients return).
        finals = GatherSeq.apply(final[:, None].contiguous(), self.group)  # (b, cp, h, p, n)
        factors = torch.exp(GatherSeq.apply(log_factor[:, None].contiguous(), self.group))  # (b, cp, h)
        keep = torch.ones(x.shape[0], self.cp, dtype=final.dtype, device=x.device)  # state crosses into rank j
        if doc_ids is not None:
            ends = gather_seq(torch.stack([doc_ids[:, 0], doc_ids[:, -1]], dim=1), self.group)  # (b, 2·cp)
            starts, lasts = ends[:, 0::2], ends[:, 1::2]
            keep[:, 1:] = (starts[:, 1:] == lasts[:, :-1]).to(keep.dtype)
        # Every rank composes every rank's incoming state and takes its own: the autograd graph
        # (and so the order of the collectives in backward) must be the same on all ranks.
        states = [torch.zeros_like(final)]
        for j in range(self.cp - 1):
            states.append((finals[:, j] + factors[:, j, :, None, None] * states[-1]) * keep[:, j + 1, None, None, None])
        mine = torch.zeros(self.cp, dtype=final.dtype, device=final.device)
        mine[self.rank] = 1.0  # a one-hot pick keeps every state in every rank's graph
        state = (torch.stack(states, dim=1) * mine[None, :, None, None, None]).sum(1)
        correction = initial_state_contribution(C, dt, A, doc_ids, state, ngroups=C.shape[2])
        return y + correction.to(y.dtype)


class AllToAllSSMCore:
    def __init__(self, cp_group, cp_rank: int, cp: int, backend: str = "auto"):
        self.group, self.rank, self.cp, self.backend = cp_group, cp_rank, cp, backend

    def _groups(self, n_heads: int, g: int) -> torch.Tensor:
        """The group sent to each of the max(g, cp) slots of the B/C all-to-all: slot s goes to
        rank s // (slots/cp). g >= cp: every group once (rank j gets groups j·g/cp ...); g < cp:
        each group replicated cp/g times, so rank j gets the group of its heads, j·g // cp."""
        per_rank = n_heads // self.cp
        if n_heads % self.cp or (g % self.cp and self.cp % g):
            raise ValueError(f"parallel.ssm_cp_mode: all_to_all needs each rank's {per_rank} heads to fall in "
                             f"whole groups ({g} groups per tensor-parallel rank, parallel.cp={self.cp})")
        return torch.arange(g) if g >= self.cp else torch.arange(self.cp) // (self.cp // g)

    def __call__(self, xBC, dt, *, mixer, doc_ids=None):
        weight, bias = mixer.conv_params()
        n_heads, p, n = dt.shape[-1], mixer.head_dim, mixer.d_state
        d_inner = n_heads * p
        b, l, width = xBC.shape
        g = (width - d_inner) // (2 * n)
        heads_here = n_heads // self.cp
        slots = self._groups(n_heads, g)  # (max(g, cp),): the group in each slot
        groups_here = slots.numel() // self.cp
        mine = slots[self.rank * groups_here:(self.rank + 1) * groups_here]  # the groups of my heads

        # Sequence shards -> head shards (all-to-all, gradients come back the same way): x by head,
        # dt by head, B and C by group (replicated up to cp slots when g < cp).
        x_part = SeqToHeads.apply(xBC[..., :d_inner].reshape(b, l, n_heads, p), self.group)  # (b, L, h/cp, p)
        dt_part = SeqToHeads.apply(dt[..., None], self.group)[..., 0]  # (b, L, h/cp)
        bc = xBC[..., d_inner:].reshape(b, l, 2, g, n).transpose(2, 3)  # (b, l, g, 2, n)
        if g < self.cp:
            bc = bc.index_select(2, slots.to(bc.device))  # (b, l, cp, 2, n); backward sums the copies
        bc_part = SeqToHeads.apply(bc.reshape(b, l, slots.numel(), 2 * n), self.group)  # (b, L, max(g,cp)/cp, 2n)
        ids = gather_seq(doc_ids, self.group) if doc_ids is not None else None
        L = x_part.shape[1]
        bc_part = bc_part.reshape(b, L, groups_here, 2, n).transpose(2, 3).reshape(b, L, 2 * groups_here * n)

        # Convolve only what this rank holds: the rows of my heads' x channels and my groups' B, C.
        rows_bc = (mine[:, None] * n + torch.arange(n)).reshape(-1)  # within B (or C) of all groups
        keep = torch.cat([torch.arange(self.rank * heads_here * p, (self.rank + 1) * heads_here * p),
                          d_inner + rows_bc, d_inner + g * n + rows_bc]).to(weight.device)
        conv_in = torch.cat([x_part.reshape(b, L, -1), bc_part], dim=-1)
        conv_out = causal_conv1d(conv_in, weight[keep], None if bias is None else bias[keep], doc_ids=ids,
                                 activation="silu")
        x, B, C = mixer.split_xBC(conv_out, heads_here)  # B, C (b, L, groups_here, n)
        A, D = mixer.scan_params()
        heads = slice(self.rank * heads_here, (self.rank + 1) * heads_here)
        y, _ = ssd_scan(x, dt_part, A[heads], B, C, chunk_size=mixer.chunk_size, D=D[heads], seq_idx=ids,
                        backend=self.backend)
        return HeadsToSeq.apply(y.contiguous(), self.group)  # (b, l, h, p)


def check_ssm_cp(mode: str, cp: int, mamba_heads: int, ngroups: int, tp: int = 1) -> None:
    """One line naming the keys when an SSM cp mode cannot work."""
    if mode not in SSM_MODES:
        raise ValueError(f"parallel.ssm_cp_mode: unknown mode {mode!r}; known: {', '.join(SSM_MODES)}")
    if mode == "all_to_all":
        heads = mamba_heads // tp
        if heads % cp:
            raise ValueError(f"parallel.ssm_cp_mode: all_to_all needs the Mamba heads per tensor-parallel rank "
                             f"({mamba_heads} / parallel.tp={tp} = {heads}) to divide by parallel.cp={cp}; "
                             f"use state_passing, which has no head-count limit")
        groups = ngroups // tp
        per_rank = heads // cp
        if groups > 1 and (heads // groups) % per_rank and per_rank % (heads // groups):
            raise ValueError(f"parallel.ssm_cp_mode: all_to_all needs each rank's {per_rank} heads to fall in "
                             f"whole groups (model.ngroups={ngroups})")


def build_ssm_core(mode: str, mesh, backend: str = "auto"):
    cls = StatePassingSSMCore if mode == "state_passing" else AllToAllSSMCore
    return cls(mesh["cp"].get_group(), mesh.local_rank("cp"), mesh.dims.cp, backend)
