"""Balanced batches from a text source with a real tokenizer (jsonl + sentencepiece): document lengths
come from the token-length index (data/length_index.py) and, the first time, from the balancing group
(each rank tokenizes 1/N of the unknown lengths, the group all-reduces them), so a rank tokenizes only
its share of the lengths and the documents it holds, not every document of the step.

In one 4-rank gloo group (cp4, zeppelin): a cold cache (lengths split over the ranks, the batches
token for token those of the plain packer without any index), a warm cache (no document tokenized
for its length; a rank tokenizes only what it holds), a resume from a saved cursor (identical
batches), a modified source file (its index is not trusted: lengths learned again, batches of the
new file). In one process: a corrupt index file is ignored, a tampered one fails with one line."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from balance_cases import VARLEN
from distributed import run_group

STEPS = 4


class _Engine:
    def __init__(self, ranks=None):
        self.global_ranks = ranks

    def set_step(self, layout):
        self.layout = layout


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "eta", "日本", "x=1;", "def", "return"]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(2, 90)))) for _ in range(n)]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from longtrain.launcher.cli import main

    root = tmp_path_factory.mktemp("balance_data")
    _write(root / "docs.jsonl", _texts(700, 1))
    model = root / "tok.model"
    assert main(["tokenizer", "train", "--source", str(root / "docs.jsonl"), "--vocab-size", "300",
                 "--out", str(model)]) == 0
    return root


def _overrides(root, world, tp=1):
    return VARLEN + [f"data.source={root / 'docs.jsonl'}", f"data.tokenizer={root / 'tok.model'}",
                     f"parallel.cp={world}", f"parallel.tp={tp}", "parallel.sequence_parallel=false",
                     "parallel.balance=zeppelin", "parallel.balance_bins=2", f"run.launch.nproc_per_node={world * tp}"]


def _balanced(root, rank, world, ranks, extra=(), tp=1, length_ranks=None):
    """Rank `rank` of a balancing group of `world` ranks (global `ranks`), with `tp` peers each."""
    from longtrain.launcher.balanced_batches import BalancedBatches
    from longtrain.launcher.config import load_recipe
    from longtrain.models.sizes import resolve_model_config

    recipe = load_recipe(None, _overrides(root, world, tp) + list(extra))
    return BalancedBatches(recipe, recipe.parallel.balance, _Engine(ranks), rank, world, dp=1,
                           model_cfg=resolve_model_config(recipe.model), tp=tp, length_ranks=length_ranks)


def _plain_rows(settings, lanes, steps, bins):
    """The packed rows of the same stream without any index: every document tokenized."""
    from longtrain.data.pipeline import DocumentStream, RowProducer

    producer = RowProducer(settings, lanes, list(range(lanes)), stream=DocumentStream(settings, length_index=False))
    out = []
    for step in range(steps):
        rows = [producer.materialize(k)[0] for k in range(step * bins, (step + 1) * bins)]
        out.append({key: np.concatenate([r[key] for r in rows]) for key in ("tokens", "labels", "positions")})
    return out


def _run(batches, steps, plain=None, first_step=0):
    """This rank's batches; checked against the plain rows at the tokens the layout gives this rank."""
    got = []
    for step in range(first_step, first_step + steps):
        batch = next(batches)
        ids = batches.last_layout.linear_ids
        if plain is not None:
            for key in ("tokens", "labels", "positions"):
                assert np.array_equal(batch[key][0].numpy(), plain[step][key][ids]), (step, key)
        got.append({key: batch[key].clone() for key in ("tokens", "labels", "positions")})
    return got


def _counts(batches):
    stream = batches.producer.stream
    return {"tokenized": batches.docs_tokenized, "for_lengths": batches.lengths_tokenized, "read": batches.docs_read,
            "fetched": batches.producer.next_doc, "loaded": sum(ix.loaded for ix in stream.lengths if ix),
            "stale": any(ix.stale for ix in stream.lengths if ix), "exchanges": batches.exchange.calls}


