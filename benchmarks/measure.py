"""What the multi-process benchmarks measure besides time, in one place: the bytes each rank sends
(wrappers around torch.distributed's collectives), per-rank peak memory on CPU (the RSS high-water
mark over one pass), how much of the machine other processes used, and the machine itself.

Imported by benchmarks/context_parallel.py and benchmarks/ssm.py (scripts in this folder: Python
puts the folder on sys.path when one of them runs).
"""
from __future__ import annotations

import gc
import inspect
import json
import os
import platform
import sys
import time
from collections import defaultdict


# ----------------------------------------------------------------------------------------------
# Bytes each rank sends
# ----------------------------------------------------------------------------------------------
class CommCounter:
    """Bytes that leave this rank per (phase, tag, op) while `active`. `phase` is fwd/bwd (set by
    the driver), `tag` what is communicating (set by the caller, e.g. a Mamba or attention core;
    "other" by default). Accounting (standard algorithms): all_to_all(_single): the input minus
    the chunk kept for itself; all_gather(_into_tensor): the input to each of the N-1 others;
    all_reduce: ring, 2(N-1)/N x the buffer; reduce_scatter: ring, (N-1) x the output; broadcast:
    the source sends the buffer to N-1 others; batch_isend_irecv: the isend tensors."""

    def __init__(self):
        self.active = False
        self.phase = "fwd"
        self.tag = "other"
        self.bytes = defaultdict(float)
        self.calls = defaultdict(int)

    def add(self, op: str, nbytes: float):
        if self.active:
            key = (self.phase, self.tag, op)
            self.bytes[key] += nbytes
            self.calls[key] += 1

    def reset(self):
        self.bytes.clear()
        self.calls.clear()
        self.tag = "other"

    def snapshot(self) -> dict:
        """{tag: {fwd, bwd, total, by_op: {"fwd:all_gather": {bytes, calls}}}}"""
        out = {}
        for (phase, tag, op), n in self.bytes.items():
            t = out.setdefault(tag, {"fwd": 0.0, "bwd": 0.0, "by_op": {}})
            t[phase] += n
            t["by_op"][f"{phase}:{op}"] = {"bytes": n, "calls": self.calls[(phase, tag, op)]}
        for t in out.values():
            t["total"] = t["fwd"] + t["bwd"]
        return out

    def totals(self) -> dict:
        """All tags together: {fwd, bwd, total, by_op}."""
        out = {"fwd": 0.0, "bwd": 0.0, "by_op": {}}
        for (phase, _tag, op), n in self.bytes.items():
            out[phase] += n
            entry = out["by_op"].setdefault(f"{phase}:{op}", {"bytes": 0.0, "calls": 0})
            entry["bytes"] += n
            entry["calls"] += self.calls[(phase, _tag, op)]
        out["total"] = out["fwd"] + out["bwd"]
        return out


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def install_comm_counter(counter: CommCounter):
    """Wrap torch.distributed's collectives (looked up at call time by longtrain's comm.py and by
    DeepSpeed's TorchBackend alike). isend/irecv stay untouched (P2POp checks their identity):
    they are counted through batch_isend_irecv."""
    import torch.distributed as dist

    def world(a):
        return dist.get_world_size(a.get("group"))

    def a2a_single(a):
        n, x = world(a), a["input"]
        if a.get("input_split_sizes"):
            row = nbytes(x) // max(x.shape[0], 1)
            return nbytes(x) - a["input_split_sizes"][dist.get_rank(a.get("group"))] * row
        return nbytes(x) * (n - 1) / n

    def broadcast(a):
        src = a.get("src")
        if src is None:
            src = dist.get_global_rank(a["group"], a["group_src"]) if a.get("group_src") is not None else 0
        return nbytes(a["tensor"]) * (world(a) - 1) if dist.get_rank() == src else 0

    sizes = {
        "all_to_all_single": a2a_single,
        "all_to_all": lambda a: sum(nbytes(t) for i, t in enumerate(a["input_tensor_list"])
                                    if i != dist.get_rank(a.get("group"))),
        "all_gather": lambda a: nbytes(a["tensor"]) * (world(a) - 1),
        "all_gather_into_tensor": lambda a: nbytes(a["input_tensor"]) * (world(a) - 1),
        "all_reduce": lambda a: nbytes(a["tensor"]) * 2 * (world(a) - 1) / world(a),
        "reduce_scatter": lambda a: nbytes(a["output"]) * (world(a) - 1),
        "reduce_scatter_tensor": lambda a: nbytes(a["output"]) * (world(a) - 1),
        "send": lambda a: nbytes(a["tensor"]),
        "broadcast": broadcast,
        "batch_isend_irecv": lambda a: sum(nbytes(op.tensor) for op in a["p2p_op_list"] if op.op is dist.isend),
    }
    for name, size_fn in sizes.items():
        real = getattr(dist, name, None)
        if real is None or getattr(real, "_counted", False):
            continue
        sig = inspect.signature(real)

        def wrapper(*args, _real=real, _sig=sig, _name=name, _size=size_fn, **kwargs):
            if counter.active:
                bound = _sig.bind(*args, **kwargs)
                bound.apply_defaults()
                counter.add(_name, _size(bound.arguments))
            return _real(*args, **kwargs)

        wrapper._counted = True
        setattr(dist, name, wrapper)


