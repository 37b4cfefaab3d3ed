"""Decoding over tensor-parallel ranks (parallel/decode.py) at tp2, one gloo group for every case:
greedy tokens equal one process's for standard, ladder and hybrid models (sharded: each rank holds
its heads' caches), prompts of different lengths batched; a ladder model's decode keeps each
sublayer's all-reduce in flight while the next sublayer computes (from the launch/wait order);
TPLA sharded over the ranks (each holding its latent slice) equals TPLA simulated in one process,
with per-rank cache bytes (d_c/g + d_r)/(d_c + d_r) of MLA's."""
from __future__ import annotations

import pytest
import torch

from decode_cases import make, prompts, recompute_greedy, tp_decode_cases
from distributed import run_group
from longtrain.models.decode import LatentCache, generate, left_pad

LENGTHS = [7, 3, 10]
NEW = 8
CASES = {
    "standard": {"kind": "standard"},
    "ladder": {"kind": "ladder"},
    "ladder_no_overlap": {"kind": "ladder", "overlap": False},
    "ladder_last2": {"kind": "ladder_last2"},
    "hybrid": {"kind": "hybrid"},
    "hybrid_ladder": {"kind": "hybrid_ladder"},
    "mla": {"kind": "mla"},
    "hybrid_mla": {"kind": "hybrid_mla"},
    "mla_tpla": {"kind": "mla", "decode": "tpla"},
    "hybrid_mla_tpla": {"kind": "hybrid_mla", "decode": "tpla"},
    "ladder_sampled": {"kind": "ladder", "temperature": 1.0, "top_p": 0.9},
}


@pytest.fixture(scope="module")
def tp2():
    names = list(CASES)
    results = run_group(2, tp_decode_cases, [dict(CASES[n], lengths=LENGTHS, new=NEW) for n in names])
    return dict(zip(names, results))


def one_process(case: dict, **kw):
    model = make(case["kind"])
    padded, lengths = left_pad(prompts(LENGTHS, model.cfg.vocab_size))
    make_cache = None
    if case.get("decode") == "tpla":
        make_cache = lambda: LatentCache("tpla", 2)  # noqa: E731 - the one-process TPLA reference
    tokens, caches = generate(model, padded, NEW, prompt_lengths=lengths, make_latent_cache=make_cache,
                              temperature=case.get("temperature", 0.0), top_p=case.get("top_p", 1.0),
                              generator=torch.Generator().manual_seed(0))
    return tokens, caches


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_decode_equals_one_process(tp2, name):
    got = tp2[name]
    want, caches = one_process(CASES[name])
    assert torch.equal(got["tokens"], want), name
    if CASES[name].get("decode") != "tpla" and not CASES[name].get("temperature"):  # exact greedy decoding
        model = make(CASES[name]["kind"])
        for row, prompt in enumerate(prompts(LENGTHS, model.cfg.vocab_size)):  # = recomputing the prefix
            assert got["tokens"][row, -NEW:].tolist() == recompute_greedy(model, prompt, NEW), (name, row)
    assert got["broadcasts"] == NEW  # every sampled token went through rank 0's broadcast
    if CASES[name].get("decode") == "tpla":
        assert not got["sharded"] and got["comm"]["all_reduce"] > 0
        # each rank caches its half of the latent and the whole RoPE key, and nothing else changes
        mla = [c for c in caches if isinstance(c, LatentCache)]
        d_c, d_r = mla[0].c.shape[-1] // 2, mla[0].k_rope.shape[-1]  # the reference holds all slices
        rest = sum(c.nbytes() for c in caches if not isinstance(c, LatentCache))
        assert got["cache_bytes"] - rest == sum(c.nbytes() for c in mla) * (d_c + d_r) // (2 * d_c + d_r)
    else:
        assert got["sharded"]  # the model really was split over the ranks
        latent = sum(c.nbytes() for c in caches if isinstance(c, LatentCache))  # head split: MLA's latent on every rank
        assert got["cache_bytes"] - latent == sum(c.nbytes() for c in caches if not isinstance(c, LatentCache)) // 2
        assert latent == 0 or "mla" in name  # each rank: its heads' KV and Mamba caches


def test_tpla_sharded_is_not_exact_mla():
    """The TPLA case above must be able to fail: on these weights TPLA's tokens differ from MLA's."""
    tpla, _ = one_process(CASES["mla_tpla"])
    exact, _ = one_process({"kind": "mla"})
    assert not torch.equal(tpla, exact)


def _decode_steps(log):
    """The events of each decode call after the prefill (the model's forward calls 2, 3, ...)."""
    calls = [i for i, e in enumerate(log) if e[0] == "call"]
    return [log[a + 1:b] for a, b in zip(calls[1:], calls[2:] + [len(log)])]


@pytest.mark.parametrize("name,overlap", [("ladder", True), ("hybrid_ladder", True), ("ladder_last2", True),
                                          ("ladder_no_overlap", False)])
def test_ladder_decode_overlaps_its_all_reduces(tp2, name, overlap):
    got = tp2[name]
    sublayers = got["sublayers"]
    steps = _decode_steps(got["log"])
    assert len(steps) == NEW - 1
    assert got["comm"]["start"] == got["comm"]["wait"] == len(sublayers) * NEW  # prefill + NEW - 1 steps
    for events in steps:
        starts = [label for kind, label in events if kind == "start"]
        assert [s.rsplit(".", 1)[0] for s in starts] == [label for label, _ in sublayers]
        where = {e: i for i, e in enumerate(events)}
        for j, start in enumerate(starts[:-1]):
            next_label, next_is_ladder = sublayers[j + 1]
            t_start, t_wait, t_next = where[("start", start)], where[("wait", start)], where[("compute", next_label)]
            if overlap and next_is_ladder:  # in flight while the next sublayer computes
                assert t_start < t_next < t_wait, (start, events)
            else:
                assert t_start < t_wait < t_next, (start, events)
    if not overlap:
        assert got["comm"]["wait_at_start"] == got["comm"]["start"]
