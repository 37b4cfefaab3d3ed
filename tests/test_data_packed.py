"""The streamed, packed data pipeline: packing invariants, exact resume at any dp degree,
blending, megatron indexed datasets, Hugging Face streaming, bad input. Ranks are simulated in one
process (the loader takes dp_rank / dp_degree)."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from longtrain.data.config import DataConfig
from longtrain.data.loader import build_loader
from longtrain.data.packing import IGNORE_INDEX, attention_mask_from_doc_ids, cu_seqlens_from_doc_ids
from longtrain.data.pipeline import BLEND_BLOCK, Blend, DataSettings, DocumentStream
from longtrain.data.tokenizers import ByteTokenizer


def cfg(**overrides):
    fields = dict(source="builtin", sources=[], tokenizer="bytes", seq_len=256, batch_size=2, packing="concat",
                  num_workers=0, lanes=0, text_field="text", skip_bad_records=False)
    fields.update(overrides)
    return DataConfig(**fields)


def loader(dp_rank=0, dp_degree=1, seed=0, **overrides):
    return build_loader(cfg(**overrides), dp_rank=dp_rank, dp_degree=dp_degree, seed=seed)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def words(n, seed, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "eta", "日本", "\t", "  ", "x=1;"]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(lo, hi)))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Packing invariants
# ----------------------------------------------------------------------------------------------
def check_batch(batch, pieces, stream, row_len=None):
    """Every token is its document's token; doc_ids, positions, labels and the attention mask
    follow the true document of every token."""
    B, S = batch["tokens"].shape
    for key in ("tokens", "labels", "positions", "doc_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (B, S)
    if row_len is not None:
        assert S == row_len
    docs = {}
    for b in range(B):
        tokens, labels = batch["tokens"][b], batch["labels"][b]
        positions, doc_ids = batch["positions"][b], batch["doc_ids"][b]
        true_doc = torch.full((S,), -1, dtype=torch.int64)
        at = 0
        for i, (d, source, record, start, stop) in enumerate(pieces[b]):
            if d not in docs:
                docs[d] = torch.from_numpy(stream.fetch(d).tokens)
            doc = docs[d]
            n = stop - start
            assert torch.equal(tokens[at:at + n], doc[start:stop])
            assert torch.equal(positions[at:at + n], torch.arange(n))  # restart at every piece
            assert (doc_ids[at:at + n] == i).all()
            want = torch.cat([doc[start + 1:stop + 1], torch.tensor([IGNORE_INDEX] * (stop + 1 > len(doc)))])
            assert torch.equal(labels[at:at + n], want)  # the document's next token, or -100 at its end
            true_doc[at:at + n] = d
            at += n
        assert (doc_ids[at:] == -1).all() and (labels[at:] == IGNORE_INDEX).all()  # padding at the end
        # attention allowed only within one true document (same doc id >= 0 and causal)
        mask = attention_mask_from_doc_ids(doc_ids)
        q, k = torch.nonzero(mask, as_tuple=True)
        assert (true_doc[q] == true_doc[k]).all() and (true_doc[q] >= 0).all() and (k <= q).all()
        # boundaries
        cu = cu_seqlens_from_doc_ids(doc_ids)
        assert cu.dtype == torch.int32 and cu[0] == 0 and int(cu[-1]) == at
        assert torch.equal(cu.diff().long(), torch.tensor([stop - start for *_, start, stop in pieces[b]]))
        starts = cu[:-1].long()
        assert (positions[starts] == 0).all()
        # a label never crosses to another document: a document's last token predicts nothing
        eos_mask = tokens == stream.tokenizer.eos_id
        assert (labels[eos_mask & (doc_ids >= 0)] == IGNORE_INDEX).all()
    return docs


@pytest.mark.parametrize("packing", ["concat", "whole", "varlen"])
def test_packed_batches_keep_documents_apart(packing):
    extra = {"max_doc_len": 300} if packing == "varlen" else {}
    ld = loader(packing=packing, seq_len=512, batch_size=3, **extra)
    stream = DocumentStream(ld.settings)
    seen_boundary = False
    for _ in range(25):
        batch = next(ld)
        pieces = ld.last_pieces
        if packing == "varlen":
            assert batch["tokens"].shape[0] == 1 and batch["tokens"].shape[1] <= 3 * 512
            assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_doc_ids(batch["doc_ids"][0]))
            assert all(stop - start <= 300 for *_, start, stop in pieces[0])  # kept whole up to the maximum
        check_batch(batch, pieces, stream, None if packing == "varlen" else 512)
        seen_boundary |= any(len(row) > 1 for row in pieces)
    assert seen_boundary
    if packing == "whole":  # a document shorter than a row is never split
        for row in ld.last_pieces:
            for d, _, _, start, stop in row:
                length = stream.fetch(d).length
                assert length > 512 or (start, stop) == (0, length)


def test_short_and_odd_documents(tmp_path):
    """Length-1 documents (text of one byte without BOS/EOS), odd lengths, rows full of tiny documents."""
    texts = ["a", "bc", "def", "x" * 17, "y"] * 40
    path = write_jsonl(tmp_path / "tiny.jsonl", texts)
    for packing in ("concat", "whole"):
        ld = loader(source=str(path), packing=packing, seq_len=7, batch_size=4, add_bos=False, add_eos=False)
        stream = DocumentStream(ld.settings)
        for _ in range(5):
            batch = next(ld)
            check_batch(batch, ld.last_pieces, stream, 7)


def test_packing_efficiency_on_builtin_at_4096():
    ld = loader(packing="concat", seq_len=4096, batch_size=4)
    for _ in range(25):
        next(ld)
    assert ld.efficiency >= 0.99
    ld = loader(packing="whole", seq_len=4096, batch_size=4)
    for _ in range(25):
        next(ld)
    assert ld.efficiency >= 0.97  # whole documents, first-fit over a 64-document window


def test_cu_seqlens_helper():
    row = torch.tensor([0, 0, 1, 2, 2, 2, -1, -1])
    assert cu_seqlens_from_doc_ids(row).tolist() == [0, 2, 3, 6]
    assert cu_seqlens_from_doc_ids(row, include_padding=True).tolist() == [0, 2, 3, 6, 8]
    assert cu_seqlens_from_doc_ids(torch.tensor([-1, -1])).tolist() == [0]
    with pytest.raises(ValueError, match="padding"):
        cu_seqlens_from_doc_ids(torch.tensor([0, -1, 1]))


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
def run_ranks(loaders, steps):
    """Rows in global order (step by step, rank by rank): (tokens row, pieces)."""
    rows = []
    for _ in range(steps):
        for ld in loaders:
            batch = next(ld)
            for b in range(batch["tokens"].shape[0]):
                rows.append((batch["tokens"][b], tuple(ld.last_pieces[b])))
    return rows


def pieces_multiset(rows):
    return Counter(p for _, pieces in rows for p in pieces)


def docs_multiset(rows):
    return Counter((d, start, stop) for _, pieces in rows for d, _, _, start, stop in pieces)


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "a.jsonl", words(300, 1, 1, 120))
    write_jsonl(root / "b.jsonl", words(200, 2, 1, 60))
    return root


@pytest.fixture(scope="module")
def spm_model(jsonl_corpus, tmp_path_factory):
    from longtrain.launcher.cli import main

    out = tmp_path_factory.mktemp("tok") / "tok.model"
    assert main(["tokenizer", "train", "--source", str(jsonl_corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    return str(out)


RESUME_CASES = {
    "builtin-concat": dict(packing="concat", seq_len=128, batch_size=2),
    "jsonl-spm-whole": dict(packing="whole", seq_len=64, batch_size=2),
    "blend-varlen": dict(packing="varlen", seq_len=64, batch_size=2, max_doc_len=96),
}


def case_overrides(name, jsonl_corpus, spm_model):
    over = dict(RESUME_CASES[name])
    if name == "jsonl-spm-whole":
        over.update(source=str(jsonl_corpus), tokenizer=spm_model)
    if name == "blend-varlen":
        over.update(sources=[{"path": "builtin", "weight": 1}, {"path": str(jsonl_corpus / "a.jsonl"), "weight": 3}])
    return over


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_exact_resume_same_dp(name, jsonl_corpus, spm_model):
    over = case_overrides(name, jsonl_corpus, spm_model)
    ranks = [loader(r, 2, **over) for r in range(2)]
    run_ranks(ranks, 3)
    state = ranks[0].state_dict()
    assert all(ld.state_dict() == state for ld in ranks)  # a global cursor, identical on every rank
    expected = run_ranks(ranks, 3)
    resumed = [loader(r, 2, **over) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
    got = run_ranks(resumed, 3)
    assert [p for _, p in got] == [p for _, p in expected]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, expected))


@pytest.mark.parametrize("name", list(RESUME_CASES))
@pytest.mark.parametrize("before,after", [(2, 4), (4, 1)])
def test_resume_at_another_dp_degree(name, before, after, jsonl_corpus, spm_model):
    over = case_overrides(name, jsonl_corpus, spm_model)
    first = [loader(r, before, **over) for r in range(before)]
    consumed = run_ranks(first, 2)
    state = first[0].state_dict()
    second = [loader(r, after, **over) for r in range(after)]
    for ld in second:
        ld.load_state_dict(state)
    steps_after = 8 // after
    consumed += run_ranks(second, steps_after)

    # the uninterrupted run: the same job at the first degree, for as many rows
    total_rows = len(consumed)
    straight = [loader(r, before, **over) for r in range(before)]
    reference = []
    while len(reference) < total_rows:
        reference += run_ranks(straight, 1)
    assert len(reference) == total_rows
    assert docs_multiset(consumed) == docs_multiset(reference)
    assert Counter(d for d, _, _ in docs_multiset(consumed).elements()) == \
        Counter(d for d, _, _ in docs_multiset(reference).elements())
    # stronger: the same global rows in the same order
    assert [p for _, p in consumed] == [p for _, p in reference]
    # and no document piece was consumed twice
    assert max(docs_multiset(consumed).values()) == 1


def test_workers_give_the_same_rows_and_resume(jsonl_corpus, spm_model):
    over = dict(source=str(jsonl_corpus), tokenizer=spm_model, packing="whole", seq_len=64, batch_size=4)
    inline = loader(1, 2, **over)
    want = [next(inline) for _ in range(4)]
    background = loader(1, 2, **dict(over, num_workers=2))
    try:
        got = [next(background) for _ in range(2)]
        state = background.state_dict()
        background.load_state_dict(state)  # restarts the workers at the cursor
        got += [next(background) for _ in range(2)]
    finally:
        background.close()
    for a, b in zip(want, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_state_dict_checks_the_stream(jsonl_corpus):
    ld = loader(packing="concat")
    state = ld.state_dict()
    other = loader(packing="whole")
    with pytest.raises(ValueError, match="differ from this recipe"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        loader(packing="concat", seq_len=128).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Blending
# ----------------------------------------------------------------------------------------------
def test_blend_proportions_within_two_percent(tmp_path):
    weights = [0.5, 0.3, 0.2]
    paths = []
    for i in range(3):
        paths.append(str(write_jsonl(tmp_path / f"s{i}.jsonl", [f"source {i} doc {j}" for j in range(97 + i)])))
    sources = [{"path": p, "weight": w} for p, w in zip(paths, weights)]
    ld = loader(sources=sources, packing="concat", seq_len=1024, batch_size=8, add_bos=False, add_eos=False, seed=5)
    seen = {}
    while len(seen) < 10_000:
        next(ld)
        for row in ld.last_pieces:
            for d, source, *_ in row:
                seen[d] = source
    first = [seen[d] for d in range(10_000)]
    counts = np.bincount(first, minlength=3) / 10_000
    assert np.all(np.abs(counts - weights) <= 0.02), counts
    # seeded: another seed interleaves differently, with the same proportions per block
    a, b = Blend(weights, 5), Blend(weights, 6)
    assert [a.locate(d)[0] for d in range(100)] != [b.locate(d)[0] for d in range(100)]
    per_block = np.bincount([a.locate(d)[0] for d in range(BLEND_BLOCK, 2 * BLEND_BLOCK)], minlength=3)
    assert per_block.tolist() == [500, 300, 200]
    # each source's documents come in order, each exactly once per epoch
    stream = DocumentStream(ld.settings)
    locs = [stream.blend.locate(d) for d in range(3000)]
    for s in range(3):
        js = [j for src, j in locs if src == s]
        assert js == list(range(len(js)))


def test_blend_weight_too_small(tmp_path):
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight: 0.0001 is less than 1/1000"):
        Blend([1.0, 0.0001], 0, ["data.sources[0]", "data.sources[1]"])


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def test_megatron_indexed_dataset_round_trip(tmp_path):
    from longtrain.data.sources import SourceSpec, write_indexed_dataset, MegatronSource

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 1000, size=int(n)) for n in rng.integers(1, 300, size=60)]
    prefix = str(tmp_path / "corpus_text_document")
    write_indexed_dataset(prefix, docs)  # megatron-core's IndexedDatasetBuilder
    src = MegatronSource(SourceSpec(path=prefix + ".bin"))
    assert src.num_records == len(docs)
    for j, doc in enumerate(docs):
        assert np.array_equal(src.payload(j), doc)
        assert src.token_length(j, None) == len(doc)
    # through the loader: pre-tokenized ids, BOS/EOS added from the tokenizer spec
    ld = loader(source=prefix, tokenizer="pretokenized:vocab=1000,bos=1,eos=2", packing="concat", seq_len=100,
                batch_size=2)
    stream = DocumentStream(ld.settings)
    for _ in range(3):
        check_batch(next(ld), ld.last_pieces, stream, 100)
    d = ld.last_pieces[0][0]
    record = d[2]
    assert np.array_equal(stream.fetch(d[0]).tokens, np.concatenate([[1], docs[record], [2]]))


def test_megatron_token_outside_vocabulary(tmp_path):
    from longtrain.data.sources import write_indexed_dataset

    prefix = str(tmp_path / "c")
    write_indexed_dataset(prefix, [np.arange(5, 20)] * 5 + [np.array([7, 5000])] * 3)
    ld = loader(source=prefix, tokenizer="pretokenized:vocab=1000,bos=1,eos=2", seq_len=64, batch_size=1)
    with pytest.raises(ValueError, match=r"c\.bin \(document 5\): token id 5000 is outside the tokenizer's vocab"):
        for _ in range(5):
            next(ld)


def test_hugging_face_streaming_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"parquet document {i} " * (i % 5 + 1) for i in range(60)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": texts[:30]}), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"content": texts[30:]}), tmp_path / "pq" / "part-1.parquet")
    ld = loader(sources=[{"path": str(tmp_path / "pq"), "text_field": "content"}], packing="whole", seq_len=256,
                batch_size=2)
    stream = DocumentStream(ld.settings)
    assert "parquet via datasets" in stream.sources[0].description
    from longtrain.data.sources import in_split

    kept = [t for r, t in enumerate(texts) if in_split(np.array([r]), "train")[0]]
    tok = ByteTokenizer()
    got = [tok.decode(stream.fetch(d).tokens) for d in range(len(kept) + 3)]
    assert got[:len(kept)] == kept
    assert got[len(kept):] == kept[:3]  # the next epoch re-reads the stream
    check_batch(next(ld), ld.last_pieces, DocumentStream(ld.settings), 256)
    # a JSON array file, also through datasets
    (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in texts[:10]]))
    stream = DocumentStream(DataSettings.from_config(cfg(source=str(tmp_path / "arr.json")), 0, "train"))
    assert tok.decode(stream.fetch(0).tokens) == texts[0]


def test_text_files_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "one.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "d" / "sub" / "two.txt").write_text("third line\r\nfourth line")
    stream = DocumentStream(DataSettings.from_config(cfg(source=str(tmp_path / "d"), add_bos=False, add_eos=False),
                                                     0, "train"))
    tok = ByteTokenizer()
    assert [tok.decode(stream.fetch(d).tokens) for d in range(4)] == ["first line", "second line", "third line",
                                                                      "fourth line"]
    glob = DocumentStream(DataSettings.from_config(cfg(source=str(tmp_path / "d" / "**" / "*.txt")), 0, "train"))
    assert glob.sources[0].files == stream.sources[0].files


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def test_sentencepiece_trained_by_the_command_round_trips(spm_model):
    from longtrain.data.tokenizers import build_tokenizer

    tok = build_tokenizer(spm_model)
    assert tok.vocab_size == 300 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    texts = ["def f(x):\n\tif x:\r\n        return 'héllo wörld ✓ 日本語 🚀'  \n\n",
             "  leading and trailing spaces  ", "", "\x00\x01 control", "a ▁ meta ▁▁ symbol", "ζeta gamma alpha" * 20]
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False, add_eos=False) == ids[1:-1]
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
    assert build_tokenizer(f"sentencepiece:{spm_model}").vocab_size == 300


def test_tokenizer_train_refuses_to_overwrite(spm_model, jsonl_corpus, capsys):
    from longtrain.launcher.cli import main

    assert main(["tokenizer", "train", "--source", str(jsonl_corpus), "--vocab-size", "300", "--out", spm_model]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and line)
# ----------------------------------------------------------------------------------------------
def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(ValueError, match=r"^data.source.path: .*nope.jsonl does not exist$"):
        loader(source=str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^data.sources\[1\].path: .*empty.jsonl is empty$"):
        loader(sources=["builtin", str(tmp_path / "empty.jsonl")])
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"blank.jsonl has no records"):
        next(loader(source=str(tmp_path / "blank.jsonl")))
    with pytest.raises(ValueError, match=r"data.source.path: .*\*.jsonl matches no files"):
        loader(source=str(tmp_path / "none" / "*.jsonl"))
    with pytest.raises(ValueError, match=r"^data.tokenizer: .*missing.model does not exist$"):
        loader(tokenizer=str(tmp_path / "missing.model"))
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(ValueError, match=r"^data.tokenizer: .*bad.model is not a sentencepiece model"):
        loader(tokenizer=str(tmp_path / "bad.model"))


def bad_corpus(tmp_path):
    good = [json.dumps({"text": f"good {i}"}) for i in range(6)]
    lines = [good[0], good[1], json.dumps({"body": "no text field"}), good[2], "{not json", good[3]]
    data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + (good[4] + "\n").encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("line,message", [
    (3, r"bad.jsonl:3: no 'text' field \(fields: body\); set text_field"),
    (5, r"bad.jsonl:5: not valid JSON"),
    (7, r"bad.jsonl:7: invalid UTF-8 \(byte 0xe9 at column 14\)"),
])
def test_bad_records_fail_with_file_and_line(tmp_path, line, message):
    from longtrain.data.sources import LineSource, SourceSpec, BadRecord

    path = bad_corpus(tmp_path)
    src = LineSource(SourceSpec(path=str(path)), "jsonl")
    with pytest.raises(BadRecord, match=message):
        src.payload(line - 1)
    # and through the loader, with skip_bad_records off (the default): the first bad one stops it
    with pytest.raises(ValueError, match=r"data.source: .*bad.jsonl:3: no 'text' field"):
        ld = loader(source=str(path), seq_len=16, batch_size=1)
        for _ in range(20):
            next(ld)


def test_skip_bad_records_counts_them(tmp_path):
    path = bad_corpus(tmp_path)
    ld = loader(source=str(path), seq_len=16, batch_size=1, packing="whole", skip_bad_records=True)
    texts = []
    tok = ByteTokenizer()
    for _ in range(8):
        batch = next(ld)
        for i in range(int(batch["doc_ids"].max()) + 1):
            texts.append(tok.decode(batch["tokens"][0][batch["doc_ids"][0] == i]))
    assert ld.stats["skipped_records"] == 3
    assert set(texts) >= {f"good {i}" for i in (0, 1, 2, 3, 4)}


def test_recipe_checks_tokenizer_and_vocab(tmp_path, spm_model, jsonl_corpus):
    from longtrain.launcher.config import RecipeError, load_recipe
    from longtrain.launcher.launch import check_data

    base = ["model.name=tiny", f"data.source={jsonl_corpus}", "data.packing=concat"]
    recipe = load_recipe(None, base + [f"data.tokenizer={spm_model}"])
    with pytest.raises(RecipeError, match=r"model.vocab_size: 260 is smaller than the vocabulary of data.tokenizer "
                                          r".*tok.model \(300\)"):
        check_data(recipe, "recipe")
    check_data(load_recipe(None, base + [f"data.tokenizer={spm_model}", "model.vocab_size=300"]), "recipe")
    with pytest.raises(RecipeError, match=r"data.tokenizer: .*nothere.model does not exist"):
        check_data(load_recipe(None, base + [f"data.tokenizer={tmp_path / 'nothere.model'}"]), "recipe")
    with pytest.raises(RecipeError, match=r"data.source.path: .*missing.jsonl does not exist"):
        check_data(load_recipe(None, ["data.packing=concat", f"data.source={tmp_path / 'missing.jsonl'}"]), "r")
    with pytest.raises(RecipeError, match=r"data.sources\[0\].wieght: unknown key \(did you mean 'weight'\?\)"):
        load_recipe(None, ["data.packing=concat", "data.sources=[{path: builtin, wieght: 2}]"])
    with pytest.raises(RecipeError, match=r"data.packing: none .* set data.packing: concat"):
        load_recipe(None, [f"data.source={jsonl_corpus}"])
    with pytest.raises(RecipeError, match=r"data.packing: 'pack' is not one of"):
        load_recipe(None, ["data.packing=pack"])
    with pytest.raises(RecipeError, match=r"model.vocab_size: 260 is smaller than the vocabulary of data.tokenizer"):
        load_recipe(None, ["model.name=tiny", "data.packing=concat", "data.tokenizer=pretokenized:vocab=1000,eos=2"])


def test_resume_far_into_the_stream():
    """A resumed loader replays its lanes from document lengths (builtin + bytes: no reading),
    in lockstep, and continues exactly where an uninterrupted run is."""
    import time

    straight = loader(packing="concat", seq_len=128, batch_size=2, lanes=4)
    for _ in range(600):
        next(straight)
    want = next(straight)
    resumed = loader(packing="concat", seq_len=128, batch_size=2, lanes=4)
    resumed.load_state_dict(dict(straight.state_dict(), cursor=straight.cursor - 2))
    assert all(torch.equal(want[k], v) for k, v in next(resumed).items())
    far = loader(packing="concat", seq_len=128, batch_size=2, lanes=4)
    started = time.perf_counter()
    far.load_state_dict(dict(far.state_dict(), cursor=200_000))  # 25.6M tokens: past the first epoch
    batch = next(far)
    assert time.perf_counter() - started < 20
    check_batch(batch, far.last_pieces, DocumentStream(far.settings), 128)
    assert any(p[1] == 0 and far._producer.stream.views[0]._perms for row in far.last_pieces for p in row)


def test_varlen_recipe_limits():
    from longtrain.launcher.config import RecipeError, load_recipe

    recipe = load_recipe(None, ["data.packing=varlen", "data.max_doc_len=512", "model.name=tiny",
                                "data.batch_size=4", "data.seq_len=256"])
    assert recipe.data.packing == "varlen"
    for extra in (["train.grad_accum=2"], ["parallel.pp=2", "run.launch.nproc_per_node=2"]):
        with pytest.raises(RecipeError, match=r"data.packing: varlen bins .* need pp=1, train.grad_accum=1, no sequence parallel, and cp=1 unless"):
            load_recipe(None, ["data.packing=varlen", "model.name=tiny", "data.batch_size=4", "data.seq_len=32"]
                        + extra)
    with pytest.raises(RecipeError, match=r"data.max_doc_len: varlen documents of up to 2048 tokens exceed "
                                          r"model.max_seq_len=1024"):
        load_recipe(None, ["data.packing=varlen", "model.name=tiny", "data.max_doc_len=2048",
                           "data.batch_size=16", "data.seq_len=256"])


def test_eval_rows_do_not_depend_on_the_dp_degree():
    def eval_rows(dp, steps):
        ranks = [build_loader(cfg(batch_size=2), dp_rank=r, dp_degree=dp, seed=0, split="eval") for r in range(dp)]
        return [p for _, p in run_ranks(ranks, steps)]

    one, two = eval_rows(1, 4), eval_rows(2, 2)
    assert one == two and len(one) == 8


def test_builtin_stream_is_tied_to_its_python(monkeypatch):
    """The built-in corpus is the running Python's standard library: a checkpoint's cursor from
    another Python release (another stdlib, other documents) is refused, not silently resumed."""
    import platform

    state = loader(source="builtin", packing="concat").state_dict()
    assert f"stdlib of Python {platform.python_version()}" in state["source"]
    loader(source="builtin", packing="concat").load_state_dict(state)  # same Python: resumes
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    with pytest.raises(ValueError, match="differ from this recipe"):
        loader(source="builtin", packing="concat").load_state_dict(state)
