"""The trainer on given batches, inside a process group, for the outside-reference tests
(tests/test_outside_reference.py): losses, pre-clip gradient norms and final full weights."""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE = -100
ROWS, SEQ, STEPS, TOKENS = 8, 32, 4, 260  # global rows per step; token ids < the byte vocabulary


def make_batches(seed: int = 0) -> list[dict]:
    """STEPS global batches of ROWS x SEQ with about a fifth of the labels ignored, unevenly
    per row (so that a per-row or per-micro-batch mean would differ from the token mean)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, TOKENS, (ROWS, SEQ + 1), generator=gen)
        labels = tokens[:, 1:].clone()
        ignore = torch.rand(ROWS, SEQ, generator=gen) < torch.linspace(0.0, 0.6, ROWS)[:, None]
        labels[ignore] = IGNORE
        positions = torch.arange(SEQ).expand(ROWS, SEQ).clone()
        batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": labels, "positions": positions})
    return batches


class GivenBatches:
    """A stand-in for the data loader: this data rank's rows of each global batch."""

    def __init__(self, batches: list[dict], dp_rank: int, dp: int):
        per = ROWS // dp
        self.batches = [{k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in b.items()} for b in batches]
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.i]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"cursor": self.i}


def train_on_batches(cases: list[list[str]]) -> list[dict]:
    from cases import full_weights
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    batches = make_batches()
    out = []
    for overrides in cases:
        recipe = load_recipe(None, list(overrides) + [f"run.launch.nproc_per_node={dist.get_world_size()}"])
        trainer = Trainer(recipe)
        trainer.loader = GivenBatches(batches, trainer.mesh.dp_rank, trainer.dims.dp)
        norms = {}
        real_step = trainer.train_step

        def train_step(batch, real_step=real_step, norms=norms, trainer=trainer):
            real_step(batch)
            norms[trainer.step] = float(trainer.last_grad_norm)  # read on the host here, for the test

        trainer.train_step = train_step
        result = trainer.run()
        out.append({"losses": result.losses, "grad_norms": norms, "weights": full_weights(trainer)})
        dist.barrier()
    return out
