"""The built-in offline corpus: the Python standard library's own .py source files.

Every Python install ships it, so training and tests need no download. The document order is
deterministic for a seed: relative paths are sorted, then permuted with a seeded numpy RNG. A
stable hash of the relative path puts about 1 in 50 documents in the "eval" split.

With the byte tokenizer a document of n bytes is n + 2 tokens (BOS ... EOS), so the token counts
come from file sizes; valid UTF-8 text re-encodes to exactly its file bytes.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib

import numpy as np

SPLITS = ("train", "eval")
EVAL_EVERY = 50  # a document is in "eval" when crc32(relative path) % EVAL_EVERY == 0
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib"})


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_of(rel_path: str) -> str:
    """'eval' or 'train', from a hash of the relative path (stable across runs and machines)."""
    return "eval" if zlib.crc32(rel_path.encode("utf-8")) % EVAL_EVERY == 0 else "train"


@functools.lru_cache(maxsize=4)
def _scan_sources(root: str) -> tuple[tuple[str, int], ...]:
    """Sorted (relative posix path, size in bytes) of the usable .py files under root.

    Skips SKIP_DIRS, empty files and files that are not valid UTF-8. Checking UTF-8 reads every
    file once per process (about 10 MB); the result is cached.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.stat(path).st_size
            if size == 0:
                continue
            with open(path, "rb") as f:
                data = f.read()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            found.append((os.path.relpath(path, root).replace(os.sep, "/"), size))
    found.sort()
    return tuple(found)


class BuiltinCorpus:
    """The documents of one split, in a seeded order.

    `documents[i]` is the absolute path of document i, `doc_token_lengths[i]` its token count
    (file bytes + BOS + EOS) and `read_tokens(i, tokenizer)` its tokens.
    """

    source = "builtin"

    def __init__(self, split: str = "train", seed: int = 0, *, root: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}; known: {', '.join(SPLITS)}")
        self.split = split
        self.seed = int(seed)
        self.root = os.path.abspath(root or stdlib_root())
        entries = [(rel, size) for rel, size in _scan_sources(self.root) if split_of(rel) == split]
        if not entries:
            raise ValueError(f"builtin corpus: no usable .py files for split {split!r} under {self.root}")
        order = np.random.default_rng(self.seed).permutation(len(entries))
        self.relative_paths = [entries[i][0] for i in order]
        self.documents = [os.path.join(self.root, *rel.split("/")) for rel in self.relative_paths]
        self.doc_token_lengths = np.array([entries[i][1] + 2 for i in order], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_token_lengths.sum())

    def read_tokens(self, i: int, tokenizer) -> np.ndarray:
        """Tokens of document i, BOS ... EOS, as int64."""
        with open(self.documents[i], "rb") as f:
            text = f.read().decode("utf-8")  # bytes, not text mode: keep \r\n as it is on disk
        tokens = np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), dtype=np.int64)
        if len(tokens) != self.doc_token_lengths[i]:
            raise ValueError(
                f"builtin corpus: {self.relative_paths[i]} gave {len(tokens)} tokens, expected "
                f"{int(self.doc_token_lengths[i])}; token counts come from file sizes, which only "
                "holds for the byte tokenizer (or the file changed on disk)"
            )
        return tokens

    def __repr__(self) -> str:
        return f"BuiltinCorpus(split={self.split!r}, seed={self.seed}, documents={len(self)}, tokens={self.num_tokens})"
