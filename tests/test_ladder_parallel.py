"""Ladder Residual under every axis of the mesh: per-step losses and final weights equal one
process (tp2 with and without sequence parallel, overlap on and off, activation checkpointing,
cp2 ring, dp2 x tp2 FSDP, HSDP 2 x 2, pp2 x tp2, tp2 x cp2 Ulysses, a hybrid stack under tp2 and under pp2 x tp2 with the stage
boundary between an attention and an MLP layer), and the overlap is applied: each sublayer's
reduction is launched before the next sublayer computes and waited for only after it, in forward
(the output reduction) and in backward (the input-gradient reduction, waited for after the
backward of the sublayer before it); with overlap off every wait follows its launch."""
import pytest

from cases import global_batch, train_cases
from distributed import run_group
from ladder_cases import ladder_group
from test_layouts import _compare

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

STEPS = ["train.steps=5"]
LADDER = ["model.residual=ladder", "model.ladder_layers=3"]  # 3 of 4 layers: the boundary is exercised too
HYBRID = ["model.kind=hybrid", "model.residual=ladder", "model.pattern=M*|-M*-", "data.seq_len=32"]
TP2 = ["parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1)
# 3 layers = 6 sublayers in 2 stages: stage 0 ends after layer 1's attention, stage 1 starts with its MLP.
THREE = ["model.n_layers=3"]
MID_LAYER = ["parallel.pp=2", "parallel.pp_split=sublayers", "parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1)
LADDER3 = THREE + ["model.residual=ladder", "model.ladder_layers=2"]

LAYOUTS = {
    2: {
        "tp2_sp": LADDER + TP2,
        "tp2_no_sp": LADDER + TP2 + ["parallel.sequence_parallel=false"],
        "tp2_sp_overlap_off": LADDER + TP2 + ["parallel.ladder_overlap=false"],
        "tp2_recompute": LADDER + TP2 + ["parallel.activation_checkpoint=full"],
        "hybrid_tp2": HYBRID + TP2,
        "cp2_ring": LADDER + ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.dp_shard=1"] + global_batch(1),
    },
    4: {
        "dp2_tp2": LADDER + ["parallel.dp_shard=2", "parallel.tp=2"] + global_batch(2),
        "hsdp2x2": LADDER + ["parallel.dp_replicate=2", "parallel.dp_shard=2"] + global_batch(4),
        "pp2_tp2": LADDER + ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "tp2_cp2_ulysses": LADDER + ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ulysses",
                                     "parallel.dp_shard=1"] + global_batch(1),
        "hybrid_pp2_tp2": HYBRID + ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"] + global_batch(1),
        "ladder3_pp2_tp2_mid_layer": LADDER3 + MID_LAYER,
        "standard3_pp2_tp2_mid_layer": THREE + MID_LAYER,
    },
}
TRACES = [LADDER + TP2, LADDER + TP2 + ["parallel.sequence_parallel=false"],
          LADDER + TP2 + ["parallel.ladder_overlap=false"], HYBRID + TP2]


@pytest.fixture(scope="module")
def references():
    ref, hybrid, ladder3, standard3 = run_group(1, train_cases, [
        STEPS + LADDER + global_batch(1), STEPS + HYBRID + global_batch(1), STEPS + LADDER3 + global_batch(1),
        STEPS + THREE + global_batch(1)])
    assert ref["losses"][5] < ref["losses"][1]
    return {"transformer": ref, "hybrid": hybrid, "ladder3": ladder3, "standard3": standard3}


@pytest.fixture(scope="module")
def two_ranks():
    names = list(LAYOUTS[2])
    return names, run_group(2, ladder_group, [STEPS + LAYOUTS[2][n] for n in names], TRACES)


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_ladder_layout_matches_single_process(world_size, references, two_ranks):
    if world_size == 2:
        names, out = two_ranks
        results = out["train"]
    else:
        names = list(LAYOUTS[world_size])
        results = run_group(world_size, train_cases, [STEPS + LAYOUTS[world_size][n] for n in names])
    for name, got in zip(names, results):
        prefix = name.split("_")[0]
        _compare(name, got, references[prefix if prefix in references else "transformer"])
    if world_size == 2:  # overlap on and off: the same numbers, not merely close
        on, off = results[names.index("tp2_sp")], results[names.index("tp2_sp_overlap_off")]
        assert on["losses"] == off["losses"]


def _positions(log):
    where = {}
    for i, event in enumerate(log):
        where.setdefault(event, []).append(i)
    return where


@pytest.mark.parametrize("index,overlap", [(0, True), (1, True), (2, False), (3, True)])
def test_reduction_in_flight_while_next_sublayer_computes(two_ranks, index, overlap):
    trace = two_ranks[1]["traces"][index]
    log, sublayers = trace["log"], trace["sublayers"]
    forward = log[:log.index(("forward_done", ""))]
    starts = [label for kind, label in forward if kind == "start"]
    # every sublayer launched exactly one reduction, in order, and every launch was waited for
    assert [s.rsplit(".", 1)[0] for s in starts] == [label for label, _ in sublayers]
    assert trace["counts"]["start"] == trace["counts"]["wait"] == len(sublayers)
    assert trace["in_flight"] == 0
    where = _positions(forward)
    overlapped = 0
    for j, start in enumerate(starts[:-1]):
        next_label, next_is_ladder = sublayers[j + 1]
        t_start, t_wait = where[("start", start)][0], where[("wait", start)][0]
        t_next = where[("compute", next_label)][0]
        assert t_start < t_wait
        if overlap and next_is_ladder:  # in flight while the next sublayer computes
            assert t_start < t_next < t_wait, (start, forward)
            overlapped += 1
        else:  # a standard sublayer (or overlap off) reads the sum first
            assert t_wait < t_next, (start, forward)
    last = starts[-1]  # the last output is read by the final norm
    assert where[("start", last)][0] < where[("wait", last)][0]
    if overlap:
        ladder_sublayers = sum(is_ladder for _, is_ladder in sublayers[1:])
        assert overlapped == ladder_sublayers > 0
    else:
        assert trace["counts"]["wait_at_start"] == len(sublayers)

    # Backward: sublayer j's input-gradient reduction is launched when its backward is done and,
    # where sublayer j-1 is a ladder sublayer that made the stream j reads, waited for only after
    # sublayer j-1's backward ran; elsewhere (and with overlap off) waited for at once.
    backward = log[log.index(("forward_done", "")):]
    assert backward[-1] == ("backward_end", "")
    where = _positions(backward)
    assert trace["counts"]["grad_start"] == trace["counts"]["grad_wait"] == len(sublayers)
    assert trace["lazy_pending"] == 0
    hidden = 0
    for j, (label, is_ladder) in enumerate(sublayers):
        t_start, t_wait = where[("grad_start", label)], where[("grad_wait", label)]
        assert len(t_start) == len(t_wait) == 1, label
        t_start, t_wait = t_start[0], t_wait[0]
        assert where[("backward_done", label)][0] < t_start  # launched when the sublayer's backward is done
        if overlap and is_ladder and j >= 2 and sublayers[j - 1][1]:
            prev = sublayers[j - 1][0]
            # in flight during the whole backward of the sublayer before it
            assert t_start < where[("backward", prev)][0] < where[("backward_done", prev)][0] < t_wait, \
                (label, backward)
            hidden += 1
        else:
            assert t_wait == t_start + 1, (label, backward)
    assert trace["counts"]["grad_deferred"] == hidden
    if overlap:
        assert hidden == sum(sublayers[j][1] and sublayers[j - 1][1] for j in range(2, len(sublayers))) > 0


def test_sublayer_split_puts_a_stage_boundary_inside_a_layer():
    """parallel.pp_split: sublayers on 3 layers in 2 stages: layer 1's attention ends stage 0 and
    its MLP begins stage 1 (names unchanged, so checkpoints move between layouts)."""
    import dataclasses

    from longtrain.models.registry import build_model
    from longtrain.models.sizes import SIZES
    from longtrain.parallel.pipeline import build_stage_module

    model = build_model(dataclasses.replace(SIZES["tiny"], n_layers=3))
    assert model.pipeline_sublayer_stages(2) == [{"0": {"attention", "feed_forward"}, "1": {"attention"}},
                                                 {"1": {"feed_forward"}, "2": {"attention", "feed_forward"}}]
    first, second = (build_stage_module(model, s, 2, "sublayers") for s in (0, 1))
    assert first.layers["1"].feed_forward is None and first.layers["1"].attention is not None
    assert second.layers["1"].attention is None and second.layers["1"].feed_forward is not None
    names = {n for part in (first, second) for n, _ in part.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}
    assert [s.mixer for s in second.layers["1"].tensor_parallel_plan().sublayers] == ["feed_forward"]
    # and the trainer builds its stages that way (parallel.pp_split reaches the pipeline split)
    from cases import stage_sublayers

    built = run_group(2, stage_sublayers, LADDER3 + ["parallel.pp=2", "parallel.pp_split=sublayers",
                                                     "parallel.dp_shard=1"] + global_batch(1))
    assert built == [{"0": ["attention", "feed_forward"], "1": ["attention"]},
                     {"1": ["feed_forward"], "2": ["attention", "feed_forward"]}]
