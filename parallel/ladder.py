"""Ladder Residual under tensor parallelism: each sublayer's output reduction stays in flight
while the next sublayer computes (research notes section 2.2).

A row-parallel output projection (attention wo, MLP w2, Mamba out_proj) leaves partial sums on
every tp rank; a standard block all-reduces them (reduce-scatters them under sequence parallel)
and waits at once, because the next sublayer reads the sum. A ladder sublayer does not read its
predecessor's output (models/ladder.py), so here the projection only *launches* the collective
(`async_op=True`) and hands the model a placeholder (an expanded zero, no memory) that stands for
the buffer being filled; the model reads it through `residual_sync`, which waits on the work
handle and returns the buffer, and does so only after the next sublayer has computed. (The buffer
itself never reaches autograd before it is complete: completion marks it written, which autograd
would take for an in-place change of a view.) A placeholder keeps its buffer reachable while it
lives, so a block recomputed under activation checkpointing reads its input again. On gloo the collective runs on the backend's threads; on nccl it runs on the process
group's own stream, ordered after the producing kernels, and `wait()` makes the compute stream
wait for it (set CUDA_DEVICE_MAX_CONNECTIONS > 1 so the two actually run side by side).

`parallel.ladder_overlap: false` waits right after launching (same numbers, no overlap), which
is how the benchmark measures what the overlap hides. `log` (a list, when set) records
("start", projection) / ("wait", projection) events in order, which the tests read.

Backward: the reduction's backward is the identity (all-gather of the gradient under sequence
parallel); the input-gradient all-reduce in front of each sublayer is DTensor's and waited at
once. Not overlapped yet, for two reasons: the norm's backward sits between that all-reduce and
the stream (so either the norm runs on partial gradients, leaving its weight gradient partial
over tp, or its backward must be deferred too), and autograd runs ready nodes latest-created
first, so the node that adds the reduced gradient to the stream must be created before the
previous sublayer's forward (a lazily completed stream add), or it runs, and waits, first.
"""
from __future__ import annotations

import time
import weakref
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel
from torch.distributed.tensor.parallel.style import distribute_module


