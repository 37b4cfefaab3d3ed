"""Data loaders for one data-parallel rank: `build_loader(data_cfg, dp_rank=, dp_degree=, seed=)`.

Two loaders, one batch contract. Every `next()` returns a dict of int64 torch tensors for this
data rank: `tokens`, `labels` (-100 where no loss is taken), `positions` (restarting at 0 at each
document start) and `doc_ids` (per row 0, 1, 2, ... by document; padding -1). Attention is allowed
between two tokens of a row only when their doc_ids are equal and >= 0 (and causal). Fixed-length
modes give (batch_size, seq_len); varlen gives (1, T) with T <= the token budget plus
`cu_seqlens` (int32, the document boundaries) — see data/packing.py for the label/position rules
and data/pipeline.py for the cursor invariant.

- `PackedLoader` (`data.packing: concat | whole | varlen`): any sources, blended, packed per lane,
  produced ahead of the trainer by `data.num_workers` background processes.
- `FixedLengthLoader` (`data.packing: none`, the default, builtin + bytes only): described below.

Both keep a global cursor in `state_dict()`, identical on every rank, so resuming at any dp
degree neither repeats nor skips data; cp, tp and pp ranks of one data rank build the same loader
and get the same batches.

FixedLengthLoader: fixed-length training sequences over the concatenated token stream of a corpus.

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
from .config import DataConfig
from .tokenizers import build_tokenizer



class FixedLengthLoader:
    """An iterator of batches {"tokens", "labels", "positions", "doc_ids"}, each int64
    (batch_size, seq_len). This is `data.packing: none`: rows are windows of the stream, attention
    spans the whole row (doc_ids are all 0) and labels run across document boundaries."""

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
                "positions": positions, "doc_ids": torch.zeros(count, self.seq_len, dtype=torch.int64)}

    # ------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seq_len": self.seq_len, "source": self.corpus.source}

    def close(self) -> None:
        pass

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




# ----------------------------------------------------------------------------------------------
# Packed loader
# ----------------------------------------------------------------------------------------------
class PackedLoader:
    """Packed rows for one data rank (see data/pipeline.py for the invariant).

    `state_dict()` = {"cursor": global row index, "lanes": V, "fingerprint": the stream's
    settings}; identical on every rank. `stats` counts tokens, padding and skipped records of the
    rows this rank consumed; `last_pieces` lists, per row of the last batch, the
    (document, source, record, start, stop) pieces it holds."""

    def __init__(self, settings, dp_rank: int = 0, dp_degree: int = 1):
        from .pipeline import DocumentStream

        settings.check()
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
            raise ValueError(f"data: dp_rank {dp_rank} is not in [0, dp_degree={dp_degree})")
        self.settings = settings
        self.dp_rank, self.dp_degree = int(dp_rank), int(dp_degree)
        self.rows_per_step = settings.rows_per_step
        self.lanes = settings.lanes or dp_degree * self.rows_per_step
        self.cursor = 0
        self.num_workers = settings.num_workers
        # Opens every source and the tokenizer now, so that bad paths fail here, in the caller.
        self._stream = DocumentStream(settings)
        self.tokenizer = self._stream.tokenizer
        self.stats = {"rows": 0, "tokens": 0, "padding": 0, "skipped_records": 0}
        self.last_pieces: list = []
        self._producer = None
        self._workers: list = []
        self._worker_of: dict[int, int] = {}
        self._worker_skipped: dict[int, int] = {}

    # -- iteration ------------------------------------------------------------------------------
    @property
    def sequences_per_step(self) -> int:
        return self.dp_degree * self.rows_per_step

    def __iter__(self):
        return self

    def _rows_of_step(self) -> list[int]:
        first = self.cursor + self.dp_rank * self.rows_per_step
        return list(range(first, first + self.rows_per_step))

    def _my_lanes(self) -> list[int]:
        from .pipeline import lanes_of_rank

        return lanes_of_rank(self.cursor, self.dp_rank, self.dp_degree, self.rows_per_step, self.lanes)

    def _start(self) -> None:
        from .pipeline import RowProducer

        lanes = self._my_lanes()
        if self.num_workers == 0:
            self._producer = RowProducer(self.settings, self.lanes, lanes, stream=self._stream)
            self._stream = None  # the producer owns it now (its readers move forward)
            self._producer.fast_forward(self.cursor)
            return
        self._stream = None  # workers open their own
        import multiprocessing as mp

        from .pipeline import worker_main

        ctx = mp.get_context("spawn")
        n = min(self.num_workers, len(lanes))
        groups = [lanes[w::n] for w in range(n)]
        step_rows = self.rows_per_step
        for w, group in enumerate(groups):
            q = ctx.Queue(maxsize=max(2, self.settings.prefetch * step_rows))
            p = ctx.Process(target=worker_main, daemon=True, name=f"longtrain-data-{self.dp_rank}-{w}",
                            args=(self.settings, self.lanes, group, self.cursor, self.dp_rank, self.dp_degree, q))
            p.start()
            self._workers.append((p, q))
            for v in group:
                self._worker_of[v] = w

    def _get_row(self, k: int):
        if self._producer is not None:
            arrays, pieces = self._producer.materialize(k)
            return arrays, pieces, self._producer.stream.bad.count, 0
        import queue

        w = self._worker_of[k % self.lanes]
        proc, q = self._workers[w]
        waited = 0.0
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if not proc.is_alive():
                    raise RuntimeError(f"data: worker {proc.name} exited with code {proc.exitcode}") from None
        if item[0] == "error":
            _, kind, text = item
            self.close()
            raise (ValueError(text) if kind == "value" else RuntimeError(f"data worker {proc.name}: {kind}: {text}"))
        _, got, arrays, pieces, skipped = item
        if got != k:
            raise RuntimeError(f"data: worker {proc.name} sent row {got}, expected row {k}")
        return arrays, pieces, skipped, w

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._producer is None and not self._workers:
            self._start()
        rows, pieces = [], []
        for k in self._rows_of_step():
            arrays, row_pieces, skipped, w = self._get_row(k)
            rows.append(arrays)
            pieces.append(row_pieces)
            self._worker_skipped[w] = skipped
        self.cursor += self.sequences_per_step
        self.last_pieces = pieces
        batch = {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}
        used = sum(b - a for row in pieces for *_, a, b in row)
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += used
        self.stats["padding"] += batch["tokens"].numel() - used
        self.stats["skipped_records"] = sum(self._worker_skipped.values())
        if self.settings.packing == "varlen":
            from .packing import cu_seqlens_from_doc_ids

            batch["cu_seqlens"] = cu_seqlens_from_doc_ids(batch["doc_ids"][0])
        return batch

    @property
    def efficiency(self) -> float:
        """Non-padding fraction of the tokens this rank consumed."""
        total = self.stats["tokens"] + self.stats["padding"]
        return self.stats["tokens"] / total if total else 1.0

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "lanes": self.lanes, "seq_len": self.settings.seq_len,
                "source": self.settings.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("cursor", "lanes", "seq_len"):
            if key not in state:
                raise ValueError(f"data loader state: missing key {key!r}")
        if int(state["seq_len"]) != self.settings.seq_len:
            raise ValueError(f"data loader state: seq_len {state['seq_len']} in the checkpoint differs from "
                             f"data.seq_len={self.settings.seq_len}; the global cursor counts rows of one length")
        if "source" in state and state["source"] != self.settings.fingerprint():
            raise ValueError(f"data loader state: the checkpoint's data settings ({state['source']}) differ from "
                             f"this recipe's ({self.settings.fingerprint()}); the global cursor only holds for "
                             "the same stream")
        cursor, lanes = int(state["cursor"]), int(state["lanes"])
        if cursor < 0 or lanes < 1:
            raise ValueError(f"data loader state: cursor {cursor} / lanes {lanes} out of range")
        self.close()
        self.cursor, self.lanes = cursor, lanes

    def close(self) -> None:
        """Stop the worker processes (they are daemons: they also end with this process)."""
        for proc, q in self._workers:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=5)
            q.cancel_join_thread()
            q.close()
        self._workers, self._worker_of, self._worker_skipped = [], {}, {}
        if self._producer is not None:
            self._producer = None  # its stream's readers moved on: the next start opens a new one

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_loader(data_cfg: DataConfig, *, dp_rank: int, dp_degree: int, seed: int, split: str = "train"):
    """The loader for a recipe's `data` section."""
    from .pipeline import DataSettings

    if data_cfg.packing == "none":
        if data_cfg.sources or data_cfg.source != "builtin":
            raise ValueError(f"data.packing: none (fixed windows of the built-in stream) reads only source: builtin; "
                             f"set data.packing: concat (or whole, varlen) for {data_cfg.source!r}")
        tokenizer = build_tokenizer(data_cfg.tokenizer)
        if not getattr(tokenizer, "lengths_from_bytes", False):
            raise ValueError(f"data.packing: none needs the byte tokenizer (token counts from file sizes); "
                             f"set data.packing: concat to use {data_cfg.tokenizer}")
        corpus = BuiltinCorpus(split, seed)
        return FixedLengthLoader(corpus, tokenizer, data_cfg.seq_len, data_cfg.batch_size,
                                 dp_rank=dp_rank, dp_degree=dp_degree)
    settings = DataSettings.from_config(data_cfg, seed, split)
    if split != "train":
        # A few eval batches, rebuilt each evaluation: no processes, and one lane so that the eval
        # rows are the same prefix of one packed stream whatever the dp degree.
        settings.num_workers = 0
        settings.lanes = 1
    return PackedLoader(settings, dp_rank=dp_rank, dp_degree=dp_degree)
