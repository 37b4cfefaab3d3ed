"""Document sources: where the text (or pre-tokenized ids) of each document comes from.

A recipe names one source (`data.source`) or a weighted blend (`data.sources`, a list of paths or
mappings `{path, weight, text_field, format, hub_config, hub_split}`):

| format     | what `path` is                                   | read by                         | access     |
|------------|--------------------------------------------------|---------------------------------|------------|
| `builtin`  | the word `builtin` (the stdlib corpus)           | data/builtin.py                 | random     |
| `jsonl`    | .jsonl files: a file, glob or directory          | longtrain (line index)          | random     |
| `text`     | .txt files: one document per non-blank line      | longtrain (line index)          | random     |
| `json`     | .json files (arrays or JSON lines)               | Hugging Face `datasets`, stream | sequential |
| `parquet`  | .parquet files                                   | Hugging Face `datasets`, stream | sequential |
| `hub`      | `hf:org/name` (a dataset on the Hugging Face hub) | Hugging Face `datasets`, stream | sequential |
| `megatron` | a .bin/.idx prefix (pre-tokenized)               | megatron-core IndexedDataset    | random     |

`format: auto` (the default) picks by the path: `builtin`, `hf:` prefix, a megatron prefix (a
.bin/.idx pair exists), else the extension of the files found. jsonl and text files are read by
longtrain itself rather than through `datasets`, so that a bad record is reported as `file:line`
and can be skipped alone (`data.skip_bad_records`), and so that a resume seeks straight to a record
(a per-file index of line offsets, built by one fast newline scan as each file is first needed)
instead of re-reading the stream; set `format: hf_jsonl` / `hf_text` to stream them through
`datasets` instead.

Records and splits: every source numbers its records 0, 1, 2, ... in file order (files sorted).
Record r belongs to the "eval" split when mix64(r) % EVAL_EVERY == 0 (about 1 in 50; builtin uses
its own path hash), else to "train". A split's documents are its records in order; when a split
runs out, it wraps into the next epoch: random-access sources permute the split's records with a
seeded RNG per epoch, sequential ones re-read them in order.

Errors are ValueError with one line naming the source key and the file (and line for records).
A malformed record (invalid UTF-8, invalid JSON, no text field, token id out of the vocabulary)
fails with its file and line unless `data.skip_bad_records` is on: then it becomes an empty
document and is counted in `BadRecords`.
"""
from __future__ import annotations

import difflib
import glob as globlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from .config import DataConfig

EVAL_EVERY = 50
FORMATS = ("auto", "builtin", "jsonl", "text", "json", "parquet", "hub", "megatron", "hf_jsonl", "hf_text")
_EXTENSIONS = {"jsonl": (".jsonl",), "text": (".txt",), "json": (".json",), "parquet": (".parquet",),
               "hf_jsonl": (".jsonl",), "hf_text": (".txt",)}
_SPEC_KEYS = ("path", "weight", "text_field", "format", "hub_config", "hub_split")


# ----------------------------------------------------------------------------------------------
# Source specifications (from the recipe)
# ----------------------------------------------------------------------------------------------
@dataclass
class SourceSpec:
    path: str
    weight: float = 1.0
    text_field: Optional[str] = None  # None: data.text_field
    format: str = "auto"
    hub_config: Optional[str] = None
    hub_split: str = "train"
    key: str = "data.source"  # where it came from, for messages


def parse_source_specs(data_cfg: DataConfig) -> list[SourceSpec]:
    """data.sources (a non-empty list) or else data.source -> SourceSpecs; ValueError naming the key."""
    items = data_cfg.sources or []
    default_field = data_cfg.text_field
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"data.sources: expected a list of paths or mappings, got {type(items).__name__}")
    if not items:
        source = data_cfg.source
        if not isinstance(source, str) or not source.strip():
            raise ValueError("data.source: expected a path, a glob, hf:<dataset> or builtin")
        items, keys = [source], ["data.source"]
    else:
        keys = [f"data.sources[{i}]" for i in range(len(items))]
    specs = []
    for key, item in zip(keys, items):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ValueError(f"{key}: expected a path or a mapping with a 'path', got {type(item).__name__}")
        for name in item:
            if name not in _SPEC_KEYS:
                close = difflib.get_close_matches(str(name), _SPEC_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{key}.{name}: unknown key{hint}; known: {', '.join(_SPEC_KEYS)}")
        path = item.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{key}.path: expected a path, a glob, hf:<dataset> or builtin")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{key}.weight: must be a positive number, got {weight!r}")
        fmt = item.get("format", "auto")
        if fmt not in FORMATS:
            close = difflib.get_close_matches(str(fmt), FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}.format: {fmt!r} is not one of {', '.join(FORMATS)}{hint}")
        text_field = item.get("text_field", default_field)
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"{key}.text_field: expected a field name, got {text_field!r}")
        specs.append(SourceSpec(path=path.strip(), weight=float(weight), text_field=text_field, format=fmt,
                                hub_config=item.get("hub_config"), hub_split=str(item.get("hub_split", "train")),
                                key=key))
    return specs


