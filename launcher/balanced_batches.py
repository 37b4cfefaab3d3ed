"""Batches for `parallel.balance`: the balancing group (dp_replicate x dp_shard x cp ranks; tp peers
follow) shares each step's whole sequences.

Every rank of the group packs the same `bins` varlen bins per step (`parallel.balance_bins`, default
one per data rank: the rows the data ranks would have read) from one global row cursor, but from
document *lengths* only: the packer (data/pipeline.RowProducer with lazy tokens) decides each bin's
pieces (document, start, stop) without tokenizing a document whose length is known. Every rank plans
the step from those lengths (parallel/balance/planner.py; the same plan everywhere), hands the
attention engine its StepLayout, and then materializes only the tokens it holds (its linear layout):
only the documents its pieces come from are read and tokenized. `next()` returns this rank's tokens,
labels, positions and sequence ids as one (1, S) row, which the trainer feeds as it is (no cp
sharding). Counters (tests assert on them): `docs_read`, `tokens_materialized`, `docs_tokenized` (all
documents this rank tokenized, each once), `lengths_tokenized` (of them, its share of the unknown
lengths) and `lengths_reused` (held documents whose tokens came from that share: not tokenized again).

Lengths. Known without reading for the built-in corpus with the byte tokenizer and for megatron
sources. For text sources with a real tokenizer (jsonl, text, json, parquet, builtin + sentencepiece)
they come from the token-length index (data/length_index.py, in $LONGTRAIN_CACHE: later steps,
epochs, resumes and runs tokenize nothing for lengths) and, for lengths nobody knows yet, from the
group: in blocks of documents, each rank tokenizes 1/N of the unknown ones and a max all-reduce gives
every rank all of them (data/pipeline.DocumentStream; random-access sources, i.e. jsonl/text/builtin;
streamed json/parquet are read in order by every rank and tokenized where the index does not know
them). Only lengths travel. The all-reduces run on gloo groups of their own (`_length_groups`), never
on the engine's group. The group that learns lengths is `length_ranks`: the trainer passes the whole
world (the balancing group's tp peers read the same stream and pack the same steps, so they share the
work instead of repeating it: N = world), else it is the balancing group.

Ahead of the trainer (`data.num_workers` >= 1; eval batches are made inline): one worker process
per rank packs, plans and materializes the steps (StepMaker, the same code as inline), `data.prefetch`
steps ahead (the plan is a pure function of the lengths). A process has no process group, so the
worker's length exchanges go through a pipe to a relay thread of the training process, which makes
the collective (waiting on the pipe or in gloo, it does not hold the GIL; a thread producer would:
sentencepiece keeps the GIL while it encodes, measured: tokenizing beside a torch loop in a thread
took longer than doing both in turn). Stopping a worker (close, load_state_dict) is agreed by the
group: the ranks' workers may have made different numbers of exchanges, so the ranks agree on the
count and the ones behind make up the difference with empty exchanges; the relay group is then quiet
for the next worker. A worker's error reaches the trainer as its one line.

The cursor is the loader's global row cursor of steps CONSUMED (a worker may have produced more): a
step moves it by `bins` rows, so resuming at another group size continues the global stream with
nothing repeated or skipped (and, with balance_bins fixed, with identical steps). The state is
PackedLoader's (same keys, same checks).
"""
from __future__ import annotations

import math
import pickle
import threading
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from longtrain.data.loader import PackedLoader
from longtrain.data.packing import IGNORE_INDEX
from longtrain.data.pipeline import NOT_INDEXED, RESOLVE_BLOCK, DataSettings, RowProducer
from longtrain.launcher.log import LOGGER
from longtrain.models.registry import kind_of
from longtrain.parallel.balance.cost import (CostModel, ModelShape, attention_table_note, probe_shape_note,
                                             resolve_cluster)
from longtrain.parallel.balance.engine import StepLayout
from longtrain.parallel.balance.planner import plan_step
from longtrain.parallel.balance.remap import remaps

