"""The packed data pipeline: blended document stream -> lanes -> rows, with a global cursor.

Invariant (what makes resume exact at any data-parallel degree)
----------------------------------------------------------------
1. The global document stream is a pure function of (sources, weights, seed, split): document d
   comes from source `blend.locate(d) = (s, j)`, the j-th document of source s's split.
2. There are V lanes (`data.lanes`; 0 = dp_degree x rows per step of the run that starts the
   stream; then V is stored in the loader state and never changes). Lane v owns the documents
   d with d % V == v, in order, and packs them with its own packer (data/packing.py).
3. Global row k is row number k // V of lane k % V. So the sequence of global rows is a pure
   function of the stream and V, independent of the dp degree, of the rank, and of workers.
4. The loader state is one global row cursor K (plus V and settings to check), identical on
   every rank. A step gives data rank r the rows [K + r*R, K + (r+1)*R) (R rows per step: the
   batch size, or 1 bin in varlen mode) and moves K by dp*R.
Hence after a resume at any dp degree the global rows continue from K: no row, so no piece of a
document, is repeated or skipped, and the multiset of consumed documents equals that of an
uninterrupted run.

Work per rank: a rank reads and tokenizes only the documents of the lanes it needs. With V a
multiple of dp*R every rank needs V/dp lanes of its own; after a resume at a larger global batch
(dp*R > V) ranks share lanes and each tokenizes some documents that another rank uses (correct,
just redundant work) — set data.lanes to a multiple of the largest global batch you will run.

Resume cost: a lane is a sequential packer, so a resumed worker rebuilds its lanes' state by
replaying their packing from the start of the stream. Only document *lengths* are needed for
that: free for builtin + bytes and for megatron sources (lengths come from the index), and for
text sources whose records were tokenized before (by any run on this machine with the same files
and tokenizer: the token-length index, data/length_index.py); otherwise a read and tokenize of the
rank's share of the consumed stream (about consumed_tokens / dp / (tokens/s of one worker x
workers); e.g. 1B consumed tokens at dp=8 with 2 workers at ~2M tokens/s: ~30 s). Sequential
(datasets-streamed) sources are re-read from their start (tokenized only where the index does not
know a record).

Balanced batches (launcher/balanced_batches.py) pack every lane on every rank from lengths; a
DocumentStream with an `exchange` learns the lengths nobody knows yet together with the group
(see DocumentStream).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import typing
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import DataConfig, Packing
from .packing import ConcatPacker, Doc, FirstFitPacker, materialize, piece_records
from .sources import EVAL_EVERY, BadRecord, BadRecords, MegatronSource, in_split, open_source, parse_source_specs

PACKING_MODES = typing.get_args(Packing)
BLEND_BLOCK = 1000  # documents per blending block (exact proportions per block)


# ----------------------------------------------------------------------------------------------
# Settings: everything a worker process needs to rebuild the pipeline (plain, picklable)
# ----------------------------------------------------------------------------------------------

def _source_identity(path: str) -> str:
    """A source as the fingerprint names it. The built-in corpus is this Python's standard library,
    which differs between Python releases: a checkpoint taken on one must not resume its cursor in
    another's stream (it would silently read other documents)."""
    return f"builtin(stdlib of Python {platform.python_version()})" if path == "builtin" else path

