"""Tokenizers: text <-> token ids.

Every tokenizer exposes `encode(text, add_bos=True, add_eos=True) -> list[int]`,
`encode_batch(texts) -> list[list[int]]` (no BOS/EOS), `decode(ids) -> str` and the attributes
`bos_id`, `eos_id`, `pad_id`, `vocab_size`, `name`.

`data.tokenizer` in a recipe names one:

- `bytes`: UTF-8 bytes (vocabulary 259), no file needed.
- `path/to/tok.model` or `sentencepiece:path/to/tok.model`: a SentencePiece model, for example one
  written by `longtrain tokenizer train`.
- `pretokenized:vocab=V,bos=B,eos=E[,pad=P]`: no text encoding at all, for pre-tokenized
  (megatron .bin/.idx) sources made with another tokenizer (e.g. Llama 3's): only the vocabulary
  size (checked against every document's ids and the model) and the special ids.

BOS/EOS: the tokenizers only add them when asked. The data pipeline asks per document according to
`data.add_bos` / `data.add_eos` (both on by default), so a document is `BOS text EOS`. A
SentencePiece model without a BOS or EOS piece cannot be used with those settings on; that is
reported when the tokenizer is loaded (see `check_special_tokens`).
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator

KNOWN_TOKENIZERS = ("bytes", "<file>.model", "sentencepiece:<file>", "pretokenized:vocab=V,bos=B,eos=E")

# SentencePiece's whitespace meta symbol. A literal U+2581 in the text would come back as a space
# from decode(), so it is encoded as its three UTF-8 byte-fallback pieces instead.
_META = "\u2581"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then BOS=256, EOS=257, PAD=258.

    A text of n UTF-8 bytes encodes to exactly n tokens (+1 for BOS, +1 for EOS), which lets a
    corpus know its token counts from file sizes alone.
    """

    name = "bytes"
    identity = "bytes"  # what cached token lengths depend on (data/length_index.py)
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    lengths_from_bytes = True  # len(encode(text, False, False)) == len(text.encode("utf-8"))

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Special ids are dropped; byte sequences that are not valid UTF-8 become U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece model (.model file) behind the same interface as ByteTokenizer.

    Encoding is exact for models trained by `train_sentencepiece` (identity normalization, byte
    fallback, no dummy prefix): decode(encode(text)) == text for any text. `pad_id` falls back to
    the EOS id when the model has no pad piece (padding never carries a label).
    """

    lengths_from_bytes = False

    def __init__(self, path: str):
        import sentencepiece as spm  # lazily: `import longtrain` stays fast

        self.path = str(path)
        if not os.path.exists(self.path):
            raise ValueError(f"data.tokenizer: {self.path} does not exist")
        if os.path.isdir(self.path):
            raise ValueError(f"data.tokenizer: {self.path} is a directory, not a sentencepiece .model file")
        try:
            with open(self.path, "rb") as f:
                proto = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with long texts
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"data.tokenizer: {self.path} is not a sentencepiece model ({first})") from None
        self.name = f"sentencepiece:{self.path}"
        # what cached token lengths depend on (data/length_index.py): the model itself, not its path
        self.identity = f"sentencepiece:{hashlib.sha256(proto).hexdigest()[:24]}"
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        pad = int(self.sp.pad_id())
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)
        meta = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
        unk = self.sp.unk_id()
        self._meta_ids = meta if all(i != unk for i in meta) else None

    def _encode_plain(self, text: str) -> list[int]:
        if _META not in text or self._meta_ids is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META)):
            if i:
                ids.extend(self._meta_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self._encode_plain(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once (sentencepiece encodes a list in C++); no BOS/EOS."""
        plain = [i for i, t in enumerate(texts) if _META not in t or self._meta_ids is None]
        out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        if plain:
            for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain])):
                out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_plain(t)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.bos_id, self.eos_id, int(self.sp.pad_id())}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class PretokenizedTokenizer:
    """Special ids and a vocabulary size for sources that are already token ids."""

    lengths_from_bytes = False

    def __init__(self, spec: str):
        self.name = spec
        fields = {}
        for part in spec.split(":", 1)[1].split(","):
            key, _, value = part.partition("=")
            if key.strip() not in ("vocab", "bos", "eos", "pad") or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"data.tokenizer: {spec!r}: expected pretokenized:vocab=V,bos=B,eos=E[,pad=P]")
            fields[key.strip()] = int(value)
        if "vocab" not in fields or fields["vocab"] < 1:
            raise ValueError(f"data.tokenizer: {spec!r}: vocab=V is required")
        self.vocab_size = fields["vocab"]
        self.bos_id, self.eos_id = fields.get("bos", -1), fields.get("eos", -1)
        self.pad_id = fields.get("pad", max(self.eos_id, 0))
        for key in ("bos", "eos", "pad"):
            if fields.get(key, -1) >= self.vocab_size:
                raise ValueError(f"data.tokenizer: {spec!r}: {key}={fields[key]} is outside the vocabulary")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        raise ValueError(f"data.tokenizer: {self.name} reads only pre-tokenized (megatron .bin/.idx) sources; "
                         "a text source needs bytes or a sentencepiece .model")

    encode_batch = encode

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"PretokenizedTokenizer({self.name!r})"


