"""Optimizer offloading, plain (`cpu`) or interleaved (Deep Optimizer States, arXiv 2410.21316),
on the shards FSDP2/TP leave on each rank. Exact: the same AdamW as torch.optim.AdamW.

Layout. Every parameter's local shard (a DTensor's local tensor, or the plain tensor) gets a
slot in one flat fp32 host buffer per quantity: master weight, m (exp_avg), v (exp_avg_sq) and
gradient, pinned when CUDA exists. The flat range of each weight-decay group is cut into
subgroups of `subgroup_size` elements; subgroup x is updated on the device iff (x+1) % stride == 0
(stride 1: all on the device; stride > subgroups: all on the host, plain CPU offload).

Backward. A post-accumulate-grad hook on every parameter that has elements in host subgroups
copies its (FSDP-reduced) gradient into the host gradient buffer as soon as it is ready: on CUDA
on a side stream, non-blocking; without CUDA on a copier thread. Before the update every copy is
awaited and checked against the gradient's version (a gradient changed after its copy, e.g. by
accumulation, is copied again, synchronously); device gradients of parameters wholly on the host
are then dropped. Gradients of device subgroups stay on the device.

Clipping. `clip_offloaded_grad_norm` takes the global gradient norm over host and device
subgroups (per layout: local norms, summed over the mesh dimensions that shard them, then over
the pipeline), and each subgroup scales its gradient by the clip coefficient before its update,
as torch's clip_grads_with_norm_ does.

Update. Host subgroups are updated in order on a worker thread (DeepSpeed's CPU Adam or torch's
fused CPU AdamW, whichever measured faster unless forced), and their weights copied back into the
parameters in the training dtype (CUDA: non-blocking from pinned memory on a side stream).
Meanwhile the main thread runs the device subgroups in order through one reusable device buffer
set: prefetch master/m/v (H2D stream), gather the gradient, fused AdamW on the device, write the
weights into the parameters (training dtype), flush master/m/v back (D2H stream); the next
prefetch waits for that flush. Without CUDA the "device" is the CPU: the same schedule, with the
device subgroups on the main thread and the host subgroups on the worker thread.

Checkpoints. The optimizer's state is per parameter (step, exp_avg, exp_avg_sq; DTensors over the
host buffers when the parameter is a DTensor), with the param-group keys of torch.optim.AdamW, so
torch.distributed.checkpoint saves and reshards it like AdamW's: a run saved with one offload
setting (or none) resumes under another and under another layout. A non-fp32 training dtype adds
`master` (the fp32 weight) to the state.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from longtrain.parallel.offload_model import (
    DEVICE_BUFFER_BYTES,
    PROBE_NUMEL,
    Prediction,
    cached_probe,
    candidate_subgroup_sizes,
    pick_layout,
    predict,
    roles_for_stride,
    subgroup_sizes,
)

log = logging.getLogger(__name__)
ALL_HOST = 1 << 62  # the stride of plain CPU offload


# ----------------------------------------------------------------------------------------------
# Small device helpers (streams on CUDA, no-ops on CPU)
# ----------------------------------------------------------------------------------------------
def pinned_empty(numel: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A host buffer, page-locked when there is a CUDA device to copy to and from."""
    return torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def device_adam(p, g, m, v, step: torch.Tensor, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """Fused AdamW on one flat buffer set, on whatever device it lives (CUDA, or CPU's fused
    kernel). `step` is the step count after this update, a float tensor on the same device."""
    torch._fused_adamw_([p], [g], [m], [v], [], [step], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, maximize=False)


class _Stream:
    """A CUDA side stream, or nothing on CPU."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def wait_current(self) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def record(self):
        return self.stream.record_event() if self.stream is not None else None


# ----------------------------------------------------------------------------------------------
# Host Adam implementations
# ----------------------------------------------------------------------------------------------
class TorchFusedHostAdam:
    name = "torch"

    def update(self, p, g, m, v, *, step: int, lr, beta1, beta2, eps, weight_decay) -> None:
        device_adam(p, g, m, v, torch.tensor(float(step)), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay)


class DeepSpeedHostAdam:
    """deepspeed.ops.adam's CPU Adam kernel (AdamW mode), called on flat fp32 host buffers."""
    name = "deepspeed"
    _next_id = 10_000  # ids apart from DeepSpeedCPUAdam's own counter

    def __init__(self):
        from deepspeed.ops.op_builder import CPUAdamBuilder

        self.op = CPUAdamBuilder().load()
        self.opt_id = DeepSpeedHostAdam._next_id
        DeepSpeedHostAdam._next_id += 1
        self.op.create_adam(self.opt_id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    def update(self, p, g, m, v, *, step: int, lr, beta1, beta2, eps, weight_decay) -> None:
        self.op.adam_update(self.opt_id, step, lr, beta1, beta2, eps, weight_decay, True, p, g, m, v)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.op.destroy_adam(self.opt_id)


_HOST_ADAMS: dict = {}


def host_adams(choice: str) -> dict:
    """The host Adam implementations to consider: `torch`, `deepspeed`, or both for `auto`.
    DeepSpeed's op is built on first use (JIT, about a minute, then cached); if it cannot be built
    the torch kernel is used with a warning."""
    out = {}
    if choice in ("auto", "deepspeed"):
        if "deepspeed" not in _HOST_ADAMS:
            try:
                _HOST_ADAMS["deepspeed"] = DeepSpeedHostAdam()
            except Exception as err:  # an import error or a failed JIT build
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                warnings.warn(f"optim.offload_host_adam: DeepSpeed's CPU Adam could not be built ({first}); "
                              "using torch's fused CPU AdamW")
                _HOST_ADAMS["deepspeed"] = None
        if _HOST_ADAMS["deepspeed"] is not None:
            out["deepspeed"] = _HOST_ADAMS["deepspeed"]
    if choice in ("auto", "torch") or not out:
        out["torch"] = _HOST_ADAMS.setdefault("torch", TorchFusedHostAdam())
    return out


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """Elements [param_start, param_end) of parameter `param` (flattened local shard) sit at
    [flat_start, flat_start + n) of the flat buffers."""
    param: int
    param_start: int
    param_end: int
    flat_start: int


@dataclass
class Subgroup:
    index: int
    group: int          # param group (weight-decay group)
    start: int          # [start, end) of the flat buffers
    end: int
    role: str           # "host" or "device"
    segments: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.end - self.start


OffloadMode = Literal["cpu", "interleaved"]
HostAdam = Literal["auto", "deepspeed", "torch"]


@dataclass
class OffloadSettings:
    mode: OffloadMode = "interleaved"
    subgroup_size: str | int = "auto"   # auto (the performance model picks) | parameters per subgroup
    stride: str | int = "auto"          # auto | k
    host_adam: HostAdam = "auto"
    device_memory_gb: float = 0.0       # budget for the device buffer set; 0: what the device has free


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state lives on the host, updated per subgroup on the host or the device."""

    def __init__(self, param_groups: list[dict], *, lr: float, betas, eps: float, device: torch.device,
                 settings: OffloadSettings):
        defaults = dict(torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr, betas=tuple(betas),
                                          eps=eps, foreach=True).defaults)
        super().__init__(param_groups, defaults)
        self.device = device
        self.settings = settings
        self.params: list[nn.Parameter] = [p for g in self.param_groups for p in g["params"]]
        for p in self.params:
            if not local(p).is_contiguous():
                raise ValueError("optim.offload: a parameter's local shard is not contiguous")
        self.train_dtype = self.params[0].dtype if self.params else torch.float32
        self.counters = {"async_grad_copies": 0, "sync_grad_copies": 0, "host_updates": 0,
                         "device_updates": 0, "device_grads_freed": 0, "steps": 0}
        self.group_numels = [sum(local(p).numel() for p in g["params"]) for g in self.param_groups]
        self._choose_layout()
        self._build_flat()
        self._assign_roles()
        self._init_state()
        self._streams = {name: _Stream(device) for name in ("grad_d2h", "h2d", "d2h", "weights")}
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="offload-grads") if device.type != "cuda" else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="offload-host")
        # param index -> (local gradient, (its storage, its version) when copied, future or event)
        self._grad_copies: dict[int, tuple] = {}
        self._lock = threading.Lock()
        self._clip_coef: torch.Tensor | None = None
        self._prepared = False
        self.last_update_s = 0.0
        self._hooks = [self.params[i].register_post_accumulate_grad_hook(self._make_hook(i))
                       for i in sorted({s.param for sg in self.subgroups if sg.role == "host" for s in sg.segments})]

    # -- layout -------------------------------------------------------------------------------
    def _build_flat(self) -> None:
        size = self.subgroup_size
        self.offsets, offset = [], 0
        self.subgroups: list[Subgroup] = []
        for gi, group in enumerate(self.param_groups):
            group_start = offset
            for p in group["params"]:
                self.offsets.append(offset)
                offset += local(p).numel()
            for start in range(group_start, offset, size):
                self.subgroups.append(Subgroup(len(self.subgroups), gi, start, min(start + size, offset), "host"))
        self.numel = offset
        # Segments: which pieces of which parameters each subgroup covers.
        for sg in self.subgroups:
            for pi, p in enumerate(self.params):
                a, b = self.offsets[pi], self.offsets[pi] + local(p).numel()
                lo, hi = max(a, sg.start), min(b, sg.end)
                if lo < hi:
                    sg.segments.append(Segment(pi, lo - a, hi - a, lo))
        d = self.device
        self.master = pinned_empty(self.numel, d)
        self.exp_avg = pinned_empty(self.numel, d).zero_()
        self.exp_avg_sq = pinned_empty(self.numel, d).zero_()
        self.grad = pinned_empty(self.numel, d).zero_()
        with torch.no_grad():
            for pi, p in enumerate(self.params):
                self._flat(self.master, pi).copy_(local(p).reshape(-1))
        self.staging = pinned_empty(self.numel, d, self.train_dtype) if self.train_dtype != torch.float32 else None

    def _flat(self, buf: torch.Tensor, pi: int) -> torch.Tensor:
        return buf[self.offsets[pi]: self.offsets[pi] + local(self.params[pi]).numel()]

    def _choose_layout(self) -> None:
        """Subgroup size, stride and host Adam: as set, or the performance model's predicted-fastest
        (parallel/offload_model.py) from a probe measured once per machine and size (cached)."""
        s = self.settings
        self.host_adams = host_adams(s.host_adam)
        weight_bytes = torch.empty((), dtype=self.train_dtype).element_size()
        self.budget_bytes = self._device_budget_bytes()
        size_setting = str(s.subgroup_size)
        if size_setting == "auto":
            candidates = candidate_subgroup_sizes(self.group_numels)
            # Probes at two sizes (the smallest and largest candidate); each candidate uses the nearer.
            refs = sorted({min(candidates[0], PROBE_NUMEL), min(candidates[-1], PROBE_NUMEL)})
        elif size_setting.isdigit() and int(size_setting) >= 1:
            candidates = [int(size_setting)]
            refs = [min(max(subgroup_sizes(self.group_numels, candidates[0]), default=1), PROBE_NUMEL)]
        else:
            raise ValueError(f"optim.offload_subgroup_size: must be auto or an integer >= 1, got {s.subgroup_size!r}")
        probes = {r: cached_probe(self.device, self.host_adams, r) for r in refs}

        def probe_for(size: int):
            return probes[min(refs, key=lambda r: abs(math.log(r) - math.log(max(1, min(size, PROBE_NUMEL)))))]

        if s.mode == "cpu":
            stride = ALL_HOST
        elif str(s.stride) == "auto":
            stride = None
        else:
            stride = int(s.stride)
        try:
            size, k, self.predictions = pick_layout(probe_for, self.group_numels, candidates, weight_bytes,
                                                    self.budget_bytes, stride)
        except ValueError:
            if len(candidates) > 1:
                raise
            size, k = candidates[0], stride  # one size that does not fit: the error below names it
        self.subgroup_size = size
        self.probe = probe_for(size)
        self.host_adam = self.host_adams[self.probe.best_host_adam()]
        self.stride = stride if stride is not None else k
        sizes = subgroup_sizes(self.group_numels, size)
        roles = roles_for_stride(len(sizes), self.stride)
        largest = max((n for n, r in zip(sizes, roles) if r == "device"), default=0)
        if DEVICE_BUFFER_BYTES * largest > self.budget_bytes:
            raise ValueError(f"optim.offload_subgroup_size: a device subgroup of {largest} parameters needs "
                             f"{DEVICE_BUFFER_BYTES * largest / 2**30:.3g} GiB of device buffers, the budget is "
                             f"{self.budget_bytes / 2**30:.3g} GiB (optim.offload_device_memory_gb)")
        self.prediction: Prediction = predict(self.probe, sizes, roles, self.host_adam.name, weight_bytes,
                                              min(self.stride, len(sizes) + 1))

    def _device_budget_bytes(self) -> float:
        if self.settings.device_memory_gb > 0:
            return self.settings.device_memory_gb * 2**30
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return 0.9 * free
        import os

        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def _assign_roles(self) -> None:
        roles = roles_for_stride(len(self.subgroups), self.stride)
        for sg, role in zip(self.subgroups, roles):
            sg.role = role
        device_sgs = [sg for sg in self.subgroups if sg.role == "device"]
        n = max((sg.numel for sg in device_sgs), default=0)
        # The one reusable device buffer set: master, m, v and the gathered gradient.
        self.dev_bufs = [torch.empty(n, device=self.device) for _ in range(4)] if n else None
        self.dev_step = torch.zeros((), device=self.device)
        on_device = {s.param for sg in device_sgs for s in sg.segments}
        self.host_only_params = [pi for pi in range(len(self.params)) if pi not in on_device]

    def placement_summary(self) -> dict:
        """Which subgroups are where (for logs and tests)."""
        return {"stride": self.stride, "subgroup_size": self.subgroup_size, "subgroups": len(self.subgroups),
                "host": [sg.index for sg in self.subgroups if sg.role == "host"],
                "device": [sg.index for sg in self.subgroups if sg.role == "device"],
                "host_adam": self.host_adam.name, "predicted_update_s": self.prediction.update_s}

    # -- state (what checkpoints see) ---------------------------------------------------------
    def _as_param_layout(self, flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        view = flat.view(local(p).shape)
        if isinstance(p, DTensor):
            return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        return view

    def _init_state(self) -> None:
        self._steps = 0
        for pi, p in enumerate(self.params):
            st = {"step": torch.tensor(0.0),
                  "exp_avg": self._as_param_layout(self._flat(self.exp_avg, pi), p),
                  "exp_avg_sq": self._as_param_layout(self._flat(self.exp_avg_sq, pi), p)}
            if self.train_dtype != torch.float32:
                st["master"] = self._as_param_layout(self._flat(self.master, pi), p)
            self.state[p] = st

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch.optim.AdamW's (or this class's) state into the host buffers: values are
        copied into place, never replace the buffers."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("optim.offload: the checkpoint's optimizer has another number of param groups")
        ids = [i for g in groups for i in g["params"]]
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        with torch.no_grad():
            for pid, p in zip(ids, self.params):
                saved = state_dict["state"].get(pid)
                if not saved:
                    continue
                mine = self.state[p]
                for key in ("exp_avg", "exp_avg_sq", "master"):
                    if key in saved and key in mine:
                        src, dst = local(saved[key]), local(mine[key])
                        if src.data_ptr() != dst.data_ptr():
                            dst.copy_(src)
                mine["step"].copy_(torch.as_tensor(saved["step"], dtype=torch.float32))
            if self.train_dtype == torch.float32 or not any("master" in s for s in state_dict["state"].values()):
                for pi, p in enumerate(self.params):  # the weights themselves are the fp32 master
                    self._flat(self.master, pi).copy_(local(p).reshape(-1))
        steps = {int(self.state[p]["step"]) for p in self.params}
        self._steps = max(steps) if steps else 0

    # -- backward: gradients to the host ------------------------------------------------------
    def _make_hook(self, pi: int):
        def hook(param: torch.Tensor) -> None:
            if param.grad is None or _placements(param.grad) != _placements(param):
                return  # another layout (TP: replicated or partial gradients): redistributed at the step
            g = local(param.grad)
            dst = self._flat(self.grad, pi)
            stream = self._streams["grad_d2h"]
            if stream.stream is not None:
                stream.wait_current()
                with stream():
                    dst.copy_(g.reshape(-1), non_blocking=True)
                g.record_stream(stream.stream)
                done = stream.record()
            else:
                done = self._copier.submit(dst.copy_, g.reshape(-1))
            with self._lock:
                self._grad_copies[pi] = (g, (g.data_ptr(), g._version), done)
                self.counters["async_grad_copies"] += 1
        return hook

    @torch.no_grad()
    def prepare_gradients(self) -> None:
        """Await the gradient copies of backward, copy again any gradient changed since (or never
        copied), and drop the device gradients of parameters held wholly on the host."""
        if self._prepared:
            return
        self._norm_of = {}
        for pi, p in enumerate(self.params):  # the same order on every rank: collectives inside
            if p.grad is not None and _placements(p.grad) != _placements(p):
                self._norm_of[pi], p.grad = _to_param_layout(p, p.grad)
        for g, version, done in list(self._grad_copies.values()):
            done.result() if isinstance(done, Future) else done.synchronize()
        host_params = sorted({s.param for sg in self.subgroups if sg.role == "host" for s in sg.segments})
        for pi in host_params:
            p = self.params[pi]
            if p.grad is None:
                raise RuntimeError("optim.offload: a parameter received no gradient this step; offloading "
                                   "updates every parameter every step")
            g = local(p.grad)
            copied = self._grad_copies.get(pi)
            if copied is None or copied[1] != (g.data_ptr(), g._version):  # never copied, or changed since
                self._flat(self.grad, pi).copy_(g.reshape(-1))
                self.counters["sync_grad_copies"] += 1
        self._grad_copies.clear()
        for pi in self.host_only_params:
            self.params[pi].grad = None
            self.counters["device_grads_freed"] += 1
        self._prepared = True

    def grads_for_norm(self) -> dict[int, tuple]:
        """id(parameter) -> (layout key, local gradient or its norm, sharded mesh dims). The
        gradient is read where the update reads it: host subgroups' from the host buffer, device
        subgroups' from the device. The key is the gradient's layout as backward left it."""
        self.prepare_gradients()
        on_host = {s.param for sg in self.subgroups if sg.role == "host" for s in sg.segments}
        out = {}
        for pi, p in enumerate(self.params):
            if pi in self._norm_of:
                out[id(p)] = self._norm_of[pi]
                continue
            g = self._flat(self.grad, pi) if pi in on_host else local(p.grad).reshape(-1)
            out[id(p)] = (_layout(p), g, _shard_dims(p))
        return out

    # -- update -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("optim.offload: closures are not supported")
        self.prepare_gradients()
        started = time.perf_counter()
        self._steps += 1
        host = [sg for sg in self.subgroups if sg.role == "host"]
        device = [sg for sg in self.subgroups if sg.role == "device"]
        self._streams["weights"].wait_current()  # the parameters are written after backward read them
        pending = self._worker.submit(self._update_host, host) if host else None
        if device:
            self._update_device(device)
        if pending is not None:
            pending.result()
        for name in ("d2h", "weights"):
            s = self._streams[name].stream
            if s is not None:
                torch.cuda.current_stream(self.device).wait_stream(s)
        synchronize(self.device)
        for p in self.params:
            self.state[p]["step"].fill_(float(self._steps))
        self.counters["steps"] += 1
        self.last_update_s = time.perf_counter() - started
        self._clip_coef = None
        self._prepared = False

    def _hyper(self, sg: Subgroup) -> dict:
        g = self.param_groups[sg.group]
        lr = float(g["lr"])
        return dict(lr=lr, beta1=float(g["betas"][0]), beta2=float(g["betas"][1]), eps=float(g["eps"]),
                    weight_decay=float(g["weight_decay"]))

    @torch.no_grad()  # grad mode is per thread
    def _update_host(self, subgroups: list[Subgroup]) -> None:
        """Worker thread: the host subgroups in order, each one's weights sent back at once."""
        weights = self._streams["weights"]
        for sg in subgroups:
            a, b = sg.start, sg.end
            grad = self.grad[a:b]
            if self._clip_coef is not None:
                grad.mul_(self._clip_coef)
            self.host_adam.update(self.master[a:b], grad, self.exp_avg[a:b], self.exp_avg_sq[a:b],
                                  step=self._steps, **self._hyper(sg))
            src = self.master[a:b]
            if self.staging is not None:
                src = self.staging[a:b].copy_(src)  # the training dtype, cast on the host
            with weights():
                for s in sg.segments:
                    n = s.param_end - s.param_start
                    dst = local(self.params[s.param]).view(-1)[s.param_start:s.param_end]
                    dst.copy_(src[s.flat_start - a: s.flat_start - a + n], non_blocking=True)
            with self._lock:
                self.counters["host_updates"] += 1

    def _update_device(self, subgroups: list[Subgroup]) -> None:
        """Main thread: device subgroups through the one buffer set: prefetch, update, flush."""
        master, m, v, grad = self.dev_bufs
        h2d, d2h = self._streams["h2d"], self._streams["d2h"]
        flushed = None
        self.dev_step.fill_(float(self._steps))
        coef = self._clip_coef.to(self.device) if self._clip_coef is not None else None
        for sg in subgroups:
            a, b, n = sg.start, sg.end, sg.numel
            with h2d():
                if flushed is not None:
                    h2d.stream.wait_event(flushed)  # the buffers are free once the last flush is done
                for dst, src in ((master, self.master), (m, self.exp_avg), (v, self.exp_avg_sq)):
                    dst[:n].copy_(src[a:b], non_blocking=True)
                prefetched = h2d.record()
            for s in sg.segments:
                g = local(self.params[s.param].grad).reshape(-1)
                grad[s.flat_start - a: s.flat_start - a + s.param_end - s.param_start].copy_(
                    g[s.param_start:s.param_end])
            if coef is not None:
                grad[:n].mul_(coef)
            if prefetched is not None:
                torch.cuda.current_stream(self.device).wait_event(prefetched)
            device_adam(master[:n], grad[:n], m[:n], v[:n], self.dev_step, **self._hyper(sg))
            for s in sg.segments:
                k = s.flat_start - a
                local(self.params[s.param]).view(-1)[s.param_start:s.param_end].copy_(
                    master[k: k + s.param_end - s.param_start])
            d2h.wait_current()
            with d2h():
                for src, dst in ((master, self.master), (m, self.exp_avg), (v, self.exp_avg_sq)):
                    dst[a:b].copy_(src[:n], non_blocking=True)
                flushed = d2h.record()
            self.counters["device_updates"] += 1

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._worker.shutdown()
        if self._copier is not None:
            self._copier.shutdown()


def _placements(t: torch.Tensor):
    return tuple(t.placements) if isinstance(t, DTensor) else None


def _layout(t: torch.Tensor):
    return (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else None


def _shard_dims(t: torch.Tensor) -> list[int]:
    """Mesh dimensions whose ranks hold different pieces of t: Shard and FSDP2's _StridedShard
    (which is_shard() does not count), not Replicate or Partial."""
    if not isinstance(t, DTensor):
        return []
    return [i for i, pl in enumerate(t.placements) if not pl.is_replicate() and not pl.is_partial()]


def _to_param_layout(p: DTensor, grad: DTensor) -> tuple[tuple, DTensor]:
    """A gradient that backward left in another layout than its parameter (tensor parallel:
    Replicate for a sharded embedding, Partial for replicated norms): its norm entry as the
    trainer's clipping computes it (partial sums reduced first, then the local norm), and the
    gradient in the parameter's layout, as torch's optimizers redistribute it."""
    from torch.distributed.tensor import Replicate

    whole = grad.redistribute(grad.device_mesh, [Replicate() if pl.is_partial() else pl for pl in grad.placements])
    norm = torch._foreach_norm([local(whole)], 2.0)[0]
    entry = (_layout(grad), norm, _shard_dims(grad))
    return entry, whole.redistribute(p.device_mesh, p.placements)


@torch.no_grad()
def clip_offloaded_grad_norm(parts: list[nn.Module], optimizers: list[OffloadAdamW], max_norm: float, pp_group,
                             device: torch.device) -> float:
    """The global gradient norm over host and device subgroups of every model part on every
    rank, summed as the trainer's clip_grad_norm sums it (per parameter layout in model order:
    local norms, squares summed over the mesh dimensions that shard them, then over the pipeline).
    With max_norm > 0 each subgroup's gradient is scaled by max_norm / (norm + 1e-6), at most 1,
    before its update, as torch's clip_grads_with_norm_ does."""
    grads: dict[int, tuple] = {}
    for opt in optimizers:
        grads.update(opt.grads_for_norm())
    by_layout: dict = {}  # layout key -> (entries in model order, sharded mesh dims)
    for part in parts:
        for p in part.parameters():
            if id(p) in grads:
                key, value, dims = grads[id(p)]
                by_layout.setdefault(key, ([], dims))[0].append(value)
    total_sq = torch.zeros((), dtype=torch.float32)
    for key, (values, dims) in by_layout.items():
        tensors = [v for v in values if v.dim() > 0]
        norms_of = iter(_norms(tensors))
        norms = torch.stack([(next(norms_of) if v.dim() > 0 else v).to(device) for v in values])
        # Each parameter's norm is made global before the norms are combined, mesh dimension by
        # mesh dimension, as DTensor reduces its partial norms (the same bits as the trainer's).
        for dim in dims:
            sq = norms ** 2
            dist.all_reduce(sq, group=key[0].get_group(dim))
            norms = sq ** (1.0 / 2)
        total_sq += torch.linalg.vector_norm(norms).float().cpu() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        total_sq = total_sq.to(device)
        dist.all_reduce(total_sq, group=pp_group)
        total_sq = total_sq.cpu()
    total = total_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for opt in optimizers:
            opt._clip_coef = coef
    return float(total)


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms in order; host and device tensors each in one foreach call."""
    out: list = [None] * len(tensors)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2.0)):
            out[i] = n
    return out


def build_offload_optimizer(groups: list[dict], *, lr, betas, eps, device, settings: OffloadSettings) -> OffloadAdamW:
    opt = OffloadAdamW(groups, lr=lr, betas=betas, eps=eps, device=device, settings=settings)
    log.info("optimizer offload: %s", opt.placement_summary())
    return opt


def offload_metrics(optimizers) -> dict:
    """Predicted and measured update seconds of the last step (the slowest model part's)."""
    offloaded = [o for o in optimizers if isinstance(o, OffloadAdamW)]
    if not offloaded:
        return {}
    return {"offload_update_s": max(o.last_update_s for o in offloaded),
            "offload_update_s_predicted": max(o.prediction.update_s for o in offloaded),
            "offload_subgroup_size": max(o.subgroup_size for o in offloaded)}