def detect_format(spec: SourceSpec) -> str:
    """The format of a spec with format auto (no file is opened; globs/directories are listed)."""
    if spec.format != "auto":
        return spec.format
    path = spec.path
    if path == "builtin":
        return "builtin"
    if path.startswith(("hf:", "hf://")):
        return "hub"
    stem = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(stem + ".bin") or os.path.isfile(stem + ".idx"):
        return "megatron"
    files = expand_files(spec, None)
    exts = sorted({os.path.splitext(f)[1].lower() for f in files})
    by_ext = {".jsonl": "jsonl", ".txt": "text", ".json": "json", ".parquet": "parquet"}
    found = sorted({by_ext[e] for e in exts if e in by_ext})
    if len(found) > 1:
        raise ValueError(f"{spec.key}.path: {path} holds files of several formats ({', '.join(found)}); "
                         "give one source per format, or set format")
    if not found:
        raise ValueError(f"{spec.key}.path: {path}: no .jsonl, .json, .parquet or .txt files "
                         f"(found {', '.join(exts) or 'nothing'}); set format for other names")
    return found[0]


def expand_files(spec: SourceSpec, fmt: Optional[str]) -> list[str]:
    """Sorted files for a local source: a file, a glob or a directory (searched recursively)."""
    path = os.path.expanduser(spec.path)
    exts = _EXTENSIONS.get(fmt or "", (".jsonl", ".txt", ".json", ".parquet"))
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in globlib.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ValueError(f"{spec.key}.path: {spec.path} matches no files")
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, name) for d, _, names in os.walk(path) for name in names
                       if name.lower().endswith(exts))
        if not files:
            raise ValueError(f"{spec.key}.path: {spec.path} is a directory with no {'/'.join(exts)} files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"{spec.key}.path: {spec.path} does not exist")
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"{spec.key}.path: {f} is empty")
    return files


# ----------------------------------------------------------------------------------------------
# Split membership
# ----------------------------------------------------------------------------------------------
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a stable integer hash (numpy, vectorized)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def in_split(records: np.ndarray, split: str) -> np.ndarray:
    is_eval = (_mix64(np.asarray(records)) % np.uint64(EVAL_EVERY)) == 0
    return is_eval if split == "eval" else ~is_eval


# ----------------------------------------------------------------------------------------------
# Bad records
# ----------------------------------------------------------------------------------------------
class BadRecord(ValueError):
    """One malformed record; str() names the file and line (or record)."""


@dataclass
class BadRecords:
    """Malformed records met so far: raised, or (skip on) counted once per record (a record
    met again in a later epoch is not counted twice)."""

    skip: bool = False
    seen: set = field(default_factory=set)
    examples: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.seen)

    def handle(self, err: BadRecord, key=None) -> None:
        if not self.skip:
            raise err
        key = key if key is not None else str(err)
        if key not in self.seen:
            self.seen.add(key)
            if len(self.examples) < 5:
                self.examples.append(str(err))


# ----------------------------------------------------------------------------------------------
# Sources. Random-access ones implement num_records, payload(record) and maybe token_length(record);
# sequential ones implement iterate(start) -> (record, payload) pairs. A payload is a str (text) or
# an int64 array (token ids); None is an empty document.
# ----------------------------------------------------------------------------------------------
class BuiltinSource:
    """The stdlib corpus (data/builtin.py): already split and in a seeded order."""

    random_access = True
    split_done = True  # records are already the split's documents

    def __init__(self, spec: SourceSpec, split: str, seed: int):
        from .builtin import BuiltinCorpus

        self.key = spec.key
        self.corpus = BuiltinCorpus(split, seed)
        self.num_records = len(self.corpus)
        self.description = f"builtin ({self.num_records} stdlib files)"

    def payload(self, record: int) -> str:
        with open(self.corpus.documents[record], "rb") as f:
            return f.read().decode("utf-8")

    def token_length(self, record: int, tokenizer) -> Optional[int]:
        if getattr(tokenizer, "lengths_from_bytes", False):
            return int(self.corpus.doc_token_lengths[record]) - 2
        return None

    def where(self, record: int) -> str:
        return self.corpus.documents[record]


