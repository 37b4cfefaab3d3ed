"""Which tokens of a sequence each context-parallel rank holds.

The cp ranks form R ring members of u Ulysses ranks each (cp = R x u; u = 1 for pure ring, R = 1 for
pure Ulysses). A ring member owns a set of token indices; its u ranks hold consecutive pieces of
that set, so a Ulysses all-gather inside the member gives back the member's tokens in order.

Member token sets:
- contiguous: member i owns the i-th of R equal slices (ring without balancing, Ulysses);
- zigzag: the sequence is cut into 2R chunks and member i owns chunks i and 2R-1-i, so that
  every member does the same causal attention work;
- document-aware zigzag (packed batches): every document is cut into 2R chunks and member i
  owns chunks i and 2R-1-i of each document, so the work is balanced document by document.

Lengths that do not divide are padded inside: padding slots get token 0, label -100 (no loss),
document id -1 (attends nothing) and position 0. Slots past the row's end are appended to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longtrain.kernels.chunked_loss import IGNORE_INDEX



@dataclass(frozen=True)
class CPShape:
    ring: int  # R: ring members
    ulysses: int  # u: ranks per member
    balance: str  # "contiguous" | "zigzag"

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses

    def member_of(self, cp_rank: int) -> tuple[int, int]:
        """(ring member, index inside the member) of a cp rank: Ulysses ranks are adjacent."""
        return divmod(cp_rank, self.ulysses)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Unpacked sequences (one document per row): the same layout for every row
# ----------------------------------------------------------------------------------------------
def padded_length(seq_len: int, shape: CPShape) -> int:
    chunks = 2 * shape.ring if shape.balance == "zigzag" else shape.ring
    return _round_up(seq_len, chunks * shape.ulysses)


def member_segments(seq_len_padded: int, shape: CPShape) -> list[list[tuple[int, int]]]:
    """For each ring member, its tokens as contiguous (start, length) segments, in local order."""
    R = shape.ring
    if shape.balance == "zigzag":
        chunk = seq_len_padded // (2 * R)
        return [[(i * chunk, chunk), ((2 * R - 1 - i) * chunk, chunk)] for i in range(R)]
    piece = seq_len_padded // R
    return [[(i * piece, piece)] for i in range(R)]


def segment_index(segments: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + length) for start, length in segments])


def dense_index(seq_len: int, shape: CPShape) -> torch.Tensor:
    """(cp, local_len) token indices of each cp rank for an unpacked row of seq_len tokens."""
    padded = padded_length(seq_len, shape)
    out = []
    for segs in member_segments(padded, shape):
        member = segment_index(segs)
        out.extend(member.chunk(shape.ulysses))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Packed rows (document ids): a layout per row
# ----------------------------------------------------------------------------------------------
def _documents(doc_row: torch.Tensor) -> tuple[list[tuple[int, int]], list[int]]:
    """Contiguous runs of equal document id >= 0 as (start, length), and the padding indices."""
    ids = doc_row.tolist()
    docs, pads, start = [], [], None
    for i, d in enumerate(ids + [None]):
        if start is not None and (d is None or d != ids[start]):
            docs.append((start, i - start))
            start = None
        if d is None:
            break
        if d < 0:
            pads.append(i)
        elif start is None:
            start = i
    return docs, pads


def _split(length: int, parts: int) -> list[int]:
    base, extra = divmod(length, parts)
    return [base + (1 if p < extra else 0) for p in range(parts)]


def packed_member_tokens(doc_row: torch.Tensor, shape: CPShape) -> list[list[int]]:
    """Token indices of each ring member for one packed row (before padding)."""
    R = shape.ring
    docs, pads = _documents(doc_row)
    members: list[list[int]] = [[] for _ in range(R)]
    if shape.balance == "zigzag":
        rotate = 0
        for start, length in docs:
            sizes = _split(length, 2 * R)
            # Rotate which chunks get the remainder so that short documents spread over members.
            sizes = sizes[-rotate:] + sizes[:-rotate] if rotate else sizes
            rotate = (rotate + length) % (2 * R)
            bounds = [start]
            for size in sizes:
                bounds.append(bounds[-1] + size)
            for i in range(R):
                for c in (i, 2 * R - 1 - i):
                    members[i].extend(range(bounds[c], bounds[c + 1]))
    else:
        real = [t for start, length in docs for t in range(start, start + length)]
        real.sort()
        for i, size in enumerate(_split(len(real), R)):
            members[i], real = real[:size], real[size:]
    for p in pads:  # the row's own padding fills the smallest members
        min(members, key=len).append(p)
    return [sorted(m) for m in members]


def packed_index(doc_ids: torch.Tensor, shape: CPShape) -> tuple[torch.Tensor, int]:
    """(batch, cp, local_len) token indices for packed rows, and the padded row length
    (indices >= the row's length are padding slots appended to the row)."""
    batch, seq_len = doc_ids.shape
    per_row = [packed_member_tokens(doc_ids[b], shape) for b in range(batch)]
    member_len = _round_up(max(len(m) for row in per_row for m in row), shape.ulysses)
    padded_len = seq_len + shape.ring * member_len  # room for every member's padding slots
    index = torch.empty(batch, shape.cp, member_len // shape.ulysses, dtype=torch.long)
    for b, row in enumerate(per_row):
        next_pad = seq_len
        for i, tokens in enumerate(row):
            fill = list(range(next_pad, next_pad + member_len - len(tokens)))
            next_pad += len(fill)
            member = torch.tensor(tokens + fill, dtype=torch.long)
            for j, piece in enumerate(member.chunk(shape.ulysses)):
                index[b, i * shape.ulysses + j] = piece
    return index, padded_len


# ----------------------------------------------------------------------------------------------
# Sharding a batch
# ----------------------------------------------------------------------------------------------
def _pad_row_tensors(batch: dict, padded_len: int) -> dict:
    seq_len = batch["tokens"].shape[1]
    extra = padded_len - seq_len
    if extra <= 0:
        return batch
    fills = {"tokens": 0, "labels": IGNORE_INDEX, "positions": 0, "doc_ids": -1}
    out = {}
    for key, value in batch.items():
        if key in fills and torch.is_tensor(value) and value.dim() == 2:
            pad = torch.full((value.shape[0], extra), fills[key], dtype=value.dtype, device=value.device)
            if key == "positions" and "doc_ids" not in batch:  # unpacked: padding continues the order
                pad = torch.arange(seq_len, padded_len, device=value.device).expand(value.shape[0], -1)
            out[key] = torch.cat([value, pad], dim=1)
        else:
            out[key] = value
    return out


def shard_batch(batch: dict, shape: CPShape, cp_rank: int) -> dict:
    """This cp rank's part of a batch (tokens, labels, positions and doc_ids when packed)."""
    packed = batch.get("doc_ids") is not None
    if packed:
        index, padded_len = packed_index(batch["doc_ids"].cpu(), shape)
        local = index[:, cp_rank]
    else:
        seq_len = batch["tokens"].shape[1]
        padded_len = padded_length(seq_len, shape)
        local = dense_index(seq_len, shape)[cp_rank].expand(batch["tokens"].shape[0], -1)
    full = _pad_row_tensors(batch, padded_len)
    if not packed and "positions" in full:
        # Unpacked rows: the attention's causal order is the global token order.
        full["positions"] = torch.arange(padded_len).expand(full["tokens"].shape[0], -1)
    out = {}
    for key, value in full.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == padded_len:
            out[key] = torch.gather(value, 1, local.to(value.device))
        else:
            out[key] = value
    return out


def attention_work(doc_ids: torch.Tensor | None, seq_len: int, shape: CPShape) -> list[int]:
    """Allowed (query, key) pairs per cp rank under a causal (per-document) mask, for balance checks."""
    if doc_ids is None:
        index = dense_index(seq_len, shape)[None]
        docs = torch.zeros(1, padded_length(seq_len, shape), dtype=torch.long)
        docs[:, seq_len:] = -1
    else:
        index, padded_len = packed_index(doc_ids, shape)
        docs = torch.cat([doc_ids, torch.full((doc_ids.shape[0], padded_len - doc_ids.shape[1]), -1)], dim=1)
    work = [0] * shape.cp
    for b in range(index.shape[0]):
        row = docs[b]
        for rank in range(shape.cp):
            for t in index[b, rank].tolist():
                d = int(row[t])
                if d >= 0:  # keys: same document, not after the query
                    work[rank] += int(((row[: t + 1] == d)).sum())
    return work
