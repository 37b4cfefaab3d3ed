"""Pipeline parallel over the `pp` axis with torch.distributed.pipelining.

The model is split into `pp x stages_per_rank` stages by layers, where the model says
(`pipeline_stages`: an even split, or a hybrid pattern's '|' marks). Rank r owns stage r (GPipe,
1F1B) or stages r, r+pp, r+2pp, ... (looped placement, for interleaved 1F1B and the interleaved
zero-bubble schedule). A stage is the whole model with the other stages' layers deleted: the
first keeps the embedding, the last the final norm and output head, and parameter names stay
those of the whole model so checkpoints move between layouts.
"""
from __future__ import annotations

import copy
import typing
from typing import Callable, Literal, Sequence

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

PPSchedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
SCHEDULES = dict(zip(typing.get_args(PPSchedule),
                     (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)))


def stage_ids_for_rank(pp_rank: int, pp_degree: int, stages_per_rank: int) -> list[int]:
    return [pp_rank + k * pp_degree for k in range(stages_per_rank)]


PPSplit = Literal["layers", "sublayers"]


def build_stage_module(model, stage_id: int, n_stages: int, split: PPSplit = "layers"):
    """A copy of `model` that keeps only what stage `stage_id` runs: whole layers where the model
    splits (`pipeline_stages`), or with split=sublayers an even share of all sublayers, so a stage
    may end after a block's attention and the next begin with its MLP (`pipeline_sublayer_stages`)."""
    if split == "sublayers":
        keep_sublayers = model.pipeline_sublayer_stages(n_stages)[stage_id]
    else:
        keep_sublayers = {str(i): None for i in model.pipeline_stages(n_stages)[stage_id]}
    stage = copy.deepcopy(model)
    for name in list(stage.layers.keys()):
        if name not in keep_sublayers:
            del stage.layers[name]
        elif keep_sublayers[name] is not None and len(keep_sublayers[name]) < len(stage.layers[name].SUBLAYERS):
            stage.layers[name].keep_sublayers(keep_sublayers[name])
    if stage_id != 0:
        stage.tok_embeddings = None
    if stage_id != n_stages - 1:
        stage.norm = None
        stage.output = None
    return stage


class StageAdapter(nn.Module):
    """What a pipeline stage runs: the stage module on (tokens or hidden states, positions[,
    doc_ids]), handing positions and document ids on to the next stage with the hidden states,
    since attention on every stage needs them (RoPE, packed-document masks, context parallel)."""

    def __init__(self, stage: nn.Module, is_last: bool):
        super().__init__()
        self.stage = stage
        self.is_last = is_last

    def forward(self, x, *meta):
        if self.stage.ladder_residual:  # Ladder Residual: (stream, pending output, *meta) between stages
            pending = None
            if self.stage.tok_embeddings is None:
                pending, *meta = meta
            out = self.stage(x, *meta, pending=pending)
            return out if self.is_last else (*(t.contiguous() for t in out), *meta)  # p2p sends contiguous
        out = self.stage(x, *meta)
        return out if self.is_last else (out, *meta)


class Pipeline:
    """This rank's stages and the schedule that runs them for one optimizer step."""

    def __init__(self, stage_modules: Sequence[nn.Module], stage_ids: list[int], n_stages: int, pp_mesh,
                 device: torch.device, schedule: str, n_microbatches: int, loss_fn: Callable):
        group = pp_mesh.get_group()
        self.stage_modules = stage_modules
        self._loss_fn = loss_fn
        self._token_count: torch.Tensor | None = None  # the step's global token count (step / forward_only)
        self.stages = [PipelineStage(StageAdapter(m, sid == n_stages - 1), sid, n_stages, device, group=group)
                       for m, sid in zip(stage_modules, stage_ids)]
        self.has_first = 0 in stage_ids
        self.has_last = (n_stages - 1) in stage_ids
        cls = SCHEDULES[schedule]
        if issubclass(cls, PipelineScheduleMulti):
            self.schedule = cls(self.stages, n_microbatches=n_microbatches, loss_fn=self._scaled_loss, scale_grads=False)
        else:
            if len(self.stages) != 1:
                raise ValueError(f"parallel.pp_schedule: {schedule} runs exactly one stage per rank")
            self.schedule = cls(self.stages[0], n_microbatches=n_microbatches, loss_fn=self._scaled_loss,
                                scale_grads=False)

    def _scaled_loss(self, output, target):
        """A micro-batch's summed loss over the global token count of the step it belongs to."""
        return self._loss_fn(output, target) / self._token_count

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, meta: tuple, token_count: torch.Tensor
             ) -> torch.Tensor | None:
        """Forward and backward of one batch (split into micro-batches); `meta` are the
        per-token tensors every stage needs (positions[, doc_ids]); `token_count` the global
        token count the summed loss is divided by. Returns the summed micro-batch losses on the
        rank holding the last stage, None elsewhere."""
        self._token_count = token_count
        return self._run(self.schedule.step, tokens, labels, meta)

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor, labels: torch.Tensor, meta: tuple, token_count: torch.Tensor
                     ) -> torch.Tensor | None:
        """The same loss without backward (evaluation)."""
        self._token_count = token_count
        return self._run(self.schedule.eval, tokens, labels, meta)

    def _run(self, run, tokens, labels, meta):
        losses: list[torch.Tensor] = []
        target = labels if self.has_last else None
        if self.has_first:
            run(tokens, *meta, target=target, losses=losses)
        else:
            run(target=target, losses=losses)
        if self.has_last:
            return torch.stack([loss.detach() for loss in losses]).sum()
        return None