class _IndexedFile:
    """Byte offsets of the non-blank lines of one file, from one newline scan."""

    CHUNK = 1 << 24

    def __init__(self, path: str):
        self.path = path
        starts, ends = [], []
        offset = 0
        carry_start = 0
        with open(path, "rb") as f:
            while True:
                buf = f.read(self.CHUNK)
                if not buf:
                    break
                nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10) + offset
                if len(nl):
                    line_starts = np.concatenate([[carry_start], nl[:-1] + 1])
                    starts.append(line_starts)
                    ends.append(nl)
                    carry_start = int(nl[-1]) + 1
                offset += len(buf)
        if carry_start < offset:  # last line without a newline
            starts.append(np.array([carry_start]))
            ends.append(np.array([offset]))
        starts_a = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
        ends_a = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, np.int64)
        self.line_numbers = np.arange(1, len(starts_a) + 1, dtype=np.int64)
        # blank lines (only whitespace, which a 1-2 byte line usually is) are not records
        keep = (ends_a - starts_a) > 0
        short = np.flatnonzero(keep & ((ends_a - starts_a) <= 4))
        if len(short):
            with open(path, "rb") as f:
                for i in short:
                    f.seek(int(starts_a[i]))
                    if not f.read(int(ends_a[i] - starts_a[i])).strip():
                        keep[i] = False
        self.starts, self.ends, self.line_numbers = starts_a[keep], ends_a[keep], self.line_numbers[keep]

    def __len__(self) -> int:
        return len(self.starts)


