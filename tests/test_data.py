"""The built-in offline data pipeline: byte tokenizer, stdlib corpus, fixed-length loader."""
import os
import time

import numpy as np
import pytest
import torch

from longtrain.data.builtin import BuiltinCorpus, split_of
from longtrain.data.config import DataConfig
from longtrain.data.loader import FixedLengthLoader, build_loader
from longtrain.data.tokenizers import ByteTokenizer, build_tokenizer

SEQ_LEN = 64
BATCH = 2


@pytest.fixture(scope="module")
def tokenizer():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def corpus():
    return BuiltinCorpus("train", seed=1234)


def make_loader(corpus, tokenizer, dp_rank=0, dp_degree=1, batch_size=BATCH):
    return FixedLengthLoader(corpus, tokenizer, SEQ_LEN, batch_size, dp_rank, dp_degree)


def data_cfg(**overrides):
    fields = dict(source="builtin", tokenizer="bytes", seq_len=SEQ_LEN, batch_size=BATCH)
    fields.update(overrides)
    return DataConfig(**fields)


def spans(batch):
    """(rows, seq_len + 1) stream spans from a batch: tokens plus the last label."""
    return torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip(tokenizer):
    text = "def f(x):\n    return 'héllo wörld ✓ 日本語 🚀'\r\n"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id == 256 and ids[-1] == tokenizer.eos_id == 257
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert max(ids[1:-1]) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_bos=False, add_eos=False) == list(text.encode("utf-8"))
    assert tokenizer.decode([tokenizer.pad_id, 0xFF, ord("a")]) == "\ufffda"
    assert tokenizer.vocab_size == 259 and tokenizer.pad_id == 258


def test_unknown_tokenizer_message():
    assert isinstance(build_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"data.tokenizer: unknown tokenizer 'gpt2'; known: bytes"):
        build_tokenizer("gpt2")


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------
def test_corpus_is_deterministic_and_split(corpus, tokenizer):
    again = BuiltinCorpus("train", seed=1234)
    assert again.documents == corpus.documents
    np.testing.assert_array_equal(again.doc_token_lengths, corpus.doc_token_lengths)
    assert BuiltinCorpus("train", seed=99).documents != corpus.documents
    assert sorted(BuiltinCorpus("train", seed=99).documents) == sorted(corpus.documents)

    evals = BuiltinCorpus("eval", seed=1234)
    assert len(evals) > 0 and len(corpus) > 10 * len(evals)
    assert not set(evals.documents) & set(corpus.documents)
    assert all(split_of(p) == "eval" for p in evals.relative_paths)
    assert not any(part in ("site-packages", "test", "tests", "idlelib")
                   for p in corpus.relative_paths for part in p.split("/")[:-1])

    assert corpus.doc_token_lengths.dtype == np.int64
    for i in range(3):
        tokens = corpus.read_tokens(i, tokenizer)
        assert len(tokens) == corpus.doc_token_lengths[i]
        assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id


