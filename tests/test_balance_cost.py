"""Balance cost model: the formulas of techniques.md section 1.3 written out plainly, presets, regimes,
preset files, and the one-line errors of the `cluster:` section."""
import dataclasses
import math

import numpy as np
import pytest

from longtrain.parallel.balance.cost import (PRESETS, ClusterError, ClusterSpec, CostModel, ModelShape,
                                             attention_flops, attention_linear_crossing, hiding_length,
                                             linear_flops, load_preset_file, regime, resolve_cluster,
                                             ring_step_bytes, write_preset_file)

GQA = ModelShape(n_layers=2, n_heads=32, n_kv_heads=8, head_dim=128, linear_params_per_layer=200_000_000)
FLAT = ClusterSpec("flat", gpus_per_node=8, nics_per_node=8, nic_gbps=400.0, intra_gbs=450.0,
                   attention_tflops=((1, 600.0),), linear_tflops=600.0, latency_us=0.0)


def test_formulas_plainly():
    L = 1000
    assert attention_flops(L, GQA) == 4 * 0.5 * L * L * 32 * 128
    assert linear_flops(L, GQA) == 2 * L * 200_000_000
    assert ring_step_bytes(L, 4, GQA, 2) == 2 * (L / 4) * 8 * 128 * 2
    # tau: per-step compute A/(g^2 F) equals per-step bytes V/BW exactly at L/g = tau
    tau = hiding_length("intra", GQA, FLAT)
    assert tau == pytest.approx((8 / 32) * 2 * 600e12 / (2 * 0.5 * 450e9))
    g = 4
    L = tau * g
    assert attention_flops(L, GQA) / g ** 2 / 600e12 == pytest.approx(ring_step_bytes(L, g, GQA, 2) / 450e9)
    # techniques.md's table: NVLink ~330 tokens, a 400 Gb NIC per GPU ~3k tokens (full mask, c = 1)
    full = ModelShape(1, 32, 8, 128, 1, causal=False)
    assert hiding_length("intra", full, FLAT) == pytest.approx(333.3, rel=0.01)
    assert hiding_length("inter", full, FLAT) == pytest.approx(3000, rel=0.01)
    # with a message latency alpha, per-step compute equals bytes/BW + alpha at L/g = tau
    slow = ClusterSpec("slow", 8, 8, 400.0, 450.0, ((1, 600.0),), 600.0, latency_us=20.0)
    tau_lat = hiding_length("intra", GQA, slow)
    assert tau_lat > tau
    L = tau_lat * g
    assert attention_flops(L, GQA) / g ** 2 / 600e12 == pytest.approx(ring_step_bytes(L, g, GQA, 2) / 450e9 + 20e-6)
    # attention FLOPs equal linear FLOPs at the crossing length
    x = attention_linear_crossing(GQA)
    assert attention_flops(x, GQA) == pytest.approx(linear_flops(x, GQA))


def test_regimes_from_crossing_points():
    t_intra, t_inter = hiding_length("intra", GQA, FLAT), hiding_length("inter", GQA, FLAT)
    assert t_inter > t_intra
    assert regime(int(2 * t_intra) - 1, GQA, FLAT) == "local"
    assert regime(int(2 * t_intra) + 1, GQA, FLAT) == "intra"
    assert regime(int(2 * 8 * t_inter) + 1, GQA, FLAT) == "inter"
    assert regime(int(2 * 8 * t_inter) - 1, GQA, FLAT) == "intra"


def test_presets_and_per_rank_nic_share():
    a, c = PRESETS["A"], PRESETS["C"]
    assert a.gpus_per_node == 8 and a.nics_per_node == 4
    assert a.inter_gbs == pytest.approx(4 * 200 / 8 / 8)  # two GPUs share a 200 Gb/s NIC: 12.5 GB/s
    assert c.inter_gbs == pytest.approx(50.0)
    # fewer NICs per GPU: a longer hiding length (the paper's cluster A gains most)
    m = ModelShape.llama("7B")
    assert hiding_length("inter", m, a) > hiding_length("inter", m, c)
    # attention FLOP/s interpolates in log length, clamped at the ends
    spec = ClusterSpec("t", 8, 8, 400, 450, ((1000, 100.0), (4000, 300.0)))
    assert spec.attention_flops_per_s(10) == 100e12 and spec.attention_flops_per_s(10 ** 6) == 300e12
    assert spec.attention_flops_per_s(2000) == pytest.approx(200e12)


def test_cost_model_seconds():
    cm = CostModel(GQA, FLAT)
    assert cm.attention_seconds(2000) == pytest.approx(3.5 * attention_flops(2000, GQA) / 600e12 * 2)
    assert cm.linear_seconds(2000) == pytest.approx(3 * linear_flops(2000, GQA) / 600e12 * 2)
    # the output head counts once per token, not per layer
    headed = CostModel(dataclasses.replace(GQA, head_params=32000 * 4096), FLAT)
    assert headed.linear_seconds(2000) == pytest.approx(3 * 2000 * 2 * (2 * 200_000_000 + 32000 * 4096) / 600e12)
    from longtrain.models.sizes import SIZES

    shape = ModelShape.of(SIZES["llama-1b"], tp=2)
    assert shape.head_params == 128256 * 2048 // 2 and ModelShape.llama("7B").head_params == 32000 * 4096
    assert cm.ring_transfer_seconds(2000, 2, "intra") == pytest.approx(ring_step_bytes(2000, 2, GQA, 2) / 450e9)