CAPACITY_FACTOR = 1.5  # a rank's attention-layout token capacity, over the group's mean tokens per rank


def attention_capacity(bins: int, budget: int, group_size: int) -> int:
    """Tokens a rank may hold in the attention layout: CAPACITY_FACTOR x the group's mean tokens per rank
    (`bins` bins of `budget` tokens a step); the trainer's loader and `plan balance` plan with it."""
    return math.ceil(CAPACITY_FACTOR * bins * budget / group_size)


def step_balance(plan, layout) -> tuple:
    """(attention work max/mean, attention-layout tokens max/mean, ring groups, remapped) of one step's
    plan and layout: what the trainer logs, averaged over its log window (Trainer._balance_metrics).
    The same on every rank (the plan is), so nothing is communicated."""
    work, tokens = plan.attention_work(), plan.tokens_per_rank()
    rings = len({group for group, _ in plan.groups.values() if len(group) > 1})
    return (float(work.max() / work.mean()) if work.mean() > 0 else 1.0,
            float(tokens.max() / tokens.mean()) if tokens.mean() > 0 else 1.0,
            rings, layout.to_attention is not None)


def window_balance(steps: list) -> dict:
    """The log record's balance keys from step_balance's tuples of the window's steps (empty: none)."""
    if not steps:
        return {}
    attention, tokens, rings, remapped = zip(*steps)
    return {"balance/attention_max_over_mean": sum(attention) / len(steps),
            "balance/tokens_max_over_mean": sum(tokens) / len(steps),
            "balance/rings_per_step": sum(rings) / len(steps),
            "balance/remapped_steps": sum(remapped), "balance/steps": len(steps)}


class StepMaker:
    """Packs, plans and materializes this rank's steps from a global row cursor: inline in the
    training process, or ahead of it in a worker process (balanced_worker_main). Everything it
    holds is plain and picklable until start() opens the stream."""

    def __init__(self, settings: DataSettings, lanes: int, bins: int, rank: int, plan_args: dict):
        self.settings, self.lanes, self.bins, self.rank, self.plan_args = settings, lanes, bins, rank, plan_args
        self.producer: RowProducer | None = None
        self.cursor = 0
        self.resolve_block = RESOLVE_BLOCK  # documents whose lengths the group learns together
        self.keep_length_tokens = True  # a held document tokenized for its length is not tokenized again
        self.share_stream_lengths = True  # streamed sources' lengths are learned with the group too
        self.counters = {"docs_read": 0, "tokens_materialized": 0, "docs_tokenized": 0, "lengths_tokenized": 0,
                         "lengths_reused": 0}

    def start(self, cursor: int, exchange=None) -> None:
        from longtrain.data.pipeline import DocumentStream

        stream = DocumentStream(self.settings, exchange=exchange, resolve_block=self.resolve_block,
                                keep_length_tokens=self.keep_length_tokens,
                                share_stream_lengths=self.share_stream_lengths)
        self._seen = (0, 0, 0)  # the new stream's tokenization counters, as far as counted
        # every lane on every rank: all ranks pack the whole step
        self.producer = RowProducer(self.settings, self.lanes, list(range(self.lanes)), stream=stream,
                                    lazy_tokens=True)
        self.producer.fast_forward(cursor)
        self.cursor = cursor

    def step(self) -> tuple:
        """(batch arrays, plan, layout, pieces) of the step at the cursor; moves the cursor."""
        producer = self.producer
        assert producer is not None
        rows = [producer.row(k) for k in range(self.cursor, self.cursor + self.bins)]
        self.cursor += self.bins
        pieces = [piece for row in rows for piece in row]  # a varlen row's pieces are its sequences
        lengths = [stop - start for _, start, stop in pieces]
        a = self.plan_args
        bins = [b % a["dp"] for b, row in enumerate(rows) for _ in row]
        capacity = a["capacity"] + len(lengths)  # zigzag remainders (a token per sequence) under even_cp
        plan = plan_step(lengths, a["world"], a["strategy"], capacity=capacity, gpus_per_node=a["gpus_per_node"],
                         cp=a["cp"], bins=bins, contiguous=a["contiguous"], **a["planner"])
        remap = remaps(a["remap"], plan, a["cost_model"])
        layout = StepLayout.build(plan, self.rank, remap)
        arrays = self._materialize(layout.linear_ids, pieces, lengths)
        stream = producer.stream
        self.counters["docs_tokenized"] += stream.tokenized - self._seen[0]
        self.counters["lengths_tokenized"] += stream.tokenized_for_lengths - self._seen[1]
        self.counters["lengths_reused"] += stream.length_tokens_reused - self._seen[2]
        self._seen = (stream.tokenized, stream.tokenized_for_lengths, stream.length_tokens_reused)
        stream.flush_lengths(force=False)
        return arrays, plan, layout, pieces

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
            self.counters["docs_read"] += 1
        self.counters["tokens_materialized"] += len(ids)
        return {"tokens": tokens, "labels": labels, "positions": pos, "doc_ids": seq}

    def close(self) -> None:
        if self.producer is not None:
            self.producer.stream.flush_lengths()
        self.producer = None


