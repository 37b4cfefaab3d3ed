"""Smoke test of benchmarks/ssm.py: a tiny run (cp 1 and 2, the mixer at two short lengths and the
hybrid stack at one) in a subprocess writes the JSON, the markdown and the plots. Timings are not
judged (noise at this size); what is exact is: both SSM cp modes match cp 1 (the correctness
guard, 1e-5), and the bytes each rank sends per Mamba layer equal the formulas (flat in the length
for state passing, linear for all-to-all)."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ssm.py"
MODES = ["state_passing", "all_to_all"]


def test_ssm_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--cps", "1,2", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "ssm.json").read_text())
    assert {"machine", "config", "summary", "raw", "plots", "elapsed_s", "other_processes_cpu_share"} <= set(report)
    assert {"cpu_count", "cpu", "torch_version", "platform"} <= set(report["machine"])
    cfg = report["config"]
    assert cfg["lengths"] == [256, 512] and cfg["stack_lengths"] == [256, 512] and cfg["cps"] == [1, 2]
    assert cfg["threads_per_rank"] == 1 and cfg["batch"] == 1 and cfg["precision"] == "fp32"
    assert cfg["modes"] == MODES and cfg["stack"]["pattern"] == "M-M*-"

    s = report["summary"]
    assert {"mixer", "stack", "crossover", "guard"} <= set(s)
    for part, lengths in (("mixer", ("256", "512")), ("stack", ("256", "512"))):
        for x in lengths:
            single = s[part]["1"]["single"][x]
            assert single["wall_s"] > 0 and single["peak_bytes"] > single["input_bytes"] > 0
        for mode in MODES:
            for x in lengths:
                r = s[part]["2"][mode][x]
                assert r["wall_s"] > 0 and r["max_rank_cpu_s"] > 0 and r["peak_bytes"] > 0
                assert len(r["peak_bytes_per_rank"]) == 2 and r["memory_ratio_vs_cp1"] > 0
                # The correctness guard: the cp output equals cp 1's.
                assert r["max_abs_diff_vs_cp1"]["out"] <= 1e-5 and r["guard_ok"], (part, mode, x, r["max_abs_diff_vs_cp1"])
                assert r["max_abs_diff_vs_cp1"]["dx"] <= 1e-5
                # Byte counts are exact.
                assert abs(r["mamba_bytes_over_formula"] - 1) < 1e-9, (part, mode, x, r["bytes_per_mamba_layer"])
                assert r["other_bytes"] == 0
        if part == "stack":
            assert abs(s["stack"]["2"]["all_to_all"]["256"]["attention_bytes_over_formula"] - 1) < 1e-9
    # State passing: flat in the length; all-to-all: linear.
    sp = [s["mixer"]["2"]["state_passing"][x]["bytes_per_mamba_layer"]["total"] for x in ("256", "512")]
    a2a = [s["mixer"]["2"]["all_to_all"][x]["bytes_per_mamba_layer"]["total"] for x in ("256", "512")]
    assert sp[0] == sp[1] > 0 and abs(a2a[1] / a2a[0] - 2) < 1e-9
    # The stack's Mamba layers send what the lone mixer sends.
    for mode in MODES:
        assert (s["stack"]["2"][mode]["256"]["bytes_per_mamba_layer"]["total"]
                == s["mixer"]["2"][mode]["256"]["bytes_per_mamba_layer"]["total"])
    # Above --stack-timed-max-len the stack is timed by its check pass alone.
    assert "timed_from" not in s["stack"]["2"]["state_passing"]["256"]
    assert s["stack"]["2"]["state_passing"]["512"]["timed_from"] == "check pass"
    cx = s["crossover"]["2"]
    assert abs(cx["bytes"]["measured_tokens"] / cx["bytes"]["tokens"] - 1) < 1e-9
    assert {"time_mixer_wall", "time_mixer_cpu", "time_stack_wall"} <= set(cx)
    assert s["guard"]["passed"] is True and s["guard"]["max_abs_diff_out"] <= 1e-5

    markdown = (tmp_path / "ssm.md").read_text()
    for heading in ("Forward+backward wall time, mixer", "Forward+backward wall time, stack", "Per-rank peak memory",
                    "Bytes sent per rank per Mamba layer", "Crossover", "L* = N² [(k-1)C + (N-1)h(pn+1)]",
                    "Correctness guard", "Method"):
        assert heading in markdown, heading
    assert markdown.strip() in proc.stdout  # printed at the end

    assert sorted(report["plots"]) == ["ssm_bytes.png", "ssm_memory.png", "ssm_time.png"]
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_fail_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--modes", "scan"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--modes: unknown scan" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--lengths", "1000", "--cps", "3"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "must divide by cp 3" in proc.stderr
