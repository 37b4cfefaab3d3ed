"""The 4D parallel mesh: one DeviceMesh with axes, outermost first, `pp, dp_replicate, dp_shard,
cp, tp` (tp innermost so it stays inside a node), and three flattened submeshes:

- `batch` = dp_replicate x dp_shard: ranks that read different data;
- `loss`  = dp_replicate x dp_shard x cp: ranks over which the loss is normalized;
- `fsdp`  = dp_shard x cp: ranks that shard parameters (FSDP2), replicated over dp_replicate (HSDP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    def describe(self) -> str:
        return " x ".join(f"{axis}{getattr(self, axis)}" for axis in AXES if getattr(self, axis) > 1) or "single"


class Mesh:
    """The world mesh plus convenient views; every view exists even when its degree is 1."""

    def __init__(self, dims: ParallelDims, device_type: str):
        if dist.get_world_size() != dims.world_size:
            raise ValueError(f"parallel degrees {dims.describe()} need {dims.world_size} ranks, "
                             f"but the world size is {dist.get_world_size()}")
        self.dims = dims
        self.device_type = device_type
        self.world = init_device_mesh(device_type, tuple(getattr(dims, a) for a in AXES), mesh_dim_names=AXES)
        # Flattened views are kept here: slicing them back out of the root mesh is deprecated.
        self.views = {
            "batch": self.world["dp_replicate", "dp_shard"]._flatten("batch"),
            "loss": self.world["dp_replicate", "dp_shard", "cp"]._flatten("loss"),
            "fsdp": self.world["dp_shard", "cp"]._flatten("fsdp"),
        }

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.views[name] if name in self.views else self.world[name]

    def hsdp(self) -> DeviceMesh:
        """The 2D (dp_replicate, fsdp) mesh that FSDP2 uses for HSDP."""
        return self.world["dp_replicate", "fsdp"]

    def local_rank(self, name: str) -> int:
        return self[name].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.local_rank("batch")

    @property
    def pp_rank(self) -> int:
        return self.local_rank("pp")