@dataclass
class DataSettings:
    sources: list  # SourceSpec
    tokenizer: str = "bytes"
    seq_len: int = 256
    batch_size: int = 4
    packing: Packing = "none"
    add_bos: bool = True
    add_eos: bool = True
    max_doc_len: int = 0
    token_budget: int = 0
    pack_window: int = 64
    lanes: int = 0
    num_workers: int = 1
    prefetch: int = 2
    skip_bad_records: bool = False
    seed: int = 0
    split: str = "train"

    @classmethod
    def from_config(cls, data_cfg: DataConfig, seed: int, split: str) -> "DataSettings":
        """The section's fields of the same name, its sources parsed, and the run's seed and split."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(DataConfig)}
        given = {name: getattr(data_cfg, name) for name in shared - {"sources"}}
        return cls(sources=parse_source_specs(data_cfg), seed=int(seed), split=split, **given)

    @property
    def rows_per_step(self) -> int:
        return 1 if self.packing == "varlen" else self.batch_size

    @property
    def budget(self) -> int:
        return self.token_budget or self.batch_size * self.seq_len

    @property
    def row_len(self) -> Optional[int]:
        """Padded row length, or None for unpadded varlen bins."""
        return None if self.packing == "varlen" else self.seq_len

    def fingerprint(self) -> str:
        """What must not change under a global cursor: the stream and how rows are cut."""
        srcs = ";".join(f"{_source_identity(s.path)}|{s.weight:g}|{s.text_field}|{s.format}" for s in self.sources)
        return (f"sources={srcs} tokenizer={self.tokenizer} bos={int(self.add_bos)} eos={int(self.add_eos)} "
                f"packing={self.packing} seq_len={self.seq_len} budget={self.budget if self.packing == 'varlen' else 0} "
                f"max_doc_len={self.max_doc_len} window={self.pack_window}")

    def check(self) -> None:
        if self.packing not in PACKING_MODES:
            raise ValueError(f"data.packing: {self.packing!r} is not one of {', '.join(PACKING_MODES)}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("data.seq_len and data.batch_size must be at least 1")
        if self.packing == "varlen":
            if self.max_doc_len > self.budget:
                raise ValueError(f"data.max_doc_len: {self.max_doc_len} exceeds the token budget {self.budget} "
                                 "(data.token_budget, default batch_size x seq_len)")
        if self.max_doc_len < 0 or self.token_budget < 0 or self.lanes < 0 or self.num_workers < 0 \
                or self.pack_window < 1 or self.prefetch < 1:
            raise ValueError("data.max_doc_len, data.token_budget, data.lanes and data.num_workers must be >= 0, "
                             "data.pack_window and data.prefetch >= 1")


# ----------------------------------------------------------------------------------------------
# Blending
# ----------------------------------------------------------------------------------------------
class Blend:
    """Global document index d -> (source s, source-local document j).

    Documents come in blocks of BLEND_BLOCK. Every block holds exactly counts[s] documents of
    source s (largest-remainder rounding of weight x BLEND_BLOCK), in an order shuffled by a
    numpy RNG seeded with (seed, block). Proportions are therefore exact per block, the
    interleaving is random, and locate(d) costs O(1) after a block's table is built."""

    def __init__(self, weights: list[float], seed: int, keys: list[str] | None = None):
        w = np.asarray(weights, dtype=np.float64)
        self.n = len(w)
        self.seed = int(seed)
        if self.n == 1:
            self.counts = np.array([BLEND_BLOCK])
        else:
            target = w / w.sum() * BLEND_BLOCK
            counts = np.floor(target).astype(np.int64)
            rest = BLEND_BLOCK - counts.sum()
            counts[np.argsort(-(target - counts), kind="stable")[:rest]] += 1
            self.counts = counts
            for i, c in enumerate(counts):
                if c == 0:
                    key = keys[i] if keys else f"source {i}"
                    raise ValueError(f"{key}.weight: {weights[i]:g} is less than 1/{BLEND_BLOCK} of the total "
                                     "weight; this source would never be read")
        self.labels = np.repeat(np.arange(self.n), self.counts)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._blocks.get(b)
        if hit is None:
            order = np.random.default_rng([self.seed, 7919, b]).permutation(self.labels)
            # rank[i] = how many earlier positions of the block hold the same source
            rank = np.zeros(BLEND_BLOCK, dtype=np.int64)
            for s in range(self.n):
                where = np.flatnonzero(order == s)
                rank[where] = np.arange(len(where))
            hit = (order, rank)
            self._blocks[b] = hit
            if len(self._blocks) > 16:
                self._blocks.popitem(last=False)
        return hit

    def locate(self, d: int) -> tuple[int, int]:
        if self.n == 1:
            return 0, d
        b, i = divmod(d, BLEND_BLOCK)
        order, rank = self._block(b)
        s = int(order[i])
        return s, b * int(self.counts[s]) + int(rank[i])