class LineSource:
    """jsonl or text files, one record per non-blank line, random access through line offsets.
    Files are indexed lazily, in order, as records are asked for."""

    random_access = True
    split_done = False

    def __init__(self, spec: SourceSpec, fmt: str):
        self.key, self.spec, self.fmt = spec.key, spec, fmt
        self.files = expand_files(spec, fmt)
        self.text_field = spec.text_field or "text"
        self._index: list[_IndexedFile] = []
        self._first: list[int] = [0]  # first record of each indexed file (+ end)
        self._handles: dict[int, Any] = {}
        self.description = f"{fmt} ({len(self.files)} file{'s' if len(self.files) != 1 else ''}: {spec.path})"

    def _index_next(self) -> bool:
        i = len(self._index)
        if i >= len(self.files):
            return False
        idx = _IndexedFile(self.files[i])
        if len(idx) == 0:
            raise ValueError(f"{self.key}.path: {self.files[i]} has no records (only blank lines)")
        self._index.append(idx)
        self._first.append(self._first[-1] + len(idx))
        return True

    def has_record(self, record: int) -> bool:
        while record >= self._first[-1]:
            if not self._index_next():
                return False
        return True

    @property
    def num_records(self) -> int:
        while self._index_next():
            pass
        return self._first[-1]

    def records_known(self) -> int:
        """Records in the files indexed so far (a lower bound on num_records)."""
        return self._first[-1]

    def _locate(self, record: int) -> tuple[int, int]:
        if not self.has_record(record):
            raise IndexError(record)
        f = int(np.searchsorted(self._first, record, side="right")) - 1
        return f, record - self._first[f]

    def where(self, record: int) -> str:
        f, r = self._locate(record)
        return f"{self.files[f]}:{int(self._index[f].line_numbers[r])}"

    def _raw(self, record: int) -> tuple[bytes, str]:
        f, r = self._locate(record)
        idx = self._index[f]
        handle = self._handles.get(f)
        if handle is None:
            if len(self._handles) >= 8:
                self._handles.pop(next(iter(self._handles))).close()
            handle = self._handles[f] = open(self.files[f], "rb")
        handle.seek(int(idx.starts[r]))
        raw = handle.read(int(idx.ends[r] - idx.starts[r]))
        return raw, f"{self.files[f]}:{int(idx.line_numbers[r])}"

    def payload(self, record: int) -> Optional[str]:
        raw, where = self._raw(record)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecord(f"{self.key}: {where}: invalid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                            f"{err.start + 1})") from None
        if self.fmt == "text":
            return line.rstrip("\r")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadRecord(f"{self.key}: {where}: not valid JSON ({err.msg} at column {err.colno})") from None
        return _text_of(obj, self.text_field, self.key, where)

    def token_length(self, record: int, tokenizer) -> Optional[int]:
        return None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _text_of(obj: Any, text_field: str, key: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise BadRecord(f"{key}: {where}: expected a JSON object with a {text_field!r} field, got "
                        f"{type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(list(map(str, obj))[:8]) or "none"
        raise BadRecord(f"{key}: {where}: no {text_field!r} field (fields: {keys}); set text_field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise BadRecord(f"{key}: {where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


class HFStreamSource:
    """json, parquet, hub (and hf_jsonl / hf_text) through Hugging Face `datasets` in streaming
    mode. Sequential: starting at record r uses IterableDataset.skip(r), which still reads (but
    does not tokenize) the r records before it."""

    random_access = False
    split_done = False

    def __init__(self, spec: SourceSpec, fmt: str):
        self.key, self.spec, self.fmt = spec.key, spec, fmt
        self.text_field = spec.text_field or "text"
        if fmt == "hub":
            self.name = spec.path.split("://", 1)[-1].split(":", 1)[-1] if spec.path.startswith("hf") else spec.path
            self.files = None
            self.description = f"hub ({self.name}, split {spec.hub_split})"
        else:
            self.files = expand_files(spec, fmt)
            self.description = f"{fmt} via datasets ({len(self.files)} file{'s' if len(self.files) != 1 else ''}: {spec.path})"

    def _dataset(self):
        try:
            import datasets  # lazily: slow to import
        except ImportError:  # pragma: no cover
            raise ValueError(f"{self.key}: format {self.fmt} needs the `datasets` package (pip install datasets)") from None
        datasets.disable_progress_bars()
        builder = {"json": "json", "hf_jsonl": "json", "parquet": "parquet", "hf_text": "text"}.get(self.fmt)
        try:
            if self.fmt == "hub":
                return datasets.load_dataset(self.name, self.spec.hub_config, split=self.spec.hub_split, streaming=True)
            return datasets.load_dataset(builder, data_files=self.files, split="train", streaming=True)
        except Exception as err:
            raise ValueError(f"{self.key}.path: {self.spec.path}: {_first_line(err)}") from None

    def where(self, record: int) -> str:
        return f"{self.spec.path} (record {record})"

    def iterate(self, start: int) -> Iterator[tuple[int, Optional[str]]]:
        ds = self._dataset()
        if start:
            ds = ds.skip(start)
        record = start
        it = iter(ds)
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except Exception as err:
                raise ValueError(f"{self.key}: {self.spec.path}: reading after record {record}: {_first_line(err)}") from None
            try:
                yield record, _text_of(row, self.text_field, self.key, self.where(record))
            except BadRecord as err:
                yield record, err
            record += 1


class MegatronSource:
    """A megatron-core indexed dataset (.bin/.idx): documents of pre-tokenized ids."""

    random_access = True
    split_done = False

    def __init__(self, spec: SourceSpec):
        self.key, self.spec = spec.key, spec
        prefix = spec.path[:-4] if spec.path.endswith((".bin", ".idx")) else spec.path
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"{spec.key}.path: {prefix + ext} does not exist")
            if os.path.getsize(prefix + ext) == 0:
                raise ValueError(f"{spec.key}.path: {prefix + ext} is empty")
        self.prefix = prefix
        self._ds = None
        ds = self.dataset
        self.doc_index = np.asarray(ds.document_indices, dtype=np.int64)
        self.seq_lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        self.num_records = len(self.doc_index) - 1
        if self.num_records <= 0:
            raise ValueError(f"{spec.key}.path: {prefix}.idx holds no documents")
        self.description = f"megatron ({prefix}.bin, {self.num_records} documents)"

    @property
    def dataset(self):
        if self._ds is None:
            self._ds = open_indexed_dataset(self.prefix, self.key)
        return self._ds

    def where(self, record: int) -> str:
        return f"{self.prefix}.bin (document {record})"

    def payload(self, record: int) -> np.ndarray:
        a, b = int(self.doc_index[record]), int(self.doc_index[record + 1])
        parts = [np.asarray(self.dataset[i], dtype=np.int64) for i in range(a, b)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def token_length(self, record: int, tokenizer) -> Optional[int]:
        a, b = int(self.doc_index[record]), int(self.doc_index[record + 1])
        return int(self.seq_lengths[a:b].sum())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None
        return state


def _quiet_megatron_import():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" etc.
        import logging

        logging.getLogger("megatron").setLevel(logging.WARNING)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed_dataset(prefix: str, key: str = "data.source"):
    try:
        indexed_dataset = _quiet_megatron_import()
    except ImportError:  # pragma: no cover
        raise ValueError(f"{key}: megatron indexed datasets need megatron-core (pip install megatron-core)") from None
    try:
        return indexed_dataset.IndexedDataset(prefix, mmap=True)
    except Exception as err:
        raise ValueError(f"{key}.path: {prefix}.idx/.bin: not a megatron indexed dataset ({_first_line(err)})") from None


def write_indexed_dataset(prefix: str, documents, dtype=np.int32) -> None:
    """Write token documents as a megatron-core .bin/.idx pair (with megatron-core's builder)."""
    import torch

    indexed_dataset = _quiet_megatron_import()
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # megatron-core's numpy 2 copy= notice
        for doc in documents:
            doc = np.asarray(doc)
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_source(spec: SourceSpec, split: str, seed: int):
    fmt = detect_format(spec)
    if fmt == "builtin":
        return BuiltinSource(spec, split, seed)
    if fmt in ("jsonl", "text"):
        return LineSource(spec, fmt)
    if fmt == "megatron":
        return MegatronSource(spec)
    return HFStreamSource(spec, fmt)
