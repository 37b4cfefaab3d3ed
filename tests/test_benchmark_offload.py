"""Smoke test of benchmarks/offload.py: the CPU comparison (host Adam kernels, one update per
offload mode with its prediction, trainer steps per mode) and the GPU script's code path run on CPU
with a tiny model, DeepSpeed ZeRO-3 offload included; both write JSON, markdown and PNG with every
expected key."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "offload.py"


def _run(args, out):
    # One probe cache for both runs (the probe is measured once per machine).
    env = dict(os.environ, OMP_NUM_THREADS="1", LONGTRAIN_CACHE=str(out.parent / "offload_probe_cache"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)] + args, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_offload_benchmark_smoke(tmp_path):
    _run(["--params", "2097152", "--subgroup", "524288", "--repeats", "1", "--adam-sizes", "262144",
          "--train-model", "tiny", "--train-steps", "2"], tmp_path)
    report = json.loads((tmp_path / "offload.json").read_text())
    assert (tmp_path / "offload.md").is_file() and (tmp_path / "offload.png").is_file()
    assert report["figures"] == ["offload.png"]
    row = report["host_adam"]["params_per_s"]["262144"]
    assert {"torch", "torch_foreach_adamw"} <= set(row) and all(v > 0 for v in row.values())
    assert ("deepspeed" in row) == report["host_adam"]["deepspeed_built"]
    modes = report["update"]["modes"]
    assert set(modes) == {"none", "cpu", "interleaved_k2", "interleaved_auto"}
    assert modes["cpu"]["device"] == 0 and modes["cpu"]["stride"] == 5  # 4 subgroups, all on the host
    assert modes["interleaved_k2"]["device_subgroups"] == [1, 3]
    assert modes["interleaved_k2"]["device"] == 16 * 524288  # one reusable buffer set
    assert modes["none"]["device"] == 8 * 2097152 and modes["none"]["host"] == 0  # m and v
    for mode in ("cpu", "interleaved_k2", "interleaved_auto"):
        assert modes[mode]["measured_s"] > 0 and modes[mode]["predicted_s"] > 0
        assert modes[mode]["host"] == 16 * 2097152  # fp32 master, m, v, gradient on the host
    train = report["train"]
    assert train["losses_equal_within_1e-6"] and set(train["modes"]) == set(modes)
    assert all(r["step_s"] > 0 and r["update_s"] > 0 for r in train["modes"].values())


def test_offload_gpu_script_runs_on_cpu(tmp_path):
    _run(["--gpu-smoke", "--gpu-model", "tiny", "--seq-len", "64", "--gpu-steps", "2", "--subgroup", "20000"], tmp_path)
    report = json.loads((tmp_path / "offload_gpu.json").read_text())
    assert (tmp_path / "offload_gpu.md").is_file() and (tmp_path / "offload_gpu.png").is_file()
    gpu = report["gpu"]
    assert set(gpu["modes"]) == {"cpu", "interleaved_auto", "deepspeed_zero3_offload"}
    ds = gpu["modes"]["deepspeed_zero3_offload"]
    assert "error" not in ds, ds
    assert ds["step_s"] > 0 and len(ds["losses"]) == 2
    assert gpu["speedup_interleaved_over_cpu"] > 0 and gpu["speedup_interleaved_over_deepspeed"] > 0
    assert gpu["exactness_fp32"]["equal_within_1e-6"], gpu["exactness_fp32"]
    assert set(gpu["goals"]) == {"interleaved_2x_over_cpu", "interleaved_faster_than_deepspeed"}
