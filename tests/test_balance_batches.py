"""Balanced batches (launcher/balanced_batches.py) read only what a rank holds: every rank packs the
step from document lengths, plans it, and materializes only its own tokens. In one process, the four
ranks of a cp4 group (each its own BalancedBatches, so its own documents): together they hold every
token of the step exactly once, equal to the packed rows the plain loader gives from the same cursor
(tokens, labels, positions); a rank reads only the documents of the sequences it holds (the others'
tokens are never loaded: builtin source + byte tokenizer give lengths without reading); and the
cursor moves by the step's bins."""
import dataclasses

import numpy as np
import torch

from balance_cases import VARLEN


class _Engine:
    def set_step(self, layout):
        self.layout = layout


def _batches(overrides, rank, world):
    from longtrain.launcher.balanced_batches import BalancedBatches
    from longtrain.launcher.config import load_recipe
    from longtrain.models.sizes import resolve_model_config

    recipe = load_recipe(None, VARLEN + overrides + [f"run.launch.nproc_per_node={world}"])
    return BalancedBatches(recipe, recipe.parallel.balance, _Engine(), rank, world, dp=1,
                           model_cfg=resolve_model_config(recipe.model))


def test_each_rank_materializes_only_its_tokens():
    from longtrain.data.loader import PackedLoader

    # bins of 16K tokens, documents cut at 2K (the built-in documents are source files of ~1K-40K bytes:
    # a step holds whole small files and pieces of large ones, each piece a sequence)
    overrides = ["parallel.cp=4", "parallel.balance=zeppelin", "parallel.balance_bins=2", "data.token_budget=16384",
                 "data.max_doc_len=2048", "model.max_seq_len=16384"]
    unread, grand_total = 0, 0
    ever_held: list = [set() for _ in range(4)]
    ranks = [_batches(overrides, r, 4) for r in range(4)]
    plain = PackedLoader(ranks[0].loader.settings, dp_rank=0, dp_degree=1)  # the same stream and lanes
    for step in range(6):
        rows = [next(plain) for _ in range(2)]
        flat = {k: torch.cat([r[k][0, :r["cu_seqlens"][-1]] for r in rows]) for k in ("tokens", "labels", "positions")}
        total = flat["tokens"].numel()
        seen = np.zeros(total, np.int64)
        for r, batches in enumerate(ranks):
            batch = next(batches)
            ids = torch.from_numpy(batches.last_layout.linear_ids)
            seen[ids.numpy()] += 1
            for key in flat:
                assert torch.equal(batch[key][0], flat[key][ids]), (step, r, key)
            held = {int(s) for s in np.unique(batch["doc_ids"][0].numpy())}
            pieces = batches.last_pieces  # (document, start, stop) per sequence; a long document gives several
            ever_held[r] |= {id(pieces[s][0]) for s in held}  # a document's later pieces come in later steps
            docs = {id(doc): doc for doc, _, _ in pieces}
            unread += len(set(docs) - ever_held[r])
            for key, doc in docs.items():  # read iff held (now or in an earlier step)
                assert (doc._tokens is not None) == (key in ever_held[r]), (step, r, doc)
        assert (seen == 1).all()
        assert all(b.loader.state_dict()["cursor"] == 2 * (step + 1) for b in ranks)
        grand_total += total
        assert sum(b.tokens_materialized for b in ranks) == grand_total
    print("documents a rank did not read:", unread)
    assert unread > 0  # the test means something: some rank skipped some document of a step
    plain.close()


def test_steps_are_planned_with_the_clusters_cost_model(monkeypatch, tmp_path):
    """The trainer's steps are planned with the cluster preset's planner inputs (CostModel.planner_kwargs):
    on a preset whose ranks share cores, the shared cores and the ring member cost reach plan_step; on
    one with a device per rank, neither (rings at their ideal share)."""
    import longtrain.launcher.balanced_batches as bb
    from longtrain.parallel.balance.cost import PRESETS, write_preset_file

    seen = []
    real = bb.plan_step

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bb, "plan_step", spy)
    base = ["parallel.cp=4", "parallel.balance=zeppelin", "data.token_budget=4096", "data.max_doc_len=1024",
            "model.max_seq_len=4096", "data.num_workers=0"]
    shared = write_preset_file(dataclasses.replace(PRESETS["h100x8"], shared_cores=2), tmp_path / "shared.yaml")
    for preset, cores in ((str(shared), 2), ("h100x8", 0)):
        seen.clear()
        batches = _batches(base + [f"cluster.preset={preset}", "cluster.gpus_per_node=4"], 0, 4)
        next(iter(batches))
        assert seen and seen[-1]["shared_cores"] == cores
        assert ("ring_cost" in seen[-1]) == (cores > 0)
        assert seen[-1]["cost"] == batches.cost_model.cost