def test_preset_file_round_trip_and_errors(tmp_path):
    path = write_preset_file(FLAT, tmp_path / "x.yaml")
    assert load_preset_file(path) == FLAT
    with_full = dataclasses.replace(FLAT, attention_full_tflops=((512, 2.0), (4096, 3.0)))
    assert load_preset_file(write_preset_file(with_full, tmp_path / "y.yaml")) == with_full
    with_ring = dataclasses.replace(FLAT, ring_step_us=1500.0, ring_token_us=1.25)
    assert load_preset_file(write_preset_file(with_ring, tmp_path / "z.yaml")) == with_ring
    with_shape = dataclasses.replace(FLAT, probed_heads=8, probed_head_dim=32, probed_linear="model debug")
    assert load_preset_file(write_preset_file(with_shape, tmp_path / "s.yaml")) == with_shape
    assert resolve_cluster(str(path)) == FLAT
    assert resolve_cluster("C", gpus_per_node=2, world=4).gpus_per_node == 2
    with pytest.raises(ClusterError, match=r"^cluster.preset: unknown preset 'Z'"):
        resolve_cluster("Z")
    with pytest.raises(ClusterError, match=r"^cluster.gpus_per_node: 8 GPUs per node do not divide the 12 ranks"):
        resolve_cluster("C", world=12)
    (tmp_path / "bad.yaml").write_text("name: x\n")
    with pytest.raises(ClusterError, match=r"^cluster.preset: .*bad.yaml is not a preset file"):
        resolve_cluster(str(tmp_path / "bad.yaml"))
    assert math.isfinite(resolve_cluster("local").attention_flops_per_s(1000))


def test_recipe_errors_name_the_key():
    from longtrain.launcher.config import RecipeError, load_recipe

    base = ["data.packing=varlen", "parallel.cp=2", "run.launch.nproc_per_node=4", "model.name=tiny"]
    assert load_recipe(None, base).parallel.balance == "auto"
    with pytest.raises(RecipeError, match="parallel.balance: unknown|parallel.balance: 'nope' is not one of"):
        load_recipe(None, base + ["parallel.balance=nope"])
    with pytest.raises(RecipeError, match="cluster.preset: unknown preset 'nope'"):
        load_recipe(None, base + ["cluster.preset=nope"])
    with pytest.raises(RecipeError, match="cluster.gpus_per_node: 3 GPUs per node do not divide the 4 ranks"):
        load_recipe(None, base + ["cluster.gpus_per_node=3"])
    with pytest.raises(RecipeError, match="data.packing: varlen bins"):
        load_recipe(None, base + ["parallel.balance=none"])
    # hybrid Mamba stacks are balanced (contiguous scan groups); pipeline parallelism is refused in one line
    assert load_recipe(None, base + ["model.kind=hybrid", "model.name=hybrid-tiny"]).parallel.balance == "auto"
    with pytest.raises(RecipeError, match=r"need pp=1|parallel.balance: pipeline parallelism") as err:
        load_recipe(None, base + ["parallel.pp=2", "parallel.balance=zeppelin"])
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="parallel.balance: zeppelin balances varlen batches"):
        load_recipe(None, ["parallel.balance=zeppelin", "model.name=tiny"])
    with pytest.raises(RecipeError, match="parallel.balance_bins: -1 must be >= 0"):
        load_recipe(None, base + ["parallel.balance_bins=-1"])


def test_probe_writes_a_loadable_preset(tmp_path):
    from longtrain.launcher.cli import main

    out = tmp_path / "probed.yaml"
    assert main(["probe", "--out", str(out), "--lengths", "64,128", "--ranks", "2"]) == 0
    spec = load_preset_file(out)
    assert [row[0] for row in spec.attention_tflops] == [64, 128]
    assert [row[0] for row in spec.attention_full_tflops] == [64, 128]  # full blocks, measured apart
    assert (spec.probed_heads, spec.probed_head_dim, spec.probed_linear) == (8, 64, "matmul 512")  # the defaults
    assert all(tflops > 0 for _, tflops in spec.attention_full_tflops)
    assert all(tflops > 0 for _, tflops in spec.attention_tflops)
    assert spec.intra_gbs > 0 and spec.latency_us > 0 and spec.linear_tflops > 0
    assert "collective_us" in out.read_text() and spec.collective_us > 0
    assert spec.collective_us != ClusterSpec("x", 1, 1, 1.0, 1.0).collective_us  # measured, not the default
    # a ring's work outside the kernels, measured among the ranks (a ring of 2 over 1K-4K tokens here
    # spends milliseconds a step on it: never nothing)
    assert spec.ring_step_us >= 0 and spec.ring_token_us >= 0 and spec.ring_step_us + 1024 * spec.ring_token_us > 0


def test_probe_measures_the_model_without_core_attention(tmp_path, monkeypatch):
    """`longtrain probe --model`: the linear rate is the model's own forward + loss + backward with core
    attention left out (the attention kernel never runs), over the FLOPs cost.py counts; an unknown
    size is one line."""
    import longtrain.kernels.attention as kernels
    import longtrain.parallel.balance.probe as probe_module
    from longtrain.launcher.cli import main
    from longtrain.models.sizes import SIZES
    from longtrain.parallel.balance.cost import model_linear_flops

    def no_attention(*args, **kwargs):
        raise AssertionError("core attention ran in the linear probe")

    runs = []

    def one_second(fn, repeats):
        fn()
        runs.append(repeats)
        return 1.0

    cfg = dataclasses.replace(SIZES["tiny"], n_layers=3)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "attention_forward", no_attention)
        patch.setattr(probe_module, "_best", one_second)
        rate = probe_module.model_linear_tflops(cfg, tokens=128)
    # at most two layers run (a layer's cost repeats), so the FLOPs are those of a 2-layer model
    assert runs and rate * 1e12 == pytest.approx(3 * model_linear_flops(128, ModelShape.of(
        dataclasses.replace(cfg, n_layers=2))))
    out = tmp_path / "probed.yaml"
    assert main(["probe", "--out", str(out), "--lengths", "64", "--ranks", "2", "--model", "tiny"]) == 0
    spec = load_preset_file(out)
    assert 0 < spec.linear_tflops < probe_module.linear_tflops(dim=SIZES["tiny"].dim)  # slower than a bare matmul
    # the preset says what it measured: the model's own shapes and linear work
    assert (spec.probed_heads, spec.probed_head_dim, spec.probed_linear) == (4, 8, "model tiny")
    with pytest.raises(SystemExit, match=r"^longtrain probe: --model 'nope' is not a transformer size; known: tiny"):
        main(["probe", "--out", str(out), "--ranks", "2", "--model", "nope"])


