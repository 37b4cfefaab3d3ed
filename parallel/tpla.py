"""TPLA decoding over tensor-parallel ranks (arXiv 2508.15881): every rank holds the whole
(replicated) model and computes every head, but caches only its 1/g slice of each token's latent
(plus the whole RoPE key); each rank's attention output is a partial sum, and one plain-sum
all-reduce per layer over the tp group combines them (models/decode.py's LatentCache does the
per-rank math; this file only supplies the group and the all-reduce).

Prefill stays exact MLA on every rank (from the full latent) and writes the rank's slice."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from longtrain.models.decode import LatentCache


class _SumOverGroup:
    def __init__(self, group):
        self.group = group
        self.calls = 0  # all-reduces issued (one per layer and decode call)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        y = y.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        self.calls += 1
        return y


def tpla_cache_factory(tpla_degree: int, tp_group, latent_norm: str = "exact",
                       backend: str = "auto") -> tuple[Callable[[], LatentCache], _SumOverGroup]:
    """The LatentCache maker for this rank (shard = its rank in `tp_group`), and the all-reduce
    (its `calls` count the collectives). The TPLA degree must be the tp degree."""
    tp = dist.get_world_size(tp_group)
    if tpla_degree != tp:
        raise ValueError(f"decode.tpla_degree: {tpla_degree} is not the tensor-parallel degree {tp}; TPLA shards the "
                         "latent over the tp ranks (one slice per rank)")
    shard = dist.get_rank(tp_group)
    reduce = _SumOverGroup(tp_group)

    def make() -> LatentCache:
        return LatentCache("tpla", tpla_degree, shard=shard, latent_norm=latent_norm, reduce=reduce, backend=backend)

    return make, reduce