def test_corpus_skips_unusable_files(tmp_path):
    files = {
        "good.py": b"x = 1\n",
        "pkg/also_good.py": "s = 'ü'\n".encode(),
        "empty.py": b"",
        "latin1.py": b"s = '\xfc'\n",
        "notes.txt": b"not python\n",
        "tests/t.py": b"skip = 1\n",
        "test/t.py": b"skip = 1\n",
        "idlelib/i.py": b"skip = 1\n",
        "site-packages/s.py": b"skip = 1\n",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    assert split_of("good.py") == split_of("pkg/also_good.py") == "train"
    c = BuiltinCorpus("train", seed=0, root=str(tmp_path))
    assert sorted(c.relative_paths) == ["good.py", "pkg/also_good.py"]
    lengths = dict(zip(c.relative_paths, c.doc_token_lengths.tolist()))
    assert lengths == {"good.py": 6 + 2, "pkg/also_good.py": len("s = 'ü'\n".encode()) + 2}


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------
def test_sequences_follow_the_stream(corpus, tokenizer):
    loader = make_loader(corpus, tokenizer)
    first = max(0, int(corpus.doc_token_lengths[0]) // SEQ_LEN - 20)  # just before document 1
    loader.load_state_dict({"cursor": first, "seq_len": SEQ_LEN})
    batches = [next(loader) for _ in range(40)]
    for b in batches:
        assert set(b) == {"tokens", "labels", "positions", "doc_ids"}
        assert not b["doc_ids"].any()  # packing none: one attention span per row
        for t in b.values():
            assert t.dtype == torch.int64 and t.shape == (BATCH, SEQ_LEN)
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
        assert torch.equal(b["positions"], torch.arange(SEQ_LEN).expand(BATCH, -1))
    tokens = torch.cat([b["tokens"] for b in batches]).reshape(-1)
    labels = torch.cat([b["labels"] for b in batches]).reshape(-1)
    assert torch.equal(labels[:-1], tokens[1:])  # last label of sequence k == first token of k+1
    assert (tokens[1:] == tokenizer.bos_id).any()  # the window crosses a document boundary

    start = first * SEQ_LEN
    covered = int(np.searchsorted(np.cumsum(corpus.doc_token_lengths), start + len(tokens))) + 1
    stream = np.concatenate([corpus.read_tokens(i, tokenizer) for i in range(covered)])
    np.testing.assert_array_equal(tokens.numpy(), stream[start:start + len(tokens)])


def test_stream_wraps_into_the_next_epoch(corpus, tokenizer):
    loader = make_loader(corpus, tokenizer)
    epoch_tokens = int(corpus.doc_token_lengths.sum())
    assert loader.num_sequences == epoch_tokens // SEQ_LEN
    k = epoch_tokens // SEQ_LEN  # the sequence holding stream position epoch_tokens
    span = spans(loader.sequences(k - 1, 3)).numpy()
    flat = np.concatenate([span[0, :-1], span[1, :-1], span[2]])
    at = epoch_tokens - (k - 1) * SEQ_LEN
    assert flat[at - 1] == tokenizer.eos_id and flat[at] == tokenizer.bos_id
    # epoch 1 reshuffles the documents with seed + 1
    first_doc = int(np.random.default_rng(corpus.seed + 1).permutation(len(corpus))[0])
    expected = corpus.read_tokens(first_doc, tokenizer)
    got = flat[at:at + len(expected)]
    np.testing.assert_array_equal(got, expected[:len(got)])


def test_exact_resume(corpus, tokenizer):
    loader = make_loader(corpus, tokenizer)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    assert state == {"cursor": 7 * BATCH, "seq_len": SEQ_LEN, "source": "builtin"}
    expected = [next(loader) for _ in range(3)]

    resumed = make_loader(corpus, tokenizer)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            assert torch.equal(got[key], want[key])


def test_resume_with_another_dp_degree_neither_repeats_nor_skips(corpus, tokenizer):
    consumed = []  # in global order: step by step, rank by rank
    ranks = [make_loader(corpus, tokenizer, dp_rank=r, dp_degree=2) for r in range(2)]
    for _ in range(3):
        consumed += [spans(next(loader)) for loader in ranks]
    state = ranks[0].state_dict()
    assert all(loader.state_dict() == state for loader in ranks)

    ranks = [make_loader(corpus, tokenizer, dp_rank=r, dp_degree=4) for r in range(4)]
    for loader in ranks:
        loader.load_state_dict(state)
    for _ in range(3):
        consumed += [spans(next(loader)) for loader in ranks]
    consumed = torch.cat(consumed)

    single = make_loader(corpus, tokenizer, dp_rank=0, dp_degree=1)
    total = (2 * 3 + 4 * 3) * BATCH
    reference = torch.cat([spans(next(single)) for _ in range(total // BATCH)])
    assert consumed.shape == reference.shape == (total, SEQ_LEN + 1)
    assert torch.equal(consumed, reference)
    assert single.cursor == ranks[0].cursor == total


def test_load_state_dict_checks_seq_len(corpus, tokenizer):
    loader = make_loader(corpus, tokenizer)
    with pytest.raises(ValueError, match="seq_len"):
        loader.load_state_dict({"cursor": 0, "seq_len": SEQ_LEN * 2, "source": "builtin"})
    with pytest.raises(ValueError, match="cursor"):
        loader.load_state_dict({"seq_len": SEQ_LEN})


def test_jump_far_into_the_stream_is_fast(corpus, tokenizer):
    loader = make_loader(corpus, tokenizer)
    far = 1_000 * loader.num_sequences + 12_345  # epoch 1000
    start = time.perf_counter()
    loader.load_state_dict({"cursor": far, "seq_len": SEQ_LEN, "source": "builtin"})
    batch = next(loader)
    assert time.perf_counter() - start < 1.0
    assert loader.cursor == far + BATCH
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])


def test_build_loader(tokenizer):
    loader = build_loader(data_cfg(), dp_rank=1, dp_degree=2, seed=1234)
    assert isinstance(loader.tokenizer, ByteTokenizer)
    assert (loader.seq_len, loader.batch_size, loader.dp_rank, loader.dp_degree) == (SEQ_LEN, BATCH, 1, 2)
    assert next(loader)["tokens"].shape == (BATCH, SEQ_LEN)
    eval_loader = build_loader(data_cfg(), dp_rank=0, dp_degree=1, seed=1234, split="eval")
    assert eval_loader.corpus.split == "eval"


def test_build_loader_errors():
    with pytest.raises(ValueError, match=r"data.packing: none .* reads only source: builtin"):
        build_loader(data_cfg(source="hf_hub"), dp_rank=0, dp_degree=1, seed=0)
    with pytest.raises(ValueError, match=r"data.tokenizer: unknown tokenizer 'spm'"):
        build_loader(data_cfg(tokenizer="spm"), dp_rank=0, dp_degree=1, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        build_loader(data_cfg(), dp_rank=2, dp_degree=2, seed=0)


def _blocked_worker(q, with_watch: bool) -> None:
    """A data worker stuck on a full queue (its consumer gone), as in a killed rank's data worker."""
    from longtrain.data.pipeline import exit_with_parent

    if with_watch:
        exit_with_parent()
    while True:
        q.put("row")


def _rank_that_dies(pid_file: str, with_watch: bool) -> None:
    """A training process: starts a daemon data worker, then dies without cleanup (as when killed)."""
    import multiprocessing as mp
    import os
    import time

    ctx = mp.get_context("spawn")
    q = ctx.Queue(maxsize=1)
    worker = ctx.Process(target=_blocked_worker, args=(q, with_watch), daemon=True)
    worker.start()
    with open(pid_file, "w") as f:
        f.write(str(worker.pid))
    time.sleep(2.0)  # the worker imports, starts its watch, and blocks on the full queue
    os._exit(1)  # no atexit: daemon children are not ended


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc for the worker's state")
def test_a_data_worker_ends_with_its_training_process(tmp_path):
    """exit_with_parent (both data workers call it first): a worker whose training process dies without
    cleanup (killed by the launcher when another rank failed) exits within seconds; without it the
    same worker stays blocked on its full queue (checked, then killed)."""
    import multiprocessing as mp
    import signal
    import time

    ctx = mp.get_context("spawn")
    pids = {}
    for with_watch in (True, False):
        pid_file = tmp_path / f"worker{with_watch}.pid"
        rank = ctx.Process(target=_rank_that_dies, args=(str(pid_file), with_watch))
        rank.start()
        rank.join(timeout=60)
        pids[with_watch] = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while _alive(pids[True]) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not _alive(pids[True]), "the watched worker outlived its training process"
        assert _alive(pids[False]), "the unwatched worker ended anyway: the test shows nothing"
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
