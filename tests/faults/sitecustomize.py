"""Faults for the CLI reliability tests, planted in every process of a job from outside.

Put this directory on PYTHONPATH and describe the fault in LONGTRAIN_FAULT (JSON); Python imports
sitecustomize at startup, and this one patches longtrain.launcher.trainer once it is imported:

  {"kill_rank": R, "at_step": S, "attempt": A}   rank R kills itself (SIGKILL) as step S starts,
                                                 on launcher attempt A (LONGTRAIN_RESTART_COUNT)
  {"hang_rank": R, "at_step": S}                 rank R sleeps forever as step S starts
  {"slow_step": S, "seconds": T, "ready": F}     every rank sleeps T s in step S (F created first)
  {"stall_save_at": S, "ready": F}               the save of step S stalls after the shards are
                                                 written, before meta.json (F created first)
  {"nan_at_step": S}                             the loss of step S is NaN on every rank
Nothing here is imported by longtrain itself.
"""
import json
import os
import sys

FAULT = json.loads(os.environ.get("LONGTRAIN_FAULT") or "{}")


def _touch(path):
    if path:
        with open(path, "a"):
            pass


def _patch(trainer_mod):
    import signal
    import time

    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("LONGTRAIN_RESTART_COUNT", "0"))
    real_step = trainer_mod.Trainer.train_step

    def train_step(self, batch):
        step = self.step + 1
        if FAULT.get("kill_rank") == rank and FAULT.get("at_step") == step and FAULT.get("attempt", 0) == attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULT.get("hang_rank") == rank and FAULT.get("at_step") == step:
            while True:
                time.sleep(1)
        if FAULT.get("slow_step") == step:
            _touch(FAULT.get("ready"))
            time.sleep(FAULT["seconds"])
        return real_step(self, batch)

    trainer_mod.Trainer.train_step = train_step
    if "nan_at_step" in FAULT:
        real_loss = trainer_mod.Trainer._loss_fn

        def loss_fn(self, logits, labels):
            loss = real_loss(self, logits, labels)
            return loss * float("nan") if self.step + 1 == FAULT["nan_at_step"] else loss

        trainer_mod.Trainer._loss_fn = loss_fn
        real_model_loss = trainer_mod.Trainer._model_loss  # the chunked loss does not pass through _loss_fn

        def model_loss(self, *args):
            loss = real_model_loss(self, *args)
            return loss * float("nan") if self.step + 1 == FAULT["nan_at_step"] else loss

        trainer_mod.Trainer._model_loss = model_loss
    if "stall_save_at" in FAULT:
        from longtrain.launcher import checkpoint

        real_save = checkpoint.dcp.save

        def save(state, checkpoint_id):
            real_save(state, checkpoint_id=checkpoint_id)
            if f"step_{FAULT['stall_save_at']:08d}" in str(checkpoint_id):
                _touch(FAULT.get("ready"))
                time.sleep(3600)

        checkpoint.dcp.save = save


class _PatchOnImport:
    """A meta path finder that patches the trainer module right after it is executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "longtrain.launcher.trainer":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT:
    sys.meta_path.insert(0, _PatchOnImport())
