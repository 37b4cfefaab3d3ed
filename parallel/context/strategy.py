"""The context-parallel attention strategy that parallel/ installs into every attention module.

Modes (recipe key `parallel.cp_mode`):
- ring:      pass-KV ring over cp ranks, contiguous shards;
- zigzag:    the same ring over zigzag shards (equal causal work per rank);
- ulysses:   all-to-all from sequence shards to head shards, plain attention, and back;
- hybrid:    Ulysses inside groups of `cp_ulysses_degree` adjacent ranks, a zigzag ring across the
             groups (USP); the default when cp > 8 or the heads per tp rank do not divide by cp;
- allgather: every rank all-gathers K/V (Llama-3 style) and attends its zigzag queries to them.
Packed rows (document ids) work in every mode: masks come from positions and document ids.

`parallel.cp_kv_chunks` (ring, zigzag, hybrid): each ring member's K/V goes round the ring in
that many pieces, one after another, so that what is in flight at once is that much smaller
(ring.py). A memory knob for the longest sequences; 1 (default) sends whole blocks.
"""
from __future__ import annotations

import math

import typing
from typing import Literal

import torch.distributed as dist

from longtrain.parallel.context.comm import GatherSeq, HeadsToSeq, SeqToHeads, gather_seq
from longtrain.parallel.context.layout import CPShape, member_segments
from longtrain.parallel.context.ring import LocalBlocksAttention, RingAttention, TokenInfo

CPMode = Literal["ring", "zigzag", "ulysses", "hybrid", "allgather"]
MODES = typing.get_args(CPMode)


class CPConfigError(ValueError):
    """A context-parallel setting that cannot work; str() is one line naming the keys."""


def auto_ulysses_degree(cp: int, heads: int, kv_heads: int) -> int:
    """The largest divisor of cp that is at most 8 (a node) and divides the heads per tp rank."""
    best = 1
    for u in range(1, min(cp, 8) + 1):
        if cp % u == 0 and heads % u == 0 and (kv_heads % u == 0 or u % kv_heads == 0):
            best = u
    return best


def resolve_mode(mode: str, cp: int, heads: int, kv_heads: int, ulysses_degree: int, tp: int = 1,
                 contiguous: bool = False, kv_chunks: int = 1) -> tuple[str, CPShape]:
    """(mode, shape) for a recipe's cp settings, heads being per tensor-parallel rank.
    `contiguous`: every rank's shard must be one contiguous run (hybrid Mamba stacks, whose scans
    need their tokens in order): ring/hybrid/allgather then use contiguous shards, zigzag is refused."""
    mode, shape = _resolve_layout(mode, cp, heads, kv_heads, ulysses_degree, tp, contiguous)
    if kv_chunks < 1:
        raise CPConfigError(f"parallel.cp_kv_chunks: {kv_chunks} must be at least 1")
    if kv_chunks > 1 and (mode == "allgather" or shape.ring == 1):
        raise CPConfigError(f"parallel.cp_kv_chunks: {kv_chunks} pieces of K/V need a ring, but cp_mode {mode} "
                            f"(ring {shape.ring} x ulysses {shape.ulysses}) has none; use ring, zigzag or hybrid "
                            f"with ring > 1, or cp_kv_chunks: 1")
    return mode, shape