class SublayerReductions:
    """The `residual_sync` of a tensor-parallel ladder model part: launches the sublayer output
    reductions and waits for them where the model reads them."""

    MAX_IN_FLIGHT = 2  # the ladder needs one besides the newest; more only under recomputation

    def __init__(self, tp_group, sequence_parallel: bool, overlap: bool = True):
        self.group = tp_group
        self.tp = dist.get_world_size(tp_group)
        self.sequence_parallel = sequence_parallel
        self.overlap = overlap
        # placeholder storage address -> [work (None once waited), label, result buffer, send buffer]
        self.pending: dict[int, list] = {}
        self.log: list | None = None
        self.counts = {"start": 0, "wait": 0, "wait_at_start": 0}
        self.wait_seconds = 0.0  # host time blocked in wait(): the communication left exposed

    # -- launch (from the output projection) ---------------------------------------------------
    def start(self, partial_sums: torch.Tensor, label: str) -> torch.Tensor:
        """Launch the reduction; returns a placeholder of the result's shape (no memory) that
        stands for it until the model reads it through __call__. The collective's buffer is never
        handed to autograd before it is complete (completion marks it written)."""
        return _StartReduction.apply(partial_sums, self, label)

    def _launch(self, partial_sums: torch.Tensor, label: str) -> torch.Tensor:
        in_flight = [k for k, entry in self.pending.items() if entry[0] is not None]
        for key in in_flight[:max(0, len(in_flight) - self.MAX_IN_FLIGHT + 1)]:  # bounded (recomputation)
            self._wait(key)
        if self.sequence_parallel:  # (B, S, D) partial -> (B, S/tp, D) sum: scatter along the sequence
            send = partial_sums.transpose(0, 1).contiguous()
            b, s, d = partial_sums.shape
            # (B, S/tp, D) laid out sequence-first, so that its transpose is the contiguous buffer
            out = torch.empty_strided((b, s // self.tp, d), (d, b * d, 1), dtype=send.dtype, device=send.device)
            work = dist.reduce_scatter_single(out.transpose(0, 1), send, group=self.group, async_op=True)
        else:
            send = None
            out = partial_sums.contiguous().clone()
            work = dist.all_reduce(out, group=self.group, async_op=True)
        base = out.new_zeros(1)
        placeholder = base.expand(out.shape)
        key = base.untyped_storage().data_ptr()
        self.pending[key] = [work, label, out, send]
        # The entry lives as long as the placeholder: a recomputed block (activation checkpointing)
        # reads its input placeholder again.
        weakref.finalize(base, self.pending.pop, key, None)
        self.counts["start"] += 1
        if self.log is not None:
            self.log.append(("start", label))
        if not self.overlap:
            self.counts["wait_at_start"] += 1
            self._wait(key)
        return placeholder

    # -- read (from the model) -------------------------------------------------------------------
    def __call__(self, pending: torch.Tensor) -> torch.Tensor:
        """The completed sum a placeholder stands for (waiting for it if still in flight); any
        other tensor (already complete, e.g. received from the previous pipeline stage) as is."""
        key = pending.untyped_storage().data_ptr()
        if key not in self.pending:
            return pending
        self._wait(key)
        return _ReadReduction.apply(pending, self.pending[key][2])

    @property
    def in_flight(self) -> int:
        return sum(entry[0] is not None for entry in self.pending.values())

    def _wait(self, key: int) -> None:
        entry = self.pending[key]
        if entry[0] is None:
            return
        began = time.perf_counter()
        entry[0].wait()
        self.wait_seconds += time.perf_counter() - began
        entry[0] = entry[3] = None
        self.counts["wait"] += 1
        if self.log is not None:
            self.log.append(("wait", entry[1]))

    def drain(self) -> None:
        """Wait for every reduction in flight (from backward: a forward that launched one nobody
        read, as a recomputed block's last output, is over)."""
        for key in list(self.pending):
            self._wait(key)


class _StartReduction(torch.autograd.Function):
    """Forward: launch the sum of the tp ranks' partial outputs (all-reduce, or reduce-scatter
    along the sequence); return a placeholder. Backward: the gradient of a sum each rank then
    holds in full is the gradient itself (all-gathered along the sequence under SP)."""

    @staticmethod
    def forward(ctx, partial_sums, reductions: SublayerReductions, label: str):
        ctx.reductions = reductions
        return reductions._launch(partial_sums, label)

    @staticmethod
    def backward(ctx, grad):
        red = ctx.reductions
        red.drain()
        if not red.sequence_parallel:
            return grad, None, None
        shard = grad.transpose(0, 1).contiguous()  # (S/tp, B, D)
        full = shard.new_empty((shard.shape[0] * red.tp, *shard.shape[1:]))
        dist.all_gather_single(full, shard, group=red.group)
        return full.transpose(0, 1), None, None


class _ReadReduction(torch.autograd.Function):
    """placeholder -> the completed buffer; the gradient passes to the placeholder unchanged."""

    @staticmethod
    def forward(ctx, placeholder, out):
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LadderRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a linear whose partial output the ladder reduces asynchronously."""

    def __init__(self, reductions: SublayerReductions, label: str):
        super().__init__()
        self.reductions, self.label = reductions, label

    def _output(self, mod, outputs, device_mesh):
        if tuple(outputs.placements) != (Partial(),):
            raise RuntimeError(f"{self.label}: expected a partial-sum output, got {outputs.placements}")
        return self.reductions.start(outputs.to_local(grad_placements=[Replicate()]), self.label)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{self.label}: ladder overlap shards nn.Linear output projections only")
        self.desired_input_layouts = (Shard(-1),)  # row-parallel: input split by features
        return distribute_module(module, device_mesh, self._partition_linear_fn,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 self._output)
