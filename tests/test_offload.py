"""Optimizer offloading (parallel/offload.py) is exact: with clipping active, 10 steps with the
optimizer state on the host (plain CPU offload) or interleaved with stride 1, 2, 3 end at the
weights torch.optim.AdamW reaches, on one process and under dp_shard2 (FSDP2), tp2 and pp2; each
case asserts where its subgroups were updated. Checkpoints of offloaded state resume under another
offload setting and another layout. Bad settings fail with one line naming the key."""

import pytest
import torch

from distributed import run_group
from offload_cases import OFFLOAD, REFERENCE, offload_cases

STEPS = ["train.steps=10"]
MODES = {"stride1": ["optim.offload=interleaved", "optim.offload_stride=1"],
         "stride2": ["optim.offload=interleaved", "optim.offload_stride=2"],
         "stride3": ["optim.offload=interleaved", "optim.offload_stride=3"],
         "cpu": ["optim.offload=cpu"]}
LAYOUTS = {"dp_shard2": ["parallel.dp_shard=2", "data.batch_size=4"],
           "tp2": ["parallel.tp=2", "parallel.dp_shard=1", "data.batch_size=8"],
           "pp2": ["parallel.pp=2", "parallel.dp_shard=1", "data.batch_size=8"]}


def _assert_weights_close(name, got, ref, rel=1e-6):
    assert set(got) == set(ref), name
    for key, w in ref.items():
        err = float((got[key] - w).abs().max())
        assert err <= rel * float(w.abs().max()), f"{name} {key}: max difference {err:.3g} vs max |w| {w.abs().max():.3g}"


def _assert_losses_close(name, got, ref, rel=1e-6):
    assert sorted(got) == sorted(ref), name
    for step, b in ref.items():
        assert abs(got[step] - b) <= rel * abs(b), f"{name}: step {step} loss {got[step]} vs {b}"


def _assert_placed(name, out, steps=10):
    """The subgroups are where the stride puts them, and each was updated there every step."""
    mode = name.split("/")[-1]
    assert out["state_on_host"], name
    for placed, counters in zip(out["placements"], out["counters"]):
        n = placed["subgroups"]
        assert n >= 3, f"{name}: only {n} subgroups; the test needs several"
        if mode == "cpu":
            want_device = []
        else:
            k = int(mode.removeprefix("stride"))
            want_device = [x for x in range(n) if (x + 1) % k == 0]
        assert placed["device"] == want_device, name
        assert placed["host"] == [x for x in range(n) if x not in want_device], name
        assert counters["steps"] == steps, name
        assert counters["device_updates"] == len(want_device) * steps, name
        assert counters["host_updates"] == (n - len(want_device)) * steps, name
        if placed["host"]:
            # Host gradients arrive through the backward hooks, not copied late at the step
            # (under tp2 the norms' partial gradients are redistributed, hence copied, at the step).
            assert counters["async_grad_copies"] > 0, name
            if "tp2" not in name:
                assert counters["sync_grad_copies"] == 0, name
        else:
            assert counters["async_grad_copies"] == 0, name


def _cases(layout: list[str]) -> list[dict]:
    return [{"overrides": STEPS + layout + REFERENCE}] + [
        {"overrides": STEPS + layout + OFFLOAD + mode} for mode in MODES.values()]


