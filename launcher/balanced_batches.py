"""Batches for `parallel.balance`: the balancing group (dp_replicate x dp_shard x cp ranks; tp peers
follow) shares each step's whole sequences.

Every rank of the group reads the same `bins` varlen bins per step (`parallel.balance_bins`, default
one per data rank: the rows the data ranks would have read) from one global row cursor, plans the
step (parallel/balance/planner.py; every rank computes the same plan from the same lengths, nothing
is communicated), hands the attention engine its StepLayout, and keeps only its own tokens (its
linear layout): `next()` returns this rank's tokens, labels, positions and sequence ids as one
(1, S) row, which the trainer feeds as it is (no cp sharding).

The cursor is the loader's global row cursor: a step moves it by `bins` rows, so resuming at another
group size continues the global stream with nothing repeated or skipped (and, with balance_bins
fixed, with identical steps).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from longtrain.data.loader import PackedLoader
from longtrain.data.pipeline import DataSettings
from longtrain.models.registry import kind_of
from longtrain.parallel.balance.cost import CostModel, ModelShape, resolve_cluster
from longtrain.parallel.balance.engine import StepLayout
from longtrain.parallel.balance.planner import plan_step

CAPACITY_FACTOR = 1.5  # a rank's attention-layout token capacity, over the group's mean tokens per rank


class BalancedBatches:
    def __init__(self, recipe, strategy: str, engine, balance_rank: int, group_size: int, dp: int, model_cfg,
                 tp: int = 1, split: str = "train"):
        settings = DataSettings.from_config(recipe.data, recipe.train.seed, split)
        self.bins = recipe.parallel.balance_bins or dp
        if split != "train":
            settings.num_workers, settings.lanes = 0, 1
        else:
            settings.lanes = settings.lanes or self.bins
        self.loader = PackedLoader(settings, dp_rank=0, dp_degree=1)
        self.strategy, self.engine, self.rank, self.world = strategy, engine, balance_rank, group_size
        self.cp, self.dp = recipe.parallel.cp, dp
        self.remap = recipe.parallel.balance_remap and strategy == "zeppelin"
        self.capacity = math.ceil(CAPACITY_FACTOR * self.bins * settings.budget / group_size)
        cluster = resolve_cluster(recipe.cluster.preset, recipe.cluster.gpus_per_node, world=group_size)
        self.gpus_per_node = cluster.gpus_per_node
        self.cost_model = CostModel(ModelShape.of(model_cfg, tp), cluster)
        self.tau_intra, self.tau_inter = self.cost_model.tau("intra"), self.cost_model.tau("inter")
        # scan-based models (hybrid Mamba stacks): ring members hold contiguous chunks, no zigzag
        self.contiguous = kind_of(model_cfg).contiguous_sequence
        self.last_plan = None
        self.last_layout = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [next(self.loader) for _ in range(self.bins)]
        lengths, bins = [], []
        for b, row in enumerate(rows):
            cu = row["cu_seqlens"].tolist()
            lengths.extend(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
            bins.extend([b % self.dp] * (len(cu) - 1))
        capacity = self.capacity + len(lengths)  # zigzag remainders (a token per sequence) under even_cp
        plan = plan_step(lengths, self.world, self.strategy, capacity=capacity, gpus_per_node=self.gpus_per_node,
                         cp=self.cp, bins=bins, cost=self.cost_model.cost, tau_intra=self.tau_intra,
                         tau_inter=self.tau_inter, contiguous=self.contiguous)
        layout = StepLayout.build(plan, self.rank, self.remap)
        self.engine.set_step(layout)
        self.last_plan, self.last_layout = plan, layout
        ids = torch.from_numpy(layout.linear_ids)
        flat = {key: torch.cat([row[key][0, :row["cu_seqlens"][-1]] for row in rows]) for key in
                ("tokens", "labels", "positions")}
        seq_of_token = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
        batch = {key: flat[key][ids][None] for key in flat}
        batch["doc_ids"] = seq_of_token[ids][None]
        return batch

    # the loader's global cursor ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