class BalancedBatches:
    def __init__(self, recipe, strategy: str, engine, balance_rank: int, group_size: int, dp: int, model_cfg,
                 tp: int = 1, split: str = "train", length_ranks: list[int] | None = None):
        """`length_ranks`: the global ranks that learn unknown document lengths together (None: the
        balancing group, `engine.global_ranks`). Every one of them must build this loader at the same
        point with the same data settings, bins and cursor (then they fetch the same documents in the
        same order, so they make the same exchanges), as every rank of the world does in the trainer."""
        settings = DataSettings.from_config(recipe.data, recipe.train.seed, split)
        self.bins = recipe.parallel.balance_bins or dp
        if split != "train":
            settings.num_workers, settings.lanes = 0, 1
        else:
            settings.lanes = settings.lanes or self.bins
        self.loader = PackedLoader(settings, dp_rank=0, dp_degree=1)
        self.strategy, self.engine, self.rank, self.world = strategy, engine, balance_rank, group_size
        self.cp, self.dp = recipe.parallel.cp, dp
        # remapping (zeppelin only): true, false, or None = per step by the cost model (remap.remap_pays)
        self.remap = recipe.parallel.balance_remap if strategy == "zeppelin" else False
        self.capacity = attention_capacity(self.bins, settings.budget, group_size)
        cluster = resolve_cluster(recipe.cluster.preset, recipe.cluster.gpus_per_node, world=group_size)
        self.gpus_per_node = cluster.gpus_per_node
        self.cost_model = CostModel(ModelShape.of(model_cfg, tp), cluster)
        # sequences past the preset's attention table are priced at its last length's rate: said once
        self.table_note = attention_table_note(cluster, settings.max_doc_len or settings.budget,
                                               "this run's steps may hold")
        if self.table_note and split == "train":
            LOGGER.warning("parallel.balance: %s", self.table_note)
        # a preset probed at other shapes than this model's prices its plans off: said once
        self.shape_note = probe_shape_note(cluster, model_cfg, recipe.model.name)
        if self.shape_note and split == "train":
            LOGGER.warning("parallel.balance: %s", self.shape_note)
        # scan-based models (hybrid Mamba stacks): ring members hold contiguous chunks, no zigzag
        self.contiguous = kind_of(model_cfg).contiguous_sequence
        self.last_plan = None
        self.last_layout = None
        self.remapped_steps = 0  # steps whose layout remapped tokens (balance_remap auto decides per step)
        self.last_pieces: list = []  # inline: (Doc, start, stop) per sequence; ahead: (doc, source, record, start, stop)
        plan_args = {"strategy": strategy, "world": group_size, "capacity": self.capacity, "dp": dp, "cp": self.cp,
                     "gpus_per_node": self.gpus_per_node, "planner": self.cost_model.planner_kwargs(),
                     "contiguous": self.contiguous, "remap": self.remap, "cost_model": self.cost_model}
        self.maker = StepMaker(settings, self.loader.lanes, self.bins, balance_rank, plan_args)
        self.producer: RowProducer | None = None  # inline: the maker's RowProducer (every lane, lazy tokens)
        self.workers = settings.num_workers  # 0: inline; else one process produces steps ahead
        self._worker: tuple | None = None  # (process, step queue, relay, stop event) while producing ahead
        self._counters = dict(self.maker.counters)
        self.stop_pads = 0  # empty exchanges made when stopping a worker that lagged its peers (tests)
        # `length_ranks` (or the balancing group) learn unknown document lengths together
        # (data/pipeline.DocumentStream) when the stream has text sources whose lengths are learned by
        # tokenizing (with a length index, or streamed): over gloo groups of their own.
        stream = self.loader._stream
        needs_exchange = stream is not None and stream.learns_lengths_together
        ranks = list(length_ranks if length_ranks is not None else getattr(engine, "global_ranks", None) or [])
        self.exchange: GroupLengthExchange | None = None
        self._relay_exchange: GroupLengthExchange | None = None
        self._control: GroupLengthExchange | None = None
        if needs_exchange and len(ranks) > 1 and dist.is_initialized():
            groups = _length_groups(tuple(ranks))
            self.exchange = GroupLengthExchange(groups["inline"], len(ranks))
            self._relay_exchange = GroupLengthExchange(groups["relay"], len(ranks))
            self._control = GroupLengthExchange(groups["control"], len(ranks))

    # counters (tests assert on them) -----------------------------------------------------------
    @property
    def docs_read(self) -> int:
        """Documents whose tokens this rank read (a document per held sequence)."""
        return self._counters["docs_read"]

    @property
    def tokens_materialized(self) -> int:
        return self._counters["tokens_materialized"]

    @property
    def docs_tokenized(self) -> int:
        """Documents this rank tokenized (its share of unknown lengths, and the documents it holds)."""
        return self._counters["docs_tokenized"]

    @property
    def lengths_tokenized(self) -> int:
        """Documents this rank tokenized for its share of the lengths the group learns together."""
        return self._counters["lengths_tokenized"]

    @property
    def lengths_reused(self) -> int:
        """Of them, the documents this rank also held: their tokens were kept, not tokenized again."""
        return self._counters["lengths_reused"]

    def __iter__(self):
        return self

    # steps ------------------------------------------------------------------------------------
    def _next_inline(self) -> tuple:
        if self.maker.producer is None:
            self.maker.start(self.loader.cursor, self.exchange)
            self.producer = self.maker.producer
        out = self.maker.step()
        self._counters = dict(self.maker.counters)
        return out

    def _next_ahead(self) -> tuple:
        import queue

        if self._worker is None:
            self._start_worker()
        assert self._worker is not None
        proc, steps, relay, _ = self._worker
        while True:
            try:
                item = steps.get(timeout=1.0)
                break
            except queue.Empty:
                if not proc.is_alive():
                    self._stop_worker(orderly=False)
                    raise RuntimeError(f"data: balanced-batch worker {proc.name} exited with code {proc.exitcode}") from None
                if relay is not None and relay.error:
                    self._stop_worker(orderly=False)
                    raise RuntimeError(f"data: balanced-batch worker {proc.name}: length exchange failed: {relay.error}")
        if item[0] == "error":
            _, kind, text = item
            self._stop_worker(orderly=False)
            raise ValueError(text) if kind == "value" else RuntimeError(f"data: balanced-batch worker {proc.name}: {kind}: {text}")
        _, cursor, arrays, planned, pieces, deltas = item
        plan, layout = pickle.loads(planned)
        if cursor != self.loader.cursor:
            raise RuntimeError(f"data: balanced-batch worker {proc.name} sent the step at row {cursor}, "
                               f"expected row {self.loader.cursor}")
        for key, value in deltas.items():
            self._counters[key] += value
        return arrays, plan, layout, pieces

    def __next__(self) -> dict:
        arrays, plan, layout, pieces = self._next_inline() if not self.workers else self._next_ahead()
        self.loader.cursor += self.bins  # the cursor of steps consumed (a worker may have produced more)
        self.engine.set_step(layout)
        self.last_plan, self.last_layout, self.last_pieces = plan, layout, pieces
        self.remapped_steps += layout.to_attention is not None
        return {key: torch.from_numpy(arrays[key])[None] for key in ("tokens", "labels", "positions", "doc_ids")}

    # the worker -------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        steps = ctx.Queue(maxsize=max(1, self.loader.settings.prefetch))
        relay, child_conn, group = None, None, None
        if self._relay_exchange is not None:
            parent_conn, child_conn = ctx.Pipe()
            relay = _Relay(parent_conn, self._relay_exchange)
            group = (self._relay_exchange.rank, self._relay_exchange.size)
        stop = ctx.Event()
        proc = ctx.Process(target=balanced_worker_main, daemon=True, name=f"longtrain-balance-data-{self.rank}",
                           args=(self.maker, self.loader.cursor, child_conn, group, steps, stop))
        proc.start()
        if relay is not None:
            relay.start()
        self._worker = (proc, steps, relay, stop)

    def _stop_worker(self, orderly: bool = True) -> None:
        """End the worker; then (orderly: every rank of the group stops its worker at the same step,
        as close() and load_state_dict() do) every rank has made the same number of length exchanges
        on the relay group (a rank whose worker had run further waits in one: the others make up the
        difference with empty ones), so the group is quiet for the next worker. Not orderly (this
        rank's worker failed): the relay is abandoned, and the group with it."""
        if self._worker is None:
            return
        proc, steps, relay, stop = self._worker
        self._worker = None
        stop.set()  # a worker waiting to hand over a step writes its length index and ends
        proc.join(timeout=WORKER_STOP_S if orderly else 0)
        if proc.is_alive():  # (busy in a step, or waiting in a length exchange)
            proc.terminate()
        proc.join(timeout=5)
        steps.cancel_join_thread()
        steps.close()
        if relay is None:
            return
        relay.stop.set()
        relay.join(timeout=1.0)
        exchange, control = self._relay_exchange, self._control
        assert exchange is not None and control is not None
        if orderly and not relay.error:
            try:
                issued = control.max(np.array([relay.count], np.int64))
                if not relay.is_alive():  # (alive: waiting in its last exchange, which is the latest of all)
                    for _ in range(int(issued[0]) - relay.count):
                        exchange.max(np.full(self.maker.resolve_block, NOT_INDEXED, np.int64))
                        self.stop_pads += 1
                relay.join(timeout=5.0)
            except RuntimeError:  # a peer did not stop in time (it failed): the relay group is abandoned
                pass
        if relay.is_alive() or relay.error:
            self._relay_exchange = self._control = None  # never reused: a later worker runs without
        relay.conn.close()

    # the loader's global cursor ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stop_worker()
        self.loader.load_state_dict(state)
        self.maker.close()  # packs again from the loaded cursor
        self.producer = None

    def close(self) -> None:
        self._stop_worker()
        self.loader.close()
        self.maker.close()
        self.producer = None


