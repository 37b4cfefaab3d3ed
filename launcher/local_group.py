"""Run a function on N local gloo processes and bring rank 0's result back.

For tests and benchmarks on one machine: starting processes costs seconds, so callers spawn one
group and run many cases inside it. A failure on any rank raises with that rank's traceback.
With `on_event`, the function gets a queue as its last argument; what it puts there reaches
`on_event` in the parent while the group runs (progress bars).
"""
from __future__ import annotations

import os
import sys
import pickle
import queue
import tempfile
import traceback
import warnings


class GroupFailed(RuntimeError):
    """A rank of the group failed; str() holds each failing rank's traceback."""


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args, events):
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a crash in native code still shows where Python was
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    status = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        status["result"] = fn(*args, events) if events is not None else fn(*args)
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        status["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(status, f)
        if "error" in status:
            os._exit(1)  # do not wait on peers that may be stuck in a collective
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        # The result is on disk: leave without running native static destructors, where a
        # backend thread still joinable at interpreter exit can abort the process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_group(world_size: int, fn, *args, on_event=None):
    """Run fn(*args) on every rank of a new gloo group on this machine; return rank 0's value."""
    import torch.multiprocessing as mp

    events = mp.get_context("spawn").Queue() if on_event is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "init"), tmp, fn, args, events),
                                 nprocs=world_size, join=False, start_method="spawn")

        def drain():
            while events is not None:
                try:
                    on_event(events.get_nowait())
                except queue.Empty:
                    return

        try:
            while not ctx.join(timeout=0.2):
                drain()
            drain()
        except Exception as err:  # a rank died: show its traceback
            errors = []
            for rank in range(world_size):
                path = os.path.join(tmp, f"rank{rank}.pkl")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        status = pickle.load(f)
                    if "error" in status:
                        errors.append(f"--- rank {rank} ---\n{status['error']}")
            raise GroupFailed("\n".join(errors) or str(err)) from None
        with open(os.path.join(tmp, "rank0.pkl"), "rb") as f:
            return pickle.load(f)["result"]
