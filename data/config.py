"""The recipe's `data` section: sources, tokenizer, sequence length and batch, packing, workers.

data/pipeline.py turns it into the settings one loader runs with (DataSettings.from_config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Packing = Literal["none", "concat", "whole", "varlen"]


@dataclass
class DataConfig:
    # One source: builtin, a jsonl/json/parquet/txt file, glob or directory, a megatron .bin/.idx
    # prefix, or hf:<dataset>. `sources` (a list of paths or {path, weight, text_field, format,
    # hub_config, hub_split}) blends several with weights and overrides `source` (data/sources.py).
    source: str = "builtin"
    sources: list = field(default_factory=list)  # a weighted blend of sources (see source)
    text_field: str = "text"  # the record field holding the text (per source: sources[i].text_field)
    tokenizer: str = "bytes"  # bytes, or a sentencepiece .model file (longtrain tokenizer train)
    add_bos: bool = True  # each document is BOS text EOS; EOS predicts nothing (data/packing.py)
    add_eos: bool = True  # see add_bos
    seq_len: int = 256  # tokens per row (the training context)
    batch_size: int = 4  # sequences per data-parallel rank per optimizer step
    eval_batches: int = 2  # batches per evaluation
    # none: fixed windows of the builtin stream (attention spans the row); concat: documents end
    # to end, cut at seq_len, no padding; whole: whole documents per row (split only when longer
    # than seq_len), padded; varlen: per step one bin of whole documents (up to max_doc_len each)
    # within token_budget tokens, unpadded.
    packing: Packing = "none"
    max_doc_len: int = 0  # varlen: longer documents are split into pieces of this length (0: the budget)
    token_budget: int = 0  # varlen: tokens per data rank per step (0: batch_size x seq_len)
    pack_window: int = 64  # whole/varlen: documents looked ahead for first-fit packing
    lanes: int = 0  # independent packing streams (0: dp x batch_size of the first run; then fixed)
    num_workers: int = 1  # background processes per rank that read, tokenize and pack (0: inline)
    prefetch: int = 2  # steps each worker produces ahead
    skip_bad_records: bool = False  # skip and count malformed records instead of failing on them