def balanced_worker_main(maker: StepMaker, cursor: int, conn, exchange: tuple | None, steps, stop) -> None:
    """Produce this rank's balanced steps from `cursor` into `steps` until `stop` is set (then write
    the length index and end) or the process is terminated. Lengths the group learns together go
    through `conn` to the training process, which makes the collective (a worker process has no
    process group)."""
    import os
    import queue

    from longtrain.data.pipeline import exit_with_parent

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_with_parent()  # a rank killed mid-step leaves no worker behind
    try:
        maker.start(cursor, _PipeExchange(conn, *exchange) if exchange is not None else None)
        while True:
            at = maker.cursor
            before = dict(maker.counters)
            arrays, plan, layout, pieces = maker.step()
            deltas = {key: value - before[key] for key, value in maker.counters.items()}
            records = [(doc.index, doc.source, doc.record, start, stop) for doc, start, stop in pieces]
            # plain pickle bytes: the queue's pickler would move the layout's tensors through shared
            # memory, a few ms per tensor on the receiving side (measured), longer than the copy
            item = ("step", at, arrays, pickle.dumps((plan, layout)), records, deltas)
            while not stop.is_set():
                try:
                    steps.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                maker.close()  # writes the length index
                return
    except BaseException as err:  # one line to the trainer
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        steps.put(("error", "value" if isinstance(err, ValueError) else type(err).__name__, text))


