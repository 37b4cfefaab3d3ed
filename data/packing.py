"""Document packing: documents -> rows with per-document positions, labels and document ids.

A row is a list of pieces (document, start, stop). Materialized it becomes four int64 arrays of
the row's length:

- `tokens`: the pieces' tokens, then `pad_id` up to the row length (fixed-length modes).
- `labels`: the next token of the same document, or -100 (IGNORE_INDEX) where no loss is taken:
  padding, and the last token of a document. With BOS/EOS on (data.add_bos/add_eos) a document is
  `BOS text EOS`: BOS predicts the first text token, the last text token predicts EOS, and EOS
  predicts nothing — no label ever crosses into another document. When a document is split into
  pieces, the last token of a non-final piece is labelled with the document's next token (the
  first token of the next piece: still the same document).
- `positions`: 0, 1, 2, ... restarting at every piece (a continued document restarts at 0 in
  its new row; RoPE is relative, so within a piece nothing changes). Padding gets 0.
- `doc_ids`: 0, 1, 2, ... per piece in order of appearance in the row; padding -1. Attention is
  allowed between two tokens of a row only when their doc_ids are equal and >= 0 (and causal).
  Padding is always at the end of a row.

Packers (one per lane, see data/pipeline.py), each a deterministic function of its document
sequence:

- `ConcatPacker` (data.packing: concat): documents end to end, cut every `seq_len` tokens. No
  padding at all (efficiency 1.0); a document longer than the rest of a row continues in the
  lane's next row.
- `FirstFitPacker` (data.packing: whole, and varlen): whole documents; a row takes the first
  piece of a lookahead pool of `window` pieces, then every later piece of the pool that still
  fits, in order. Documents longer than `max_piece` are cut into pieces of `max_piece` tokens
  (whole: seq_len; varlen: data.max_doc_len, "kept whole up to a maximum"). `whole` pads each row
  to seq_len; varlen rows are unpadded token bins of up to `capacity` tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from longtrain.kernels.chunked_loss import IGNORE_INDEX  # the label the loss ignores



class Doc:
    """One document of the global stream: global index, source, record, epoch, token count, and
    its tokens (loaded on first use when only the length was known)."""

    __slots__ = ("index", "source", "record", "epoch", "length", "_tokens", "_load")

    def __init__(self, index: int, source: int, record: int, epoch: int, length: int,
                 tokens: Optional[np.ndarray] = None, load: Optional[Callable[[], np.ndarray]] = None):
        self.index, self.source, self.record, self.epoch = index, source, record, epoch
        self.length = int(length)
        self._tokens, self._load = tokens, load

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            tokens = self._load()
            if len(tokens) != self.length:
                raise ValueError(f"document {self.index} (source {self.source}, record {self.record}) has "
                                 f"{len(tokens)} tokens, but its length was given as {self.length}")
            self._tokens = tokens
        return self._tokens

    def __repr__(self) -> str:
        return f"Doc(index={self.index}, source={self.source}, record={self.record}, length={self.length})"


# A piece: (doc, start, stop)
Piece = tuple


class ConcatPacker:
    def __init__(self, pull: Callable[[], Doc], seq_len: int):
        self.pull, self.seq_len = pull, seq_len
        self.doc: Optional[Doc] = None
        self.offset = 0

    def next_row(self) -> list[Piece]:
        pieces, space = [], self.seq_len
        while space:
            if self.doc is None or self.offset >= self.doc.length:
                self.doc, self.offset = self.pull(), 0
                continue
            take = min(space, self.doc.length - self.offset)
            pieces.append((self.doc, self.offset, self.offset + take))
            self.offset += take
            space -= take
        return pieces


class FirstFitPacker:
    def __init__(self, pull: Callable[[], Doc], capacity: int, max_piece: int, window: int):
        if not 1 <= max_piece <= capacity:
            raise ValueError(f"data: max piece length {max_piece} must be in [1, {capacity}]")
        self.pull, self.capacity, self.max_piece, self.window = pull, capacity, max_piece, max(1, window)
        self.pool: list[Piece] = []

    def _refill(self) -> None:
        while len(self.pool) < self.window:
            doc = self.pull()
            for start in range(0, doc.length, self.max_piece):
                self.pool.append((doc, start, min(doc.length, start + self.max_piece)))

    def next_row(self) -> list[Piece]:
        self._refill()
        first = self.pool.pop(0)
        pieces, space = [first], self.capacity - (first[2] - first[1])
        i = 0
        while space and i < len(self.pool):
            piece = self.pool[i]
            size = piece[2] - piece[1]
            if size <= space:
                pieces.append(self.pool.pop(i))
                space -= size
            else:
                i += 1
        return pieces


def materialize(pieces: list[Piece], row_len: Optional[int], pad_id: int) -> dict[str, np.ndarray]:
    """Pieces -> tokens, labels, positions, doc_ids (int64). row_len None: unpadded."""
    used = sum(stop - start for _, start, stop in pieces)
    n = used if row_len is None else row_len
    if used > n:
        raise ValueError(f"data: pieces hold {used} tokens, more than the row length {n}")
    tokens = np.full(n, pad_id, dtype=np.int64)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(n, dtype=np.int64)
    doc_ids = np.full(n, -1, dtype=np.int64)
    at = 0
    for i, (doc, start, stop) in enumerate(pieces):
        size = stop - start
        src = doc.tokens
        tokens[at:at + size] = src[start:stop]
        nxt = min(stop + 1, doc.length)  # labels: src[start+1 : stop+1] within the document
        lab = src[start + 1:nxt]
        labels[at:at + len(lab)] = lab
        positions[at:at + size] = np.arange(size)
        doc_ids[at:at + size] = i
        at += size
    return {"tokens": tokens, "labels": labels, "positions": positions, "doc_ids": doc_ids}


def piece_records(pieces: list[Piece]) -> list[tuple[int, int, int, int, int]]:
    """(global doc index, source, record, start, stop) of each piece: what a row consumed."""
    return [(doc.index, doc.source, doc.record, start, stop) for doc, start, stop in pieces]


def cu_seqlens_from_doc_ids(doc_ids_row, include_padding: bool = False):
    """Cumulative document boundaries of one row, int32 torch tensor [0, end_0, end_1, ...].

    Documents are the maximal runs of equal doc_ids >= 0 (padding, -1, is only at the end of a
    row). cu_seqlens[-1] is the number of non-padding tokens; with include_padding the padding
    tail, when there is one, is appended as a last segment so that cu_seqlens[-1] == len(row)."""
    import torch

    ids = torch.as_tensor(doc_ids_row).reshape(-1)
    n = ids.numel()
    valid = ids >= 0
    n_valid = int(valid.sum())
    if n_valid and not bool(valid[:n_valid].all()):
        raise ValueError("cu_seqlens_from_doc_ids: padding (doc_id -1) must be at the end of the row")
    core = ids[:n_valid]
    if n_valid:
        change = torch.nonzero(core[1:] != core[:-1]).reshape(-1) + 1
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), change, torch.tensor([n_valid])])
    else:
        bounds = torch.zeros(1, dtype=torch.long)
    if include_padding and n_valid < n:
        bounds = torch.cat([bounds, torch.tensor([n])])
    return bounds.to(torch.int32)


def attention_mask_from_doc_ids(doc_ids_row):
    """(S, S) bool: query i may attend key j (document-local causal mask). For tests and
    reference attention."""
    import torch

    ids = torch.as_tensor(doc_ids_row).reshape(-1)
    same = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    return same & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