# ----------------------------------------------------------------------------------------------
# One source's split, over epochs
# ----------------------------------------------------------------------------------------------
class SplitView:
    """The j-th document of a source's split, for j over all epochs."""

    def __init__(self, source, split: str, seed: int, index: int):
        self.source, self.split, self.seed, self.index = source, split, seed, index
        self._kept = np.zeros(0, np.int64)  # random access: records of the split found so far
        self._kept_n = 0  # records examined for _kept
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._seq_iter = None  # sequential sources: the open stream
        self._seq_epoch = -1
        self._seq_pos = 0  # split documents read in this epoch
        self._seq_count: Optional[int] = None  # split documents per epoch, once an epoch ended

    # random access -------------------------------------------------------------------------
    def _kept_upto(self, j: int) -> tuple[np.ndarray, bool]:
        """Records of the split, at least j+1 of them unless the source has fewer; and whether
        that is all of them. Lazily indexed line files are indexed only as far as needed."""
        src = self.source
        lazy = hasattr(src, "records_known")
        while True:
            known = src.records_known() if lazy else src.num_records
            if known > self._kept_n:
                new = np.arange(self._kept_n, known)
                if not getattr(src, "split_done", False):
                    new = new[in_split(new, self.split)]
                self._kept = np.concatenate([self._kept, new])
                self._kept_n = known
            if len(self._kept) > j:
                return self._kept, not lazy
            if not lazy or not src.has_record(known):
                return self._kept, True

    def _record(self, j: int) -> tuple[int, int]:
        """(record, epoch) of split document j (random-access sources)."""
        kept, _ = self._kept_upto(j)
        if j < len(kept):
            return int(kept[j]), 0
        if len(kept) == 0:
            raise ValueError(f"{self.source.key}: no records in the {self.split!r} split of "
                             f"{getattr(self.source, 'description', '')} (about 1 in {EVAL_EVERY} is held out for eval)")
        epoch, q = divmod(j, len(kept))
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(kept))
            self._perms[epoch] = perm
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        return int(kept[perm[q]]), epoch

    # sequential ----------------------------------------------------------------------------
    def _next_in_split(self):
        """The next (record, payload) of the split in this epoch, or None at its end."""
        for record, payload in self._seq_iter:
            if in_split(np.array([record]), self.split)[0]:
                return record, payload
        return None

    def _sequential(self, j: int):
        while True:
            epoch, q = divmod(j, self._seq_count) if self._seq_count is not None else (0, j)
            if self._seq_iter is None or epoch != self._seq_epoch or q < self._seq_pos:
                self._seq_iter, self._seq_epoch, self._seq_pos = self.source.iterate(0), epoch, 0
            item = None
            while self._seq_pos <= q:
                item = self._next_in_split()
                if item is None:
                    break
                self._seq_pos += 1
            if item is not None:
                return item[0], epoch, item[1]
            if self._seq_count is not None or self._seq_pos == 0:
                raise ValueError(f"{self.source.key}: no records in the {self.split!r} split of "
                                 f"{self.source.spec.path}" if self._seq_pos == 0 else
                                 f"{self.source.key}: {self.source.spec.path} changed while being read")
            self._seq_count, self._seq_iter = self._seq_pos, None

    # ---------------------------------------------------------------------------------------
    def record_of(self, j: int) -> tuple[int, int]:
        """(record, epoch) of split document j, without reading it (random-access sources)."""
        return self._record(j)

    def payload(self, record: int):
        """A random-access record's text or ids, or the BadRecord that reading it raised."""
        try:
            return self.source.payload(record)
        except BadRecord as err:
            return err

    def get(self, j: int, tokenizer, need_tokens: bool):
        """(record, epoch, payload or None, known token length or None)."""
        src = self.source
        if src.random_access:
            record, epoch = self._record(j)
            length = src.token_length(record, tokenizer)
            if length is not None and not need_tokens:
                return record, epoch, None, length
            try:
                return record, epoch, src.payload(record), length
            except BadRecord as err:
                return record, epoch, err, None
        record, epoch, payload = self._sequential(j)
        return record, epoch, payload, None