def _resolve_layout(mode: str, cp: int, heads: int, kv_heads: int, ulysses_degree: int, tp: int,
                    contiguous: bool) -> tuple[str, CPShape]:
    if mode == "auto":
        mode = "ulysses" if cp <= 8 and heads % cp == 0 else "hybrid"
    if contiguous and mode == "zigzag":
        raise CPConfigError("parallel.cp_mode: zigzag reorders the sequence, but the Mamba layers of a hybrid "
                            "stack scan it in order; use ulysses (balanced), hybrid or ring")
    if mode not in MODES:
        raise CPConfigError(f"parallel.cp_mode: unknown mode {mode!r}; known: auto, {', '.join(MODES)}")

    def check_heads(u: int, what: str):
        if heads % u:
            raise CPConfigError(
                f"parallel.cp_mode: {what} needs the attention heads per tensor-parallel rank (model.n_heads / "
                f"parallel.tp = {heads * tp} / {tp} = {heads}) to divide by the Ulysses degree {u}")
        if kv_heads % u and u % kv_heads:
            raise CPConfigError(
                f"parallel.cp_mode: {what} needs the kv heads per tensor-parallel rank ({kv_heads}) and the "
                f"Ulysses degree {u} to divide one another")

    if mode == "ulysses":
        check_heads(cp, "ulysses")
        return mode, CPShape(ring=1, ulysses=cp, balance="contiguous")
    if mode == "hybrid":
        u = ulysses_degree or auto_ulysses_degree(cp, heads, kv_heads)
        if cp % u:
            raise CPConfigError(f"parallel.cp_ulysses_degree: {u} does not divide parallel.cp={cp}")
        check_heads(u, "hybrid")
        return mode, CPShape(ring=cp // u, ulysses=u, balance="contiguous" if contiguous else "zigzag")
    balance = "contiguous" if mode == "ring" or contiguous else "zigzag"
    return mode, CPShape(ring=cp, ulysses=1, balance=balance)


def build_groups(world_mesh, shape: CPShape):
    """Process groups for this rank's Ulysses group (adjacent cp ranks) and ring (stride u).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    names = world_mesh.mesh_dim_names
    ranks = world_mesh.mesh.movedim(names.index("cp"), -1).reshape(-1, shape.cp).tolist()
    ulysses_lists = [line[i * shape.ulysses:(i + 1) * shape.ulysses] for line in ranks for i in range(shape.ring)]
    ring_lists = [line[j::shape.ulysses] for line in ranks for j in range(shape.ulysses)]
    ulysses = dist.new_subgroups_by_enumeration(ulysses_lists)[0] if shape.ulysses > 1 else None
    ring = dist.new_subgroups_by_enumeration(ring_lists)[0] if shape.ring > 1 else None
    return ulysses, ring


class ContextParallelAttention:
    """Called by the model's attention as core_attention(q, k, v, scale, positions, doc_ids) with
    this rank's shard of the sequence; returns this rank's shard of the output."""

    def __init__(self, mode: str, shape: CPShape, cp_rank: int, cp_group, ulysses_group, ring_group,
                 backend: str = "auto", causal: bool = True, kv_chunks: int = 1):
        self.mode, self.shape, self.cp_rank, self.kv_chunks = mode, shape, cp_rank, kv_chunks
        self.cp_group, self.ulysses_group, self.ring_group = cp_group, ulysses_group, ring_group
        self.backend, self.causal = backend, causal
        self.member, _ = shape.member_of(cp_rank)

    def __call__(self, q, k, v, scale: float, positions=None, doc_ids=None, seq_len: int | None = None):
        """`seq_len`: an unpacked row's length before the cp padding (layout.padded_length); keys
        past it are padding and are masked. Causal attention never reaches them from a real query,
        so only full (non-causal) attention over unpacked rows needs it, and there it is required."""
        u = self.shape.ulysses
        packed = doc_ids is not None
        if not packed and not self.causal and seq_len is None:
            raise ValueError("ContextParallelAttention: full (non-causal) attention over unpacked rows needs seq_len, "
                             "the length before cp padding, or the padding keys would be attended")
        if u > 1:
            h_kv = k.shape[2]
            if h_kv % u:  # fewer kv heads than Ulysses ranks: replicate them
                k, v = (t.repeat_interleave(u // math.gcd(u, h_kv), dim=2) for t in (k, v))
            q, k, v = (SeqToHeads.apply(t, self.ulysses_group) for t in (q, k, v))
            if packed:
                positions, doc_ids = (gather_seq(t, self.ulysses_group) for t in (positions, doc_ids))
        if packed:
            q_info = TokenInfo(pos=positions, doc=doc_ids)
            member_infos = None
        else:
            padded = q.shape[1] * self.shape.ring
            limit = seq_len if seq_len is not None and seq_len < padded else None
            member_infos = [TokenInfo(segments=s, limit=limit) for s in member_segments(padded, self.shape)]
            q_info = member_infos[self.member]

        if self.mode == "allgather":
            k_all, v_all = (GatherSeq.apply(t, self.cp_group) for t in (k, v))
            if packed:
                k_info = TokenInfo(pos=gather_seq(positions, self.cp_group), doc=gather_seq(doc_ids, self.cp_group))
            else:
                k_info = TokenInfo(segments=[seg for info in member_infos for seg in info.segments],
                                   limit=q_info.limit)
            out = LocalBlocksAttention.apply(q, k_all, v_all, q_info, k_info, scale, self.causal, self.backend)
        elif self.shape.ring == 1:
            out = LocalBlocksAttention.apply(q, k, v, q_info, q_info, scale, self.causal, self.backend)
        else:
            out = RingAttention.apply(q, k, v, q_info, member_infos, self.member, scale, self.causal, self.backend,
                                      self.ring_group, self.kv_chunks)
        if u > 1:
            out = HeadsToSeq.apply(out, self.ulysses_group)
        return out


def build_strategy(mesh, mode: str, heads: int, kv_heads: int, ulysses_degree: int, backend: str,
                   tp: int = 1, causal: bool = True, contiguous: bool = False,
                   kv_chunks: int = 1) -> ContextParallelAttention:
    """The strategy for this rank of `mesh` (a longtrain Mesh). heads/kv_heads per tp rank."""
    cp = mesh.dims.cp
    mode, shape = resolve_mode(mode, cp, heads, kv_heads, ulysses_degree, tp, contiguous, kv_chunks)
    ulysses, ring = build_groups(mesh.world, shape)
    return ContextParallelAttention(mode, shape, mesh.local_rank("cp"), mesh["cp"].get_group(), ulysses, ring,
                                    backend=backend, causal=causal, kv_chunks=kv_chunks)
