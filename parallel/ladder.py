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

Backward (the same overlap, mirrored): in front of each sublayer's norm sits `_SublayerInput`
(all-gathering the stream along the sequence under sequence parallel). A tp rank's gradient at
the mixer input is its share of the sum (its heads' part); it stays partial through the norm's
backward (the norm is linear in the gradient it receives; its weight gradient stays this rank's
share, summed over tp once per step by `finish_gradients`, which the trainer calls after the
last backward: ParallelModel.finish_gradients), and `_SublayerInput` launches the reduction of the
stream gradient (all-reduce, or reduce-scatter along the sequence) on a second process group
(so the sequence-parallel all-gather of the next sublayer's backward does not queue behind it).
Who waits: a ladder step creates the node that adds the pending output to the stream
(`_LazyAdd`, filled in after the sublayer computed) *before* the sublayer runs, so autograd, which
runs ready nodes latest-created first, reaches it only after that sublayer's backward; when the
sublayer after next reads that stream, its input gradient is handed to `_LazyAdd`, which waits
for it there. So sublayer j+1's input-gradient reduction is in flight during sublayer j's
backward. Anywhere else (the first sublayer of a stage, a standard sublayer, overlap off) the
reduction is waited for at once. `log` also records ("grad_start"/"grad_wait", sublayer).
Cost under sequence parallel: a ladder sublayer's norm runs on the gathered sequence (tp times the
norm's small compute, and it keeps the gathered stream for backward where SequenceParallel kept a
shard); the norm weights are replicated DTensors as the final norm's are.
"""
from __future__ import annotations

import time
import weakref
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel
from torch.distributed.tensor.parallel.style import distribute_module

from longtrain.models.transformer import rms_norm


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
        self.counts = {"start": 0, "wait": 0, "wait_at_start": 0, "grad_start": 0, "grad_wait": 0,
                       "grad_deferred": 0}
        self.wait_seconds = 0.0  # host time blocked in wait(): the communication left exposed
        self.grad_wait_seconds = 0.0  # the same for the input-gradient reductions of backward
        self.norm_grad_seconds = 0.0  # host time in finish_gradients (the norm weight gradient sums)
        self.norms: list[nn.Module] = []  # the sublayer norms whose weight gradients are tp shares
        # The input-gradient reductions run on their own group (on nccl: their own stream).
        self.grad_group = dist.new_group(dist.get_process_group_ranks(tp_group), use_local_synchronization=True)
        # storage address of a `_LazyAdd` output -> (weak reference to it, its deferred gradients)
        self.lazy: dict[int, tuple] = {}

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
        work, out, send = self._reduce(partial_sums, self.group)
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

    def _reduce(self, partial_sums: torch.Tensor, group) -> tuple:
        """Launch the sum over tp: all-reduce, or under sequence parallel (B, S, D) partial ->
        (B, S/tp, D) sum, scattered along the sequence. Returns (work, result, send buffer)."""
        if self.sequence_parallel:
            send = partial_sums.transpose(0, 1).contiguous()
            b, s, d = partial_sums.shape
            # (B, S/tp, D) laid out sequence-first, so that its transpose is the contiguous buffer
            out = torch.empty_strided((b, s // self.tp, d), (d, b * d, 1), dtype=send.dtype, device=send.device)
            work = dist.reduce_scatter_single(out.transpose(0, 1), send, group=group, async_op=True)
            return work, out, send
        out = partial_sums.contiguous().clone()
        return dist.all_reduce(out, group=group, async_op=True), out, None

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """(B, S/tp, D) -> (B, S, D): the sequence-parallel stream as a sublayer reads it."""
        piece = shard.transpose(0, 1).contiguous()
        full = piece.new_empty((piece.shape[0] * self.tp, *piece.shape[1:]))
        dist.all_gather_single(full, piece, group=self.group)
        return full.transpose(0, 1)

    # -- the ladder step (from the model) ----------------------------------------------------------
    def add_after(self, h: torch.Tensor, pending: torch.Tensor, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + pending, compute(h)) with `pending`'s reduction in flight while `compute` runs; the
        stream node is made first (see the module notes: backward overlap)."""
        key = pending.untyped_storage().data_ptr()
        if not self.overlap or key not in self.pending:  # complete already (e.g. received from a stage)
            out = compute(h)
            return h + self(pending), out
        stream = _LazyAdd.apply(h, pending, self)
        out = compute(h)
        self._wait(key)
        with torch.no_grad():
            stream.copy_(h + self.pending[key][2])
        return stream, out

    def _register_lazy(self, stream: torch.Tensor) -> list:
        self.lazy = {k: v for k, v in self.lazy.items() if v[0]() is not None}
        deferred: list = []
        self.lazy[stream.untyped_storage().data_ptr()] = (weakref.ref(stream), deferred)
        return deferred

    def lazy_target(self, stream: torch.Tensor) -> list | None:
        """The deferred-gradient list of the `_LazyAdd` that made `stream` (None: not made so)."""
        if not self.overlap or type(stream) is not torch.Tensor:  # e.g. the embedding's AsyncCollectiveTensor
            return None
        entry = self.lazy.get(stream.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def start_grad(self, partial_grad: torch.Tensor, label: str) -> tuple:
        work, out, _ = self._reduce(partial_grad, self.grad_group)
        self.counts["grad_start"] += 1
        if self.log is not None:
            self.log.append(("grad_start", label))
        return work, out, label

    def wait_grad(self, launched: tuple) -> torch.Tensor:
        work, out, label = launched
        began = time.perf_counter()
        work.wait()
        self.grad_wait_seconds += time.perf_counter() - began
        self.counts["grad_wait"] += 1
        if self.log is not None:
            self.log.append(("grad_wait", label))
        return out.contiguous()  # a stream gradient (sent as is between pipeline stages)

    def finish_gradients(self) -> None:
        """Once per optimizer step, after the last backward: sum the sublayer norms' weight
        gradients over tp (each rank's is its share: the norm's backward ran on the partial input
        gradient). One all-reduce of all of them; FSDP's reduction over dp, already done, is a
        sum too, so the order does not matter."""
        began = time.perf_counter()
        grads = [norm.weight.grad for norm in self.norms if norm.weight.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        if local:
            flat = torch.cat([g.reshape(-1) for g in local])
            dist.all_reduce(flat, group=self.group)
            for g, piece in zip(local, flat.split([g.numel() for g in local])):
                g.copy_(piece.view_as(g))
        self.norm_grad_seconds += time.perf_counter() - began

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
        return red.gather(grad), None, None


class _ReadReduction(torch.autograd.Function):
    """placeholder -> the completed buffer; the gradient passes to the placeholder unchanged."""

    @staticmethod
    def forward(ctx, placeholder, out):
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LazyAdd(torch.autograd.Function):
    """Forward: an empty stream tensor (h + pending, written by add_after once the sublayer that
    reads h computed and pending's reduction completed). Made before that sublayer, its backward
    runs after the sublayer's backward: there it waits for the input-gradient reductions of the
    sublayer that read this stream (deferred to it by `_SublayerInput`) and adds them."""

    @staticmethod
    def forward(ctx, h, pending, reductions: SublayerReductions):
        stream = torch.empty_like(h, memory_format=torch.contiguous_format)
        ctx.deferred, ctx.reductions = reductions._register_lazy(stream), reductions
        return stream

    @staticmethod
    def backward(ctx, grad):
        for launched in ctx.deferred:
            grad = grad + ctx.reductions.wait_grad(launched)
        ctx.deferred.clear()
        return grad, grad, None


class _SublayerInput(torch.autograd.Function):
    """Forward: the stream as a sublayer's norm reads it (all-gathered along the sequence under
    sequence parallel). Backward: the gradient arriving here is this rank's share (the norm
    behind it ran on the mixer's partial input gradient); launch its sum over tp and wait for it
    at once, or, when `_LazyAdd` made the stream, hand the reduction to it and return none."""

    @staticmethod
    def forward(ctx, stream, reductions: SublayerReductions, label: str):
        ctx.reductions, ctx.label = reductions, label
        ctx.deferred = reductions.lazy_target(stream)
        if reductions.sequence_parallel:
            return reductions.gather(stream)
        return stream.view_as(stream)

    @staticmethod
    def backward(ctx, partial_grad):
        red = ctx.reductions
        launched = red.start_grad(partial_grad, ctx.label)
        if ctx.deferred is not None:
            red.counts["grad_deferred"] += 1
            ctx.deferred.append(launched)
            return None, None, None
        return red.wait_grad(launched), None, None


class _PartialGradInput(torch.autograd.Function):
    """The mixer's input as a replicated DTensor whose gradient comes back as this rank's local
    share of the sum, unreduced (DTensor would all-reduce it here, and wait)."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, DTensor):
            if tuple(grad.placements) != (Partial(),):
                grad = grad.redistribute(ctx.mesh, [Partial()])
            grad = grad.to_local()
        return grad, None


class LadderSublayerInput(ParallelStyle):
    """For a ladder model's sublayer norm: `_SublayerInput` in front of it; its weight's gradient
    (this rank's share) is summed over tp by `finish_gradients`. Replaces SequenceParallel on the
    norm: under sequence parallel the stream is gathered first and the norm runs on the whole
    sequence."""

    def __init__(self, reductions: SublayerReductions, label: str):
        super().__init__()
        self.reductions, self.label = reductions, label

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not hasattr(module, "eps") or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise NotImplementedError(f"{self.label}: ladder overlap expects an RMSNorm in front of the sublayer")
        red, label = self.reductions, self.label
        if red.sequence_parallel:  # a replicated DTensor, as SequenceParallel makes the final norm's
            module.register_parameter("weight", nn.Parameter(distribute_tensor(module.weight.data, device_mesh,
                                                                                [Replicate()])))
        module.register_forward_pre_hook(lambda mod, args: (_SublayerInput.apply(args[0], red, label), *args[1:]))
        module.forward = partial(_norm_on_local_weight, module)
        red.norms.append(module)
        return module


def _norm_on_local_weight(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's forward with its weight as this rank's local tensor (a replicated DTensor under
    sequence parallel). Its gradient is this rank's share until `finish_gradients` sums it."""
    weight = module.weight
    return rms_norm(x, weight.to_local() if isinstance(weight, DTensor) else weight, module.eps)


class LadderMixerInput(ParallelStyle):
    """For a ladder model's mixer (attention, MLP, Mamba-2): its first input as a replicated
    DTensor whose gradient stays this rank's share (`_PartialGradInput`); other inputs as they are."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.register_forward_pre_hook(lambda mod, args: (_PartialGradInput.apply(args[0], device_mesh), *args[1:]))
        return module


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
