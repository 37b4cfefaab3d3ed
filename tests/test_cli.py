"""The `longtrain` command as users run it: one clear line and a non-zero exit for bad input,
the failing rank's error for a worker failure, and a clean checkpointed stop on SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
TINY = ["model.name=tiny", "data.seq_len=32", "data.batch_size=2", "run.tensorboard=false", "run.progress=false"]


def longtrain(*args, timeout=120, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("longtrain: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_config_prints_resolved_recipe(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {DEBUG}\ntrain:\n  steps: 7\n")
    proc = longtrain("config", str(child), "parallel.tp=1", "optim.lr=1e-4")
    assert proc.returncode == 0, proc.stderr
    assert "steps: 7" in proc.stdout and "lr: 0.0001" in proc.stdout and "nproc_per_node: 4" in proc.stdout


@pytest.mark.parametrize("overrides,expected", [
    (["parallel.tpp=2"], "parallel.tpp: unknown key (did you mean 'tp'?)"),
    (["train.steps=many"], "train.steps: expected an integer, got str 'many'"),
    (["parallel.tp=3"], "parallel degrees dp_replicate=1 x cp=1 x tp=3 x pp=1 = 3 do not divide the world size 4"),
    (["parallel.dp_shard=4"], "parallel degrees pp=1 x dp_replicate=1 x dp_shard=4 x cp=1 x tp=2 = 8, but the world size is 4"),
    (["parallel.tp=4", "model.name=tiny", "model.n_kv_heads=1", "model.n_heads=2"],
     "model.n_heads: 2 heads do not divide by parallel.tp=4"),
    (["parallel.pp=4", "parallel.tp=1", "model.n_layers=3"], "model.n_layers: 3 layers cannot fill 4 pipeline stages"),
    (["parallel.cp_mode=rng"], "parallel.cp_mode: 'rng' is not one of"),
    (["checkpoint.resume=/definitely/not/here"], "checkpoint.resume: /definitely/not/here does not exist"),
])
def test_bad_input_fails_fast_with_one_line(overrides, expected):
    proc = longtrain("train", DEBUG, *overrides, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert expected in line, line
    assert "Traceback" not in proc.stderr


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    proc = longtrain("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in one_error_line(proc)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    proc = longtrain("train", str(bad))
    assert proc.returncode == 2 and f"{bad}:" in one_error_line(proc) and "not valid YAML" in one_error_line(proc)


def test_incomplete_checkpoint_fails_fast(tmp_path):
    broken = tmp_path / "ckpt" / ".tmp_step_00000010"
    broken.mkdir(parents=True)
    (broken / ".metadata").write_bytes(b"")
    proc = longtrain("train", DEBUG, f"checkpoint.resume={broken}")
    assert proc.returncode == 2 and "save never completed" in one_error_line(proc)
    proc = longtrain("train", DEBUG, f"checkpoint.resume={tmp_path / 'ckpt'}")
    assert proc.returncode == 2 and "no completed checkpoint (no 'latest' file)" in one_error_line(proc)


def test_worker_failure_ends_the_job_with_its_error(tmp_path):
    bad_hf = tmp_path / "hf"
    bad_hf.mkdir()
    (bad_hf / "config.json").write_text("{not json")
    proc = longtrain("train", DEBUG, *TINY, "--nproc", "2", "parallel.tp=1", f"run.dir={tmp_path / 'run'}",
                     f"model.hf_checkpoint={bad_hf}", timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_error_line(proc)
    assert "worker rank" in line and "config.json" in line, line


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "longtrain.launcher.cli", "train", DEBUG, *TINY, "--nproc", "2",
                             "parallel.tp=1", "train.steps=100000", "train.log_every=1", f"run.dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 150
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    assert metrics.exists(), "training never logged a step"
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job gets it
    out, err = proc.communicate(timeout=120)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= meta["step"] < 100000
    assert meta["step"] == logged[-1]
    assert proc.returncode in (0, 143), err[-2000:]