def test_offload_exact_on_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    interleaved = OFFLOAD + MODES["stride2"]
    half = ["train.steps=10", "checkpoint.save_at_end=false", "data.batch_size=8"]
    cases = _cases(["data.batch_size=8"]) + [
        # Saved at step 5 with interleaved stride 2; resumed with no offload.
        {"overrides": half + interleaved + [f"checkpoint.dir={ckpt}/a"], "stop_after": 5},
        {"overrides": half + REFERENCE + [f"checkpoint.resume={ckpt}/a", f"checkpoint.dir={ckpt}/a2"]},
        # Saved at step 5 without offload; resumed interleaved with stride 3.
        {"overrides": half + REFERENCE + [f"checkpoint.dir={ckpt}/b"], "stop_after": 5},
        {"overrides": half + OFFLOAD + MODES["stride3"] + [f"checkpoint.resume={ckpt}/b", f"checkpoint.dir={ckpt}/b2"]},
        # Gradient accumulation: the hooks fire per micro-batch; the last copy is the sum.
        {"overrides": STEPS + ["data.batch_size=8", "train.grad_accum=2"] + REFERENCE},
        {"overrides": STEPS + ["data.batch_size=8", "train.grad_accum=2"] + OFFLOAD + MODES["stride2"]},
        # DeepSpeed's CPU Adam on the host: AdamW up to its own float rounding.
        {"overrides": STEPS + ["data.batch_size=8"] + OFFLOAD + ["optim.offload=cpu", "optim.offload_host_adam=deepspeed"]},
    ]
    out = run_group(1, offload_cases, cases)
    ref = out[0]
    for name, got in zip(MODES, out[1:5]):
        _assert_placed(f"single/{name}", got)
        _assert_losses_close(f"single/{name}", got["losses"], ref["losses"])
        _assert_weights_close(f"single/{name}", got["weights"], ref["weights"])
    saved_a, resumed_a, saved_b, resumed_b, accum_ref, accum, deepspeed = out[5:]
    _assert_placed("single accum2/stride2", accum)
    _assert_losses_close("accum2", accum["losses"], accum_ref["losses"])
    _assert_weights_close("accum2", accum["weights"], accum_ref["weights"])
    assert sorted(saved_a["losses"]) == [1, 2, 3, 4, 5] and sorted(resumed_a["losses"]) == [6, 7, 8, 9, 10]
    assert resumed_a["placements"] == [] and resumed_b["placements"][0]["stride"] == 3
    for name, got in (("interleaved -> none", resumed_a), ("none -> interleaved", resumed_b)):
        _assert_losses_close(f"resume {name}", got["losses"], {s: ref["losses"][s] for s in range(6, 11)})
        _assert_weights_close(f"resume {name}", got["weights"], ref["weights"])
    assert deepspeed["placements"][0]["host_adam"] in ("deepspeed", "torch")  # torch: the op did not build
    _assert_losses_close("deepspeed", deepspeed["losses"], ref["losses"], rel=1e-5)
    _assert_weights_close("deepspeed", deepspeed["weights"], ref["weights"], rel=1e-5)