# ----------------------------------------------------------------------------------------------
# The global document stream
# ----------------------------------------------------------------------------------------------
class LengthExchange(typing.Protocol):
    """The balancing group, as the document stream sees it (launcher/balanced_batches.py builds one
    over torch.distributed): this rank's index, the group size, and an element-wise max of an int64
    array over the group (every rank calls it at the same points, with arrays of the same size)."""

    rank: int
    size: int

    def max(self, values: np.ndarray) -> np.ndarray: ...


RESOLVE_BLOCK = 256  # documents whose lengths the group learns together (one or two all-reduces)
NOT_INDEXED = -2  # in an exchanged block: a document whose length needs no index or cannot use one


class DocumentStream:
    """The global document stream: fetch(d) gives document d as a Doc (tokens, or only its length
    when that is known without tokenizing: see fetch).

    Token lengths of text sources are remembered in data/length_index.py (`length_index` off: not
    used). With an `exchange` (the balancing group), lengths a rank would have to tokenize to learn
    are learned together: the stream's documents come in blocks of `resolve_block`; when a rank first
    fetches a document of a block for its length (every rank of the group packs the same rows, so all
    get there together), the group all-reduces the lengths any rank knows, each rank tokenizes 1/N of
    those still unknown, and a second all-reduce gives every rank all of them. Random-access sources:
    a rank reads only the records of its share (and later those it holds). Sequential (streamed)
    sources: every rank reads the block's records in stream order (a stream cannot be read in parts),
    keeps their text until fetched (at most one block) and tokenizes only its share.
    `tokenized` counts documents this stream tokenized (each encode once), `tokenized_for_lengths` the
    ones of them it tokenized for its share of the group's lengths.

    The tokens of this rank's share are kept (`keep_length_tokens`) so that a document it both learned
    the length of and later holds is not tokenized twice: until the document is fetched (at most this
    rank's share of one block, ceil(resolve_block / N) documents: a block's kept tokens are dropped
    when the next block is resolved), then in its Doc, which the packer holds anyway until the
    document is packed (its window, lanes x pack_window documents) and the step's pieces until the
    next step. A Doc whose kept tokens are used counts in `length_tokens_reused`."""

    def __init__(self, settings: DataSettings, tokenizer=None, length_index: bool = True,
                 exchange: Optional[LengthExchange] = None, resolve_block: int = RESOLVE_BLOCK,
                 keep_length_tokens: bool = True, share_stream_lengths: bool = True):
        from .length_index import open_lengths
        from .tokenizers import build_tokenizer, check_special_tokens

        self.settings = settings
        self.tokenizer = tokenizer or build_tokenizer(settings.tokenizer)
        check_special_tokens(self.tokenizer, settings.add_bos, settings.add_eos)
        self.sources = [open_source(spec, settings.split, settings.seed) for spec in settings.sources]
        self.views = [SplitView(src, settings.split, settings.seed, i) for i, src in enumerate(self.sources)]
        self.blend = Blend([s.weight for s in settings.sources], settings.seed, [s.key for s in settings.sources])
        self.bad = BadRecords(skip=settings.skip_bad_records)
        self.vocab = self.tokenizer.vocab_size
        self.lengths = [open_lengths(src, self.tokenizer, settings.split, settings.seed, settings.add_bos,
                                     settings.add_eos) if length_index else None for src in self.sources]
        self.share_stream_lengths = share_stream_lengths  # False: as before (benchmarks/data_throughput.py compares)
        self.exchange = exchange if self.learns_lengths_together else None
        self.resolve_block = resolve_block
        self._resolved_block = -1
        self.tokenized = 0
        self.tokenized_for_lengths = 0
        self.keep_length_tokens = keep_length_tokens  # False: as before (benchmarks/data_throughput.py compares)
        self._length_tokens: dict[int, np.ndarray] = {}  # global document -> its tokens, this rank's share of the block
        self.length_tokens_reused = 0
        # sequential sources: the block's records read while resolving it, and the lengths the group agreed
        self._read_ahead: dict[int, tuple] = {}  # global document -> (record, epoch, payload)
        self._agreed: dict[int, int] = {}  # global document -> token length

    def _exchanged(self, s: int) -> bool:
        """Whether the group learns source s's unknown lengths together: random-access text sources
        with a length index, and sequential (streamed) sources: every rank reads the stream anyway,
        the tokenizing is what is split."""
        if not self.sources[s].random_access:
            return self.share_stream_lengths
        return self.lengths[s] is not None

    @property
    def learns_lengths_together(self) -> bool:
        """Whether an `exchange` would be used (some source's lengths are learned by tokenizing)."""
        return any(self._exchanged(s) for s in range(len(self.sources)))

    def flush_lengths(self, force: bool = True) -> None:
        """Write the length indexes (rate-limited unless forced)."""
        for index in self.lengths:
            if index is not None:
                index.flush(force)

    def _tokens_of(self, payload, source: int, record: int) -> np.ndarray:
        s = self.settings
        tok = self.tokenizer
        if payload is None:
            return np.zeros(0, np.int64)
        if isinstance(payload, BadRecord):
            self.bad.handle(payload, (source, record))
            return np.zeros(0, np.int64)
        if isinstance(payload, str):
            if not payload:
                return np.zeros(0, np.int64)
            ids = tok.encode(payload, add_bos=s.add_bos, add_eos=s.add_eos)
            self.tokenized += 1
            return np.asarray(ids, dtype=np.int64)
        ids = np.asarray(payload, dtype=np.int64)  # pre-tokenized
        if len(ids) and (ids.max() >= self.vocab or ids.min() < 0):
            bad = int(ids.max()) if ids.max() >= self.vocab else int(ids.min())
            err = BadRecord(f"{self.sources[source].key}: {self.sources[source].where(record)}: token id {bad} is "
                            f"outside the tokenizer's vocabulary [0, {self.vocab}) ({self.tokenizer.name})")
            self.bad.handle(err, (source, record))
            return np.zeros(0, np.int64)
        if s.add_bos and (not len(ids) or ids[0] != tok.bos_id):
            ids = np.concatenate([[tok.bos_id], ids])
        if s.add_eos and (not len(ids) or ids[-1] != tok.eos_id):
            ids = np.concatenate([ids, [tok.eos_id]])
        return ids

    def fetch(self, d: int, need_tokens: bool = True) -> Doc:
        """Document d of the global stream. With need_tokens False and a length known without
        tokenizing (builtin + bytes, megatron, or a text source's length index), the tokens are
        loaded only if a row uses them."""
        s, j = self.blend.locate(d)
        view = self.views[s]
        index = self.lengths[s]
        if self.exchange is not None and not need_tokens and self._exchanged(s):
            while self._resolved_block < d // self.resolve_block:
                self._resolved_block += 1
                self._resolve_block(self._resolved_block)
        if not self.sources[s].random_access and (index is not None or self.exchange is not None):
            return self._fetch_sequential(d, s, j, index, need_tokens)
        if index is not None:
            return self._fetch_indexed(d, s, j, index, need_tokens)
        token_source = isinstance(self.sources[s], MegatronSource)  # BOS/EOS added only when missing: read
        record, epoch, payload, length = view.get(j, self.tokenizer, need_tokens or token_source)
        if payload is None and length is not None:
            total = length + int(self.settings.add_bos) + int(self.settings.add_eos) if length else 0
            return Doc(d, s, record, epoch, total, load=lambda: self._load(view, j, s))
        tokens = self._tokens_of(payload, s, record)
        return Doc(d, s, record, epoch, len(tokens), tokens=tokens)

    def _fetch_indexed(self, d: int, s: int, j: int, index, need_tokens: bool) -> Doc:
        """fetch() for a random-access source with a length index: a known length needs no
        tokenizing; a tokenized record's length is noted (malformed records never are: they are read
        each time)."""
        view = self.views[s]
        record, epoch = view.record_of(j)
        length = index.get(record)
        kept = self._length_tokens.pop(d, None) if self._length_tokens else None
        if kept is not None and len(kept) == length:  # tokenized for the group's lengths: not again
            return Doc(d, s, record, epoch, length, load=lambda: self._reuse(kept))
        if length is not None and not need_tokens:
            return Doc(d, s, record, epoch, length, load=lambda: self._load_checked(view, j, s, index, length))
        return self._tokenized(d, s, record, epoch, view.payload(record), index)

    def _fetch_sequential(self, d: int, s: int, j: int, index, need_tokens: bool) -> Doc:
        """fetch() for a sequential source with a length index or a group to learn lengths with: the
        stream is read in order anyway (by _resolve_block when it read the document's block); a length
        known from the index or the group needs no tokenizing, the text waits in the Doc until used."""
        ahead = self._read_ahead.pop(d, None)
        record, epoch, payload = ahead if ahead is not None else self.views[s].get(j, self.tokenizer, True)[:3]
        length = self._agreed.pop(d, None)
        if length is None and index is not None:
            length = index.get(record)
        kept = self._length_tokens.pop(d, None) if self._length_tokens else None
        if kept is not None and len(kept) == length:  # tokenized for the group's lengths: not again
            return Doc(d, s, record, epoch, length, load=lambda: self._reuse(kept))
        if length is not None and not need_tokens:
            return Doc(d, s, record, epoch, length,
                       load=lambda: self._checked(self._tokens_of(payload, s, record), s, record, index, length))
        return self._tokenized(d, s, record, epoch, payload, index)

    def _tokenized(self, d: int, s: int, record: int, epoch: int, payload, index) -> Doc:
        """A Doc with its tokens; the length noted in the index (malformed records never are)."""
        tokens = self._tokens_of(payload, s, record)
        if index is not None and not isinstance(payload, BadRecord):
            index.put(record, len(tokens))
        return Doc(d, s, record, epoch, len(tokens), tokens=tokens)

    def _checked(self, tokens: np.ndarray, s: int, record: int, index, length: int) -> np.ndarray:
        if len(tokens) != length:
            said = (f"the token-length index {index.path} says {length}; the index is stale (delete it; it is "
                    "rebuilt)" if index is not None else
                    f"the balancing group learned {length}: the ranks tokenize differently (same data.tokenizer "
                    "file and settings everywhere?)")
            raise ValueError(f"data: {self.sources[s].key}: {self.sources[s].where(record)} has {len(tokens)} tokens, "
                             f"but {said}")
        return tokens

    def _reuse(self, tokens: np.ndarray) -> np.ndarray:
        """A Doc's tokens kept from this rank's share of the group's lengths (counted when used)."""
        self.length_tokens_reused += 1
        return tokens

    def _load_checked(self, view: SplitView, j: int, s: int, index, length: int) -> np.ndarray:
        record, _ = view.record_of(j)
        return self._checked(self._tokens_of(view.payload(record), s, record), s, record, index, length)

    def _resolve_block(self, block: int) -> None:
        """Learn the lengths of the block's documents together with the group (see the class doc)."""
        first = block * self.resolve_block
        values = np.full(self.resolve_block, NOT_INDEXED, np.int64)
        where: dict[int, tuple[int, int]] = {}
        # the documents of earlier blocks were all fetched (the packer fetches in stream order), or never will be
        self._length_tokens, self._read_ahead, self._agreed = {}, {}, {}
        payloads: dict[int, object] = {}  # the block's sequential records, as read
        for i in range(self.resolve_block):
            s, j = self.blend.locate(first + i)
            if not self._exchanged(s):
                continue
            index = self.lengths[s]
            if self.sources[s].random_access:
                record, _ = self.views[s].record_of(j)
            else:  # read in stream order now; fetch() takes the record from here
                record, epoch, payloads[i], _ = self.views[s].get(j, self.tokenizer, True)
                self._read_ahead[first + i] = (record, epoch, payloads[i])
            known = index.get(record) if index is not None else None
            values[i] = -1 if known is None else known
            where[i] = (s, record)
        exchange = self.exchange
        assert exchange is not None
        agreed = exchange.max(values)
        unknown = np.flatnonzero(agreed == -1)
        if len(unknown):
            for i in unknown[exchange.rank::exchange.size].tolist():
                s, record = where[i]
                payload = payloads[i] if i in payloads else self.views[s].payload(record)
                if not isinstance(payload, BadRecord):  # a malformed record stays unknown: read where used
                    tokens = self._tokens_of(payload, s, record)
                    agreed[i] = len(tokens)
                    self.tokenized_for_lengths += 1
                    if self.keep_length_tokens:
                        self._length_tokens[first + i] = tokens
            agreed = exchange.max(agreed)
        for i, (s, record) in where.items():
            if agreed[i] >= 0:
                if self.lengths[s] is not None:
                    self.lengths[s].put(record, int(agreed[i]))  # type: ignore[union-attr]
                if i in payloads:
                    self._agreed[first + i] = int(agreed[i])

    def _load(self, view: SplitView, j: int, s: int) -> np.ndarray:
        record, _, payload, _ = view.get(j, self.tokenizer, True)
        return self._tokens_of(payload, s, record)