def test_a_preset_short_of_the_runs_sequences_is_said_once(tmp_path):
    """The cost model prices sequences past the preset's attention table at its last length's rate. A run
    whose steps may hold longer ones (data.max_doc_len, else data.token_budget) says so once, at its
    training loader, with the `longtrain probe --lengths` that measures them; a preset that covers them
    says nothing. So does a preset probed at other shapes than the model's (cost.probe_shape_note)."""
    import logging

    from longtrain.launcher.log import LOGGER
    from longtrain.parallel.balance.cost import resolve_cluster, write_preset_file

    short = write_preset_file(dataclasses.replace(resolve_cluster("C"), name="probed to 128",
                                                  attention_tflops=((64, 1.0), (128, 2.0))), tmp_path / "short.yaml")
    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler, level = Keep(), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        batches = _batches(["parallel.cp=2", "parallel.balance=zeppelin", f"cluster.preset={short}"], 0, 2)
        covered = _batches(["parallel.cp=2", "parallel.balance=zeppelin", "cluster.preset=C"], 0, 2)  # to 128K
        assert said == [f"parallel.balance: {batches.table_note}"] and covered.shape_note == ""
        shaped = write_preset_file(dataclasses.replace(resolve_cluster("C"), name="probed at 8 x 64", probed_heads=8,
                                                       probed_head_dim=64, probed_linear="matmul 512"),
                                   tmp_path / "shaped.yaml")
        other_shapes = _batches(["parallel.cp=2", "parallel.balance=zeppelin", f"cluster.preset={shaped}"], 0, 2)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    note = ("the preset's attention rates stop at 128 tokens and this run's steps may hold sequences of up to 160, "
            "priced at the 128-token rate; `longtrain probe --lengths 256` measures them")
    assert batches.table_note == note and covered.table_note == ""
    # tiny: 4 heads of 8
    assert other_shapes.shape_note.startswith("cluster preset 'probed at 8 x 64' measured attention at 8 heads of "
                                              "64 (this model: 4 of 8)") and other_shapes.table_note == ""
    assert said == [f"parallel.balance: {note}", f"parallel.balance: {other_shapes.shape_note}"]


def test_the_log_says_how_balanced_the_window_was():
    """step_balance / window_balance: per step the attention work's and the attention tokens' max/mean
    over the ranks, the ring groups and whether it remapped; averaged over the log window, written out
    for a tokens plan (3000-token ring over ranks 0-2, 700 tokens on rank 3) and a local one; the log
    line carries them."""
    import pytest

    from longtrain.launcher.balanced_batches import step_balance, window_balance
    from longtrain.launcher.metrics import format_line
    from longtrain.parallel.balance.engine import StepLayout
    from longtrain.parallel.balance.planner import plan_step

    ring = plan_step([3000, 700], 4, "tokens", capacity=1100)
    assert {g for g, _ in ring.groups.values()} == {(0, 1, 2), (3,)}
    work = ring.attention_work()
    first = step_balance(ring, StepLayout.build(ring, 0, remap=True))
    assert first == (pytest.approx(work.max() / work.mean()), pytest.approx(1000 / (3700 / 4)), 1, True)
    local = plan_step([10, 10, 10, 10], 4, "tokens", capacity=100)
    second = step_balance(local, StepLayout.build(local, 0, remap=False))
    assert second == (1.0, 1.0, 0, False)
    record = window_balance([first, second])
    assert record == {"balance/attention_max_over_mean": pytest.approx((first[0] + 1.0) / 2),
                      "balance/tokens_max_over_mean": pytest.approx((first[1] + 1.0) / 2),
                      "balance/rings_per_step": 0.5, "balance/remapped_steps": 1, "balance/steps": 2}
    assert window_balance([]) == {}
    line = format_line({"step": 2, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 10.0,
                        "tflops_per_device": 0.0, "mfu": None, "peak_memory_gb": 0.0, **record})
    assert line.endswith(f"balance: attention max/mean {record['balance/attention_max_over_mean']:.2f}, tokens "
                         f"{record['balance/tokens_max_over_mean']:.2f}, rings 0.5/step, remapped 1/2")
