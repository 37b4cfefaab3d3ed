"""`longtrain slurm`: the sbatch script it writes, the checks it makes against the recipe (one line
each), and --submit through sbatch. The script running on a real cluster: tests/test_slurm_cluster.py."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.launcher.config import RecipeError, load_recipe
from longtrain.launcher.slurm import SlurmJob, check_job, sbatch_script, time_limit_seconds

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
LLAMA = str(ROOT / "configs" / "llama3_8b.yaml")
TWO_BY_TWO = ["run.launch.nnodes=2", "run.launch.nproc_per_node=2", "train.device=cpu"]


def longtrain(*args, cwd=None, env=None):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def sbatch_options(script: str) -> dict:
    return dict(line[len("#SBATCH --"):].split("=", 1) if "=" in line else (line[len("#SBATCH --"):], "")
                for line in script.splitlines() if line.startswith("#SBATCH --"))


def command_of(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, script
    return shlex.split(lines[0])


def test_one_task_per_rank_script(tmp_path):
    overrides = [*TWO_BY_TWO, "train.steps=5", "run.dir=runs/my run"]
    recipe = load_recipe(DEBUG, overrides)
    script = sbatch_script(recipe, DEBUG, overrides, SlurmJob(nodes=2, time="1-00:00:00", partition="gpu",
                                                              signal_before=600), workdir=tmp_path)
    opts = sbatch_options(script)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "2" and "gpus-per-node" not in opts  # a CPU job
    assert opts["time"] == "1-00:00:00" and opts["partition"] == "gpu"
    assert "requeue" in opts and opts["signal"] == "TERM@600"
    assert opts["chdir"] == str(tmp_path) and opts["output"] == f"{tmp_path}/runs/my run/slurm-%j.out"
    assert opts["open-mode"] == "append"  # a requeued job appends to the same output
    cmd = command_of(script)
    assert cmd[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert cmd[2:] == [sys.executable, "-m", "longtrain.launcher.cli", "train", DEBUG, *overrides]  # quoted run.dir
    assert "pp=1 x dp_replicate=1 x dp_shard=2 x cp=1 x tp=2" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_gpu_job_defaults_to_one_rank_per_gpu_and_torchrun_per_node(tmp_path):
    recipe = load_recipe(LLAMA)  # 2 nodes x 8 ranks
    script = sbatch_script(recipe, LLAMA, [], SlurmJob(nodes=2), workdir=tmp_path)
    opts = sbatch_options(script)
    assert opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    script = sbatch_script(recipe, LLAMA, [], SlurmJob(nodes=2, gpus_per_node=8, per_node="torchrun"),
                           workdir=tmp_path)
    opts = sbatch_options(script)
    assert opts["ntasks-per-node"] == "1" and opts["gpus-per-node"] == "8" and "exclusive" in opts
    cmd = command_of(script)
    run = cmd[cmd.index("torch.distributed.run") + 1:]
    assert "--nnodes=2" in run and "--nproc-per-node=8" in run and "--rdzv-backend=c10d" in run
    assert "--rdzv-endpoint=$head:$((20000" in " ".join(run) and "--max-restarts=0" in run
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("overrides,job,expected", [
    (["train.device=cpu"], dict(nodes=2), "run.launch.nnodes=1 but --nodes 2: set run.launch.nnodes=2"),
    (TWO_BY_TWO, dict(nodes=2, gpus_per_node=0, time="10", signal_before=600),
     "--signal-before 600 s is not less than --time 10 (600 s)"),
    (TWO_BY_TWO, dict(nodes=2, gpus_per_node=4), "train.device=cpu but --gpus-per-node 4"),
    (["run.launch.nnodes=2", "run.launch.nproc_per_node=4", "train.device=cuda"], dict(nodes=2, gpus_per_node=8),
     "run.launch.nproc_per_node=4 but --gpus-per-node 8 (one rank per GPU): set run.launch.nproc_per_node=8"),
    ([*TWO_BY_TWO, "parallel.tp=3"], dict(nodes=2),
     "parallel degrees dp_replicate=1 x cp=1 x tp=3 x pp=1 = 3 do not divide the world size 4"),
    ([*TWO_BY_TWO, "parallel.dp_shard=4"], dict(nodes=2), "= 8, but the world size is 4"),
    (TWO_BY_TWO, dict(nodes=2, time="1:2:3:4"), "--time: '1:2:3:4' is not a Slurm time"),
])
def test_mismatches_fail_with_one_line(overrides, job, expected):
    with pytest.raises(RecipeError) as err:  # the degrees fail already when the recipe is read
        check_job(load_recipe(DEBUG, overrides), DEBUG, SlurmJob(**job))
    assert str(err.value).startswith(f"{DEBUG}: ") and expected in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-0", 86400),
                                          ("1-2:30", 95400), ("0-00:10:05", 605)])
def test_time_limit_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_cli_writes_the_script_and_submits_through_sbatch(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "4242;cluster"\n')
    (fake / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    proc = longtrain("slurm", DEBUG, *TWO_BY_TWO, "run.dir=run", "--nodes", "2", "--time", "2:00:00", "--submit",
                     cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "run" / "longtrain.sbatch"
    assert f"wrote {script}" in proc.stdout and "submitted job 4242" in proc.stdout
    assert (fake / "args").read_text().split() == ["--parsable", str(script)]
    assert sbatch_options(script.read_text())["time"] == "2:00:00" and os.access(script, os.X_OK)

    (fake / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: Batch job submission failed: Invalid partition '
                                 'name specified" >&2\nexit 1\n')
    proc = longtrain("slurm", DEBUG, *TWO_BY_TWO, "run.dir=run", "--nodes", "2", "--partition", "nope", "--submit",
                     cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"longtrain: error: --submit: sbatch {script} failed: sbatch: error: Batch job submission failed: "
        "Invalid partition name specified"]


def test_cli_mismatch_writes_nothing(tmp_path):
    proc = longtrain("slurm", DEBUG, "run.dir=run", "--nodes", "2", "--out", str(tmp_path / "job.sbatch"),
                     cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"longtrain: error: {DEBUG}: run.launch.nnodes=1 but --nodes 2: set run.launch.nnodes=2"]
    assert not (tmp_path / "job.sbatch").exists()


def test_shipped_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("debug_cpu", TWO_BY_TWO)
    cmd = command_of(sbatch_script(recipe, "debug_cpu", TWO_BY_TWO, SlurmJob(nodes=2)))
    assert Path(cmd[cmd.index("train") + 1]).resolve() == (ROOT / "configs" / "debug_cpu.yaml").resolve()
