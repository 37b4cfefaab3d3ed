"""Context-parallel attention equals single-device attention: every mode at cp 2 and 4, causal and
full masks, MHA and GQA (kv heads < cp included), packed documents of odd, tiny and
shard-spanning lengths, totals not divisible by 2·cp; bf16 error bounds; causal work balance."""
import pytest
import torch

from cases import cp_attention_errors
from distributed import run_group
from longtrain.parallel.context.layout import CPShape, attention_work
from longtrain.parallel.context.strategy import ContextParallelAttention, CPConfigError, resolve_mode

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

MODES = ["ring", "zigzag", "ulysses", "hybrid", "allgather"]
# Row 0: odd lengths, a length-1 document, one spanning several shards, padding at the end.
# Row 1: tiny documents then a long one; totals not divisible by 2·cp.
PACKED_DOCS = [[5, 1, 19, 3, 1, 2], [1, 1, 2, 27]]


def _cases(cp):
    cases = []
    for mode in MODES:
        for causal in (True, False):
            cases.append({"mode": mode, "shape": (2, 8 * cp, 4, 4, 8), "causal": causal, "name": f"{mode} mha"})
        # GQA; kv heads (1) < cp for Ulysses and hybrid; the total needs padding, which full
        # attention must not see (seq_len masks it)
        for causal in (True, False):
            cases.append({"mode": mode, "shape": (2, 8 * cp + 3, 4, 1, 8), "causal": causal,
                          "name": f"{mode} gqa odd total"})
        cases.append({"mode": mode, "shape": (2, 31, 4, 2, 8), "doc_lengths": PACKED_DOCS, "name": f"{mode} packed"})
        cases.append({"mode": mode, "shape": (2, 31, 4, 2, 8), "doc_lengths": PACKED_DOCS, "causal": False,
                      "name": f"{mode} packed full"})
        for causal in (True, False):  # packed blocks cut into per-document pieces (long rows do this)
            cases.append({"mode": mode, "shape": (2, 31, 4, 2, 8), "doc_lengths": PACKED_DOCS, "causal": causal,
                          "dense_mask_max": 0, "name": f"{mode} packed in pieces"})
    # K/V in pieces round the ring (parallel.cp_kv_chunks): uneven pieces, pieces crossing zigzag
    # segments, packed documents, more pieces than tokens (clamped)
    for mode, chunks in (("ring", 3), ("zigzag", 3), ("zigzag", 1000)):
        cases.append({"mode": mode, "kv_chunks": chunks, "shape": (2, 8 * cp, 4, 2, 8), "name": f"{mode} kv_chunks {chunks}"})
        cases.append({"mode": mode, "kv_chunks": chunks, "shape": (2, 31, 4, 2, 8), "doc_lengths": PACKED_DOCS,
                      "name": f"{mode} packed kv_chunks {chunks}"})
    cases.append({"mode": "zigzag", "kv_chunks": 2, "causal": False, "shape": (1, 8 * cp + 3, 4, 1, 8),
                  "name": "zigzag full gqa kv_chunks 2"})
    if cp == 4:  # a real 2D hybrid: Ulysses 2 x ring 2
        cases.append({"mode": "hybrid", "ulysses": 2, "shape": (1, 37, 4, 1, 8), "doc_lengths": [[7, 1, 29]],
                      "name": "hybrid u2 packed"})
        cases.append({"mode": "hybrid", "ulysses": 2, "shape": (2, 40, 4, 2, 8), "name": "hybrid u2"})
        cases.append({"mode": "hybrid", "ulysses": 2, "kv_chunks": 2, "shape": (1, 37, 4, 1, 8),
                      "doc_lengths": [[7, 1, 29]], "name": "hybrid u2 packed kv_chunks 2"})
    return cases


@pytest.mark.parametrize("cp", [2, 4])
def test_every_mode_matches_single_device(cp):
    cases = _cases(cp)
    for case, errors in zip(cases, run_group(cp, cp_attention_errors, cases)):
        for key in ("out", "dq", "dk", "dv"):
            assert errors[key] <= 1e-5, f"cp{cp} {case['name']} causal={case.get('causal', True)}: {key} {errors}"


def test_bf16_error_is_bounded_by_single_device_error():
    cases = [{"mode": mode, "shape": (1, 64, 4, 2, 16), "dtype": torch.bfloat16, "single_device_error": True,
              "seed": 3} for mode in MODES]
    cases.append({"mode": "zigzag", "shape": (1, 61, 4, 2, 16), "dtype": torch.bfloat16, "single_device_error": True,
                  "doc_lengths": [[20, 1, 33, 7]], "seed": 4})
    for case, errors in zip(cases, run_group(4, cp_attention_errors, cases)):
        for key in ("out", "dq", "dk", "dv"):
            assert errors[key] <= 2 * errors["single_" + key] + 1e-6, f"{case['mode']} {key}: {errors}"


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_zigzag_balances_causal_work(ring):
    shape = CPShape(ring=ring, ulysses=1, balance="zigzag")
    work = attention_work(None, 64 * ring, shape)
    assert max(work) / (sum(work) / len(work)) <= 1.02, work
    contiguous = attention_work(None, 64 * ring, CPShape(ring=ring, ulysses=1, balance="contiguous"))
    assert max(contiguous) / (sum(contiguous) / len(contiguous)) > 1.4  # what zigzag fixes


