"""Smoke test of benchmarks/ladder.py: a tiny tp2 run writes the JSON, markdown and PNG with every
expected key (timings on a shared CPU are not judged); the cost model is checked by hand."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder.py"


def test_ladder_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--tp", "2", "--dim", "32", "--heads", "4", "--ffn-dim", "64", "--layers", "2",
           "--seq-len", "16", "--steps", "1", "--repeats", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ladder.json").read_text())
    assert {"config", "device", "machine", "results", "gpu_model"} <= set(report)
    (r,) = report["results"]
    assert r["tp"] == 2
    for name in ("standard", "ladder", "ladder_no_overlap"):
        assert r[name]["step_s"] > 0 and len(r[name]["windows_step_s"]) == 2
    assert r["standard"]["exposed_reduction_s"] == 0  # no ladder reductions in the standard model
    assert r["reduction_s"] > 0 and r["hidden_share"] is not None
    # forward and backward reductions both measured; the backward overlap's norm-weight sums beside
    assert r["reduction_forward_s"] > 0 and r["reduction_backward_s"] > 0
    assert r["hidden_share_forward"] is not None and r["hidden_share_backward"] is not None
    assert r["least_window_hidden_share"] is not None
    assert r["ladder_no_overlap"]["least_exposed_reduction_s"] <= r["reduction_s"]  # the least window, the median
    assert r["ladder"]["norm_grad_sum_s"] > 0 and r["standard"]["norm_grad_sum_s"] == 0
    assert r["losses_match"]  # overlap on and off compute the same step
    assert "| 2 |" in (tmp_path / "ladder.md").read_text()
    assert (tmp_path / "ladder.png").stat().st_size > 0


def test_gpu_cost_model_by_hand():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ladder_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gpu_model = module.gpu_model

    g = gpu_model(dim=1024, ffn=4096, heads=8, kv_heads=8, tp=4, tokens=1, mode="decode", hbm_tb_s=1.0,
                  bus_gb_s=100.0, latency_us=10.0)
    attention = 1024 * 128 * 32 / 4 * 2 / 1e12  # params / tp x 2 bytes / HBM bytes per s
    mlp = 3 * 1024 * 4096 / 4 * 2 / 1e12
    comm = 2 * 3 / 4 * 1024 * 2 / 100e9 + 10e-6
    assert g["layer_standard_us"] == pytest.approx((attention + mlp + 2 * comm) * 1e6)
    assert g["layer_ladder_us"] == pytest.approx((max(attention, comm) + max(mlp, comm)) * 1e6)


def test_ladder_decode_benchmark_smoke(tmp_path):
    """--decode: tokens/s of the three variants at tp2 for two batch sizes, in the JSON with every key;
    overlap on and off decode the same tokens; the standard model has no ladder reductions."""
    cmd = [sys.executable, str(SCRIPT), "--decode", "--tp", "2", "--dim", "32", "--heads", "4", "--ffn-dim", "64",
           "--layers", "2", "--decode-batches", "1", "4", "--decode-prompt", "4", "--decode-tokens", "4",
           "--repeats", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ladder_decode.json").read_text())
    (result,) = report["results"]
    assert result["tp"] == 2 and [r["batch"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert row["decode_steps"] == 3 and row["tokens_match_overlap_on_off"]
        for name in ("standard", "ladder", "ladder_no_overlap"):
            assert row[name]["tokens_per_s"] > 0 and len(row[name]["windows_s"]) == 2
            assert row[name]["tokens_per_s"] == pytest.approx(row["batch"] * 3 / min(row[name]["windows_s"]))
        assert row["standard"]["exposed_reduction_s_per_step"] == 0
        assert row["reduction_s_per_step"] > 0 and row["hidden_share"] is not None
    text = (tmp_path / "ladder_decode.md").read_text()
    assert "| 2 | 1 |" in text and "| 2 | 4 |" in text
    assert (tmp_path / "ladder_decode.png").stat().st_size > 0
