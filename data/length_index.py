"""Token-length index: how many tokens each record of a text source has, without tokenizing it again.

Why: under `parallel.balance` every rank of the balancing group packs the whole step from document
LENGTHS (launcher/balanced_batches.py) and reads only the documents it holds. A builtin source with
the byte tokenizer and megatron sources know their lengths without reading; a text source (jsonl,
text, json, parquet, builtin) with a real tokenizer (sentencepiece) does not, so without this index
every rank would tokenize every document of every step just to learn its length.

What (the choice, written down):

1. A per-source cache of per-record token lengths, in the longtrain cache directory
   (`$LONGTRAIN_CACHE`, else `~/.cache/longtrain`), under `token_lengths/`, never next to the user's
   data. One file per (source files, format, text field, tokenizer, add_bos, add_eos): its name is a
   hash of those; inside, `meta` (the same key plus every file's size and mtime_ns, and the number of
   records stored) and `lengths` (int32 per record, the document's token count with BOS/EOS as the
   pipeline adds them; -1 = not known yet).
2. Built incrementally: every time the pipeline tokenizes a record (to pack it, to materialize it, or
   to learn its length) the length is noted in memory; `flush()` merges the notes with what is on
   disk and writes the file atomically (a temporary file, then os.replace), so concurrent writers
   (the ranks of one machine, loader workers) never leave a torn file; at worst one writer's new
   notes are lost and learned again later. Writes are rate-limited (FLUSH_EVERY_S) and forced at
   close.
3. Never trusted silently: a file whose key or file identity (sizes, mtimes) differs from the
   source's, or that cannot be read (corrupt, truncated, wrong shape or dtype), is ignored and
   rebuilt from scratch (its next flush replaces it). A length that disagrees with the tokens once a
   document is read fails with one line naming the index file (data/pipeline.py).
4. Records that are malformed (invalid UTF-8 / JSON, missing field) are never stored: they are read
   every time, so that `data.skip_bad_records` counts or raises them exactly as without the index.
5. Not indexed: megatron sources (lengths come from their .idx), sources read through a byte
   tokenizer from builtin (lengths from file sizes), and hub datasets (no file identity to check a
   cached length against: they are tokenized as before).

The first pass over a file is split over the balancing group (data/pipeline.py `LengthExchange`):
every rank tokenizes 1/N of the block's unknown lengths and the group all-reduces them, so even the
first epoch only moves lengths between ranks; this index makes later steps, replays after a resume,
later epochs and later runs free of tokenization for lengths.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

FLUSH_EVERY_S = 30.0  # at most one write per index per this many seconds (and one at close)
UNKNOWN = -1
_FORMAT = 1  # bumped when the file layout changes: older files are then ignored and rebuilt


def cache_root() -> Path:
    """The longtrain cache directory ($LONGTRAIN_CACHE or ~/.cache/longtrain)."""
    return Path(os.environ.get("LONGTRAIN_CACHE") or Path.home() / ".cache" / "longtrain")


def tokenizer_identity(tokenizer) -> Optional[str]:
    """What a cached length depends on in the tokenizer: the byte tokenizer, or a hash of the
    sentencepiece model's bytes (a retrained model at the same path is another tokenizer). None
    for tokenizers that do not encode text (pretokenized)."""
    identity = getattr(tokenizer, "identity", None)
    if identity is not None:
        return str(identity)
    if getattr(tokenizer, "name", None) == "bytes":
        return "bytes"
    return None


def _file_identity(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)]


def source_identity(source, split: str, seed: int) -> Optional[dict]:
    """The files (and read settings) a source's record numbers and texts come from, or None when
    its lengths cannot be checked against a file identity (hub datasets) or need no index
    (megatron)."""
    from .sources import BuiltinSource, HFStreamSource, LineSource

    if isinstance(source, LineSource):
        return {"format": source.fmt, "text_field": source.text_field,
                "files": [_file_identity(f) for f in source.files]}
    if isinstance(source, HFStreamSource) and source.files is not None:
        return {"format": source.fmt, "text_field": source.text_field,
                "files": [_file_identity(f) for f in source.files]}
    if isinstance(source, BuiltinSource):  # records are the split's documents in a seeded order
        corpus = source.corpus
        import platform

        return {"format": "builtin", "python": platform.python_version(), "root": corpus.root, "split": split,
                "seed": int(seed), "files": len(corpus.documents)}
    return None


class SourceLengths:
    """Token lengths of one source's records: `get(record)`, `put(record, length)`, `flush()`."""

    def __init__(self, identity: dict, tokenizer: str, add_bos: bool, add_eos: bool, root: Optional[Path] = None):
        files = identity.get("files")
        # the file name: everything but sizes and mtimes (a changed file replaces its stale index)
        stable = dict(identity, files=[f[0] for f in files] if isinstance(files, list) else files)
        self.key = {"format_version": _FORMAT, "source": stable, "tokenizer": tokenizer,
                    "add_bos": bool(add_bos), "add_eos": bool(add_eos)}
        self.identity = identity
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]
        self.path = (root or cache_root()) / "token_lengths" / f"{digest}.npz"
        found = self._read() if self.path.exists() else None
        self.stale = found is None and self.path.exists()  # a file was there but not trusted: rebuilt
        self.lengths = found if found is not None else np.zeros(0, np.int32)
        self.loaded = int((self.lengths >= 0).sum())  # lengths found on disk (tests assert on it)
        self.new = 0  # lengths noted since the last flush
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    # -- disk ------------------------------------------------------------------------------------
    def _read(self) -> Optional[np.ndarray]:
        """The lengths on disk, or None when the file is absent, stale or unreadable."""
        try:
            with np.load(self.path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"][()]))
                lengths = np.asarray(f["lengths"])
        except Exception:  # absent, corrupt, truncated, not an npz, missing arrays: rebuild
            return None
        if (meta.get("key") != self.key or meta.get("identity") != self.identity or lengths.dtype != np.int32
                or lengths.ndim != 1 or meta.get("records") != len(lengths) or (len(lengths) and lengths.min() < UNKNOWN)):
            return None
        return lengths

    def flush(self, force: bool = True) -> bool:
        """Merge the lengths noted here with the file's and write it atomically; True if written."""
        with self._lock:
            if not self.new or (not force and time.monotonic() - self._last_flush < FLUSH_EVERY_S):
                return False
            ours = self.lengths.copy()
            self.new = 0
            self._last_flush = time.monotonic()
        theirs = self._read()
        theirs = theirs if theirs is not None else np.zeros(0, np.int32)
        n = max(len(ours), len(theirs))
        merged = np.full(n, UNKNOWN, np.int32)
        merged[:len(theirs)] = theirs
        known = np.flatnonzero(ours >= 0)
        merged[known] = ours[known]
        meta = json.dumps({"key": self.key, "identity": self.identity, "records": int(n)})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.stem}.tmp{os.getpid()}.{threading.get_ident()}.npz")
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.array(meta), lengths=merged)
            os.replace(tmp, self.path)
        except OSError:  # a read-only or full cache directory: the index lives in memory only
            return False
        return True

    # -- lengths ---------------------------------------------------------------------------------
    def get(self, record: int) -> Optional[int]:
        if record < len(self.lengths):
            value = int(self.lengths[record])
            return value if value >= 0 else None
        return None

    def put(self, record: int, length: int) -> None:
        with self._lock:
            if record >= len(self.lengths):
                grown = np.full(max(record + 1, 2 * len(self.lengths), 1024), UNKNOWN, np.int32)
                grown[:len(self.lengths)] = self.lengths
                self.lengths = grown
            if self.lengths[record] != length:
                self.lengths[record] = length
                self.new += 1
        if self.new and time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush(force=False)


def open_lengths(source, tokenizer, split: str, seed: int, add_bos: bool, add_eos: bool) -> Optional[SourceLengths]:
    """The length index of a source, or None when the source needs or allows none (see the module
    docstring)."""
    from .sources import BuiltinSource

    tok = tokenizer_identity(tokenizer)
    if tok is None or (isinstance(source, BuiltinSource) and getattr(tokenizer, "lengths_from_bytes", False)):
        return None
    identity = source_identity(source, split, seed)
    if identity is None:
        return None
    return SourceLengths(identity, tok, add_bos, add_eos)