class _PipeExchange:
    """data/pipeline.LengthExchange in a worker: the training process's relay makes the collective."""

    def __init__(self, conn, rank: int, size: int):
        self.conn, self.rank, self.size = conn, rank, size

    def max(self, values: np.ndarray) -> np.ndarray:
        self.conn.send(values)
        return self.conn.recv()


class _Relay(threading.Thread):
    """In the training process: makes the worker's length exchanges on the relay group. It waits on
    the pipe or in gloo (the GIL released), so the training step is not slowed."""

    def __init__(self, conn, exchange: "GroupLengthExchange"):
        super().__init__(daemon=True, name="longtrain-balance-relay")
        self.conn, self.exchange = conn, exchange
        self.stop = threading.Event()
        self.count = 0  # exchanges begun
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.conn.poll(0.05):
                    continue
                values = self.conn.recv()
                self.count += 1
                out = self.exchange.max(values)
                self.conn.send(out)
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            pass  # the worker ended
        except Exception as err:  # noqa: BLE001 - reported by the next next()
            self.error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


_LENGTH_GROUPS: dict = {}
WORKER_STOP_S = 2.0  # a stopping worker's time to write its length index before it is terminated
GROUP_TIMEOUT = timedelta(minutes=30)  # a rank waits this long for the group's slowest producer
STOP_TIMEOUT = timedelta(seconds=120)  # ranks stop their workers (close, load_state_dict) this close together


