"""How a job starts: join a torchrun or SLURM job, or start N local workers.

- Under torchrun (RANK and WORLD_SIZE set), this process is one worker: train here.
- Under srun (SLURM_PROCID / SLURM_NTASKS set, no RANK), map SLURM's variables to torch's
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR from the first node of the allocation) and train.
- Otherwise, with `run.launch.nproc_per_node` > 1, start that many local workers
  (launcher/supervisor.py): the first failing worker ends the job (or, under
  `run.launch.max_restarts`, restarts it from the last checkpoint) and its error is reported.
The recipe is validated against the world size before any worker starts.
"""
from __future__ import annotations

import os
import re
import subprocess

from longtrain.launcher.config import Recipe, RecipeError, recipe_from_dict, validate_recipe


class LaunchError(RuntimeError):
    """A failed job; str() is the one line to show."""


def _expected_failures() -> tuple:
    """Failures with a message meant for the user (the rest keep their traceback: bugs)."""
    from longtrain.data.sources import BadRecord
    from longtrain.launcher.trainer import NonFiniteError

    from longtrain.launcher.run_lock import RunDirLocked

    return (BadRecord, NonFiniteError, RunDirLocked)  # CheckpointError, RecipeError: the CLI shows them (exit 2)


class StoppedBySignal(RuntimeError):
    """The job was stopped by a signal after saving a checkpoint."""


def environment() -> str:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    return "local"


def slurm_master_addr(nodelist: str) -> str:
    """The first host of a SLURM node list (scontrol when present, else a parse of the compact
    form, e.g. `gpu[003-005,009],cpu1` -> gpu003)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def join_slurm_job() -> None:
    env = os.environ
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", slurm_master_addr(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def world_size_for(recipe: Recipe) -> int:
    if environment() == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if environment() == "slurm":
        return int(os.environ["SLURM_NTASKS"])
    return recipe.run.launch.nproc_per_node * recipe.run.launch.nnodes


def preflight(recipe: Recipe, source: str, launching: bool = True) -> int:
    """Everything that can be checked before workers start; returns the world size."""
    from longtrain.launcher.checkpoint import find_resume_dir
    from pathlib import Path

    world = world_size_for(recipe)
    if launching and environment() == "local" and recipe.run.launch.nnodes > 1:
        raise RecipeError(f"{source}: run.launch.nnodes={recipe.run.launch.nnodes}: a multi-node job starts "
                          f"under torchrun or srun (see README, SLURM)")
    validate_recipe(recipe, source, world_size=world)
    for key, path in (("run.dir", recipe.run.dir), ("checkpoint.dir", recipe.checkpoint.dir)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise RecipeError(f"{source}: {key}: {path} exists and is not a directory")
    if launching:  # `longtrain config` prints recipes whose data lives on another machine
        check_data(recipe, source)
    find_resume_dir(Path(recipe.checkpoint.dir or Path(recipe.run.dir) / "checkpoints"), recipe.checkpoint.resume)
    if recipe.checkpoint.init_from:
        find_resume_dir(".", recipe.checkpoint.init_from, key="checkpoint.init_from")
    return world


def check_data(recipe: Recipe, source: str) -> None:
    """Open the tokenizer and the data sources before any worker starts: missing or empty files,
    a tokenizer file that is not there, and a model vocabulary smaller than the tokenizer's fail
    here with one line."""
    from longtrain.data.pipeline import DataSettings
    from longtrain.data.sources import open_source
    from longtrain.data.tokenizers import build_tokenizer, check_special_tokens
    from longtrain.models.sizes import resolve_model_config

    d = recipe.data
    try:
        tokenizer = build_tokenizer(d.tokenizer)
        check_special_tokens(tokenizer, d.add_bos, d.add_eos)
        vocab = resolve_model_config(recipe.model).vocab_size
        if vocab < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size: {vocab} is smaller than the vocabulary of data.tokenizer "
                             f"{d.tokenizer} ({tokenizer.vocab_size}); set model.vocab_size: {tokenizer.vocab_size}"
                             " or more")
        if d.packing != "none":
            for spec in DataSettings.from_config(d, recipe.train.seed, "train").sources:
                open_source(spec, "train", recipe.train.seed)
    except ValueError as err:
        raise RecipeError(f"{source}: {err}") from None


def worker(recipe_dict: dict) -> dict:
    """One training process (also the entry point of launched workers)."""
    from longtrain.launcher.trainer import train

    import torch.distributed as dist

    recipe = recipe_from_dict(recipe_dict, "recipe")
    result = train(recipe)
    if dist.is_initialized():  # leave together, with no backend work in flight
        dist.barrier()
        dist.destroy_process_group()
    return {"last_step": result.last_step, "stopped_by_signal": result.stopped_by_signal,
            "stop_checkpoint": result.stop_checkpoint}


def launch(recipe: Recipe, source: str = "recipe") -> None:
    world = preflight(recipe, source)
    where = environment()
    if where == "slurm":
        join_slurm_job()
    if where != "local" or (world == 1 and recipe.run.launch.max_restarts == 0):
        from longtrain.launcher.run_lock import RunDirLocked

        try:
            worker(recipe.to_dict())
        except RunDirLocked:
            raise  # the CLI shows it (exit 2)
        except _expected_failures() as err:  # bad data, NaN: one line, not a traceback
            raise LaunchError(f"{type(err).__name__}: {' '.join(str(err).split())}") from None
        return
    _launch_local(recipe, world)


def _launch_local(recipe: Recipe, nproc: int) -> None:
    """Start `nproc` workers on this node (launcher/supervisor.py), holding the run.dir lock."""
    from longtrain.launcher.run_lock import RunLock
    from longtrain.launcher.supervisor import JobFailed, JobStopped, Supervisor

    with RunLock(recipe.run.dir):
        try:
            Supervisor(recipe.to_dict(), nproc).run()
        except JobFailed as err:
            raise LaunchError(str(err)) from None
        except JobStopped as err:
            raise StoppedBySignal(str(err)) from None
