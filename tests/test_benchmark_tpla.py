"""Smoke test of benchmarks/tpla.py (tiny preset, subprocess): JSON, markdown and plots written;
per-rank cache bytes are (d_c/g + d_r)/(d_c + d_r) of head-split MLA's; the absorbed decode of the
accuracy part equals the full forward; TPLA g=1 is not run, g=2/4 rows exist for every rotation."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

ROOT = Path(__file__).resolve().parents[1]


def test_tpla_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tpla.py"), "--preset", "tiny", "--out", str(tmp_path),
           "--recipe", str(ROOT / "configs" / "debug_cpu.yaml"), "model.name=mla-tiny", "model.attention=mla",
           f"run.dir={tmp_path / 'run'}", "--gloo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "tpla.json").read_text())
    assert {"machine", "config", "decode", "summary", "accuracy", "plots"} <= set(report)
    assert set(report["plots"]) == {"tpla_decode.png", "tpla_accuracy.png", "tpla_gloo.png"}
    # --gloo: the step over real processes, per degree, length and scheme, with the same cache bytes
    gloo = {(r["scheme"], r["g"], r["length"]): r for r in report["gloo"]}
    assert set(gloo) == {(s, g, n) for s in ("mla", "tpla") for g in (2, 4) for n in (256, 512)}
    for (scheme, g, n), r in gloo.items():
        assert r["best_s"] >= r["all_reduce_s"] > 0
        assert r["cache_bytes_per_rank"] == next(d for d in report["decode"] if (d["scheme"], d["g"], d["length"]) ==
                                                 (scheme, g, n))["cache_bytes_per_rank"]
    assert "## Real processes (gloo)" in (tmp_path / "tpla.md").read_text()
    assert (tmp_path / "tpla.md").read_text().startswith("# TPLA vs MLA decode")
    d_c, d_r = 64, 16  # the tiny shapes
    for key, s in report["summary"].items():
        g = int(key.split("_")[0][1:])
        assert abs(s["cache_ratio_tpla_vs_mla"] - (d_c / g + d_r) / (d_c + d_r)) < 1e-12, key
    rows = report["accuracy"]["rows"]
    assert rows[0]["variant"] == "mla" and rows[0]["max_abs_logit_delta"] <= 1e-5
    assert {(r["g"], r["rotation"]) for r in rows[1:]} == {(g, r) for g in (2, 4) for r in ("none", "hadamard", "pca")}
