"""`longtrain slurm`: an sbatch script for a recipe, checked against the recipe before it is written.

The script asks for N nodes and, per node, one task per GPU (`--per-node tasks`, the default: srun
starts every rank, longtrain maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to torch's variables and
takes the first node of the allocation as the rendezvous host) or one torchrun per node
(`--per-node torchrun`: c10d rendezvous on the first node of the allocation). It is requeueable
(`--requeue`: preemption or a node failure puts it back in the queue, and `checkpoint.resume: auto`
continues from the last checkpoint) and asks Slurm for SIGTERM `signal_before` seconds before the
time limit (`--signal=TERM@S`), on which every rank finishes its step, saves a checkpoint and exits.

Checked before writing, one line each: run.launch.nnodes against --nodes, run.launch.nproc_per_node
against the tasks per node, train.device against --gpus-per-node, the recipe's parallel degrees
against the world size nodes x tasks, and the signal margin against --time.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from longtrain.launcher.config import Recipe, RecipeError, recipe_file, resolve_degrees, validate_recipe

PER_NODE = ("tasks", "torchrun")


@dataclass
class SlurmJob:
    nodes: int
    gpus_per_node: int | None = None  # None: run.launch.nproc_per_node (0 when train.device=cpu); 0: CPU job
    per_node: str = "tasks"  # tasks: srun starts one task per GPU | torchrun: one torchrun per node
    time: str | None = None  # Slurm's --time (MM, HH:MM:SS, D-HH:MM, ...); None: the partition's limit
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_before: int = 300  # SIGTERM this many seconds before the time limit (Slurm sends it up to 60 s early)


def time_limit_seconds(value: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ValueError(f"--time: {value!r} is not a Slurm time (MM, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H[:M[:S]]
        return ((int(days) * 24 + a) * 60 + b) * 60 + c
    if c or m.group(4) is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    if m.group(3) is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def check_job(recipe: Recipe, source: str, job: SlurmJob) -> tuple[int, int]:
    """(tasks per node, GPUs per node) for this recipe on this job; RecipeError (one line) when
    they do not fit."""
    def fail(msg):
        raise RecipeError(f"{source}: {msg}")

    launch = recipe.run.launch
    if job.per_node not in PER_NODE:
        fail(f"--per-node: {job.per_node!r} is not one of {', '.join(PER_NODE)}")
    if job.nodes < 1:
        fail(f"--nodes: must be at least 1, got {job.nodes}")
    if launch.nnodes != job.nodes:
        fail(f"run.launch.nnodes={launch.nnodes} but --nodes {job.nodes}: set run.launch.nnodes={job.nodes}")
    gpus = job.gpus_per_node
    if gpus is None:
        gpus = 0 if recipe.train.device == "cpu" else launch.nproc_per_node
    if gpus < 0:
        fail(f"--gpus-per-node: must be 0 (a CPU job) or more, got {gpus}")
    if gpus and recipe.train.device == "cpu":
        fail(f"train.device=cpu but --gpus-per-node {gpus}: pass --gpus-per-node 0 or set train.device")
    if gpus == 0 and recipe.train.device == "cuda":
        fail("train.device=cuda but --gpus-per-node 0")
    tasks = gpus or launch.nproc_per_node
    if launch.nproc_per_node != tasks:
        fail(f"run.launch.nproc_per_node={launch.nproc_per_node} but --gpus-per-node {gpus} (one rank per GPU): "
             f"set run.launch.nproc_per_node={tasks}")
    world = job.nodes * tasks
    validate_recipe(recipe, source, world_size=world)  # the degrees against nodes x tasks
    if job.time is not None:
        try:
            limit = time_limit_seconds(job.time)
        except ValueError as err:
            fail(str(err))
        if job.signal_before >= limit:
            fail(f"--signal-before {job.signal_before} s is not less than --time {job.time} ({limit} s): "
                 f"the job would be told to stop before it starts")
    if not 0 < job.signal_before <= 65535:
        fail(f"--signal-before: Slurm takes 1 to 65535 seconds, got {job.signal_before}")
    return tasks, gpus


def sbatch_script(recipe: Recipe, recipe_path: str, overrides: list[str], job: SlurmJob,
                  source: str | None = None, workdir: str | Path | None = None,
                  python: str | None = None) -> str:
    """The sbatch script (checked first with check_job). Paths in it are absolute, so it runs
    unchanged from anywhere; `workdir` (default: the current directory) is the job's working
    directory, where the recipe's relative paths (run.dir, data files) resolve as they do here."""
    source = source or recipe_path
    tasks, gpus = check_job(recipe, source, job)
    workdir = Path(workdir or Path.cwd()).resolve()
    python = python or sys.executable
    run_dir = (workdir / recipe.run.dir).resolve()
    world = job.nodes * tasks
    layout = " x ".join(f"{k}={v}" for k, v in resolve_degrees(recipe.parallel, world, source).items())
    name = job.job_name or f"longtrain-{Path(recipe_path).stem}"

    lines = ["#!/bin/bash",
             f"# Written by `longtrain slurm`: {recipe_path} on {job.nodes} node(s) x {tasks} rank(s) = {world} "
             f"ranks ({layout}).",
             "# SIGTERM (the time limit's signal below, preemption, `scancel --signal=TERM`) makes every rank",
             "# finish its step, save a checkpoint and exit; a requeued or resubmitted job resumes from it.",
             f"#SBATCH --job-name={name}",
             f"#SBATCH --nodes={job.nodes}",
             f"#SBATCH --ntasks-per-node={tasks if job.per_node == 'tasks' else 1}"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if job.per_node == "torchrun":
        lines.append("#SBATCH --exclusive")
    if job.time:
        lines.append(f"#SBATCH --time={job.time}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    lines += ["#SBATCH --requeue",
              f"#SBATCH --signal=TERM@{job.signal_before}",
              f"#SBATCH --chdir={workdir}",
              f"#SBATCH --output={run_dir}/slurm-%j.out",
              "#SBATCH --open-mode=append",
              "",
              'echo "longtrain: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, start $((${SLURM_RESTART_COUNT:-0} + 1))"']
    recipe_abs = str(recipe_file(recipe_path).resolve())  # a shipped recipe's name -> its file
    train = shlex.join(["-m", "longtrain.launcher.cli", "train", recipe_abs, *overrides])
    py = shlex.quote(python)
    if job.per_node == "tasks":
        # One task per rank; --kill-on-bad-exit ends every rank when one fails (srun names it:
        # "srun: error: <node>: task <rank>: ...").
        lines.append(f"srun --kill-on-bad-exit=1 {py} {train}")
    else:
        lines += ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  f"srun --kill-on-bad-exit=1 {py} -m torch.distributed.run --nnodes={job.nodes} "
                  f"--nproc-per-node={tasks} --rdzv-backend=c10d --rdzv-endpoint=$head:$((20000 + SLURM_JOB_ID % 20000)) "
                  f"--rdzv-id=$SLURM_JOB_ID --max-restarts=0 {train}"]
    return "\n".join(lines) + "\n"


def write_script(text: str, recipe: Recipe, out: str | Path | None, workdir: str | Path | None = None) -> Path:
    """Write the script (default: <run.dir>/longtrain.sbatch) and create run.dir, where Slurm writes
    the job's output (it does not create the directory itself)."""
    workdir = Path(workdir or Path.cwd()).resolve()
    run_dir = (workdir / recipe.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = Path(out) if out else run_dir / "longtrain.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit(path: str | Path) -> str:
    """sbatch the script; the job id."""
    if shutil.which("sbatch") is None:
        raise RecipeError("--submit: sbatch is not on PATH (run this on a Slurm login node, or submit the script "
                          "there with `sbatch`)")
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise RecipeError(f"--submit: sbatch {path} failed: {lines[-1].strip()}")
    return proc.stdout.strip().split(";")[0]