def tokenizer_path(name: str) -> str | None:
    """The .model path named by `data.tokenizer`, or None for the byte tokenizer."""
    if name == "bytes" or name.startswith("pretokenized:"):
        return None
    if name.startswith("sentencepiece:"):
        return name[len("sentencepiece:"):]
    if name.endswith(".model"):
        return name
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r}; known: {', '.join(KNOWN_TOKENIZERS)}")


def build_tokenizer(name: str):
    """The tokenizer named by `data.tokenizer` in a recipe."""
    if name.startswith("pretokenized:"):
        return PretokenizedTokenizer(name)
    path = tokenizer_path(name)
    if path is None:
        return ByteTokenizer()
    return SentencePieceTokenizer(path)


def check_special_tokens(tokenizer, add_bos: bool, add_eos: bool) -> None:
    """One line when the recipe asks for BOS/EOS that the tokenizer does not have."""
    for flag, key, value in ((add_bos, "add_bos", tokenizer.bos_id), (add_eos, "add_eos", tokenizer.eos_id)):
        if flag and value < 0:
            raise ValueError(f"data.{key}: tokenizer {tokenizer.name} has no {key[4:].upper()} piece; "
                             f"set data.{key}: false")


# ----------------------------------------------------------------------------------------------
# Training a SentencePiece model
# ----------------------------------------------------------------------------------------------
MAX_PIECE_CHARS = 4000  # sentencepiece drops training "sentences" longer than max_sentence_length


def _training_chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Documents cut into training sentences of at most max_chars, at line ends when possible
    (the newlines stay inside: the model learns pieces for indentation and line ends)."""
    for text in texts:
        start = 0
        while start < len(text):
            stop = min(len(text), start + max_chars)
            if stop < len(text):
                cut = text.rfind("\n", start, stop)
                if cut > start:
                    stop = cut + 1
            yield text[start:stop]
            start = stop


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out: str, *, model_type: str = "bpe",
                        max_sentences: int = 2_000_000, num_threads: int | None = None) -> dict:
    """Train a SentencePiece model on `texts` and write it to `out` (atomically: a temporary file,
    then a rename). Settings for exact round trips of any text, code included: identity
    normalization, no dummy prefix, whitespace kept as it is, byte fallback for characters outside
    the vocabulary, digits split. Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>.
    Returns {"vocab_size", "sentences", "path"}."""
    import sentencepiece as spm

    if vocab_size < 260 + 4:
        raise ValueError(f"--vocab-size: {vocab_size} is too small; byte fallback alone takes 256 pieces plus 4 "
                         "specials (use at least 264)")
    counted = {"sentences": 0}

    def sentences():
        for chunk in _training_chunks(texts, MAX_PIECE_CHARS):
            counted["sentences"] += 1
            yield chunk

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
            max_sentence_length=MAX_PIECE_CHARS * 4 + 16, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            num_threads=num_threads or max(1, os.cpu_count() or 1), minloglevel=2,
            hard_vocab_limit=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "training failed"
        if counted["sentences"] == 0:
            raise ValueError("--source: no text to train on") from None
        raise ValueError(f"tokenizer training failed: {first}") from None
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)
    return {"vocab_size": vocab_size, "sentences": counted["sentences"], "path": out}
