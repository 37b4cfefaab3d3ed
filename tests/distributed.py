"""Run a function on N gloo processes on CPU, once per group, and bring rank 0's result back.

Starting processes costs seconds, so a test spawns one group and runs many cases inside it.
A failure on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback
import warnings

import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args):
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    status = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        status["result"] = fn(*args)
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        status["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(status, f)
        if "error" not in status and dist.is_initialized():
            dist.destroy_process_group()
        if "error" in status:
            os._exit(1)  # do not wait on peers that may be stuck in a collective


def run_group(world_size: int, fn, *args, timeout: float = 600):
    """Run fn(*args) on every rank of a new gloo group; return rank 0's return value."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(_worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as err:  # a rank died: show its traceback
            errors = []
            for rank in range(world_size):
                path = os.path.join(tmp, f"rank{rank}.pkl")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        status = pickle.load(f)
                    if "error" in status:
                        errors.append(f"--- rank {rank} ---\n{status['error']}")
            raise AssertionError("\n".join(errors) or str(err)) from None
        with open(os.path.join(tmp, "rank0.pkl"), "rb") as f:
            return pickle.load(f)["result"]
