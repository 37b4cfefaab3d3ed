"""Batches for `parallel.balance`: the balancing group (dp_replicate x dp_shard x cp ranks; tp peers
follow) shares each step's whole sequences.

Every rank of the group packs the same `bins` varlen bins per step (`parallel.balance_bins`, default
one per data rank: the rows the data ranks would have read) from one global row cursor, but from
document *lengths* only: the packer (data/pipeline.RowProducer with lazy tokens) decides each bin's
pieces (document, start, stop) without reading a document whose length is known (builtin + bytes,
megatron sources; other sources are tokenized to learn their lengths). Every rank plans the step from
those lengths (parallel/balance/planner.py; the same plan everywhere, nothing is communicated), hands
the attention engine its StepLayout, and then materializes only the tokens it holds (its linear
layout): only the documents its pieces come from are read. `next()` returns this rank's tokens,
labels, positions and sequence ids as one (1, S) row, which the trainer feeds as it is (no cp
sharding). `docs_read` / `tokens_materialized` count what this rank read (tests assert on them).

The cursor is the loader's global row cursor: a step moves it by `bins` rows, so resuming at another
group size continues the global stream with nothing repeated or skipped (and, with balance_bins
fixed, with identical steps). The state is PackedLoader's (same keys, same checks).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from longtrain.data.loader import PackedLoader
from longtrain.data.packing import IGNORE_INDEX
from longtrain.data.pipeline import DataSettings
from longtrain.models.registry import kind_of
from longtrain.parallel.balance.cost import CostModel, ModelShape, resolve_cluster
from longtrain.parallel.balance.engine import StepLayout
from longtrain.parallel.balance.planner import plan_step

CAPACITY_FACTOR = 1.5  # a rank's attention-layout token capacity, over the group's mean tokens per rank


class BalancedBatches:
    def __init__(self, recipe, strategy: str, engine, balance_rank: int, group_size: int, dp: int, model_cfg,
                 tp: int = 1, split: str = "train"):
        settings = DataSettings.from_config(recipe.data, recipe.train.seed, split)
        self.bins = recipe.parallel.balance_bins or dp
        if split != "train":
            settings.num_workers, settings.lanes = 0, 1
        else:
            settings.lanes = settings.lanes or self.bins
        self.loader = PackedLoader(settings, dp_rank=0, dp_degree=1)
        self.strategy, self.engine, self.rank, self.world = strategy, engine, balance_rank, group_size
        self.cp, self.dp = recipe.parallel.cp, dp
        self.remap = recipe.parallel.balance_remap and strategy == "zeppelin"
        self.capacity = math.ceil(CAPACITY_FACTOR * self.bins * settings.budget / group_size)
        cluster = resolve_cluster(recipe.cluster.preset, recipe.cluster.gpus_per_node, world=group_size)
        self.gpus_per_node = cluster.gpus_per_node
        self.cost_model = CostModel(ModelShape.of(model_cfg, tp), cluster)
        self.tau_intra, self.tau_inter = self.cost_model.tau("intra"), self.cost_model.tau("inter")
        # scan-based models (hybrid Mamba stacks): ring members hold contiguous chunks, no zigzag
        self.contiguous = kind_of(model_cfg).contiguous_sequence
        self.last_plan = None
        self.last_layout = None
        self.last_pieces: list = []
        self.producer = None  # data/pipeline.RowProducer over every lane, lazy tokens
        self.docs_read = 0  # documents whose tokens this rank read (a document per held sequence)
        self.tokens_materialized = 0
        # the balancing group learns unknown document lengths together (data/pipeline.DocumentStream)
        ranks = getattr(engine, "global_ranks", None)
        self.exchange = GroupLengthExchange(ranks) if ranks and len(ranks) > 1 and dist.is_initialized() else None
        self._tokenized_before = [0, 0]  # (documents tokenized, of them for lengths) by earlier producers

    @property
    def docs_tokenized(self) -> int:
        """Documents this rank tokenized (its share of unknown lengths, and the documents it holds)."""
        stream = self.producer.stream if self.producer is not None else None
        return self._tokenized_before[0] + (stream.tokenized if stream is not None else 0)

    @property
    def lengths_tokenized(self) -> int:
        """Documents this rank tokenized only to tell the group their lengths."""
        stream = self.producer.stream if self.producer is not None else None
        return self._tokenized_before[1] + (stream.tokenized_for_lengths if stream is not None else 0)

    def __iter__(self):
        return self

    def _rows(self) -> list:
        """The pieces of this step's `bins` global rows (lengths only; tokens not read)."""
        from longtrain.data.pipeline import DocumentStream, RowProducer

        if self.producer is None:  # every lane on every rank: all ranks pack the whole step
            stream = DocumentStream(self.loader.settings, exchange=self.exchange)
            self.producer = RowProducer(self.loader.settings, self.loader.lanes, list(range(self.loader.lanes)),
                                        stream=stream, lazy_tokens=True)
            self.producer.fast_forward(self.loader.cursor)
        rows = [self.producer.row(k) for k in range(self.loader.cursor, self.loader.cursor + self.bins)]
        self.loader.cursor += self.bins
        return rows

    def __next__(self) -> dict:
        rows = self._rows()
        pieces = [piece for row in rows for piece in row]  # a varlen row's pieces are its sequences
        lengths = [stop - start for _, start, stop in pieces]
        bins = [b % self.dp for b, row in enumerate(rows) for _ in row]
        capacity = self.capacity + len(lengths)  # zigzag remainders (a token per sequence) under even_cp
        plan = plan_step(lengths, self.world, self.strategy, capacity=capacity, gpus_per_node=self.gpus_per_node,
                         cp=self.cp, bins=bins, cost=self.cost_model.cost, tau_intra=self.tau_intra,
                         tau_inter=self.tau_inter, contiguous=self.contiguous)
        layout = StepLayout.build(plan, self.rank, self.remap)
        self.engine.set_step(layout)
        self.last_plan, self.last_layout, self.last_pieces = plan, layout, pieces
        batch = self._materialize(layout.linear_ids, pieces, lengths)
        self.producer.stream.flush_lengths(force=False)  # type: ignore[union-attr]
        return batch

    def _materialize(self, ids: np.ndarray, pieces: list, lengths: list) -> dict:
        """tokens, labels, positions, doc_ids of the global token ids this rank holds, as the packed
        row would have them (labels: the next token of the same document, IGNORE_INDEX past its end),
        reading only the documents of those tokens."""
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        seq = np.searchsorted(offsets, ids, side="right") - 1
        pos = ids - offsets[seq]
        tokens = np.empty(len(ids), np.int64)
        labels = np.full(len(ids), IGNORE_INDEX, np.int64)
        for s in np.unique(seq).tolist():
            doc, start, _ = pieces[s]
            where = np.flatnonzero(seq == s)
            at = pos[where] + start  # positions in the document
            src = doc.tokens  # reads the document (once; a Doc keeps its tokens)
            tokens[where] = src[at]
            has_next = at + 1 < doc.length
            labels[where[has_next]] = src[at[has_next] + 1]
            self.docs_read += 1
        self.tokens_materialized += len(ids)
        batch = {"tokens": torch.from_numpy(tokens)[None], "labels": torch.from_numpy(labels)[None],
                 "positions": torch.from_numpy(pos)[None], "doc_ids": torch.from_numpy(seq)[None]}
        return batch

    # the loader's global cursor ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def _drop_producer(self) -> None:
        if self.producer is not None:
            stream = self.producer.stream
            stream.flush_lengths()
            self._tokenized_before[0] += stream.tokenized
            self._tokenized_before[1] += stream.tokenized_for_lengths
        self.producer = None

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._drop_producer()  # packs again from the loaded cursor

    def close(self) -> None:
        self.loader.close()
        self._drop_producer()


_LENGTH_GROUPS: dict = {}


class GroupLengthExchange:
    """data/pipeline.LengthExchange over the balancing group's ranks: an element-wise max all-reduce
    on a gloo group of its own (created once per member tuple, only by the members; CPU tensors, and
    never interleaved with the training step's collectives on the engine's group)."""

    def __init__(self, ranks: list[int]):
        key = (id(dist.group.WORLD), tuple(ranks))
        if key not in _LENGTH_GROUPS:
            _LENGTH_GROUPS[key] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
        self.group = _LENGTH_GROUPS[key]
        self.rank, self.size = dist.get_rank(self.group), len(ranks)
        self.calls = 0

    def max(self, values: np.ndarray) -> np.ndarray:
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64).copy())
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        self.calls += 1
        return out.numpy()
