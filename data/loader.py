"""Fixed-length training sequences over the concatenated token stream of a corpus.

The stream is the corpus documents joined end to end, each BOS ... EOS. Sequence k covers stream
tokens [k*seq_len, k*seq_len + seq_len + 1): `tokens` are the first seq_len of them and `labels`
the same span shifted by one, so the last label of sequence k is the first token of sequence k+1.

Epochs: when the stream runs out it wraps around and goes on with the next epoch. Epoch 0 uses the
corpus order; epoch e >= 1 reshuffles the documents with numpy RNG seed `corpus.seed + e`. A
sequence may straddle two epochs. `num_sequences` = tokens per epoch // seq_len.

Cursor: the loader holds one global sequence index `cursor`, the same on every data-parallel
rank. One `next()` gives rank r the sequences [cursor + r*B, cursor + (r+1)*B) for B = batch_size
and advances the cursor by dp_degree*B. Saving the cursor and resuming with any other dp_degree
therefore neither repeats nor skips a sequence.

Jumping to any cursor is a binary search over the cumulative document lengths (np.searchsorted);
only the documents that a batch touches are read, and recently read ones are cached.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .builtin import BuiltinCorpus
from .tokenizers import build_tokenizer

KNOWN_SOURCES = ("builtin",)


class FixedLengthLoader:
    """An iterator of batches {"tokens", "labels", "positions"}, each int64 (batch_size, seq_len)."""

    def __init__(self, corpus, tokenizer, seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_degree: int = 1, *, doc_cache_size: int = 32):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"data: seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
            raise ValueError(f"data: dp_rank {dp_rank} is not in [0, dp_degree={dp_degree})")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_degree = int(dp_degree)
        self.cursor = 0  # global sequence index of the next batch, identical on every rank

        self._epoch_tokens = int(np.sum(corpus.doc_token_lengths))
        if self._epoch_tokens == 0:
            raise ValueError("data: the corpus has no tokens")
        self._epoch_layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._doc_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._doc_cache_size = doc_cache_size

    # ------------------------------------------------------------------------------------------
    # Iteration
    # ------------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        """Sequences in one epoch of the stream."""
        return self._epoch_tokens // self.seq_len

    @property
    def sequences_per_step(self) -> int:
        """How far one `next()` moves the global cursor."""
        return self.dp_degree * self.batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.cursor + self.dp_rank * self.batch_size
        batch = self.sequences(first, self.batch_size)
        self.cursor += self.sequences_per_step
        return batch

    def sequences(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Global sequences [first, first + count) as a batch; does not move the cursor."""
        spans = np.stack([self._read_stream(k * self.seq_len, (k + 1) * self.seq_len + 1)
                          for k in range(first, first + count)])
        spans = torch.from_numpy(spans)
        positions = torch.arange(self.seq_len, dtype=torch.int64).expand(count, -1).contiguous()
        return {"tokens": spans[:, :-1].contiguous(), "labels": spans[:, 1:].contiguous(),
                "positions": positions}

    # ------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seq_len": self.seq_len, "source": self.corpus.source}

    def load_state_dict(self, state: dict) -> None:
        for key in ("cursor", "seq_len"):
            if key not in state:
                raise ValueError(f"data loader state: missing key {key!r}")
        if int(state["seq_len"]) != self.seq_len:
            raise ValueError(f"data loader state: seq_len {state['seq_len']} in the checkpoint differs "
                             f"from data.seq_len={self.seq_len}; the global cursor counts sequences of "
                             "one fixed length")
        if "source" in state and state["source"] != self.corpus.source:
            raise ValueError(f"data loader state: source {state['source']!r} in the checkpoint differs "
                             f"from data.source={self.corpus.source!r}")
        cursor = int(state["cursor"])
        if cursor < 0:
            raise ValueError(f"data loader state: cursor {cursor} is negative")
        self.cursor = cursor

    # ------------------------------------------------------------------------------------------
    # The token stream
    # ------------------------------------------------------------------------------------------
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start offset of each position in that order) for one epoch."""
        layout = self._epoch_layouts.get(epoch)
        if layout is None:
            n = len(self.corpus.doc_token_lengths)
            if epoch == 0:
                order = np.arange(n)
            else:
                order = np.random.default_rng(self.corpus.seed + epoch).permutation(n)
            starts = np.concatenate([[0], np.cumsum(self.corpus.doc_token_lengths[order])[:-1]])
            layout = (order, starts)
            self._epoch_layouts[epoch] = layout
            if len(self._epoch_layouts) > 2:  # a sequence touches at most two epochs
                self._epoch_layouts.popitem(last=False)
        else:
            self._epoch_layouts.move_to_end(epoch)
        return layout

    def _document(self, doc: int) -> np.ndarray:
        tokens = self._doc_cache.get(doc)
        if tokens is None:
            tokens = self.corpus.read_tokens(doc, self.tokenizer)
            self._doc_cache[doc] = tokens
            if len(self._doc_cache) > self._doc_cache_size:
                self._doc_cache.popitem(last=False)
        else:
            self._doc_cache.move_to_end(doc)
        return tokens

    def _read_stream(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop), across document and epoch boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        filled = 0
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, self._epoch_tokens)
            order, starts = self._epoch_layout(epoch)
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            tokens = self._document(int(order[slot]))
            piece = tokens[offset - int(starts[slot]):][: stop - pos]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            pos += len(piece)
        return out


def build_loader(data_cfg, *, dp_rank: int, dp_degree: int, seed: int, split: str = "train") -> FixedLengthLoader:
    """The loader for a recipe's `data` section (source, tokenizer, seq_len, batch_size)."""
    if data_cfg.source != "builtin":
        # Later sources (token files, Hugging Face datasets) plug in here with the same corpus
        # interface: documents, doc_token_lengths, read_tokens, seed, source.
        raise ValueError(f"data.source: unknown source {data_cfg.source!r}; known: {', '.join(KNOWN_SOURCES)}")
    tokenizer = build_tokenizer(data_cfg.tokenizer)
    corpus = BuiltinCorpus(split, seed)
    return FixedLengthLoader(corpus, tokenizer, data_cfg.seq_len, data_cfg.batch_size,
                             dp_rank=dp_rank, dp_degree=dp_degree)
