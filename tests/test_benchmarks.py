"""Smoke test of benchmarks/train_throughput.py: a tiny run in a subprocess writes the JSON and the
markdown with every expected key (the numbers themselves are not checked: timing on a shared CPU
is noise at this size)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def test_train_throughput_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--seq-len", "32", "--batch-size", "2",
           "--steps", "3", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "train_throughput.json").read_text())
    phases = ["single", "dp2_fsdp", "dp2_fsdp_no_reshard", "dp2_replicate"]
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
            assert r["target"] == 0.95 and r["passed"] == (r["ratio_longtrain_over_plain"] >= 0.95)
        else:  # reported, not judged
            assert r["target"] is None and r["passed"] is None
        # Same model, init and batches on both sides: the first step's loss agrees.
        assert r["losses_match"], r["first_loss"]
    assert report["single"]["layout"] == "single" and report["dp2_fsdp"]["layout"] == "dp_shard2"
    assert report["dp2_replicate"]["layout"] == "dp_replicate2"
    assert report["passed"] == report["single"]["passed"]

    markdown = (tmp_path / "train_throughput.md").read_text()
    assert "| comparison |" in markdown and "single process" in markdown and "dp2" in markdown
    assert "1 intra-op thread per process" in markdown
    assert markdown.strip() in proc.stdout  # printed at the end
