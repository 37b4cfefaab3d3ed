"""Smoke test of benchmarks/chunked_loss.py: a tiny run in a subprocess writes the JSON and the
markdown; the chunked loss's peak memory is at least 3x lower than the full logits' at chunks of
1/8 and 1/4 of the tokens, with the same loss (1e-6 relative) and gradients; under tp2 the
vocabulary-parallel chunks' peak a rank is at least 3x below the gathered full logits'."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "chunked_loss.py"


def test_chunked_loss_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "chunked_loss.json").read_text())
    assert {"machine", "config", "summary", "elapsed_s"} <= set(report)
    cfg, s = report["config"], report["summary"]
    assert cfg["tokens"] == 512 and cfg["vocab"] == 8192 and cfg["chunks"] == [64, 128]
    full = s["full"]
    assert full["peak_bytes"] >= full["logits_fp32_bytes"] == 512 * 8192 * 4
    for chunk in ("64", "128"):
        r = s["chunked"][chunk]
        assert r["ratio_vs_full"] >= 3.0, (chunk, r)
        assert r["peak_bytes"] >= int(chunk) * 8192 * 4  # one chunk's fp32 logits is alive: measured, not zero
        # ... and only one (softmax and its gradient in place), beside the fp32 grad of W and grad h
        assert r["peak_bytes"] <= 1.25 * int(chunk) * 8192 * 4 + 8192 * 32 * 4 + 4 * 512 * 32 * 4, (chunk, r)
        assert r["loss_rel_diff"] <= 1e-6
        assert r["grad_h_max_abs_diff"] <= 1e-5 and r["grad_w_max_abs_diff"] <= 1e-4
    tp = s["tp"]
    assert tp["tp"] == 2 and tp["tokens"] == 512 and tp["full"]["peak_bytes"] >= 512 * 8192 * 4  # gathered logits
    for chunk in ("64", "128"):
        r = tp["chunked"][chunk]
        assert r["ratio_vs_full"] >= 3.0, (chunk, r)
        assert r["peak_bytes"] >= r["local_logits_fp32_bytes"] == int(chunk) * 4096 * 4  # chunk x vocab/2 logits
        # One chunk's logits buffer at a time (softmax and its gradient formed in place in it),
        # beside the fp32 gradient of the rank's weight rows and the hidden states' gradient.
        assert r["peak_bytes"] <= 1.25 * r["local_logits_fp32_bytes"] + 4096 * 32 * 4 + 4 * 512 * 32 * 4, (chunk, r)
        assert r["loss_rel_diff"] <= 1e-6
        assert r["grad_h_max_abs_diff"] <= 1e-5 and r["grad_w_max_abs_diff"] <= 1e-4
    md = (tmp_path / "chunked_loss.md").read_text()
    assert "x lower than full" in md and "Tensor parallel: tp2, per rank" in md
