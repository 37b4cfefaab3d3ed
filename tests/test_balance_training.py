"""Training under parallel.balance gives the losses of one process on the same sequences: a tiny
model, 5 steps of varlen bins, at cp4 and dp2 x cp2 (two simulated nodes of two ranks) under
zeppelin, tokens, even_cp and hybrid_dp, zeppelin with remapping off and on (the default: per step by
the cost model), even_cp at cp4 over two simulated
nodes with the routing layer on (its ring spans both nodes), zeppelin at tp2 x cp2, and zeppelin
remapped with activation checkpointing (every ring and exchange run again in the recompute) and with
MLA."""

import pytest
from balance_cases import train_balanced
from distributed import run_group

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

CP4 = ["parallel.cp=4"]
DP2CP2 = ["parallel.cp=2", "parallel.dp_shard=2", "cluster.gpus_per_node=2"]


def _close(a, b, rel=1e-4):
    assert a.keys() == b.keys(), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


def test_balanced_training_matches_one_process():
    reference = run_group(1, train_balanced, [
        ["parallel.balance=none"],  # plain single-process varlen: one bin per step
        ["parallel.balance=tokens"],  # the same through the balance path at one rank
        ["parallel.balance=tokens", "parallel.balance_bins=2"],  # two bins per step, as dp2 x cp2 reads
        ["parallel.balance=none", "data.max_doc_len=384"],  # steps of one or two long documents
        ["parallel.balance=none", "model.attention=mla"],  # MLA (mla-tiny)
    ])
    _close(reference[1]["losses"], reference[0]["losses"], rel=1e-6)
    cases = [CP4 + [f"parallel.balance={s}"] for s in ("zeppelin", "tokens", "even_cp", "hybrid_dp")]
    cases += [CP4 + ["parallel.balance=zeppelin", "parallel.balance_remap=false"]]
    cases += [CP4 + ["parallel.balance=zeppelin", "parallel.balance_remap=true"]]
    cases += [DP2CP2 + [f"parallel.balance={s}"] for s in ("zeppelin", "even_cp")]
    cases += [CP4 + ["cluster.gpus_per_node=2", "parallel.balance=even_cp", "cluster.routing=true"]]
    # tp peers follow their balancing rank (tp2 x cp2: a group of 2; no sequence parallel under varlen)
    cases += [["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=false", "parallel.balance=zeppelin"]]
    # a step of one long document rings it over three ranks and leaves the fourth without tokens: that
    # rank still runs forward and backward (its parameters get zero gradients; FSDP reduces them all)
    cases += [CP4 + ["parallel.balance=tokens", "data.max_doc_len=384"]]
    # activation checkpointing (its recompute runs every ring and exchange again) and MLA (its value head
    # dim is not its query/key one: q, k and v travel in one exchange), remapped
    cases += [CP4 + ["parallel.balance=zeppelin", "parallel.balance_remap=true", "parallel.activation_checkpoint=full"]]
    cases += [CP4 + ["parallel.balance=zeppelin", "parallel.balance_remap=true", "model.attention=mla"]]
    results = run_group(4, train_balanced, cases)
    remapped = results[cases.index(CP4 + ["parallel.balance=zeppelin", "parallel.balance_remap=true"])]
    recomputed = results[-2]
    assert recomputed["calls"] == {k: 2 * n for k, n in remapped["calls"].items()}, (remapped, recomputed)
    assert results[-3]["last_step_empty_ranks"] > 0, results[-3]
    assert "balance/steps" not in reference[0]["last_record"]  # no balance, no balance metrics
    for case, res in zip(cases, results):
        ref = reference[2] if "parallel.dp_shard=2" in case else reference[0]
        ref = reference[3] if "data.max_doc_len=384" in case else ref
        ref = reference[4] if "model.attention=mla" in case else ref
        # the log record says how balanced the step was (log_every=1: one step a record)
        record = res["last_record"]
        assert record["balance/steps"] == 1 and record["balance/attention_max_over_mean"] >= 1.0, (case, record)
        assert record["balance/remapped_steps"] in (0, 1) and record["balance/tokens_max_over_mean"] >= 1.0
        _close(res["losses"], ref["losses"])
        if "parallel.cp=4" in case or "parallel.balance=even_cp" in case:
            # documents of up to 160 tokens exceed a cp4 rank's capacity (1.5 x 96): they must ring
            assert res["calls"]["ring"] > 0, (case, res)
        # remapping ran on exactly the steps the loader remapped: all of them when asked, none when
        # off or not zeppelin, and by default (auto) where the cost model said it pays
        assert (res["calls"]["remap"] > 0) == (res["remapped_steps"] > 0), (case, res)
        if "parallel.balance_remap=true" in case:
            assert res["remapped_steps"] == len(res["losses"]), (case, res)
        if "parallel.balance=zeppelin" not in case or "parallel.balance_remap=false" in case:
            assert res["remapped_steps"] == 0, (case, res)
        assert (res["calls"]["routed"] > 0) == ("cluster.routing=true" in case), (case, res)