@pytest.mark.parametrize("ring", [2, 4])
def test_document_aware_zigzag_balances_packed_work(ring):
    gen = torch.Generator().manual_seed(ring)
    rows = []
    for _ in range(4):  # packed rows of 4096 tokens: documents of 1 to 1500 tokens
        lengths, total = [], 0
        while total < 4096:
            n = int(torch.randint(1, 1500, (1,), generator=gen))
            n = min(n, 4096 - total)
            lengths.append(n)
            total += n
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        rows.append(ids)
    work = attention_work(torch.stack(rows), 4096, CPShape(ring=ring, ulysses=1, balance="zigzag"))
    assert max(work) / (sum(work) / len(work)) <= 1.02, work


def test_bad_cp_settings_fail_with_one_line():
    with pytest.raises(CPConfigError, match="parallel.cp_mode: unknown mode 'rings'"):
        resolve_mode("rings", 4, 8, 8, 0)
    with pytest.raises(CPConfigError, match=r"heads per tensor-parallel rank \(model.n_heads / parallel.tp = 12 / 2 = 6\)"
                                            r" to divide by the Ulysses degree 4"):
        resolve_mode("ulysses", 4, 6, 2, 0, tp=2)
    with pytest.raises(CPConfigError, match="kv heads per tensor-parallel rank \\(3\\) and the Ulysses degree 2"):
        resolve_mode("hybrid", 4, 6, 3, 2)
    assert resolve_mode("auto", 16, 32, 8, 0)[1] == CPShape(ring=2, ulysses=8, balance="zigzag")
    assert resolve_mode("auto", 4, 6, 2, 0)[0] == "hybrid"  # heads do not divide by cp
    assert resolve_mode("auto", 4, 8, 2, 0)[0] == "ulysses"
    with pytest.raises(CPConfigError, match=r"parallel.cp_kv_chunks: 2 pieces of K/V need a ring, but cp_mode ulysses"):
        resolve_mode("ulysses", 4, 8, 2, 0, kv_chunks=2)
    with pytest.raises(CPConfigError, match=r"cp_mode hybrid \(ring 1 x ulysses 4\) has none"):
        resolve_mode("hybrid", 4, 8, 2, 4, kv_chunks=2)
    with pytest.raises(CPConfigError, match=r"parallel.cp_kv_chunks: 0 must be at least 1"):
        resolve_mode("ring", 4, 8, 2, 0, kv_chunks=0)
    assert resolve_mode("zigzag", 4, 8, 2, 0, kv_chunks=4)[1] == CPShape(ring=4, ulysses=1, balance="zigzag")
    # full attention over unpacked rows cannot tell padding keys from real ones without seq_len
    full = ContextParallelAttention("ring", CPShape(ring=2, ulysses=1, balance="contiguous"), 0, None, None, None,
                                    causal=False)
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="full \\(non-causal\\) attention over unpacked rows needs seq_len"):
        full(q, q, q, 1.0)


def test_causal_blocks_split_into_pieces_without_mask_tensors():
    """Every offset causal block (K/V pieces, padding cut off the keys) runs as full and aligned
    causal pieces that together allow exactly the block's (query, key) pairs, each pair once."""
    import itertools

    from longtrain.kernels.attention import BlockMask
    from longtrain.kernels.attention import causal_pieces

    for q_start, q_len, k_start, k_len in itertools.product(range(7), range(1, 5), range(9), range(1, 6)):
        for causal in (True, False):
            cover = torch.zeros(q_len, k_len, dtype=torch.int)
            for q_off, q_n, k_off, k_n in causal_pieces(q_start, q_len, k_start, k_len, causal):
                mask = BlockMask(causal=causal, q_offset=q_start + q_off, k_offset=k_start + k_off)
                assert mask.kind(q_n, k_n) in ("full", "causal"), (q_start, q_len, k_start, k_len)
                cover[q_off:q_off + q_n, k_off:k_off + k_n] += mask.allowed(q_n, k_n, "cpu")[0].int()
            want = BlockMask(causal=causal, q_offset=q_start, k_offset=k_start).allowed(q_len, k_len, "cpu")[0]
            assert torch.equal(cover, want.int()), (q_start, q_len, k_start, k_len, causal)
