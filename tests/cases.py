"""Training cases that run inside a process group (see distributed.run_group)."""
from __future__ import annotations

import torch
import torch.distributed as dist

# A tiny model on short sequences: seconds per case on CPU.
TINY = ["model.name=tiny", "data.seq_len=32", "train.log_every=1", "run.progress=false",
        "run.tensorboard=false", "checkpoint.save_at_end=false", "optim.warmup_steps=2", "optim.lr=3e-3"]


def global_batch(dp: int, global_sequences: int = 8) -> list[str]:
    return [f"data.batch_size={global_sequences // dp}"]


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the model as one full tensor, gathered from all ranks (tiny models only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    local = {}
    for part in trainer.parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        local.update({k: v.detach().cpu().clone() for k, v in sd.items()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def train_cases(cases: list, want_weights: bool = True) -> list[dict]:
    """Train each case in this process group; a case is a list of recipe overrides, or a dict
    {"overrides": [...], "stop_after": k}. Returns per-case losses and final full weights
    (identical on every rank)."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = []
    for case in cases:
        if not isinstance(case, dict):
            case = {"overrides": case}
        overrides = TINY + list(case["overrides"]) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]
        trainer = Trainer(load_recipe(None, overrides))
        result = trainer.run(stop_after=case.get("stop_after"))
        out.append({"losses": result.losses, "eval_losses": result.eval_losses,
                    "weights": full_weights(trainer) if want_weights else None,
                    "last_step": result.last_step, "stopped": result.stopped_by_signal})
        dist.barrier()
    return out


def failed_save_keeps_previous(ckpt_dir: str) -> dict:
    """Train 4 steps saving every 2; make the step-4 save die midway; report what is on disk and
    what a resume finds."""
    import torch.distributed.checkpoint as dcp

    from longtrain.launcher import checkpoint as ckpt_mod
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    recipe = load_recipe(None, TINY + ["train.steps=4", "checkpoint.every=2", f"checkpoint.dir={ckpt_dir}",
                                       "checkpoint.save_at_end=true"])
    real_save = dcp.save

    def dying_save(state, checkpoint_id):
        if "00000004" in str(checkpoint_id):
            real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)  # some shards written...
            raise OSError("disk full (simulated)")  # ...then the save dies
        return real_save(state, checkpoint_id=checkpoint_id)

    ckpt_mod.dcp.save = dying_save
    error = None
    try:
        Trainer(recipe).run()
    except OSError as err:
        error = str(err)
    finally:
        ckpt_mod.dcp.save = real_save
    resume_dir = ckpt_mod.find_resume_dir(ckpt_dir, "auto")
    resumed = Trainer(load_recipe(None, TINY + ["train.steps=4", f"checkpoint.dir={ckpt_dir}"]))
    resumed.maybe_resume(_Silent())
    return {"error": error, "resume_dir": str(resume_dir), "resumed_step": resumed.step}


class _Silent:
    def write(self, line):
        pass
