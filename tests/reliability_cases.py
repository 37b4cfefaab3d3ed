"""Cases for the reliability tests that run inside a process group (see distributed.run_group)."""
from __future__ import annotations

import os

import torch.distributed as dist

from cases import TINY


class Evil:
    """A pickle that runs a command when it is unpickled: it must never be."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Silent:
    def write(self, line):
        pass


def trainer_for(overrides: list[str]):
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    return Trainer(load_recipe(None, TINY + list(overrides) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]))


def train_then_resume(first: list[str], second: list[str], tamper=None, tamper_args=()) -> dict:
    """Train with `first`, optionally tamper with the checkpoint (rank 0), then build a trainer from
    `second` and resume; returns the error line or the resumed step."""
    first_result = trainer_for(first).run()
    dist.barrier()
    if tamper is not None and dist.get_rank() == 0:
        tamper(*tamper_args)
    dist.barrier()
    trainer = trainer_for(second)
    try:
        trainer.maybe_resume(Silent())
    except Exception as err:  # noqa: BLE001 - the test looks at the message
        return {"error": f"{type(err).__name__}: {err}", "losses": first_result.losses}
    return {"error": None, "step": trainer.step, "losses": first_result.losses}


def load_with_bytes_entry(ckpt_dir: str, marker: str) -> dict:
    """A DCP checkpoint whose non-tensor entry is a malicious pickle, loaded by CheckpointManager."""
    import torch
    import torch.distributed.checkpoint as dcp

    from longtrain.launcher.checkpoint import FORMAT_VERSION, CheckpointError, CheckpointManager

    dcp.save({"w": torch.ones(3), "hyper": Evil(marker)}, checkpoint_id=ckpt_dir)
    if dist.get_rank() == 0:
        with open(os.path.join(ckpt_dir, "meta.json"), "w") as f:
            f.write(f'{{"format_version": {FORMAT_VERSION}, "world_size": 1}}')
    dist.barrier()
    state = {"w": torch.zeros(3), "hyper": 0.0}
    try:
        from pathlib import Path

        CheckpointManager.load(Path(ckpt_dir), state)
    except CheckpointError as err:
        return {"error": str(err), "w": state["w"].tolist()}
    return {"error": None, "hyper": repr(state["hyper"])}


def save_hits_full_disk(ckpt_dir: str, how: str) -> dict:
    """Train 2 steps; the save at the end hits a full disk (`how`: an OSError(ENOSPC) from the
    writer, or torch's zip writer's short-write error with too little free space)."""
    import errno
    import shutil
    from collections import namedtuple

    import torch.distributed.checkpoint as dcp

    from longtrain.launcher import checkpoint as ckpt_mod

    real_save, real_usage = dcp.save, shutil.disk_usage

    def full_save(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        if how == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    Usage = namedtuple("Usage", "total used free")
    ckpt_mod.dcp.save = full_save
    ckpt_mod.shutil.disk_usage = lambda path: Usage(10 ** 9, 10 ** 9 - 4096, 4096)
    try:
        trainer_for(["train.steps=2", f"checkpoint.dir={ckpt_dir}", "checkpoint.save_at_end=true"]).run()
        error = None
    except Exception as err:  # noqa: BLE001
        error = f"{type(err).__name__}: {err}"
    finally:
        ckpt_mod.dcp.save, ckpt_mod.shutil.disk_usage = real_save, real_usage
    return {"error": error, "left": sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []}


def write_evil_pickle(path: str, marker: str) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(Evil(marker), f)


def write_evil_torch_save(path: str, marker: str) -> None:
    import torch

    torch.save({"cpu": Evil(marker)}, path)


def overwrite(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def truncate(path: str, keep: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    overwrite(path, data[:keep])


def tamper_cases(root: str, cases: list) -> list:
    """Train once (2 steps, saved); for each case (tamper function name, file relative to the
    checkpoint, argument) copy the checkpoint, damage the copy and resume from it. Returns the
    error line (or None) and the resumed step per case."""
    import shutil

    saved = os.path.join(root, "saved")
    trainer_for(["train.steps=2", f"checkpoint.dir={saved}", "checkpoint.save_at_end=true"]).run()
    out = []
    for i, (tamper, target, arg) in enumerate(cases):
        copy = os.path.join(root, f"case{i}")
        if dist.get_rank() == 0:
            shutil.copytree(saved, copy)
            if tamper is not None:
                globals()[tamper](os.path.join(copy, "step_00000002", target), arg)
        dist.barrier()
        trainer = trainer_for(["train.steps=4", f"checkpoint.dir={copy}"])
        try:
            trainer.maybe_resume(Silent())
            out.append({"error": None, "step": trainer.step})
        except Exception as err:  # noqa: BLE001 - the test looks at the message
            out.append({"error": f"{type(err).__name__}: {err}"})
    return out


def nonfinite_cases(root: str, cases: list) -> list:
    """For each case {"overrides", "bad_steps": {step: "loss"|"grad"}, "times": n}: train with a NaN
    planted into the loss (the model's output) or one gradient at those steps, at most `times`
    times each; report the error, losses, checkpoints on disk, optimizer step counts, weights."""
    import math

    import torch

    from cases import full_weights
    from longtrain.launcher.checkpoint import find_resume_dir

    out = []
    for i, case in enumerate(cases):
        ckpt = os.path.join(root, f"case{i}")
        trainer = trainer_for(list(case["overrides"]) + [f"checkpoint.dir={ckpt}"])
        model = trainer.parts[0]
        planted = {int(k): v for k, v in case["bad_steps"].items()}
        fired: dict = {}

        def due(kind):
            step = trainer.step + 1
            if planted.get(step) == kind and fired.get(step, 0) < case.get("times", 1):
                fired[step] = fired.get(step, 0) + 1
                return True
            return False

        def poison_output(module, args, output):
            return output * float("nan") if due("loss") else output

        first = next(p for p in model.parameters())

        def poison_grad(grad):
            return grad * float("inf") if due("grad") else grad

        model.register_forward_hook(poison_output)
        first.register_hook(poison_grad)
        error = None
        try:
            result = trainer.run()
            losses, nonfinite = result.losses, result.nonfinite
        except Exception as err:  # noqa: BLE001 - the test looks at the message
            error, losses, nonfinite = f"{type(err).__name__}: {err}", {}, []
        latest = find_resume_dir(ckpt, "auto")
        opt_steps = sorted({int(s["step"]) for opt in trainer.optimizers for s in opt.state.values()})
        weights = full_weights(trainer)
        out.append({"error": error, "losses": losses, "nonfinite": nonfinite,
                    "latest": os.path.basename(str(latest)) if latest else None, "optimizer_steps": opt_steps,
                    "finite": all(bool(torch.isfinite(w).all()) for w in weights.values()),
                    "all_losses_finite": all(math.isfinite(v) for v in losses.values())})
        dist.barrier()
    return out


def resume_into_other_models(root: str, cases: list) -> dict:
    """Train and save the tiny model; then for each list of overrides build that trainer on the
    same checkpoint directory and resume. Returns the error line or the step, the optimizer's
    state size and whether the weights equal the saved run's."""
    import torch

    from cases import full_weights

    ckpt = os.path.join(root, "ckpt")
    first = trainer_for(["train.steps=2", f"checkpoint.dir={ckpt}", "checkpoint.save_at_end=true"])
    first.run()
    saved = full_weights(first)
    out = []
    for overrides in cases:
        overrides = [o.replace("CKPT", ckpt).replace("ROOT", root) for o in overrides]
        try:
            trainer = trainer_for(overrides)
            trainer.maybe_resume(Silent())
        except Exception as err:  # noqa: BLE001 - the test looks at the message
            out.append({"error": f"{type(err).__name__}: {err}"})
            continue
        weights = full_weights(trainer)
        same = weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
        optim_state = sum(len(opt.state) for opt in trainer.optimizers)
        losses = trainer.run().losses
        out.append({"error": None, "step": trainer.step - len(losses), "same_weights": same,
                    "optim_state": optim_state, "losses": losses})
    return out


def train_in(run_dir: str) -> str | None:
    """Train two steps in run_dir; the error line, or None."""
    try:
        trainer_for(["train.steps=2", f"run.dir={run_dir}"]).run()
    except Exception as err:  # noqa: BLE001 - the test looks at the message
        return f"{type(err).__name__}: {err}"
    return None


def save_on_small_disk(ckpt_dir: str) -> dict:
    """Train one step and save into ckpt_dir (on a disk too small for the checkpoint)."""
    try:
        trainer_for(["train.steps=1", f"checkpoint.dir={ckpt_dir}", "checkpoint.save_at_end=true"]).run()
        error = None
    except Exception as err:  # noqa: BLE001
        error = f"{type(err).__name__}: {err}"
    return {"error": error, "left": sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []}