def test_offload_exact_under_layouts(tmp_path, monkeypatch):
    """dp_shard2 (FSDP2 shards), tp2 (DTensor shards, replicated norms) and pp2: every stride
    and plain CPU offload against AdamW in the same layout; cp2 with stride 3; a dp_shard2
    interleaved checkpoint resumed under tp2 without offload."""
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    cases = []
    for layout in LAYOUTS.values():
        cases += _cases(layout)
    cp2 = ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.dp_shard=1", "data.batch_size=8"]
    cases += [{"overrides": STEPS + cp2 + REFERENCE}, {"overrides": STEPS + cp2 + OFFLOAD + MODES["stride3"]}]
    cases += [
        {"overrides": ["train.steps=10"] + LAYOUTS["dp_shard2"] + OFFLOAD + MODES["stride2"]
         + [f"checkpoint.dir={ckpt}/dp"], "stop_after": 5},
        {"overrides": ["train.steps=10"] + LAYOUTS["tp2"] + REFERENCE
         + [f"checkpoint.resume={ckpt}/dp", f"checkpoint.dir={ckpt}/tp"]},
    ]
    out = run_group(2, offload_cases, cases)
    per = 1 + len(MODES)
    for i, layout in enumerate(LAYOUTS):
        ref = out[i * per]
        for name, got in zip(MODES, out[i * per + 1: (i + 1) * per]):
            _assert_placed(f"{layout}/{name}", got)
            _assert_losses_close(f"{layout}/{name}", got["losses"], ref["losses"])
            _assert_weights_close(f"{layout}/{name}", got["weights"], ref["weights"])
    cp_ref, cp = out[-4], out[-3]
    _assert_placed("cp2/stride3", cp)
    _assert_losses_close("cp2/stride3", cp["losses"], cp_ref["losses"])
    _assert_weights_close("cp2/stride3", cp["weights"], cp_ref["weights"])
    dp_ref = out[0]
    resumed = out[-1]
    _assert_losses_close("dp_shard2 interleaved -> tp2 none", resumed["losses"],
                         {s: dp_ref["losses"][s] for s in range(6, 11)}, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Performance model
# ----------------------------------------------------------------------------------------------
def test_model_picks_predicted_fastest_stride():
    from longtrain.parallel.offload_model import Probe, pick_stride, predict, roles_for_stride

    sizes = [1_000_000] * 8
    # A GPU-like device: fast Adam, 25 GB/s links, a 1 Gparam/s host: the model's k >= 1 + 12 U_h / B.
    gpu = Probe({"torch": 1e9}, device_adam_params_per_s=50e9, h2d_bytes_per_s=25e9, d2h_bytes_per_s=25e9,
                device_is_host=False)
    best, preds = pick_stride(gpu, sizes, "torch", 2, device_budget_bytes=1e12)
    assert best == min(preds, key=lambda k: preds[k].update_s)
    assert set(preds) == set(range(1, 10))
    assert best == 2  # T(k=2) = max(4 ms host, 4 x 1.0 ms device) beats k=1 (8 x 0.98 ms) and k=3
    assert preds[9].update_s == pytest.approx(8e6 / 1e9)  # all on the host: 8 M params at 1 Gparam/s
    # A slow link: the device does not pay, plain CPU offload wins.
    slow = Probe({"torch": 1e9}, 50e9, 1e9, 1e9, False)
    assert pick_stride(slow, sizes, "torch", 2, 1e12)[0] == 9
    # A fast link and a slow host: everything on the device.
    fast = Probe({"torch": 1e8}, 50e9, 200e9, 200e9, False)
    assert pick_stride(fast, sizes, "torch", 2, 1e12)[0] == 1
    # A budget below one subgroup's buffers leaves only plain CPU offload.
    assert list(pick_stride(fast, sizes, "torch", 2, 15e6)[1]) == [9]
    # The formula, written out for k = 3 (subgroups 2 and 5 on the device).
    roles = roles_for_stride(8, 3)
    assert roles.count("device") == 2
    p = predict(gpu, sizes, roles, "torch", 2, 3)
    assert p.host_s == pytest.approx(6e6 / 1e9)
    assert p.device_s == pytest.approx(2 * (12e6 / 25e9 + 1e6 / 50e9 + 12e6 / 25e9))
    assert p.update_s == pytest.approx(max(p.host_s, p.device_s, p.link_s))
    # On a CPU-only machine the "device" is the same CPU: times add.
    cpu = Probe({"torch": 1e9}, 1e9, 10e9, 10e9, True)
    c = predict(cpu, sizes, roles, "torch", 4, 3)
    assert c.update_s == pytest.approx(c.host_s + c.device_s)
    # ... unless each thread's ops fit in their own cores: then they run side by side
    side_by_side = Probe({"torch": 1e9}, 1e9, 10e9, 10e9, True, concurrent=True)
    c2 = predict(side_by_side, sizes, roles, "torch", 4, 3)
    assert c2.update_s == pytest.approx(max(c2.host_s, c2.device_s)) and c2.update_s < c.update_s
    # Copies inside the device (gradient in, weights out: 8 bytes per device parameter) count when measured.
    cpu.d2d_bytes_per_s = 5e9
    assert predict(cpu, sizes, roles, "torch", 4, 3).device_s == pytest.approx(c.device_s + 2e6 * 8 / 5e9)


def test_model_picks_predicted_fastest_subgroup_size_and_stride():
    """Subgroup size auto: every candidate size is predicted jointly with every stride; the pick is
    the brute-force argmin over the (size, stride) pairs whose device buffer set fits the budget."""
    from longtrain.parallel.offload_model import (DEVICE_BUFFER_BYTES, Probe, candidate_subgroup_sizes, pick_layout,
                                                  predict, roles_for_stride, subgroup_sizes)

    groups = [12_000_000, 30_000]  # a weight-decay group and a small no-decay group
    candidates = candidate_subgroup_sizes(groups)
    assert candidates == [1 << 16, 1 << 18, 1 << 20, 1 << 22, 12_000_000]
    assert subgroup_sizes(groups, 5_000_000) == [5_000_000, 5_000_000, 2_000_000, 30_000]
    # An 8B-parameter shard: no candidate cuts it into more than 512 subgroups (the search stays short).
    big = candidate_subgroup_sizes([8_000_000_000, 1_000_000])
    assert big[0] == 1 << 24 and big[-1] == 8_000_000_000
    assert all(len(subgroup_sizes([8_000_000_000, 1_000_000], s)) <= 512 for s in big)

    def gpu(overhead_s, small_sizes_faster=1.0):
        big = Probe({"torch": 1e9, "deepspeed": 0.8e9}, 50e9, 25e9, 25e9, False, overhead_s)
        small = Probe({"torch": 1e9 * small_sizes_faster, "deepspeed": 0.8e9}, 50e9, 25e9, 25e9, False, overhead_s)
        return lambda size: small if size < 1 << 20 else big

    def brute_force(probe_for, budget, stride=None):
        best = None
        for size in candidates:
            sizes = subgroup_sizes(groups, size)
            strides = range(1, len(sizes) + 2) if stride is None else [min(stride, len(sizes) + 1)]
            for k in strides:
                roles = roles_for_stride(len(sizes), k)
                if DEVICE_BUFFER_BYTES * max((n for n, r in zip(sizes, roles) if r == "device"), default=0) > budget:
                    continue
                t = predict(probe_for(size), sizes, roles, "torch", 2, k).update_s
                if best is None or (t, -size, -k) < (best[0], -best[1], -best[2]):  # ties: larger size, stride
                    best = (t, size, k)
        return best

    picks = {}
    for name, probe_for, budget in (("cheap calls", gpu(0.0), 1e12), ("costly calls", gpu(2e-3), 1e12),
                                    ("tight budget", gpu(0.0), DEVICE_BUFFER_BYTES * 100_000),
                                    ("small calls faster", gpu(0.0, small_sizes_faster=3.0), 1e12)):
        size, k, preds = pick_layout(probe_for, groups, candidates, 2, budget)
        t, want_size, want_k = brute_force(probe_for, budget)
        assert (size, k) == (want_size, want_k), name
        assert preds[(size, k)].update_s == pytest.approx(t) == min(p.update_s for p in preds.values()), name
        for (sz, kk), _ in preds.items():  # nothing over the budget was even considered
            roles = roles_for_stride(len(subgroup_sizes(groups, sz)), kk)
            dev = [n for n, r in zip(subgroup_sizes(groups, sz), roles) if r == "device"]
            assert DEVICE_BUFFER_BYTES * max(dev, default=0) <= budget, name
        picks[name] = (size, k)
    # The size matters: per-subgroup costs push toward large subgroups, a budget toward small ones.
    assert picks["costly calls"][0] > picks["cheap calls"][0]
    assert picks["tight budget"][0] <= 100_000 and picks["tight budget"] != picks["cheap calls"]
    assert picks["small calls faster"][0] < 1 << 20  # the probe taken at the small size is used for it
    # A fixed stride: only the size is chosen; a budget no size fits with that stride fails in one line.
    size, k, preds = pick_layout(gpu(0.0), groups, candidates, 2, 1e12, stride=3)
    assert {kk for _, kk in preds} <= {3, 2 + 1} and (size, k)[1:] == brute_force(gpu(0.0), 1e12, 3)[2:]
    assert size == brute_force(gpu(0.0), 1e12, 3)[1]
    with pytest.raises(ValueError, match=r"^optim.offload_subgroup_size: no subgroup size of .* fits the device budget"):
        pick_layout(gpu(0.0), groups, candidates, 2, 1000.0, stride=1)


def test_auto_subgroup_size_in_the_optimizer(tmp_path, monkeypatch):
    """The optimizer takes the model's (size, stride), probes at two sizes, reports the size."""
    from longtrain.parallel import offload, offload_model

    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(offload_model, "SMALLEST_AUTO_SUBGROUP", 1024)
    probed = []

    def fake_probe(device, adams, chunk):  # cheap calls on small subgroups: the model goes fine
        probed.append(chunk)
        return offload_model.Probe({"torch": 1e9}, 50e9, 25e9, 25e9, False, 0.0)

    monkeypatch.setattr(offload, "cached_probe", fake_probe)
    params = [torch.nn.Parameter(torch.randn(100, 100)), torch.nn.Parameter(torch.randn(100))]
    opt = offload.OffloadAdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                               lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device=torch.device("cpu"),
                               settings=offload.OffloadSettings("interleaved", "auto", "auto", "torch", 0.0))
    assert sorted(probed) == [1024, 10_000]
    want = offload_model.pick_layout(lambda s: fake_probe(None, None, s), [10_000, 100], [1024, 4096, 10_000], 4,
                                     opt.budget_bytes)
    assert (opt.subgroup_size, opt.stride) == want[:2]
    assert opt.placement_summary()["subgroup_size"] == opt.subgroup_size
    assert [sg.numel for sg in opt.subgroups] == offload_model.subgroup_sizes([10_000, 100], opt.subgroup_size)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    metrics = offload.offload_metrics([opt])
    assert metrics["offload_subgroup_size"] == opt.subgroup_size
    from longtrain.launcher.metrics import format_line

    line = format_line({"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 1.0,
                        "tflops_per_device": 0.0, "mfu": None, "peak_memory_gb": 0.0, **metrics})
    assert line.endswith(f", subgroups of {opt.subgroup_size:,})"), line
    opt.close()
    with pytest.raises(ValueError, match=r"^optim.offload_subgroup_size: must be auto or an integer >= 1, got 'big'$"):
        offload.OffloadAdamW([{"params": params, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                             device=torch.device("cpu"),
                             settings=offload.OffloadSettings("cpu", "big", "auto", "torch", 0.0))


def test_model_predicts_this_machine(tmp_path, monkeypatch):
    """The prediction for this machine's update (probe measured here) is within 30% of the
    measured update time, for plain CPU offload and interleaved stride 2. The machine is shared
    with other jobs: each mode gets three attempts, each with a fresh probe; a model that is
    wrong (not noisy) fails all three. 16M parameters in 4M subgroups: an update of 15-30 ms, long
    enough that a thread hand-off or a page fault is not a third of it."""
    from longtrain.parallel.offload import OffloadAdamW, OffloadSettings

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2048, 2048)) for _ in range(4)]
    grads = [torch.randn_like(p) for p in params]
    for mode, stride in (("cpu", "auto"), ("interleaved", 2)):
        attempts = []
        for attempt in range(3):
            monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / f"cache_{mode}_{attempt}"))
            settings = OffloadSettings(mode, 1 << 22, stride, "torch", 0.0)
            opt = OffloadAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                               device=torch.device("cpu"), settings=settings)
            times = []
            for _ in range(7):
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                times.append(opt.last_update_s)
            opt.close()
            measured = sorted(times)[len(times) // 2]
            attempts.append((opt.prediction.update_s, measured))
            if abs(opt.prediction.update_s - measured) <= 0.3 * measured:
                break
        else:
            pytest.fail(f"{mode}: (predicted s, measured s) per attempt: {attempts}")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["optim.offload=interleaved", "optim.offload_stride=0"], r"^recipe: optim.offload_stride: must be auto or an integer >= 1, got '0'$"),
    (["optim.offload=cpu", "optim.offload_subgroup_size=0"], r"^recipe: optim.offload_subgroup_size: must be auto or an integer >= 1, got '0'$"),
    (["optim.offload=cpu", "optim.offload_subgroup_size=-5"], r"^recipe: optim.offload_subgroup_size: must be auto or an integer >= 1, got '-5'$"),
    (["optim.offload=cpu", "optim.offload_subgroup_size=huge"], r"^recipe: optim.offload_subgroup_size: must be auto or an integer >= 1, got 'huge'$"),
    (["optim.offload=interleaved", "optim.offload_subgroup_size=100000000", "optim.offload_device_memory_gb=1"],
     r"^recipe: optim.offload_device_memory_gb: 1.0 GiB cannot hold one subgroup's device buffers \(1.49 GiB"),
    (["optim.offload=disk"], r"optim.offload: 'disk' is not one of none, cpu, interleaved"),
])
def test_bad_offload_settings(overrides, message):
    from longtrain.launcher.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(None, overrides)
    assert "\n" not in str(err.value)