def group_case(root):
    import torch.distributed as dist

    from longtrain.data.pipeline import RESOLVE_BLOCK

    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = list(range(world))
    gather = lambda value: (dist.all_gather_object(out := [None] * world, value), out)[1]  # noqa: E731
    result = {}

    # cold cache: lengths learned together, batches those of the plain packer
    cold = _balanced(root, rank, world, ranks)
    plain = _plain_rows(cold.loader.settings, cold.loader.lanes, STEPS, cold.bins)
    first = _run(cold, STEPS, plain)
    result["cold"] = gather(_counts(cold))
    result["resolved_docs"] = (cold.producer.stream._resolved_block + 1) * RESOLVE_BLOCK
    cold.close()  # writes the index
    dist.barrier()

    # warm cache: no document tokenized for its length
    warm = _balanced(root, rank, world, ranks)
    _run(warm, 2, plain)
    state_at_2 = warm.state_dict()
    _run(warm, STEPS - 2, plain, first_step=2)
    result["warm"] = gather(_counts(warm))
    warm.close()

    # resume from the cursor after step 2: identical batches
    resumed = _balanced(root, rank, world, ranks)
    resumed.load_state_dict(state_at_2)
    again = _run(resumed, STEPS - 2, plain, first_step=2)
    for a, b in zip(again, first[2:]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    result["resumed"] = gather(_counts(resumed))
    resumed.close()
    dist.barrier()

    # produced ahead by a worker process, from a cold cache: the worker's length exchanges go through
    # the training process's relay; small blocks, so that ranks' workers stop at different exchanges
    cache = os.environ["LONGTRAIN_CACHE"]
    os.environ["LONGTRAIN_CACHE"] = cache + "-ahead"
    ahead = _balanced(root, rank, world, ranks, ["data.num_workers=1", "data.prefetch=2"])
    ahead.maker.resolve_block = 16
    got = _run(ahead, 3, plain)
    assert ahead.state_dict()["cursor"] == 3 * ahead.bins  # steps consumed, not produced
    ahead.load_state_dict(state_at_2)  # stops the worker mid-run (orderly), restarts it at the cursor
    got += _run(ahead, 2, plain, first_step=2)
    for a, b in zip(got, first[:3] + first[2:4]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    result["ahead"] = gather({"pads": ahead.stop_pads, "for_lengths": ahead.lengths_tokenized,
                              "tokenized": ahead.docs_tokenized, "read": ahead.docs_read})
    ahead.close()
    os.environ["LONGTRAIN_CACHE"] = cache
    dist.barrier()

    # the checkpointed cursor on a group of another size (two cp2 groups, ranks 0-1 and 2-3): the same
    # global rows, each rank's tokens those of the layout of its group's plan
    pair = [rank - rank % 2, rank - rank % 2 + 1]
    other = _balanced(root, rank % 2, 2, pair)
    other.load_state_dict(state_at_2)
    _run(other, STEPS - 2, plain, first_step=2)
    assert other.state_dict()["cursor"] == STEPS * other.bins and other.exchange is not None
    other.close()
    dist.barrier()

    # the source file changes: its index is not trusted, the batches are the new file's
    if rank == 0:
        path = root / "docs.jsonl"
        _write(path, _texts(700, 2))
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    dist.barrier()
    changed = _balanced(root, rank, world, ranks)
    _run(changed, 2, _plain_rows(changed.loader.settings, changed.loader.lanes, 2, changed.bins))
    result["changed"] = gather(_counts(changed))
    changed.close()
    return result


def test_lengths_split_over_the_group_then_indexed(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    world = 4
    result = run_group(world, group_case, corpus)
    cold, warm, resumed, changed = (result[k] for k in ("cold", "warm", "resumed", "changed"))
    resolved = result["resolved_docs"]
    print("cold:", cold, "\nwarm:", warm, "\nresumed:", resumed, "\nchanged:", changed, "\nahead:", result["ahead"])
    # cold: every document the packer looked at had its length tokenized by exactly one rank
    assert all(c["fetched"] <= resolved for c in cold)
    assert sum(c["for_lengths"] for c in cold) == resolved
    assert all(c["for_lengths"] in (resolved // world, -(-resolved // world)) for c in cold)
    assert all(c["exchanges"] >= 2 and c["loaded"] == 0 for c in cold)
    # and a rank tokenized besides only documents it holds, far fewer than the step's documents
    for c in cold:
        held = c["tokenized"] - c["for_lengths"]
        assert held <= c["read"] and c["tokenized"] < c["fetched"], c
    # warm: the index gives every length; a rank tokenizes only what it holds
    for c in warm + resumed:
        assert c["for_lengths"] == 0 and c["loaded"] >= resolved and not c["stale"], c
        assert 0 < c["tokenized"] <= c["read"] < c["fetched"], c
    # ahead: the lengths were split over the ranks' workers too (no rank tokenized every length)
    ahead = result["ahead"]
    assert all(0 < c["for_lengths"] < c["tokenized"] for c in ahead), ahead
    # changed file: the old index is stale, lengths are learned again (split over the group)
    assert all(c["stale"] and c["loaded"] == 0 and c["for_lengths"] > 0 for c in changed)


def test_corrupt_index_ignored_tampered_index_fails(corpus, tmp_path, monkeypatch):
    from longtrain.data.length_index import SourceLengths

    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    first = _balanced(corpus, 0, 2, None)  # no group: this rank tokenizes every length itself
    _run(first, 2)
    stream, fetched = first.producer.stream, first.producer.next_doc
    assert first.lengths_tokenized == 0 and stream.tokenized >= fetched
    first.close()
    index = next(ix for ix in stream.lengths if ix)
    path = index.path
    assert path.exists() and str(path).startswith(str(tmp_path / "cache"))
    known = np.flatnonzero(np.load(path)["lengths"] >= 0)
    assert len(known) >= fetched

    def reopened():
        return SourceLengths(index.identity, index.key["tokenizer"], True, True)

    assert reopened().loaded == len(known) and not reopened().stale
    path.write_bytes(b"not an index")  # corrupt: ignored and rebuilt
    again = reopened()
    assert again.stale and again.loaded == 0
    second = _balanced(corpus, 0, 2, None)
    _run(second, 2)
    assert second.producer.stream.tokenized >= second.producer.next_doc  # learned again
    second.close()
    assert reopened().loaded == len(known)
    # a tampered index (the identity matches, a length does not): one line naming the index
    with np.load(path) as f:
        meta, lengths = f["meta"], f["lengths"].copy()
    lengths[known] += 1
    np.savez(path, meta=meta, lengths=lengths)
    third = _balanced(corpus, 0, 2, None)
    with pytest.raises(ValueError, match=r"token-length index .* says \d+; the index is stale"):
        _run(third, 2)
    third.close()


def test_worker_gives_the_inline_batches_and_one_line_errors(corpus, tmp_path, monkeypatch):
    """data.num_workers 1 (steps produced ahead in a process; no group: lengths tokenized by the
    worker itself) gives the batches of num_workers 0; a malformed record met by the worker stops
    the trainer with its one line."""
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    inline = _balanced(corpus, 1, 2, None)
    expected = _run(inline, 3)
    inline.close()
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache-ahead"))  # the worker writes its own index
    ahead = _balanced(corpus, 1, 2, None, ["data.num_workers=1"])
    got = _run(ahead, 3)
    assert ahead.maker.producer is None and ahead._worker is not None  # produced in the worker
    assert ahead.docs_read == inline.docs_read and ahead.tokens_materialized == inline.tokens_materialized
    for a, b in zip(got, expected):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ahead.state_dict() == inline.state_dict()
    ahead.close()  # the worker stops, and writes the lengths it learned
    assert len(list((tmp_path / "cache-ahead" / "token_lengths").glob("*.npz"))) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (corpus / "docs.jsonl").read_text().splitlines()
    lines[5] = '{"text": "unterminated'
    (bad / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (bad / "tok.model").write_bytes((corpus / "tok.model").read_bytes())
    broken = _balanced(bad, 0, 2, None, ["data.num_workers=1"])
    with pytest.raises(ValueError, match=r"^data.source: .*docs.jsonl:6: not valid JSON"):
        _run(broken, 3)
    broken.close()


def train_counted(cases: list) -> list[dict]:
    """Train each (cache directory, recipe overrides) case in this group: the losses, the cursor and
    every rank's length counters of the train loader."""
    import torch.distributed as dist

    from balance_cases import VARLEN as base
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = []
    for cache, overrides in cases:
        os.environ["LONGTRAIN_CACHE"] = cache
        trainer = Trainer(load_recipe(None, base + overrides + [f"run.launch.nproc_per_node={dist.get_world_size()}"]))
        result = trainer.run()
        loader = trainer.loader
        counts = {"for_lengths": loader.lengths_tokenized, "tokenized": loader.docs_tokenized,
                  "reused": loader.lengths_reused, "exchange": loader.exchange.size if loader.exchange else 0}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, counts)
        out.append({"losses": result.losses, "cursor": loader.state_dict()["cursor"], "counts": gathered})
        dist.barrier()
    return out


def test_trainer_same_losses_inline_and_ahead(corpus, tmp_path, monkeypatch):
    """The trainer under zeppelin at cp2 on the jsonl + sentencepiece source: the same per-step losses
    with the steps made inline (num_workers 0, lengths learned by the group) and ahead in a worker
    (num_workers 1, the lengths from the index the first run wrote). At tp2 x cp2 (4 ranks, cold
    indexes, inline and ahead): the losses of cp2, and the world learned the lengths: the documents
    tokenized for lengths over the 4 ranks are those of the 2 cp2 ranks (not twice as many)."""
    cache = str(tmp_path / "cache")
    base = [f"data.source={corpus / 'docs.jsonl'}", f"data.tokenizer={corpus / 'tok.model'}", "model.vocab_size=300",
            "parallel.cp=2", "parallel.balance=zeppelin", "parallel.balance_bins=2", "train.steps=3",
            "train.eval_every=2", "data.eval_batches=1"]  # eval batches exchange lengths inline beside the relay
    inline, ahead = run_group(2, train_counted, [(cache, base + ["data.num_workers=0"]),
                                                 (cache, base + ["data.num_workers=1"])])
    assert sorted(inline["losses"]) == [1, 2, 3] and inline["cursor"] == ahead["cursor"] == 6
    for step in (1, 2, 3):
        assert abs(inline["losses"][step] - ahead["losses"][step]) <= 1e-6 * abs(inline["losses"][step]), step
    assert list((tmp_path / "cache" / "token_lengths").glob("*.npz"))  # the index the first run wrote
    assert all(c["exchange"] == 2 and c["for_lengths"] > 0 for c in inline["counts"])
    assert all(c["for_lengths"] == 0 for c in ahead["counts"])  # warm
    tp = base + ["parallel.tp=2", "parallel.sequence_parallel=false"]
    tp_inline, tp_ahead = run_group(4, train_counted, [(cache + "-tp", tp + ["data.num_workers=0"]),
                                                       (cache + "-tp-ahead", tp + ["data.num_workers=1"])])
    print(inline, tp_inline, tp_ahead)
    for run in (tp_inline, tp_ahead):
        assert sorted(run["losses"]) == [1, 2, 3] and run["cursor"] == 6
        for step in (1, 2, 3):
            assert abs(run["losses"][step] - inline["losses"][step]) <= 1e-5 * abs(inline["losses"][step]), step
        assert all(c["exchange"] == 4 and c["for_lengths"] > 0 for c in run["counts"]), run
    # inline, cold: the same documents' lengths learned, split over 4 ranks instead of 2 (each once)
    assert sum(c["for_lengths"] for c in tp_inline["counts"]) == sum(c["for_lengths"] for c in inline["counts"])


def _held(batches, batch):
    """(global document, source, record) of every document this rank holds tokens of in the last step."""
    pieces = batches.last_pieces
    out = set()
    for seq in np.unique(batch["doc_ids"][0].numpy()).tolist():
        piece = pieces[seq]
        out.add((piece[0].index, piece[0].source, piece[0].record) if len(piece) == 3 else piece[:3])
    return out


def tp_case(root):
    """tp2 x cp2 laid out by the real mesh (parallel/mesh.py: tp innermost, so the balancing groups are
    {0, 2} and {1, 3}), on a cold index: the world learns the lengths (each rank 1/4 of them) and a
    held document this rank tokenized for its length is not tokenized again; then as before the
    change (lengths learned per balancing group, tokens not kept: the test's contrast); then ahead in
    worker processes."""
    import collections

    import torch.distributed as dist

    from longtrain.data.pipeline import DocumentStream
    from longtrain.parallel.mesh import Mesh, ParallelDims

    world = dist.get_world_size()
    mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=2, tp=2), "cpu")
    group = dist.get_process_group_ranks(mesh["loss"].get_group())
    balance_rank = mesh.local_rank("loss")
    gather = lambda value: (dist.all_gather_object(out := [None] * world, value), out)[1]  # noqa: E731
    cache = os.environ["LONGTRAIN_CACHE"]
    encoded: list = []  # (source, record) of every text this process tokenizes
    original = DocumentStream._tokens_of

    def recording(self, payload, source, record):
        if isinstance(payload, str) and payload:
            encoded.append((source, record))
        return original(self, payload, source, record)

    result = {"groups": gather(group)}
    for name, length_ranks, keep, extra in (("world", list(range(world)), True, []),
                                            ("before", None, False, []),
                                            ("ahead", list(range(world)), True, ["data.num_workers=1"])):
        os.environ["LONGTRAIN_CACHE"] = f"{cache}-{name}"  # a cold index for each
        batches = _balanced(root, balance_rank, 2, group, extra, tp=2, length_ranks=length_ranks)
        batches.maker.keep_length_tokens = keep
        batches.maker.resolve_block = 16 if name == "ahead" else 32  # several blocks: kept tokens dropped per block
        plain = _plain_rows(batches.loader.settings, batches.loader.lanes, STEPS, batches.bins)
        encoded.clear()
        DocumentStream._tokens_of = recording
        try:
            held: set = set()
            for step in range(STEPS):
                batch = next(batches)
                ids = batches.last_layout.linear_ids
                for key in ("tokens", "labels", "positions"):
                    assert np.array_equal(batch[key][0].numpy(), plain[step][key][ids]), (name, step, key)
                held |= _held(batches, batch)
                if batches.producer is not None:  # kept tokens: at most this rank's share of one block
                    assert len(batches.producer.stream._length_tokens) <= batches.maker.resolve_block // world
        finally:
            DocumentStream._tokens_of = original
        inline = batches.producer is not None
        twice = sum(n - 1 for n in collections.Counter(encoded).values())
        result[name] = gather({
            "tokenized": batches.docs_tokenized, "for_lengths": batches.lengths_tokenized,
            "reused": batches.lengths_reused, "held": len(held), "exchange": (batches.exchange.rank, batches.exchange.size),
            "held_in_share": sum(1 for d, _, _ in held if d % batches.exchange.size == batches.exchange.rank),
            "encoded": len(encoded) if inline else None, "twice": twice if inline else None,
            "held_encoded": all((s, r) in set(encoded) for _, s, r in held) if inline else None,
            "resolved": (batches.producer.stream._resolved_block + 1) * batches.maker.resolve_block if inline else None})
        batches.close()
        dist.barrier()
    os.environ["LONGTRAIN_CACHE"] = cache
    # ranks that name different groups to learn lengths with fail together, in one line
    from longtrain.launcher.balanced_batches import _length_groups

    with pytest.raises(RuntimeError, match=r"^data: the ranks learning document lengths together disagree: rank 2 "
                                           r"names \[1, 2, 3\], rank 1 names \[0, 1\]$"):
        _length_groups((0, 1) if dist.get_rank() < 2 else (1, 2, 3))  # (groups not made yet in this process)
    return result


def test_world_learns_lengths_once_and_held_documents_are_tokenized_once(corpus, tmp_path, monkeypatch):
    """tp2 x cp2 (two balancing groups of two): the documents tokenized for lengths, summed over all
    4 ranks, are the resolved documents each once (before: each once per tp slice), a rank tokenizes
    no document twice (its length share's tokens are used when it holds the document; before: some
    were tokenized twice), the counters say so, and the batches are the plain packer's."""
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    result = run_group(4, tp_case, corpus)
    print({k: v for k, v in result.items()})
    assert result["groups"] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # the mesh's balancing groups
    world, before, ahead = result["world"], result["before"], result["ahead"]
    resolved = world[0]["resolved"]
    assert all(c["resolved"] == resolved for c in world + before) and resolved >= 4 * 32
    assert [c["exchange"] for c in world] == [(r, 4) for r in range(4)]
    assert [c["exchange"] for c in before] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    # the world: every length tokenized once over the job, a quarter per rank
    assert sum(c["for_lengths"] for c in world) == resolved
    assert all(c["for_lengths"] == resolved // 4 for c in world), world
    # before: once per balancing group, i.e. tp times over the job
    assert sum(c["for_lengths"] for c in before) == 2 * resolved
    for c in world:
        # no document tokenized twice by one rank; the counters are the encodes made
        assert c["twice"] == 0 and c["encoded"] == c["tokenized"] and c["held_encoded"], c
        # the held documents of its share reused their tokens; the others tokenized when held
        assert c["reused"] == c["held_in_share"] and c["tokenized"] == c["for_lengths"] + c["held"] - c["reused"], c
    assert sum(c["reused"] for c in world) > 0
    for c in before:  # the contrast: a held document of the rank's share tokenized again
        assert c["reused"] == 0 and c["encoded"] == c["tokenized"] == c["for_lengths"] + c["held"], c
    assert sum(c["twice"] for c in before) > 0
    # ahead in worker processes (the stream lives in the worker): the same accounting
    for r, c in enumerate(ahead):
        assert c["exchange"] == (r, 4) and c["reused"] == c["held_in_share"], c
        assert c["tokenized"] == c["for_lengths"] + c["held"] - c["reused"], c
    assert sum(c["reused"] for c in ahead) > 0


def stream_case(root):
    """A blend of a random-access jsonl source and the same kind of file streamed through `datasets`
    (format hf_jsonl: sequential), cp4 zeppelin, cold then warm index: per rank the documents it
    tokenized of each source, and its counters."""
    import collections

    import torch.distributed as dist

    from longtrain.data.pipeline import DocumentStream

    rank, world = dist.get_rank(), dist.get_world_size()
    gather = lambda value: (dist.all_gather_object(out := [None] * world, value), out)[1]  # noqa: E731
    blend = [f"data.sources=[{{path: {root / 'docs.jsonl'}}}, {{path: {root / 'streamed.jsonl'}, format: hf_jsonl}}]"]
    encoded: list = []
    original = DocumentStream._tokens_of

    def recording(self, payload, source, record):
        if isinstance(payload, str) and payload:
            encoded.append((source, record))
        return original(self, payload, source, record)

    result = {}
    for name in ("cold", "warm"):
        batches = _balanced(root, rank, world, list(range(world)), blend)
        batches.maker.resolve_block = 32  # several blocks: read-ahead texts and kept tokens dropped per block
        plain = _plain_rows(batches.loader.settings, batches.loader.lanes, STEPS, batches.bins)
        encoded.clear()
        DocumentStream._tokens_of = recording
        try:
            _run(batches, STEPS, plain)
        finally:
            DocumentStream._tokens_of = original
        stream = batches.producer.stream
        fetched = stream.blend
        per_source = collections.Counter(fetched.locate(d)[0] for d in range(batches.producer.next_doc))
        assert not stream._read_ahead or len(stream._read_ahead) <= batches.maker.resolve_block
        result[name] = gather({**_counts(batches), "exchange": batches.exchange is not None,
                               "encoded": collections.Counter(s for s, _ in encoded), "fetched_per_source": per_source,
                               "twice": sum(n - 1 for n in collections.Counter(encoded).values()),
                               "resolved": (stream._resolved_block + 1) * batches.maker.resolve_block})
        batches.close()  # writes the indexes
        dist.barrier()
    # a streamed source without a length index (a hub dataset has none): lengths still learned together
    from longtrain.launcher.balanced_batches import GroupLengthExchange

    settings = batches.loader.settings
    settings = dataclasses.replace(settings, sources=settings.sources[1:])
    stream = DocumentStream(settings, length_index=False, resolve_block=32,
                            exchange=GroupLengthExchange(dist.new_group(list(range(world)), backend="gloo"), world))
    lengths = [stream.fetch(d, need_tokens=False).length for d in range(80)]
    result["no_index"] = gather({"lengths": lengths, "tokenized": stream.tokenized,
                                 "for_lengths": stream.tokenized_for_lengths, "exchange": stream.exchange is not None})
    plain = DocumentStream(settings, length_index=False)  # no group: every document tokenized here
    result["plain_lengths"] = [plain.fetch(d).length for d in range(80)]
    return result


def test_streamed_source_lengths_split_over_the_group(corpus, tmp_path, monkeypatch):
    """A streamed (sequential) source: every rank reads the stream, but each tokenizes only its share
    of the unknown lengths and the documents it holds (before: every rank tokenized every document it
    packed); the batches are the plain packer's; a warm index tokenizes no length."""
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    _write(corpus / "streamed.jsonl", _texts(500, 3))
    result = run_group(4, stream_case, corpus)
    cold, warm = result["cold"], result["warm"]
    print("cold:", cold, "\nwarm:", warm)
    resolved = cold[0]["resolved"]
    assert all(c["exchange"] and c["resolved"] == resolved for c in cold)
    # each length tokenized once over the group, a quarter per rank
    assert sum(c["for_lengths"] for c in cold) == resolved
    assert all(c["for_lengths"] in (resolved // 4, -(-resolved // 4)) for c in cold), cold
    for c in cold:
        streamed_fetched = c["fetched_per_source"][1]
        assert streamed_fetched >= 30, c  # the streamed source is in the steps
        # far fewer streamed documents tokenized than packed: its share plus what it holds
        assert 0 < c["encoded"][1] < streamed_fetched * 0.6, c
        assert c["twice"] == 0 and c["tokenized"] == sum(c["encoded"].values()), c
    for c in warm:
        assert c["for_lengths"] == 0 and c["loaded"] >= resolved and not c["stale"], c
        assert c["encoded"][1] < c["fetched_per_source"][1] * 0.5, c
    # no index: the lengths are the plain tokenizer's, each rank tokenized a quarter of the 96 resolved
    for c in result["no_index"]:
        assert c["exchange"] and c["lengths"] == result["plain_lengths"], c
        assert c["tokenized"] == c["for_lengths"] == 96 // 4, c