# ----------------------------------------------------------------------------------------------
# Rows for a set of lanes, in the order one data rank consumes them
# ----------------------------------------------------------------------------------------------
def rank_schedule(cursor: int, dp_rank: int, dp_degree: int, rows_per_step: int):
    """Global row indices this rank consumes, in order, from a global cursor."""
    step = cursor
    while True:
        first = step + dp_rank * rows_per_step
        for k in range(first, first + rows_per_step):
            yield k
        step += dp_degree * rows_per_step


def lanes_of_rank(cursor: int, dp_rank: int, dp_degree: int, rows_per_step: int, lanes: int) -> list[int]:
    """The lanes whose rows this rank consumes (the schedule is periodic in lanes)."""
    period = lanes // np.gcd(dp_degree * rows_per_step, lanes)
    out: set[int] = set()
    for t in range(int(period)):
        first = cursor + t * dp_degree * rows_per_step + dp_rank * rows_per_step
        out.update((first + i) % lanes for i in range(rows_per_step))
    return sorted(out)


class RowProducer:
    """Packs the rows of `my_lanes` on demand: row(k) for global rows k in increasing order per
    lane. The feeder walks the global document stream in order and hands each document of
    my_lanes to its lane; documents of other lanes are not tokenized (random-access sources do
    not read them at all)."""

    def __init__(self, settings: DataSettings, lanes: int, my_lanes: list[int], stream: DocumentStream | None = None,
                 lazy_tokens: bool = False):
        """`lazy_tokens`: documents whose length is known without reading them (builtin + bytes,
        megatron) are read only when a caller asks for their tokens (balanced batches: every rank
        packs the whole step from lengths and reads only the documents it holds)."""
        self.settings, self.V = settings, lanes
        self.lazy_tokens = lazy_tokens
        self.stream = stream or DocumentStream(settings)
        self.my_lanes = sorted(my_lanes)
        self.mine = set(self.my_lanes)
        self.queues: dict[int, deque] = {v: deque() for v in self.my_lanes}
        self.packers = {v: self._packer(v) for v in self.my_lanes}
        self.next_row = {v: 0 for v in self.my_lanes}
        self.next_doc = 0  # next global document the feeder looks at
        self.replaying = False
        self.tokens = 0
        self.padding = 0

    def _packer(self, v: int):
        s = self.settings
        pull = lambda: self._pull(v)  # noqa: E731
        if s.packing == "concat":
            return ConcatPacker(pull, s.seq_len)
        if s.packing == "whole":
            return FirstFitPacker(pull, s.seq_len, s.seq_len, s.pack_window)
        if s.packing == "varlen":
            return FirstFitPacker(pull, s.budget, s.max_doc_len or s.budget, s.pack_window)
        raise ValueError(f"data.packing: {s.packing!r} rows are not made by lanes")

    def _pull(self, v: int) -> Doc:
        q = self.queues[v]
        while not q:
            d = self.next_doc
            self.next_doc += 1
            lane = d % self.V
            if lane in self.mine:
                self.queues[lane].append(self.stream.fetch(d, need_tokens=not (self.replaying or self.lazy_tokens)))
        return q.popleft()

    def row(self, k: int):
        """(pieces) of global row k; rows of a lane must be asked for in increasing order."""
        v, n = k % self.V, k // self.V
        if v not in self.mine:
            raise ValueError(f"data: row {k} belongs to lane {v}, not one of this producer's lanes")
        if n < self.next_row[v]:
            raise ValueError(f"data: row {k} of lane {v} was already produced (next is {self.next_row[v]})")
        packer = self.packers[v]
        if n > self.next_row[v]:
            self.replaying = True  # lengths only: skip rows another rank consumed, or before the cursor
            try:
                while self.next_row[v] < n:
                    packer.next_row()
                    self.next_row[v] += 1
            finally:
                self.replaying = False
        pieces = packer.next_row()
        self.next_row[v] += 1
        return pieces

    def fast_forward(self, cursor: int) -> None:
        """Replay (lengths only) every row of my lanes before the global row `cursor`, lanes in
        lockstep in global row order, as an uninterrupted run produced them: documents are handed
        to lanes in stream order, so no lane's queue grows while another catches up."""
        if cursor <= 0:
            return
        self.replaying = True
        try:
            for n in range(cursor // self.V + 1):
                for v in self.my_lanes:
                    if n * self.V + v < cursor and n >= self.next_row[v]:
                        self.packers[v].next_row()
                        self.next_row[v] = n + 1
        finally:
            self.replaying = False

    def materialize(self, k: int) -> tuple[dict, list]:
        pieces = self.row(k)
        arrays = materialize(pieces, self.settings.row_len, self.stream.tokenizer.pad_id)
        used = sum(b - a for _, a, b in pieces)
        self.tokens += used
        self.padding += len(arrays["tokens"]) - used
        return arrays, piece_records(pieces)


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------
def exit_with_parent() -> None:
    """In a data worker process: end it when the training process that started it ends, however that
    ends. A worker is a daemon, but only a parent that exits normally ends its daemons; a rank killed by
    the launcher (another rank failed) or by a signal leaves them blocked on a full queue forever,
    holding the job's output open (a `longtrain train ... | tee` would never return). A thread waits on
    the parent's sentinel and exits the process when it closes."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="longtrain-exit-with-parent", daemon=True).start()


def worker_main(settings: DataSettings, lanes: int, my_lanes: list[int], cursor: int, dp_rank: int,
                dp_degree: int, out_queue) -> None:
    """Produce this worker's rows of the rank schedule into out_queue, forever (until killed, or its
    training process ends: exit_with_parent)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_with_parent()
    try:
        producer = RowProducer(settings, lanes, my_lanes)
        producer.fast_forward(cursor)
        mine = set(my_lanes)
        for k in rank_schedule(cursor, dp_rank, dp_degree, settings.rows_per_step):
            if k % lanes in mine:
                arrays, pieces = producer.materialize(k)
                out_queue.put(("row", k, arrays, pieces, producer.stream.bad.count))
    except BaseException as err:  # report one line to the consumer
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "value" if isinstance(err, ValueError) else type(err).__name__
        out_queue.put(("error", kind, text))
