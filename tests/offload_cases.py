"""Training cases with optimizer offloading, run inside a process group (see distributed.run_group):
besides losses and final weights each case reports where its subgroups were updated."""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from cases import TINY, full_weights

# Clipping active at every step (the tiny model's gradient norms are 1.4-3.2), subgroups small
# enough that every layout has several per rank, bit-reproducible host Adam unless a case asks.
OFFLOAD = ["train.grad_clip=0.05", "optim.offload_subgroup_size=2000", "optim.offload_host_adam=torch"]
# The reference: torch.optim.AdamW with its fused kernel (the default on CPU is foreach; both
# are torch.optim.AdamW, the fused one rounds as the offloaded kernels do).
REFERENCE = ["train.grad_clip=0.05", "optim.fused='on'"]


def offload_cases(cases: list) -> list[dict]:
    """Train each case ({"overrides": [...], "stop_after": k}); report losses, weights and, per
    offloaded optimizer, its placement summary and counters (identical on every rank: rank 0's)."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer
    from longtrain.parallel.offload import OffloadAdamW

    out = []
    for case in cases:
        overrides = TINY + list(case["overrides"]) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]
        trainer = Trainer(load_recipe(None, overrides))
        result = trainer.run(stop_after=case.get("stop_after"))
        offloaded = [o for o in trainer.optimizers if isinstance(o, OffloadAdamW)]
        out.append({"losses": result.losses, "weights": full_weights(trainer),
                    "placements": [o.placement_summary() for o in offloaded],
                    "counters": [dict(o.counters) for o in offloaded],
                    "state_on_host": all(o.exp_avg.device.type == "cpu" for o in offloaded),
                    "master_dtypes": sorted({str(o.master.dtype) for o in offloaded}),
                    "weight_dtypes": sorted({str(p.dtype) for part in trainer.parallel.parts for p in part.parameters()}),
                    "compute_dtype": str(trainer.parallel.param_dtype),
                    "fsdp_param_dtypes": sorted({str(m._get_fsdp_state()._mp_policy.param_dtype)
                                                 for part in trainer.parallel.parts for m in part.modules()
                                                 if isinstance(m, FSDPModule)})})
        for o in offloaded:
            o.close()
        dist.barrier()
    return out
