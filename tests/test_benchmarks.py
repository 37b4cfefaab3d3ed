"""Smoke test of benchmarks/train_throughput.py: a tiny run in a subprocess writes the JSON and the
markdown with every expected key (the numbers themselves are not checked: timing on a shared CPU
is noise at this size)."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def test_train_throughput_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--seq-len", "32", "--batch-size", "2",
           "--steps", "3", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "train_throughput.json").read_text())
    phases = ["single", "dp2_fsdp", "dp2_fsdp_no_reshard", "dp2_replicate", "fixed_cost"]
    assert {"machine", "config", "passed", "num_params", *phases} <= set(report)
    assert {"cpu_count", "torch_version", "platform"} <= set(report["machine"])
    assert report["config"]["model"] == "tiny" and report["config"]["threads_per_process"] == 1
    for key in phases:
        r = report[key]
        assert {"longtrain", "plain", "ratio_longtrain_over_plain", "target", "passed", "first_loss",
                "losses_match"} <= set(r)
        for side in ("longtrain", "plain"):
            assert len(r[side]["repeats_tokens_per_s"]) == 2
            assert r[side]["median_tokens_per_s"] > 0
        assert r["ratio_longtrain_over_plain"] > 0
        if key == "single":
            assert r["target"] == 1.0 and r["passed"] == (r["ratio_longtrain_over_plain"] >= 1.0)
            # The step waits on the host once (the finite/stop flags); the plain loop's clip and
            # loss.item() are its own.
            assert r["host_reads_per_step"]["longtrain"] == 1, r["host_reads_per_step"]
        else:  # reported, not judged
            assert r["target"] is None and r["passed"] is None
        # Same model, init and batches on both sides: the first step's loss agrees.
        assert r["losses_match"], r["first_loss"]
    assert report["single"]["layout"] == "single" and report["dp2_fsdp"]["layout"] == "dp_shard2"
    assert report["dp2_replicate"]["layout"] == "dp_replicate2"
    assert report["passed"] == report["single"]["passed"]
    # the fixed cost of a step: measured per side, in milliseconds
    assert all(report["fixed_cost"][side]["median_ms_per_step"] > 0 for side in ("longtrain", "plain"))

    markdown = (tmp_path / "train_throughput.md").read_text()
    assert markdown.strip() and markdown.strip() in proc.stdout  # written and printed at the end


ATTENTION_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_kernel.py"


def test_attention_kernel_benchmark_smoke(tmp_path):
    """benchmarks/attention_kernel.py on CPU at toy sizes: every accuracy case within the 2x bar of
    plain SDPA in bf16, a timed row per (case, length, backend), and the report re-renders from its
    JSON."""
    cmd = [sys.executable, str(ATTENTION_SCRIPT), "--device", "cpu", "--dtype", "bf16", "--lengths", "256,512",
           "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--accuracy-len", "128", "--repeats", "2",
           "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "attention_kernel_cpu_bf16.json").read_text())
    cases = {r["case"] for r in report["accuracy"]}
    assert cases == {"causal", "full", "offset", "packed-dense", "packed-pieces"}
    for r in report["accuracy"]:
        assert r["ok"] and 0 < r["ratio"] <= 2.0, r
        assert all(0 < e < 1e-2 for e in r["errors"].values()), r
    rows = {(r["case"], r["length"], r["backend"]) for r in report["speed"]}
    assert rows == {("causal", 256, "torch"), ("packed", 256, "torch"), ("packed", 256, "torch-dense"),
                    ("causal", 512, "torch"), ("packed", 512, "torch"), ("packed", 512, "torch-dense")}
    assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in report["speed"])
    assert (tmp_path / "attention_kernel_cpu_bf16.png").exists()
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(ATTENTION_SCRIPT), "--from-json",
                           str(tmp_path / "attention_kernel_cpu_bf16.json"), "--out", str(again), "--no-plots"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (again / "attention_kernel_cpu_bf16.md").read_text() == (tmp_path / "attention_kernel_cpu_bf16.md").read_text()
