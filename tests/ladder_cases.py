"""Ladder Residual cases that run inside a process group (see distributed.run_group)."""
from __future__ import annotations

from functools import partial

import torch.distributed as dist

from cases import TINY, train_cases


def overlap_trace(overrides: list[str]) -> dict:
    """One forward and backward of a tensor-parallel ladder model with every sublayer's compute
    start (forward and backward) and every reduction's launch and wait (forward: the output
    reductions; backward: the input-gradient reductions) recorded in order: the log, the counts,
    and which layers are ladder layers."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer
    from longtrain.parallel.ladder import SublayerReductions

    recipe = load_recipe(None, TINY + overrides + [f"run.launch.nproc_per_node={dist.get_world_size()}"])
    trainer = Trainer(recipe)
    model = trainer.parts[0]
    reductions = model.residual_sync
    assert isinstance(reductions, SublayerReductions), type(reductions)
    log: list = []
    reductions.log = log
    mixers = []
    for key, block in model.layers.items():
        names = ["mixer"] if hasattr(block, "kind") else ["attention", "feed_forward"]
        for name in names:
            label = f"layers.{key}.{name}"
            mixer = getattr(block, name)
            mixer.register_forward_pre_hook(lambda mod, args, label=label: log.append(("compute", label)))
            # backward: the sublayer's output gradient arrives (its backward starts) and its input
            # gradient is complete (its backward is done)
            mixer.register_forward_hook(partial(_mark_backward, log, label))
            mixers.append((label, block.ladder))
    batch = trainer._local_batch(next(iter(trainer.loader)))
    loss = trainer._loss_fn(model(batch["tokens"], *trainer._meta(batch)), batch["labels"]) \
        / trainer._global_token_count(batch["labels"])
    log.append(("forward_done", ""))
    loss.backward()
    log.append(("backward_end", ""))
    return {"log": log, "counts": dict(reductions.counts), "sublayers": mixers, "in_flight": reductions.in_flight,
            "lazy_pending": sum(len(entry[1]) for entry in reductions.lazy.values())}


def _mark_backward(log: list, label: str, module, args, out) -> None:
    out.register_hook(lambda grad: log.append(("backward", label)))
    args[0].register_hook(lambda grad: log.append(("backward_done", label)))


def ladder_group(train: list, traces: list) -> dict:
    """Training cases (train_cases) and overlap traces in one group."""
    out = {"train": train_cases(train) if train else [], "traces": [overlap_trace(t) for t in traces]}
    dist.barrier()
    return out



def resume_across_residuals(ckpt_dir: str) -> dict:
    """Save a ladder checkpoint after one step; resume it as a standard model and as the same
    ladder model. Returns the refusal line and the step the matching resume reached."""
    from longtrain.launcher.checkpoint import CheckpointError
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    ladder = ["model.residual=ladder", "model.ladder_layers=2", f"checkpoint.dir={ckpt_dir}"]
    Trainer(load_recipe(None, TINY + ladder + ["train.steps=1", "checkpoint.save_at_end=true"])).run()
    refused = None
    try:
        Trainer(load_recipe(None, TINY + [f"checkpoint.dir={ckpt_dir}", "train.steps=2"])).maybe_resume(None)
    except CheckpointError as err:
        refused = str(err)
    same = Trainer(load_recipe(None, TINY + ladder + ["train.steps=2"]))
    same.maybe_resume(_Quiet())
    return {"refused": refused, "resumed_step": same.step}


class _Quiet:
    def write(self, line):
        pass


def finetune_from_converted(recipe_path: str, converted: str, overrides: list[str]) -> dict:
    """The debug adaptation recipe from a converted checkpoint: refused as a standard model (one
    line); as the ladder model it starts from the converted weights and trains."""
    from cases import full_weights
    from longtrain.launcher.checkpoint import CheckpointError
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    overrides = overrides + [f"checkpoint.init_from={converted}"]
    refused = None
    try:
        Trainer(load_recipe(recipe_path, overrides + ["model.residual=standard", "model.ladder_layers=null"])) \
            .maybe_resume(_Quiet())
    except CheckpointError as err:
        refused = str(err)
    trainer = Trainer(load_recipe(recipe_path, overrides))
    trainer.maybe_resume(_Quiet())
    start = full_weights(trainer)
    result = trainer.run()
    return {"refused": refused, "start": start, "losses": result.losses,
            "ladder_layers": trainer.model_cfg.ladder_layers, "counts": dict(trainer.parts[0].residual_sync.counts)}