def test_auto_budget_below_one_subgroup_is_refused(monkeypatch):
    """The device's free memory (the budget when none is set) is checked when the optimizer is built."""
    from longtrain.parallel import offload

    monkeypatch.setattr(offload.OffloadAdamW, "_device_budget_bytes", lambda self: 1000.0)
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    with pytest.raises(ValueError, match=r"^optim.offload_subgroup_size: a device subgroup of 4096 parameters needs"):
        offload.OffloadAdamW([{"params": params, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                             device=torch.device("cpu"),
                             settings=offload.OffloadSettings("interleaved", 4096, 1, "torch", 0.0))


def test_low_precision_weights_keep_an_fp32_master():
    """bf16 parameters: the optimizer updates an fp32 master (saved as state `master`) and writes
    it back in bf16, on host and device subgroups alike: the master equals fp32 AdamW (fused) fed
    the same gradients, the weights are that master rounded to bf16."""
    from longtrain.parallel.offload import OffloadAdamW, OffloadSettings

    torch.manual_seed(0)
    full = [torch.randn(40, 30), torch.randn(50)]
    params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in full]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = OffloadAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                       device=torch.device("cpu"), settings=OffloadSettings("interleaved", 500, 2, "torch", 0.0))
    ref_opt = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    assert opt.placement_summary()["device"] == [1] and opt.placement_summary()["host"] == [0, 2]
    for _ in range(3):
        for p, r in zip(params, ref):
            g = torch.randn(p.shape).to(torch.bfloat16)
            p.grad, r.grad = g, g.float()
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref):
        master = opt.state[p]["master"]
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(master, r.detach())
        assert torch.equal(p.detach(), r.detach().to(torch.bfloat16))
    assert opt.counters["host_updates"] == 6 and opt.counters["device_updates"] == 3
    opt.close()