def test_probe_takes_links_from_a_preset(tmp_path, monkeypatch):
    """`longtrain probe --links PRESET`: the kernels are measured here, the node shape, links, latency and
    all_to_all cost are the preset's (no ranks start: the link probe never runs). A GPU machine with
    fewer GPUs than --ranks cannot measure links and must name a preset; one line each for the bad cases."""
    import torch

    import longtrain.parallel.balance.probe as probe_module
    from longtrain.launcher.cli import main

    def no_links(*args, **kwargs):
        raise AssertionError("the link probe ran")

    monkeypatch.setattr(probe_module, "link_times", no_links)
    out = tmp_path / "probed.yaml"
    assert main(["probe", "--out", str(out), "--lengths", "64,128", "--links", "h100x8"]) == 0
    spec, h100 = load_preset_file(out), PRESETS["h100x8"]
    for key in ("gpus_per_node", "nics_per_node", "nic_gbps", "intra_gbs", "latency_us", "collective_us"):
        assert getattr(spec, key) == getattr(h100, key), key
    assert [row[0] for row in spec.attention_tflops] == [64, 128]  # measured here, not the preset's table
    assert spec.attention_tflops != h100.attention_tflops and spec.linear_tflops < 1.0 < h100.linear_tflops
    assert spec.bytes_per_element == 4 and spec.shared_cores >= 1 and spec.attention_call_us > 0  # CPU: fp32
    with pytest.raises(SystemExit, match=r"^longtrain probe: --links: cluster.preset: unknown preset 'nope'"):
        main(["probe", "--out", str(out), "--links", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^longtrain probe: --device cuda: no CUDA device on this machine$"):
            main(["probe", "--out", str(out), "--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"^longtrain probe: --device cuda measures links among --ranks 4 GPUs "
                                         r"and this machine has 1: pass --links PRESET"):
        main(["probe", "--out", str(out), "--device", "cuda"])


def test_probed_kernels_replace_a_presets_rates():
    """with_probed_kernels: B and C take a Hopper probe's kernel rates as measured, A (A800) scaled as
    cost.py derives its constants (attention by peak x 1.6, linear by peak); links stay the preset's.
    benchmarks/balance.py --kernels runs its at-scale sections on these."""
    import importlib.util
    from pathlib import Path

    from longtrain.parallel.balance.cost import with_probed_kernels

    probed = ClusterSpec("gpu probe", 1, 1, 1.0, 1.0, attention_tflops=((1024, 100.0), (8192, 400.0)),
                         linear_tflops=700.0, attention_call_us=40.0, attention_full_tflops=((1024, 200.0),))
    for name in ("B", "C"):
        spec = with_probed_kernels(name, PRESETS[name], probed)
        assert spec.attention_tflops == probed.attention_tflops and spec.linear_tflops == 700.0
        assert spec.attention_full_tflops == probed.attention_full_tflops and spec.attention_call_us == 40.0
        assert (spec.intra_gbs, spec.nic_gbps, spec.gpus_per_node) == (PRESETS[name].intra_gbs,
                                                                        PRESETS[name].nic_gbps, 8)
        assert CostModel(ModelShape.llama("7B"), spec).attention_seconds(4096) != \
            CostModel(ModelShape.llama("7B"), PRESETS[name]).attention_seconds(4096)
    a = with_probed_kernels("A", PRESETS["A"], probed)
    assert a.attention_tflops[1][1] == pytest.approx(400.0 * 312 / 989 * 1.6)
    assert a.linear_tflops == pytest.approx(700.0 * 312 / 989) and a.nics_per_node == 4
    spec = importlib.util.spec_from_file_location(
        "balance_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "balance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.scale_cluster("C", 16) == PRESETS["C"]


def test_plan_balance_command(tmp_path, capsys):
    """`longtrain plan balance` simulates every strategy on a named mix and writes a timeline; a bad mix
    name is one line."""
    from longtrain.launcher.cli import main

    args = ["plan", "balance", "configs/debug_cpu.yaml", "--nproc", "16", "parallel.tp=1", "parallel.cp=8",
            "data.packing=varlen", "data.token_budget=32768", "model.max_seq_len=65536", "cluster.preset=C"]
    assert main(args + ["--mix", "arxiv", "--out", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    for strategy in ("even_cp", "tokens", "hybrid_dp", "zeppelin"):
        assert f"  {strategy}" in out
    assert "cluster C (" in out and ": 2 nodes of 8 ranks" in out  # 16 ranks, C's nodes of 8
    # simulated as training runs them: remapping by the recipe's parallel.balance_remap (auto: where the
    # cost model says it pays), routing by cluster.routing (auto: on for C's 8 NICs across 2 nodes)
    assert "zeppelin remaps where the cost model says it pays" in out and "routing on" in out
    for setting, remapped in (("true", True), ("false", False)):
        assert main(args + [f"parallel.balance_remap={setting}", "cluster.routing=false", "--mix", "arxiv",
                            "--out", str(tmp_path / "r.png")]) == 0
        lines = capsys.readouterr().out.splitlines()
        zeppelin = next(line for line in lines if line.startswith("  zeppelin"))
        assert zeppelin.endswith("remapped") == remapped and "routing off" in lines[-2]
        assert not any(line.endswith("remapped") for line in lines if not line.startswith("  zeppelin"))
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert main(args + ["--mix", "nope"]) == 2
    assert "--mix: unknown mix 'nope'" in capsys.readouterr().err
    assert "rates stop at" not in out  # preset C's table reaches 128K
    assert "note:" not in out  # nor does C say what it was probed at (not probed: no shape note)
    # a probed preset whose table stops short of the step's sequences: the clamped rate is named, and how
    # to measure it (the cost model prices every longer sequence at the last length's rate)
    from longtrain.parallel.balance.cost import write_preset_file

    short = write_preset_file(dataclasses.replace(resolve_cluster("C"), name="probed to 1K",
                                                  attention_tflops=((256, 100.0), (1024, 200.0)),
                                                  attention_full_tflops=(), probed_heads=8, probed_head_dim=64,
                                                  probed_linear="matmul 512"), tmp_path / "short.yaml")
    assert main(args[:-1] + [f"cluster.preset={short}", "--mix", "long-tailed", "--out", str(tmp_path / "u.png")]) == 0
    out = capsys.readouterr().out
    longest = int(out.split("sequences of up to ")[1].split(",")[0])
    assert longest > 1024 and "attention rates stop at 1024 tokens" in out
    # and probed at other shapes than the model's (debug: 8 heads of 32), the probe that measures its own
    assert "note: cluster preset 'probed to 1K' measured attention at 8 heads of 64 (this model: 8 of 32)" in out
    assert "`longtrain probe --model debug` measures this model's own" in out
    probe_to = 1 << (longest - 1).bit_length()
    assert f"--lengths {','.join(str(256 << i) for i in range((probe_to // 256).bit_length()))}`" in out


def test_ring_member_cost_written_out():
    """A ring member's cost: its 1/g of the causal work at the kernel's speed on L/g-token blocks,
    plus each ring step's transfer beyond the step's compute (forward: K/V; backward: 2x the bytes
    against 2.5x the compute), all layers."""
    spec = ClusterSpec("t", 8, 8, 400.0, 1.0, ((256, 100.0), (4096, 400.0)), 600.0, latency_us=5.0)
    cm = CostModel(GQA, spec)
    L, g = 8192, 4
    f = spec.attention_flops_per_s(L // g)
    step = attention_flops(L, GQA) / g ** 2 / f
    # with a faster full-block rate: a member's own two chunks (1/(2g) of its pairs) at the causal
    # rate, the rest at the full one
    full = CostModel(GQA, dataclasses.replace(spec, attention_full_tflops=((256, 200.0), (4096, 800.0))))
    f_full = full.cluster.attention_flops_per_s(L // g, full=True)
    assert f_full == 2 * f
    step_mixed = attention_flops(L, GQA) / g ** 2 * (1 / (2 * g) / f + (1 - 1 / (2 * g)) / f_full)
    t_mixed = ring_step_bytes(L, g, GQA, 2) / 1e9 + 5e-6
    exposed_mixed = (g - 1) * (max(0.0, t_mixed - step_mixed) + max(0.0, 2 * t_mixed - 2.5 * step_mixed))
    assert full.ring_member_seconds(L, g, "intra") == pytest.approx((3.5 * step_mixed * g + exposed_mixed)
                                                                    * GQA.n_layers)
    transfer = ring_step_bytes(L, g, GQA, 2) / 1e9 + 5e-6
    exposed = (g - 1) * (max(0.0, transfer - step) + max(0.0, 2 * transfer - 2.5 * step))
    assert cm.ring_member_seconds(L, g, "intra") == pytest.approx((3.5 * step * g + exposed) * GQA.n_layers)
    assert exposed > 0  # a 1 GB/s link: this ring's transfers show
    # a ring does not divide the cost: smaller blocks run slower even when every transfer hides
    fast = CostModel(GQA, ClusterSpec("t", 8, 8, 400.0, 1e6, ((256, 100.0), (4096, 400.0)), 600.0, latency_us=0.0))
    assert fast.ring_member_seconds(L, g, "intra") == pytest.approx(
        fast.attention_seconds(L) / g * spec.attention_flops_per_s(L) / f)
    assert fast.ring_member_seconds(L, g, "intra") > fast.cost(L) / g
    assert cm.ring_member_seconds(L, 1, "local") == cm.cost(L)
    # the ring's own work outside the kernels: per ring step (g - 1 of them) a fixed part and a part per
    # token the member holds (L / g), every layer
    worked = CostModel(GQA, dataclasses.replace(spec, ring_step_us=2000.0, ring_token_us=1.5))
    assert worked.ring_member_seconds(L, g, "intra") - cm.ring_member_seconds(L, g, "intra") == pytest.approx(
        (g - 1) * (2000e-6 + 1.5e-6 * L / g) * GQA.n_layers)
    assert worked.ring_member_seconds(L, 1, "local") == cm.cost(L)  # no ring, no ring work
    kw = cm.planner_kwargs()
    assert kw["cost"] == cm.cost and "ring_cost" not in kw and kw["shared_cores"] == 0
    shared = CostModel(GQA, ClusterSpec("cpu", 4, 4, 8.0, 1.0, ((256, 0.01),), 0.03, shared_cores=2)).planner_kwargs()
    assert shared["ring_cost"].__func__ is CostModel.ring_member_seconds and shared["shared_cores"] == 2


def test_piece_seconds_diagonal_causal_earlier_keys_full():
    """A planner piece's forward seconds: its queries against its own tokens a causal block (n (n+1)/2
    pairs at the causal rate), against the keys before it a full one (n x start pairs at the full
    rate), 4 h d FLOPs a pair, the rates at the ring's block length; a whole local sequence is only
    the causal block."""
    from longtrain.parallel.balance.planner import Piece

    spec = ClusterSpec("t", 8, 8, 400.0, 1.0, ((256, 100.0), (4096, 400.0)), 600.0,
                       attention_full_tflops=((256, 300.0), (4096, 500.0)))
    cm = CostModel(GQA, spec)
    flops_per_pair = 4 * GQA.n_heads * GQA.head_dim
    ring = Piece(seq=0, start=3000, stop=4000, group=(0, 1, 2, 3), level="intra")
    block = 8000 // 4
    want = flops_per_pair * (1000 * 1001 / 2 / spec.attention_flops_per_s(block)
                             + 1000 * 3000 / spec.attention_flops_per_s(block, full=True))
    assert cm.piece_forward_seconds(ring, 8000) == pytest.approx(want)
    local = Piece(seq=1, start=0, stop=2000, group=(0,), level="local")
    assert cm.piece_forward_seconds(local, 2000) == pytest.approx(
        flops_per_pair * 2000 * 2001 / 2 / spec.attention_flops_per_s(2000))
    # without a full-block table the causal rate serves both
    plain = CostModel(GQA, dataclasses.replace(spec, attention_full_tflops=()))
    assert plain.piece_forward_seconds(ring, 8000) == pytest.approx(
        flops_per_pair * (1000 * 1001 / 2 + 1000 * 3000) / spec.attention_flops_per_s(block))


def test_shared_cores_makespan_and_simulation():
    """Processor sharing written out: 4 jobs on 2 cores run at half speed until the short ones end,
    then the straggler alone at full speed; the simulator's step on shared cores follows it."""
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.simulator import shared_makespan, simulate

    assert shared_makespan([1.2, 0.4, 0.4, 0.4], 2) == pytest.approx(0.4 / 0.5 + 0.8)
    assert shared_makespan([1.0] * 4, 2) == pytest.approx(2.0)
    assert shared_makespan([3.0, 1.0], 4) == pytest.approx(3.0)  # more cores than ranks: no sharing
    cpu = ClusterSpec("cpu", 4, 4, 8.0, 1.0, ((1, 0.01),), 0.03, latency_us=0.0, bytes_per_element=4)
    cm = CostModel(ModelShape(1, 4, 2, 16, 64 * 64 * 4), cpu)
    plan = plan_step([4000, 1000, 1000, 1000], 4, "tokens", capacity=8000)  # one rank does most of the work
    alone = simulate(plan, cm, False, shared_cores=0)
    shared = simulate(plan, cm, False, shared_cores=2)
    per_rank = alone.busy / cm.model.n_layers
    assert alone.step_seconds == pytest.approx(per_rank.max() * cm.model.n_layers)
    assert shared.step_seconds == pytest.approx(shared_makespan(per_rank, 2) * cm.model.n_layers)
    assert alone.step_seconds < shared.step_seconds < 2 * alone.step_seconds  # not a uniform 4/2 slowdown


def test_simulator_runs_slots_in_the_plans_schedule():
    """The simulator follows plan.order: rings of a zeppelin plan on a GPU cluster (cluster B, 32 GPUs,
    7B, GitHub-like steps) wait for each other in the fixed order (small rings first, by ranks, the
    node's 8-ring after every small ring inside it) and less in the schedule (seed 0: 15% shorter
    step); clearing the schedule falls back to the fixed order. The schedule is judged by the
    planner's costs, not the simulator's (no linear work, the backward in the forward's order); on
    these steps it never loses."""
    import math

    from longtrain.parallel.balance.cost import resolve_cluster
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.simulator import MIXES, sample_lengths, simulate

    cm = CostModel(ModelShape.llama("7B"), resolve_cluster("B", world=32))
    ratios = []
    for seed in range(6):
        lengths = sample_lengths(np.random.default_rng(seed), 32 * 32768, MIXES["github"])
        plan = plan_step(lengths, 32, "zeppelin", capacity=math.ceil(1.5 * 32768) + len(lengths), gpus_per_node=8,
                         **cm.planner_kwargs())
        scheduled = simulate(plan, cm, False).step_seconds
        plan.set_order({})
        ratios.append(scheduled / simulate(plan, cm, False).step_seconds)
    assert max(ratios) <= 1.0 + 1e-9 and ratios[0] < 0.9, ratios


def test_remap_pays_written_out():
    """balance_remap auto: remap when the step time it saves exceeds its four exchanges per layer.
    4 ranks, one node, `tokens` holding whole sequences of 3000 / 1000 / 1000 / 1000 tokens: remapping
    brings every rank to 1500 tokens outside attention (rank 0 keeps 1500, ranks 1-3 take 500 each).
    Without it ranks run on independently: off = max_r (lin(n_r) + att_r); with it they meet around
    core attention: on = lin(1500) + max_r att_r. Cost per layer = 4 collectives + 2 x (500 q/k/v
    tokens into rank 0, the largest inbound) + 2 x (1500 output tokens back from rank 0). Four ranks on
    two cores: both are at least the whole work over the cores."""
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.remap import remap_estimate, remap_pays
    from longtrain.parallel.balance.simulator import simulate

    m = ModelShape(2, 4, 2, 16, 50_000)

    def cluster(**kw):
        return ClusterSpec("c", 4, 4, 100.0, 100.0, ((1, 1.0),), 0.001, latency_us=0.0, bytes_per_element=2, **kw)

    cm = CostModel(m, cluster(collective_us=25.0))
    plan = plan_step([3000, 1000, 1000, 1000], 4, "tokens", capacity=4000)
    assert plan.tokens_per_rank().tolist() == [3000, 1000, 1000, 1000]
    t = 3 * 2 * m.linear_params_per_layer / (0.001 * 1e12) * m.n_layers  # one token's linear seconds, fwd + bwd
    att = {L: 3.5 * 4 * L * (L + 1) / 2 * m.n_heads * m.head_dim / 1e12 * m.n_layers for L in (3000, 1000)}
    work = [3000 * t + att[3000]] + [1000 * t + att[1000]] * 3
    qkv, out, bw = (4 + 2 * 2) * 16 * 2, 4 * 16 * 2, 100.0 * 1e9
    cost = 2 * (4 * 25e-6 + 2 * 500 * qkv / bw + 2 * 1500 * out / bw)
    saved_want = max(work) - (1500 * t + att[3000])
    saved, got_cost = remap_estimate(plan, cm)
    assert saved == pytest.approx(saved_want) and got_cost == pytest.approx(cost)
    assert remap_pays(plan, cm) and saved_want > cost
    # the simulator agrees: remapped, the step is shorter
    assert simulate(plan, cm, True).step_seconds < simulate(plan, cm, False).step_seconds
    # a collective so dear that it eats the saving: not remapped, and the simulator agrees
    dear = CostModel(m, cluster(collective_us=1e6 * saved_want / 4))
    assert not remap_pays(plan, dear)
    assert simulate(plan, dear, True).step_seconds > simulate(plan, dear, False).step_seconds
    # shared cores: the step is at least the whole work over the 2 cores, with or without remapping,
    # so the saving is small (a few ms) and a CPU machine's all_to_all (2 ms here) eats it
    shared = CostModel(m, cluster(collective_us=2000.0, shared_cores=2))
    floor = sum(work) / 2
    want = max(max(work), floor) - max(1500 * t + att[3000], floor)
    assert want < 0.01 * saved_want and remap_estimate(plan, shared)[0] == pytest.approx(want)
    assert not remap_pays(plan, shared)


def test_remap_auto_follows_the_simulator_at_scale():
    """On the paper's clusters (16-64 GPUs, 7B, three mixes) remap_pays picks what the simulator finds
    faster in all but two of the steps where the two differ by more than 3% (8 such steps; the closed
    form leaves out how rings tie their members together: it remaps cluster B, 64 GPUs, ArXiv- and
    GitHub-like, which the simulator finds 5% slower; the second since the output head's work counts,
    a near tie in the closed form), and the steps it gives are within 1% of always picking the faster
    one on average."""
    import math

    from longtrain.parallel.balance.cost import resolve_cluster
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.remap import remap_pays
    from longtrain.parallel.balance.simulator import MIXES, sample_lengths, simulate

    rng = np.random.default_rng(1)
    clear, ratio = [], []
    for cluster in ("A", "B", "C"):
        for gpus in (16, 32, 64):
            cm = CostModel(ModelShape.llama("7B"), resolve_cluster(cluster, world=gpus))
            for mix in ("arxiv", "github", "prolong64k"):
                lengths = sample_lengths(rng, gpus * 32768, MIXES[mix])
                plan = plan_step(lengths, gpus, "zeppelin", capacity=math.ceil(1.5 * 32768) + len(lengths),
                                 gpus_per_node=8, **cm.planner_kwargs())
                on, off = simulate(plan, cm, True).step_seconds, simulate(plan, cm, False).step_seconds
                pick = remap_pays(plan, cm)
                if abs(on / off - 1) > 0.03:
                    clear.append(pick == (on < off))
                ratio.append((on if pick else off) / min(on, off))
    assert len(clear) >= 5 and sum(clear) >= len(clear) - 2, clear
    assert np.mean(ratio) < 1.01


def test_zeppelin_on_shared_cores_holds_against_even_cp_over_perturbed_machines():
    """Where ranks share cores (this machine: 4 ranks, 2 cores), zeppelin's plan must not lose to
    even_cp in the simulator it plans with, whatever the probe measured. Presets around this machine's
    probe, every rate perturbed (attention 0.25-4x and 0.6-1.6x per length, linear 0.25-4x, latency,
    bandwidth, per-call and collective costs), full blocks 0.9-1.3x the causal rate, on the balance
    benchmark's steps at cp4 and dp2 x cp2: zeppelin (remapped where remap_pays says) against even_cp.
    Before placements were judged by the processor-sharing step (a straggler finishes alone) and ring
    members paid their kernel calls, the worst was 1.15x even_cp's step; now 1.03x (0.73x on average).
    (Where the probe finds full blocks far faster than causal ones, the model favours even_cp's rings
    and zeppelin deliberately does not chase that: planner.py, `whole under the fair share`.)"""
    import importlib.util
    from dataclasses import replace
    from pathlib import Path

    from longtrain.models.transformer import TransformerConfig
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.remap import remap_pays
    from longtrain.parallel.balance.simulator import simulate

    spec = importlib.util.spec_from_file_location(
        "balance_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "balance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lengths_table = (256, 512, 1024, 2048, 4096)
    base = ClusterSpec("this machine, probed", 1024, 1024, 30.0, 3.7,  # as `longtrain probe` wrote it here
                       tuple(zip(lengths_table, (0.018, 0.020, 0.030, 0.038, 0.043))), linear_tflops=0.035,
                       latency_us=130.0, bytes_per_element=4, shared_cores=2, attention_call_us=170.0,
                       collective_us=2500.0,
                       attention_full_tflops=tuple(zip(lengths_table, (0.041, 0.043, 0.048, 0.048, 0.049))))
    rng = np.random.default_rng(0)
    ratios = []
    for quick in (True, False):
        layouts, dims = bench.measured_setup(quick)
        shape = ModelShape.of(TransformerConfig(**dims))
        for _ in range(12):
            f = lambda lo=0.25, hi=4.0: float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # noqa: E731
            attention = f()
            causal = tuple((L, t * attention * f(0.6, 1.6)) for L, t in base.attention_tflops)
            cluster = replace(
                base, attention_tflops=causal, attention_full_tflops=tuple((L, t * f(0.9, 1.3)) for L, t in causal),
                linear_tflops=base.linear_tflops * f(), latency_us=base.latency_us * f(0.2, 8),
                intra_gbs=base.intra_gbs * f(0.2, 5), attention_call_us=base.attention_call_us * f(0.2, 5),
                collective_us=base.collective_us * f(0.3, 4))
            cluster = replace(cluster, nic_gbps=cluster.intra_gbs * 8)
            # the same steps again (the issue-length layouts' one step: its 16K-32K tails dominate, where
            # zeppelin's gain is small, test_benchmark_balance runs it)
            for layout in (spec for spec in layouts.values() if not spec.get("emulate") and not spec.get("tail")):
                cm = CostModel(shape, cluster.with_gpus_per_node(layout["gpus_per_node"]))
                for step in layout["steps"]:
                    kw = dict(capacity=layout["capacity"] + len(step["lengths"]), cp=layout["cp"], bins=step["bins"],
                              gpus_per_node=layout["gpus_per_node"], **cm.planner_kwargs())
                    even = simulate(plan_step(step["lengths"], 4, "even_cp", **kw), cm, False).step_seconds
                    zep = plan_step(step["lengths"], 4, "zeppelin", **kw)
                    ratios.append(simulate(zep, cm, remap_pays(zep, cm)).step_seconds / even)
    assert len(ratios) == 2 * 12 * (1 + 3)
    assert max(ratios) <= 1.05 and np.mean(ratios) <= 0.8, (max(ratios), np.mean(ratios))


def test_mean_preset_averages_probes_of_one_machine():
    """mean_preset: the balance benchmark simulates its runs at the mean of the probes before and after
    them (the machine's speed drifts). Every rate and cost averaged, tables entry by entry; tables of
    different lengths are one line."""
    from longtrain.parallel.balance.cost import mean_preset

    a = ClusterSpec("a", 1024, 1024, 8.0, 1.0, ((256, 0.02), (1024, 0.04)), linear_tflops=0.03, latency_us=100.0,
                    attention_call_us=80.0, collective_us=2000.0, attention_full_tflops=((256, 0.05), (1024, 0.05)))
    b = dataclasses.replace(a, name="b", nic_gbps=16.0, intra_gbs=2.0, attention_tflops=((256, 0.04), (1024, 0.06)),
                            linear_tflops=0.05, latency_us=200.0, attention_call_us=120.0, collective_us=4000.0,
                            attention_full_tflops=((256, 0.07), (1024, 0.03)))
    a, b = dataclasses.replace(a, ring_step_us=1000.0, ring_token_us=1.0), dataclasses.replace(b, ring_step_us=3000.0)
    m = mean_preset([a, b], "mean")
    assert (m.ring_step_us, m.ring_token_us) == (2000.0, 0.5)
    assert m.name == "mean" and m.gpus_per_node == 1024 and m.shared_cores == a.shared_cores
    assert (m.nic_gbps, m.intra_gbs, m.latency_us, m.attention_call_us, m.collective_us) == (12.0, 1.5, 150.0, 100.0, 3000.0)
    assert m.linear_tflops == pytest.approx(0.04)
    assert [L for L, _ in m.attention_tflops] == [256, 1024]
    assert [t for _, t in m.attention_tflops] == pytest.approx([0.03, 0.05])
    assert [t for _, t in m.attention_full_tflops] == pytest.approx([0.06, 0.04])
    with pytest.raises(ClusterError, match=r"^cluster.preset: probes with different attention_tflops lengths"):
        mean_preset([a, dataclasses.replace(b, attention_tflops=((512, 0.1),))], "x")


def test_ring_costs_fitted_from_the_ring_probe():
    """fit_ring_costs: a ring member's extra processor time at two block sizes, less the kernel calls the
    model already charges a ring member (2 x ring size calls beyond a whole sequence's one), over its
    ring steps, is fixed + per-token x tokens; neither term negative."""
    from longtrain.parallel.balance.probe import fit_ring_costs

    def extra(tokens, ring_size=4, call_s=2e-4, fixed=2e-3, per_token=1.5e-6):
        return 2 * ring_size * call_s + (ring_size - 1) * (fixed + per_token * tokens)

    measured = {"ring_size": 4, "extra_s": ((512, extra(512)), (2048, extra(2048)))}
    assert fit_ring_costs(measured, 2e-4) == pytest.approx((2e-3, 1.5e-6))
    # a ring of 2: one ring step, four extra calls
    two = {"ring_size": 2, "extra_s": ((512, extra(512, 2)), (2048, extra(2048, 2)))}
    assert fit_ring_costs(two, 2e-4) == pytest.approx((2e-3, 1.5e-6))
    # falling with block size (noise): all on the fixed part, the points' mean
    falling = {"ring_size": 2, "extra_s": ((512, 4 * 2e-4 + 3e-3), (2048, 4 * 2e-4 + 1e-3))}
    assert fit_ring_costs(falling, 2e-4) == pytest.approx((2e-3, 0.0))
    # a line through the points below the origin: all per token, through the mean
    steep = {"ring_size": 2, "extra_s": ((512, 4 * 2e-4 + 0.1e-3), (2048, 4 * 2e-4 + 2e-3))}
    assert fit_ring_costs(steep, 2e-4) == pytest.approx((0.0, 1.05e-3 / 1280))
    # less than the calls already charged: nothing more
    assert fit_ring_costs({"ring_size": 2, "extra_s": ((512, 1e-4), (2048, 2e-4))}, 2e-4) == (0.0, 0.0)


def test_simulator_charges_a_rings_work_outside_the_kernels():
    """The simulator adds cost.ring_work_seconds to each ring member (its tokens in the ring, the ring's
    steps), forward and backward, and nothing to whole sequences; the step time moves with it."""
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.simulator import simulate

    spec = ClusterSpec("cpu", 4, 4, 8.0, 1.0, ((256, 0.02), (4096, 0.05)), 0.05, latency_us=50.0)
    plain, worked = CostModel(GQA, spec), CostModel(GQA, dataclasses.replace(spec, ring_step_us=3000.0,
                                                                             ring_token_us=2.0))
    lengths = [4000, 300, 200, 100]
    ring = plan_step(lengths, 4, "even_cp", capacity=sum(lengths) + 4, cp=4, bins=[0] * 4, gpus_per_node=4)
    base, charged = simulate(ring, plain, remap=False), simulate(ring, worked, remap=False)
    held = [sum(p.stop - p.start for p in pieces) for pieces in ring.pieces]
    assert charged.busy - base.busy == pytest.approx([worked.ring_work_seconds(t, 4) for t in held])
    assert charged.step_seconds > base.step_seconds
    whole = plan_step(lengths, 4, "tokens", capacity=sum(lengths) + 4, gpus_per_node=4)
    assert all(len(p.group) == 1 for pieces in whole.pieces for p in pieces)
    assert simulate(whole, worked, remap=False).busy == pytest.approx(simulate(whole, plain, remap=False).busy)


def test_timeline_events_cover_one_layers_forward(tmp_path):
    """The timeline (StepSimulation.events, timeline_png): per rank, one layer's forward in order and
    without overlap: linear work from 0, with remapping the exchanges in and out, attention by level,
    linear work last; the forward ends before the simulated layer (forward + backward) does."""
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.simulator import simulate, timeline_png

    cm = CostModel(GQA, FLAT)
    plan = plan_step([6000, 300, 200, 100, 2500, 1000], 8, "zeppelin", capacity=4000, tau_intra=64)
    for remap in (False, True):
        sim = simulate(plan, cm, remap)
        kinds = {kind for *_, kind in sim.events}
        assert {"linear", "local"} <= kinds and ("remap" in kinds) == remap
        assert "intra" in kinds  # the 6000-token sequence rings
        for rank in range(8):
            mine = sorted((a, b, kind) for r, a, b, kind in sim.events if r == rank)
            assert mine[0][0] == 0.0 and mine[0][2] == "linear" and mine[-1][2] == "linear"
            assert all(b >= a for a, b, _ in mine)
            assert all(b <= c + 1e-12 for (_, b, _), (c, _, _) in zip(mine, mine[1:]))  # no overlap
            assert mine[-1][1] < sim.step_seconds / GQA.n_layers
    timeline_png({"zeppelin": simulate(plan, cm, True), "tokens": simulate(plan_step(
        [6000, 300, 200, 100, 2500, 1000], 8, "tokens", capacity=8000), cm, False)}, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_plan_balance_simulates_remapping_as_training_does():
    """compare_strategies (`longtrain plan balance`) simulates zeppelin as training runs it: remapped
    where remap_pays says so when parallel.balance_remap is null (cluster A, 16 GPUs, 7B: ArXiv-like
    steps remap, GitHub-like ones do not), else as set; the other strategies never remap."""
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.remap import remap_pays
    from longtrain.parallel.balance.simulator import MIXES, compare_strategies, sample_lengths, simulate

    cm = CostModel(ModelShape.llama("7B"), resolve_cluster("A", 0, 16))
    for mix, auto in (("arxiv", True), ("github", False)):
        rng = np.random.default_rng(0)
        lengths, bins = [], []
        for b in range(2):
            part = sample_lengths(rng, 8 * 16384, MIXES[mix])
            lengths, bins = lengths + part, bins + [b] * len(part)
        capacity = math.ceil(1.5 * 16384)
        plan = plan_step(lengths, 16, "zeppelin", capacity=capacity + len(lengths), cp=8, bins=bins,
                         gpus_per_node=8, **cm.planner_kwargs())
        assert remap_pays(plan, cm) == auto
        for setting, remapped in ((None, auto), (True, True), (False, False)):
            sims = compare_strategies(lengths, bins, 16, 8, cm, capacity, remap=setting)
            assert sims["zeppelin"].remapped == remapped, (mix, setting)
            assert sims["zeppelin"].step_seconds == simulate(plan, cm, remapped).step_seconds
            assert not any(sims[k].remapped for k in ("even_cp", "tokens", "hybrid_dp"))


def test_a_preset_probed_at_other_shapes_is_said():
    """cost.probe_shape_note: a preset whose probe measured other attention shapes than the model's, or
    its linear rate on a bare matmul or another model, is named in one line with the probe that measures
    this model's own; nothing when they match, or when the preset does not say (the GPU presets, older
    files). The trainer logs it once at start, `plan balance` prints it."""
    from longtrain.models.sizes import SIZES, resolve_model_config
    from longtrain.launcher.config import load_recipe
    from longtrain.parallel.balance.cost import probe_shape_note

    debug = SIZES["debug"]
    assert (debug.n_heads, debug.head_dim) == (8, 32)
    matmul = dataclasses.replace(FLAT, name="local", probed_heads=8, probed_head_dim=64, probed_linear="matmul 512")
    note = probe_shape_note(matmul, debug, "debug")
    assert note == ("cluster preset 'local' measured attention at 8 heads of 64 (this model: 8 of 32) and the "
                    "linear rate on a matmul 512; `longtrain probe --model debug` measures this model's own")
    own = dataclasses.replace(matmul, probed_head_dim=32, probed_linear="model debug")
    assert probe_shape_note(own, debug, "debug") == ""
    assert "linear rate on model tiny;" in probe_shape_note(dataclasses.replace(own, probed_linear="model tiny"),
                                                            debug, "debug")
    assert "attention at" not in probe_shape_note(dataclasses.replace(own, probed_linear="matmul 256"), debug, "debug")
    assert probe_shape_note(FLAT, debug, "debug") == "" and probe_shape_note(PRESETS["A"], debug, "debug") == ""
    # a model `longtrain probe --model` cannot build (MLA, a hybrid stack): its heads, head dim and dim
    mla = resolve_model_config(load_recipe("configs/debug_mla_cpu.yaml").model)
    assert probe_shape_note(own, mla, "mla-debug").endswith(
        f"`longtrain probe --heads {mla.n_heads} --head-dim {mla.head_dim} --dim {mla.dim}` measures this model's own")
    hybrid = resolve_model_config(load_recipe(None, ["model.kind=hybrid", "model.name=tiny"]).model)
    assert "--model" not in probe_shape_note(own, hybrid, "tiny")
