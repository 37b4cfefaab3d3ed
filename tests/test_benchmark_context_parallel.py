"""Smoke test of benchmarks/context_parallel.py: a tiny run (cp 1 and 2, two short lengths) in a
subprocess writes the JSON, the markdown and the plots. Timings are not judged (noise at this
size); what is exact is: every mode matches cp 1, and the bytes each rank sends equal the
communication formulas (forward and backward, every mode)."""
import pytest
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "context_parallel.py"
CP_MODES = ["ring", "zigzag", "ulysses", "hybrid", "allgather"]


def test_context_parallel_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--lengths", "256,512", "--cps", "2", "--repeats", "2", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "context_parallel.json").read_text())
    assert {"machine", "config", "deepspeed", "summary", "raw", "plots", "elapsed_s"} <= set(report)
    assert {"cpu_count", "torch_version", "platform"} <= set(report["machine"])
    cfg = report["config"]
    assert cfg["lengths"] == [256, 512] and cfg["cps"] == [2] and cfg["threads_per_rank"] == 1
    assert (cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["batch"]) == (4, 2, 32, 1)
    summary = report["summary"]
    for length in ("256", "512"):
        single = summary["single"][length]
        assert single["wall_s"] > 0 and single["cpu_s"] > 0 and single["peak_bytes"] > single["input_bytes"] > 0
        assert len(single["repeats_wall_s"]) == 2
    cp2 = summary["cp"]["2"]
    for mode in CP_MODES:
        for length in ("256", "512"):
            r = cp2[mode][length]
            assert r["exact"], (mode, length, r["max_abs_diff_vs_cp1"])
            assert r["wall_s"] > 0 and r["max_rank_cpu_s"] > 0 and len(r["repeats_wall_s"]) == 2
            assert r["peak_bytes"] > 0 and r["memory_ratio_vs_cp1"] > 0
            # Byte counts are exact: the forward matches the formulas, the backward the derivation.
            assert abs(r["fwd_over_derived"] - 1) < 1e-9, (mode, r["bytes_sent"], r["expected"])
            assert abs(r["total_over_derived"] - 1) < 1e-9, (mode, r["bytes_sent"], r["expected"])
    # The training-step memory view ran at the longest length, every mode exact against cp 1.
    model = summary["model"]
    assert model["length"] == 512 and model["single"]["peak_bytes"] > 0
    assert set(model["cp"]["2"]) >= set(CP_MODES)
    for mode, r in model["cp"]["2"].items():
        assert r["exact"] and r["memory_ratio_vs_cp1"] > 0, (mode, r)
    # Ring-P2P formula with t = the whole sequence: 2(N-1)/N * t * h_kv * d * 4 bytes = 64 KiB at 256.
    assert cp2["ring"]["256"]["bytes_sent"]["fwd"] == 2 * 1 / 2 * 256 * 2 * 32 * 4
    assert abs(cp2["ulysses"]["512"]["fwd_over_formula"] - 1) < 1e-9
    assert summary["all_exact"] is True
    assert "skipped" in summary["targets"]["memory_32k_cp4"]  # 32K and cp 4 not in this run

    markdown = (tmp_path / "context_parallel.md").read_text()
    for heading in ("Forward+backward wall time", "Per-rank compute share", "Per-rank peak memory",
                    "Bytes sent per rank", "DeepSpeed", "Exactness"):
        assert heading in markdown
    assert "2x oversubscribed" in markdown
    assert markdown.strip() in proc.stdout  # printed at the end

    if importlib.util.find_spec("deepspeed") is not None:
        ds = cp2["deepspeed"]["512"]
        assert ds["exact"] and abs(ds["fwd_over_derived"] - 1) < 1e-9
        assert set(summary["targets"]["ulysses_vs_deepspeed"]["ratio_per_point"]) == {"cp2@256", "cp2@512"}
    else:  # the optional `bench` extra is not installed: reported, not failed
        assert "not installed" in report["deepspeed"]["error"] and "deepspeed" not in cp2
        assert "DeepSpeed not run" in markdown

    assert sorted(report["plots"]) == ["context_parallel_memory.png", "context_parallel_time.png"]
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # K/V in pieces round the ring (the default sweep's zigzag-kv8): exact, same bytes as whole blocks
    for length in ("256", "512"):
        pieces, whole = cp2["zigzag-kv8"][length], cp2["zigzag"][length]
        assert pieces["exact"] and pieces["bytes_sent"] == whole["bytes_sent"]
        assert "K/V in 8 pieces" in pieces["layout"]

    # --from-json redraws the plots and the markdown from the JSON alone
    replotted = tmp_path / "replot"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(tmp_path / "context_parallel.json"),
                           "--out", str(replotted)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (replotted / "context_parallel.md").read_text() == markdown
    assert (replotted / "context_parallel_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_fail_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--modes", "rings"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--modes: unknown rings" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--lengths", "100", "--cps", "4"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "must divide by" in proc.stderr


def test_ulysses_memory_floor():
    """The floor the report quotes for one Ulysses call at 32K, cp 4, default shape: the caller's
    shards of q, k, v, dout, out ((3·4 + 2·2) x 8K tokens x 32 dims) plus the head-sharded
    q, k, v, out, dout, dq, dk, dv with 2 kv heads replicated to 4 ((4·4 + 4·4) x the same) = 48 MiB."""
    spec = importlib.util.spec_from_file_location("cp_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = {"heads": 4, "kv_heads": 2, "head_dim": 32, "batch": 1}
    assert bench.ulysses_floor_bytes(cfg, 4, 32768) == 48 * 2 ** 20
    # kv heads = cp: nothing replicated
    assert bench.ulysses_floor_bytes(dict(cfg, kv_heads=4), 4, 32768) == 4 * 8192 * 32 * ((3 * 4 + 2 * 4) + (4 * 4 + 4 * 4))