def _length_groups(ranks: tuple) -> dict:
    """Three gloo groups over the ranks that learn lengths together (the world in the trainer, else a
    balancing group): "inline" (the main thread's exchanges), "relay" (a worker's exchanges, made by
    the relay thread) and "control" (the exchange count agreed when workers stop, with a short
    timeout: a failed peer never stops its worker). Created once per process: every rank of the world
    takes part (every rank's groups are created in one order), at the first balanced loader, which
    every rank builds at the same point. Every member must name the same group (else the exchanges
    would wait on ranks that never make them): checked when the groups are made, one line otherwise."""
    key = (id(dist.group.WORLD), ranks)
    if key not in _LENGTH_GROUPS:
        members: list = [None] * dist.get_world_size()
        dist.all_gather_object(members, ranks)
        # checked alike on every rank (all fail together)
        differ = [(r, q) for r, named in enumerate(members) for q in named if members[q] != named]
        if differ:
            r, q = differ[0]
            raise RuntimeError(f"data: the ranks learning document lengths together disagree: rank {r} names "
                               f"{list(members[r])}, rank {q} names {list(members[q])}")
        for member in sorted(set(members)):
            made = {name: dist.new_group(list(member), backend="gloo", timeout=timeout)
                    for name, timeout in (("inline", GROUP_TIMEOUT), ("relay", GROUP_TIMEOUT),
                                          ("control", STOP_TIMEOUT))}
            if member == ranks:
                _LENGTH_GROUPS[key] = made
    return _LENGTH_GROUPS[key]


class GroupLengthExchange:
    """data/pipeline.LengthExchange over the ranks that learn lengths together: an element-wise max
    all-reduce of an int64 array on a gloo group of its own (CPU tensors; never interleaved with the
    step's collectives on the engine's group)."""

    def __init__(self, group, size: int):
        self.group = group
        self.rank, self.size = dist.get_rank(group), size
        self.calls = 0

    def max(self, values: np.ndarray) -> np.ndarray:
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64).copy())
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        self.calls += 1
        return out.numpy()