# ----------------------------------------------------------------------------------------------
# Collecting one pass's numbers from every rank of the cp group
# ----------------------------------------------------------------------------------------------
def all_ranks(value, cp: int) -> list:
    """Every rank's `value` (any picklable object), in rank order; [value] at cp 1."""
    if cp == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * cp
    dist.all_gather_object(out, value)
    return out


def record_timed_pass(res: dict, cp: int, fwd_s: float, wall_s: float, cpu_s: float) -> None:
    """Append one timed pass to `res`: the slowest rank's forward and forward+backward seconds,
    and every rank's CPU seconds."""
    import torch
    import torch.distributed as dist

    times = torch.tensor([fwd_s, wall_s], dtype=torch.float64)
    if cp > 1:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    res["fwd_s"].append(float(times[0]))
    res["wall_s"].append(float(times[1]))
    res["cpu_s"].append(all_ranks(cpu_s, cp))


# ----------------------------------------------------------------------------------------------
# Per-rank peak memory on CPU: the RSS high-water mark over one pass
# ----------------------------------------------------------------------------------------------
def proc_status_kib(*keys) -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":")[0]
            if name in keys:
                out[name] = int(line.split()[1])
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
CHECK_MMAP, CHECK_TRIM = 64 << 10, 128 << 10  # check passes: every allocation >= 64 KiB its own mapping
TIMED_MMAP, TIMED_TRIM = 32 << 20, 64 << 20  # timed passes: glibc's dynamic threshold at its ceiling


class RssPeak:
    """Per-rank peak memory of one pass: VmHWM after - VmRSS before.

    `start` switches glibc malloc to a fixed 64 KiB mmap threshold (every tensor of 64 KiB or more
    is its own mapping and leaves the resident set when freed, so the RSS follows live memory rather
    than the heap's free lists), returns free heap to the OS (gc + malloc_trim) and resets the
    kernel's high-water mark (/proc/self/clear_refs = 5). `stop` reads VmHWM and switches malloc
    to the settings of the timed passes (`timed`: a fixed 32 MiB mmap threshold and 64 MiB trim
    threshold, the ceiling glibc's dynamic threshold settles at; fixed so that every group and
    every pass runs under the same allocator). Without clear_refs (non-Linux) it falls back to
    ru_maxrss, which cannot be reset: an upper bound (`method` says which)."""

    def __init__(self, timed_after_stop: bool = True):
        import ctypes

        self.timed_after_stop = timed_after_stop  # False: stay at the check settings between passes
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            self.libc = None
        self.before = None
        self.method = "vmhwm"

    def _mallopt(self, mmap_threshold: int, trim_threshold: int):
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
            self.libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)

    def timed(self):
        self._mallopt(TIMED_MMAP, TIMED_TRIM)

    def start(self):
        self._mallopt(CHECK_MMAP, CHECK_TRIM)
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = proc_status_kib("VmRSS")["VmRSS"] * 1024
            self.method = "vmhwm"
        except OSError:
            self.method = "ru_maxrss"
            self.before = _rss_now_bytes()

    def stop(self) -> int:
        if self.method == "vmhwm":
            peak = proc_status_kib("VmHWM")["VmHWM"] * 1024 - self.before
        else:
            import resource

            unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - self.before)
        if self.timed_after_stop:
            self.timed()
        return peak


def _rss_now_bytes() -> int:
    try:
        return proc_status_kib("VmRSS")["VmRSS"] * 1024
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------
# The machine, and how much of it others used
# ----------------------------------------------------------------------------------------------
def profiler_peak_bytes(prof) -> int:
    """Peak of the running sum of the CPU allocator's allocations and frees seen by the profiler."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def machine_info() -> dict:
    import torch

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "memory_bytes": mem, "torch_version": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


class MachineLoad:
    """CPU used on this machine by processes other than this benchmark while it runs: busy time from
    /proc/stat minus this process's and its children's CPU time (other tenants share the cores)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return busy, own, time.time()

    def other_share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def klen(s) -> str:
    s = int(s)
    return f"{s // 1024}K" if s % 1024 == 0 else str(s)


def mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.1f}"


def kib(n) -> str:
    return f"{n / 2 ** 10:,.1f}"


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, imported by the caller with the Agg backend)
# ----------------------------------------------------------------------------------------------
def length_axis(ax, lengths) -> None:
    """A log-2 x axis of sequence lengths, ticked at `lengths` (4K, 8K, ...), with a grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([klen(x) for x in lengths])
    ax.set_xlabel("sequence length (tokens)")
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, path, names: list, dpi: int) -> None:
    """Lay out, write the PNG, close the figure and add its file name to `names`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    names.append(path.name)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def write_results(out, stem: str, report: dict, markdown: str, plot=None) -> str:
    """out/stem.json (the report), out/stem.md (the markdown) and, given `plot(report, path)`,
    out/stem.png; prints the markdown and returns it."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown)
    if plot is not None:
        plot(report, out / f"{stem}.png")
    print(markdown)
    return markdown
