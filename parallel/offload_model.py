"""Performance model of the offloaded optimizer update (Deep Optimizer States, arXiv 2410.21316),
and the short probe that feeds it.

Probe (cached per machine and subgroup size in LONGTRAIN_CACHE or ~/.cache/longtrain/offload_probe.json):
    U_h[impl]  host Adam throughput, parameters/s, for each host implementation that loads, over
               PROBE_NUMEL parameters in subgroup-sized calls (caches and call overheads as in a step)
    U_d        device Adam throughput (fused AdamW on the device), parameters/s, the same way
    B_h2d      host-to-device copy bandwidth, bytes/s (pinned host memory on CUDA)
    B_d2h      device-to-host copy bandwidth, bytes/s
    B_dd       copy bandwidth inside the device, bytes/s (HBM on a GPU; main memory on a CPU-only
               machine, where it costs as much as the "transfers")

Model of one update with subgroup sizes S_x and roles (host or device) from the stride k,
w = bytes per parameter of the training dtype:
    c        fixed seconds per subgroup (kernel calls, the worker thread's hand-off, per-segment
               copies), measured on a 4K-element update
    T_host   = sum_{x host}   (S_x / U_h + c)               (worker thread, in order)
               + w sum_{x host} S_x / B_h2d  only when the "device" is the host CPU (the weights'
               return is then a copy by the same thread; on a GPU it is asynchronous, in L_h2d)
    T_device = sum_{x device} (12 S_x / B_h2d + S_x / U_d + 12 S_x / B_d2h + 8 S_x / B_dd + c)
               (fp32 master, m, v prefetched and flushed back; one reusable buffer set, so one
               device subgroup's prefetch waits for the previous one's flush; inside the device
               the gradient is gathered into the buffer and the updated weights written to the
               parameters: 4 + 4 bytes per parameter at B_dd)
    L_h2d    = (12 sum_{device} S_x + w sum_{host} S_x) / B_h2d   (the link the weights share)
    T_update = max(T_host, T_device, L_h2d)            when the device is a separate processor
    T_update = T_host + T_device                       when the "device" is the host CPU itself and
               both threads' ops use all its cores; max(T_host, T_device) when each side's ops fit
               in half of them (1-thread ops on 2+ cores: the two threads run side by side, sharing
               only memory bandwidth)
The stride picked is the k in 1..n+1 (n+1: every subgroup on the host) with the least T_update
whose device buffer set (16 bytes x the largest subgroup) fits the device memory budget.

Subgroup size `auto`: the same prediction for every candidate size S (64K x 4^i parameters that
cut the shard into at most 512 subgroups, and the largest weight-decay group of the shard: one
subgroup per group) jointly with every stride; the (S, k) with the least T_update whose buffer set fits the
budget wins. Small subgroups balance host and device finely but pay c more often; large ones pay c
rarely but split the work coarsely (and need a larger buffer set). Throughputs depend on the call
size (caches), so the probe is taken at two sizes, the smallest and the largest candidate (capped
at PROBE_NUMEL), and each candidate uses the probe nearest to it in log size.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STATE_BYTES = 12          # fp32 master weight, m and v: what a device subgroup moves each way
PROBE_NUMEL = 1 << 23     # 32 MB per fp32 buffer: beyond the CPU caches, as real subgroups are
DEVICE_BUFFER_BYTES = 16  # fp32 master, m, v and the gathered gradient per device-buffer element
DEVICE_LOCAL_BYTES = 8    # per device-updated parameter: the gradient gathered in, the weight written out


@dataclass
class Probe:
    host_adam_params_per_s: dict = field(default_factory=dict)  # impl name -> params/s
    device_adam_params_per_s: float = 0.0
    h2d_bytes_per_s: float = 0.0
    d2h_bytes_per_s: float = 0.0
    device_is_host: bool = True
    subgroup_overhead_s: float = 0.0  # fixed cost per subgroup: a kernel call, thread hand-off, copies
    d2d_bytes_per_s: float = math.inf  # inf: copies inside the device taken as free (synthetic probes)
    concurrent: bool = False  # "device" is the host CPU and the two update threads each have cores of their own

    def best_host_adam(self) -> str:
        return max(self.host_adam_params_per_s, key=self.host_adam_params_per_s.get)


@dataclass
class Prediction:
    stride: int
    host_s: float
    device_s: float
    link_s: float
    update_s: float


def roles_for_stride(n_subgroups: int, stride: int) -> list[str]:
    """Subgroup x is updated on the device iff (x + 1) % stride == 0: stride 1 puts every subgroup
    on the device, a stride above the subgroup count none (plain CPU offload)."""
    if stride < 1:
        raise ValueError(f"optim.offload_stride: must be at least 1, got {stride}")
    return ["device" if (x + 1) % stride == 0 else "host" for x in range(n_subgroups)]


def predict(probe: Probe, sizes: list[int], roles: list[str], host_impl: str, weight_bytes: int,
            stride: int = 0) -> Prediction:
    u_h = probe.host_adam_params_per_s[host_impl]
    host_n = sum(s for s, r in zip(sizes, roles) if r == "host")
    dev_n = sum(s for s, r in zip(sizes, roles) if r == "device")
    c = probe.subgroup_overhead_s
    host_s = host_n / u_h + c * roles.count("host")
    if probe.device_is_host:
        host_s += weight_bytes * host_n / probe.h2d_bytes_per_s
    device_s = dev_n * (STATE_BYTES / probe.h2d_bytes_per_s + 1 / probe.device_adam_params_per_s
                        + STATE_BYTES / probe.d2h_bytes_per_s + DEVICE_LOCAL_BYTES / probe.d2d_bytes_per_s) + c * roles.count("device")
    link_s = (STATE_BYTES * dev_n + weight_bytes * host_n) / probe.h2d_bytes_per_s
    if probe.device_is_host:
        # one core set: the times add; a core set each (1-thread ops on a machine of 2+ cores): the slower
        # side (they still share memory bandwidth: measured here 0.038 s against max 0.033 / sum 0.048)
        update_s = max(host_s, device_s) if probe.concurrent else host_s + device_s
    else:
        update_s = max(host_s, device_s, link_s)
    return Prediction(stride, host_s, device_s, link_s, update_s)


def pick_stride(probe: Probe, sizes: list[int], host_impl: str, weight_bytes: int,
                device_budget_bytes: float) -> tuple[int, dict[int, Prediction]]:
    """The predicted-fastest stride among 1..n+1 whose device buffers fit the budget."""
    n = len(sizes)
    predictions = {}
    for k in range(1, n + 2):
        roles = roles_for_stride(n, k)
        largest = max((s for s, r in zip(sizes, roles) if r == "device"), default=0)
        if DEVICE_BUFFER_BYTES * largest > device_budget_bytes:
            continue
        predictions[k] = predict(probe, sizes, roles, host_impl, weight_bytes, k)
    best = min(predictions, key=lambda k: (predictions[k].update_s, -k))
    return best, predictions


SMALLEST_AUTO_SUBGROUP = 1 << 16  # below this a subgroup is all call overhead
AUTO_SUBGROUP_FACTOR = 4
MAX_AUTO_SUBGROUPS = 512


def subgroup_sizes(group_numels: list[int], size: int) -> list[int]:
    """The subgroups' sizes when each weight-decay group's flat range is cut every `size` elements."""
    if size < 1:
        raise ValueError(f"optim.offload_subgroup_size: must be at least 1, got {size}")
    return [min(size, n - a) for n in group_numels for a in range(0, n, size)]


def candidate_subgroup_sizes(group_numels: list[int]) -> list[int]:
    """Sizes `auto` considers: SMALLEST_AUTO_SUBGROUP x 4^i below the largest group that cut the
    shard into at most MAX_AUTO_SUBGROUPS subgroups (more only adds per-subgroup costs, and the
    search over strides grows with the square of the count), and the largest group itself (one
    subgroup per group)."""
    largest = max(group_numels, default=0) or 1
    out, size = [], SMALLEST_AUTO_SUBGROUP
    while size < largest:
        if sum(-(-n // size) for n in group_numels) <= MAX_AUTO_SUBGROUPS:
            out.append(size)
        size *= AUTO_SUBGROUP_FACTOR
    return out + [largest]


def pick_layout(probe_for, group_numels: list[int], candidates: list[int], weight_bytes: int,
                device_budget_bytes: float, stride: int | None = None
                ) -> tuple[int, int, dict[tuple[int, int], Prediction]]:
    """The predicted-fastest (subgroup size, stride) over `candidates` (and every stride 1..n+1,
    or only `stride` when given; a stride above n is all-host) whose device buffer set fits the
    budget. `probe_for(size)` is the Probe to predict subgroups of `size` with (its fastest host
    Adam). Returns (size, stride, {(size, stride): Prediction}); ValueError when nothing fits."""
    predictions: dict[tuple[int, int], Prediction] = {}
    for size in candidates:
        sizes = subgroup_sizes(group_numels, size)
        probe = probe_for(size)
        host_impl = probe.best_host_adam()
        n = len(sizes)
        if stride is None:
            _, per_stride = pick_stride(probe, sizes, host_impl, weight_bytes, device_budget_bytes)
        else:
            k = min(stride, n + 1)
            roles = roles_for_stride(n, k)
            largest = max((s for s, r in zip(sizes, roles) if r == "device"), default=0)
            fits = DEVICE_BUFFER_BYTES * largest <= device_budget_bytes
            per_stride = {k: predict(probe, sizes, roles, host_impl, weight_bytes, k)} if fits else {}
        for k, pred in per_stride.items():
            predictions[(size, k)] = pred
    if not predictions:
        raise ValueError(f"optim.offload_subgroup_size: no subgroup size of {candidates} fits the device budget of "
                         f"{device_budget_bytes / 2**30:.3g} GiB (optim.offload_device_memory_gb) at stride {stride}")
    # Ties: the larger subgroup (fewer calls), then the larger stride (less device work).
    size, k = min(predictions, key=lambda sk: (predictions[sk].update_s, -sk[0], -sk[1]))
    return size, k, predictions


# ----------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------
def _cache_path() -> Path:
    root = os.environ.get("LONGTRAIN_CACHE") or Path.home() / ".cache" / "longtrain"
    return Path(root) / "offload_probe.json"


def machine_key(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"v4|{platform.node()}|{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_probe(device: torch.device, host_adams: dict, chunk: int = PROBE_NUMEL, numel: int = PROBE_NUMEL,
              reps: int = 5) -> Probe:
    """Measure host Adam per implementation and device fused Adam as the update runs them: over
    `numel` fp32 parameters (beyond the CPU caches) in subgroup-sized calls of `chunk`; and both
    copy directions. `host_adams`: name -> HostAdam (see parallel/offload.py)."""
    from longtrain.parallel.offload import device_adam, pinned_empty

    chunk = max(1, min(chunk, numel))
    starts = range(0, numel - chunk + 1, chunk)
    numel_run = chunk * len(starts)

    def host_buffers():
        return [torch.rand(numel) for _ in range(4)]

    probe = Probe(device_is_host=device.type == "cpu",
                  concurrent=device.type == "cpu" and 2 * torch.get_num_threads() <= (os.cpu_count() or 1))
    for name, impl in host_adams.items():
        p, g, m, v = host_buffers()

        def host():
            for a in starts:
                impl.update(p[a:a + chunk], g[a:a + chunk], m[a:a + chunk], v[a:a + chunk], step=3, lr=1e-4,
                            beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        probe.host_adam_params_per_s[name] = numel_run / _timed(host, reps)
    p, g, m, v = (t.to(device) for t in host_buffers())
    step = torch.tensor(3.0, device=device)

    def dev():
        for a in starts:
            device_adam(p[a:a + chunk], g[a:a + chunk], m[a:a + chunk], v[a:a + chunk], step, lr=1e-4, beta1=0.9,
                        beta2=0.95, eps=1e-8, weight_decay=0.1)
        synchronize(device)

    probe.device_adam_params_per_s = numel_run / _timed(dev, reps)
    host = pinned_empty(numel * 3, device)
    host.copy_(torch.rand(numel * 3))
    dev_buf = torch.empty(numel * 3, device=device)

    def h2d():
        dev_buf.copy_(host, non_blocking=True)
        synchronize(device)

    def d2h():
        host.copy_(dev_buf, non_blocking=True)
        synchronize(device)

    probe.h2d_bytes_per_s = host.numel() * 4 / _timed(h2d, reps)
    probe.d2h_bytes_per_s = host.numel() * 4 / _timed(d2h, reps)
    other = torch.empty_like(dev_buf)

    def d2d():
        other.copy_(dev_buf)
        synchronize(device)

    probe.d2d_bytes_per_s = dev_buf.numel() * 4 / _timed(d2d, reps)
    probe.subgroup_overhead_s = _subgroup_overhead(device, next(iter(host_adams.values())), reps)
    return probe


def _subgroup_overhead(device: torch.device, impl, reps: int) -> float:
    """Seconds of one 4K-element subgroup's host update handed to a worker thread and back, plus
    its weights' copy: what a subgroup costs beyond its size."""
    from concurrent.futures import ThreadPoolExecutor

    n = 4096
    p, g, m, v = (torch.rand(n) for _ in range(4))
    target = torch.empty(n, device=device)

    def one():
        impl.update(p, g, m, v, step=3, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        target.copy_(p, non_blocking=True)

    with ThreadPoolExecutor(1) as pool:
        def handed():
            pool.submit(one).result()
            synchronize(device)
        return _timed(handed, max(reps, 20))


def cached_probe(device: torch.device, host_adams: dict, chunk: int = PROBE_NUMEL) -> Probe:
    """The probe of this machine for subgroups of `chunk` parameters (capped at PROBE_NUMEL): read
    from the cache when it holds this machine, size and every host implementation asked for, else
    measured and written there."""
    chunk = min(chunk, PROBE_NUMEL)
    path, key = _cache_path(), f"{machine_key(device)}|subgroup {chunk}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if hit and set(host_adams) <= set(hit["host_adam_params_per_s"]):
        hit = dict(hit)
        hit["host_adam_params_per_s"] = {k: v for k, v in hit["host_adam_params_per_s"].items() if k in host_adams}
        return Probe(**hit)
    probe = run_probe(device, host_adams, chunk)
    cache[key] = asdict(probe)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: probe again next time
    return probe
