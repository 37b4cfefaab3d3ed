"""Smoke test of benchmarks/ladder_quality.py: a few steps of a tiny standard and ladder model write
the JSON, markdown and PNG; both start from the same weights on the same data (equal first loss
is not expected: the ladder wiring computes something else from the same weights), and the eval
losses are where the markdown says."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder_quality.py"


def test_ladder_quality_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "6", "--eval-every", "3", "--eval-batches", "1",
           "--seq-len", "32", "--batch-size", "2", "--warmup", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ladder_quality.json").read_text())
    res, summary = report["results"], report["summary"]
    assert set(res) == {"standard", "ladder"}
    assert res["standard"]["parameters"] == res["ladder"]["parameters"]  # the same model size
    for name in res:
        assert sorted(map(int, res[name]["losses"])) == list(range(1, 7))
        assert sorted(map(int, res[name]["eval_losses"])) == [3, 6]
    assert summary["final_step"] == 6
    assert summary["final_eval_gap"] == res["ladder"]["eval_losses"]["6"] - res["standard"]["eval_losses"]["6"]
    assert res["ladder"]["losses"]["1"] != res["standard"]["losses"]["1"]  # the ladder wiring is active
    md = (tmp_path / "ladder_quality.md").read_text()
    assert f"| 6 | {res['standard']['eval_losses']['6']:.4f} | {res['ladder']['eval_losses']['6']:.4f} |" in md
    assert (tmp_path / "ladder_quality.png").stat().st_size > 0
