"""Tokenizers: text <-> token ids.

Every tokenizer exposes `encode(text, add_bos=True, add_eos=True) -> list[int]`,
`decode(ids) -> str` and the attributes `bos_id`, `eos_id`, `pad_id`, `vocab_size`.
"""
from __future__ import annotations

from typing import Iterable

KNOWN_TOKENIZERS = ("bytes",)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then BOS=256, EOS=257, PAD=258.

    A text of n UTF-8 bytes encodes to exactly n tokens (+1 for BOS, +1 for EOS), which lets a
    corpus know its token counts from file sizes alone.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Special ids are dropped; byte sequences that are not valid UTF-8 become U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def build_tokenizer(name: str):
    """The tokenizer named by `data.tokenizer` in a recipe."""
    if name == "bytes":
        return ByteTokenizer()
    # Later: "sentencepiece:<path/to/model>" -> a SentencePiece wrapper with the same interface.
    # Corpora that derive token counts from byte sizes (data/builtin.py) must then count tokens
    # by encoding instead.
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r}; known: {', '.join(KNOWN_TOKENIZERS)}")
