"""Run a function on N local gloo processes and bring rank 0's result back.

The test harness (tests and benchmarks import it; product code never does). On one machine: starting processes costs seconds, so callers spawn one
group and run many cases inside it. A failure on any rank raises with that rank's traceback.
With `on_event`, the function gets a queue as its last argument; what it puts there reaches
`on_event` in the parent while the group runs (progress bars).

Every group has a deadline (`deadline_s`, default LONGTRAIN_GROUP_DEADLINE_S or 900 s): a group
still running then (a collective that never completes, a rank stuck in a loop) is ended, and
GroupFailed carries every rank's Python stack at that moment, instead of hanging until CI is killed.
"""
from __future__ import annotations

import os
import sys
import pickle
import queue
import signal
import tempfile
import time
import traceback
import warnings

DEFAULT_DEADLINE_S = 900.0


class GroupFailed(RuntimeError):
    """A rank of the group failed; str() holds each failing rank's traceback."""


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args, events):
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a crash in native code still shows where Python was
    # On the deadline the parent sends SIGUSR1: every thread's Python stack goes to this file.
    stacks = open(os.path.join(out_dir, f"rank{rank}.stacks"), "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
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


def _deadline_from_env() -> float:
    return float(os.environ.get("LONGTRAIN_GROUP_DEADLINE_S", DEFAULT_DEADLINE_S))


def _stacks_at_deadline(ctx, tmp: str, world_size: int, deadline_s: float) -> str:
    """Ask every live rank for its Python stacks, end the group, and return the stacks as text."""
    paths = [os.path.join(tmp, f"rank{rank}.stacks") for rank in range(world_size)]
    alive = [proc.is_alive() for proc in ctx.processes]
    # A rank's stack file exists once its handler is registered; before that SIGUSR1 would kill it.
    asked = [a and os.path.exists(p) for a, p in zip(alive, paths)]
    for proc, ask in zip(ctx.processes, asked):
        if ask:
            os.kill(proc.pid, signal.SIGUSR1)
    waited = 0.0
    while waited < 10.0 and not all(os.path.getsize(p) > 0 for p, ask in zip(paths, asked) if ask):
        time.sleep(0.2)  # faulthandler writes from the signal handler: give each rank a moment
        waited += 0.2
    for proc in ctx.processes:
        if proc.is_alive():
            proc.kill()
    for proc in ctx.processes:
        proc.join(timeout=10)
    parts = [f"process group of {world_size} did not finish within its deadline of {deadline_s:.0f} s; "
             "each rank's Python stack at the deadline:"]
    for rank, path in enumerate(paths):
        if not alive[rank]:
            text = "(no stack: the rank had already exited)"
        elif not asked[rank]:
            text = "(no stack: the rank was still starting up)"
        else:
            text = open(path).read().strip() or "(no stack: the rank did not answer)"
        parts.append(f"--- rank {rank} ---\n{text}")
    return "\n".join(parts)


def run_group(world_size: int, fn, *args, on_event=None, deadline_s: float | None = None):
    """Run fn(*args) on every rank of a new gloo group on this machine; return rank 0's value.
    Raises GroupFailed with each failing rank's traceback, or with every rank's stack when the
    group runs past `deadline_s` seconds."""
    import torch.multiprocessing as mp

    deadline_s = _deadline_from_env() if deadline_s is None else deadline_s
    started = time.monotonic()

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
                if time.monotonic() - started > deadline_s:
                    raise GroupFailed(_stacks_at_deadline(ctx, tmp, world_size, deadline_s))
            drain()
        except GroupFailed:
            raise
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
