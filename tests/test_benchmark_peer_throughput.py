"""Smoke tests of benchmarks/peer_throughput.py (longtrain vs torchtitan at torchtitan's llama3
debugmodel shape): longtrain's side always runs and reports, with torchtitan's absence named;
with torchtitan importable, both sides run in the same processes and a ratio is reported."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns process groups (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_throughput.py"
TINY = ["--seq-len", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "2"]
DEBUGMODEL_PARAMS = 6_163_712  # torchtitan's llama3 debugmodel: 6.16M


def _run(tmp_path, *args) -> dict:
    cmd = [sys.executable, str(SCRIPT), *TINY, "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "peer_throughput.json").read_text())


def test_longtrain_side_without_torchtitan(tmp_path):
    report = _run(tmp_path, "--processes", "1,2", "--without-torchtitan")
    assert report["torchtitan"] == "skipped (--without-torchtitan)" and report["torchtitan_ran"] is False
    assert report["phases"] == ["processes_1", "processes_2"] and report["passed"] is None
    assert report["num_params"] == DEBUGMODEL_PARAMS
    cfg = report["config"]
    assert (cfg["seq_len"], cfg["batch_size"], cfg["dim"], cfg["n_layers"], cfg["vocab_size"]) == (32, 2, 256, 6, 2048)
    for key, world, layout in (("processes_1", 1, "single"), ("processes_2", 2, "dp_shard")):
        r = report[key]
        assert r["processes"] == world and layout in r["layout"], r["layout"]
        assert "torchtitan" not in r and r["ratio_longtrain_over_torchtitan"] is None and r["passed"] is None
        windows = r["longtrain"]["repeats_tokens_per_s"]
        assert len(windows) == 2 and all(v > 0 for v in windows)
        assert r["longtrain"]["median_tokens_per_s"] == pytest.approx(sum(windows) / 2)
        assert abs(r["first_loss"]["longtrain"] - math.log(2048)) < 0.5  # a fresh model over 2048 tokens
    markdown = (tmp_path / "peer_throughput.md").read_text()
    assert "torchtitan: skipped (--without-torchtitan)" in markdown and "| 2 | dp_shard" in markdown
    assert (tmp_path / "peer_throughput.png").stat().st_size > 0 and report["figures"] == ["peer_throughput.png"]


def test_status_names_a_missing_torchtitan(monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import peer_throughput
    finally:
        sys.path.remove(str(SCRIPT.parent))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchtitan" else real(name, *a))
    assert peer_throughput.torchtitan_status(False) == "torchtitan not installed"
    assert peer_throughput.torchtitan_status(True) == "skipped (--without-torchtitan)"


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None, reason="torchtitan not installed (optional peer)")
def test_both_sides_with_torchtitan(tmp_path):
    report = _run(tmp_path, "--processes", "1")
    assert report["torchtitan"] == "available" and report["torchtitan_ran"] is True
    r = report["processes_1"]
    assert r["num_params"] == {"longtrain": DEBUGMODEL_PARAMS, "torchtitan": DEBUGMODEL_PARAMS}
    assert len(r["torchtitan"]["repeats_tokens_per_s"]) == 2 and r["torchtitan"]["median_tokens_per_s"] > 0
    assert r["ratio_longtrain_over_torchtitan"] == pytest.approx(
        r["longtrain"]["median_tokens_per_s"] / r["torchtitan"]["median_tokens_per_s"])
    assert r["passed"] == (r["ratio_longtrain_over_torchtitan"] >= 1.05)
    assert abs(r["first_loss"]["torchtitan"] - math.log(2048)) < 1.0  # its loss is a real cross-entropy