def test_offload_exact_under_2d_layouts(tmp_path, monkeypatch):
    """HSDP (dp_replicate2 x dp_shard2) and FSDP2 x TP (dp_shard2 x tp2) on 4 ranks: interleaved
    stride 2 against AdamW in the same layout."""
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    layouts = {"hsdp": ["parallel.dp_replicate=2", "parallel.dp_shard=2", "data.batch_size=2"],
               "dp_shard2_tp2": ["parallel.dp_shard=2", "parallel.tp=2", "data.batch_size=4"]}
    cases = []
    for layout in layouts.values():
        cases += [{"overrides": STEPS + layout + REFERENCE}, {"overrides": STEPS + layout + OFFLOAD + MODES["stride2"]}]
    out = run_group(4, offload_cases, cases)
    for i, name in enumerate(layouts):
        ref, got = out[2 * i], out[2 * i + 1]
        _assert_placed(f"{name}/stride2" if name == "hsdp" else f"{name}_tp2/stride2", got)
        _assert_losses_close(name, got["losses"], ref["losses"])
        _assert_weights_close(name, got["weights"], ref["weights"])


def test_offload_under_bf16_mixed_precision(tmp_path, monkeypatch):
    """parallel.mixed_precision=bf16 (on CPU: FSDP2's bf16 compute over fp32 sharded weights, fp32
    gradient reduction) under dp_shard2: interleaved stride 2 and plain CPU offload train as AdamW
    does with the state on the device, the fp32 master and m, v on the host."""
    monkeypatch.setenv("LONGTRAIN_CACHE", str(tmp_path / "cache"))
    layout = LAYOUTS["dp_shard2"] + ["parallel.mixed_precision=bf16", "train.steps=5"]
    cases = [{"overrides": layout + REFERENCE}, {"overrides": layout + OFFLOAD + MODES["stride2"]},
             {"overrides": layout + OFFLOAD + MODES["cpu"]}]
    ref, *runs = run_group(2, offload_cases, cases)
    for name, got in zip(("dp_shard2_bf16/stride2", "dp_shard2_bf16/cpu"), runs):
        assert got["compute_dtype"] == "torch.bfloat16" and got["fsdp_param_dtypes"] == ["torch.bfloat16"], name
        assert got["weight_dtypes"] == ["torch.float32"] and got["master_dtypes"] == ["torch.float32"], name
        _assert_placed(name, got, steps=5)
        # bf16 only in the compute: the same bf16 forward and backward on the same fp32 weights,
        # so the update is as exact as in fp32 (1e-6, far inside a bf16 tolerance of ~4e-3).
        _assert_losses_close(name, got["losses"], ref["losses"], rel=1e-6)
        _assert_weights_close(name, got["weights"], ref["weights"], rel=1e-6)
