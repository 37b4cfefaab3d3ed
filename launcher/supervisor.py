"""The local launcher: start a node's worker processes, watch them, stop or restart them.

- Rendezvous: the launcher hosts the TCPStore on a socket bound to 127.0.0.1 (workers join it as
  clients, TORCHELASTIC_USE_AGENT_STORE) and gloo/NCCL bind to the loopback interface, so a
  single-node job listens on no external interface.
- A worker that fails (an exception, or killed by a signal) ends the job within a poll interval:
  the others are killed and the launcher names the rank and its error in one line. Under
  `run.launch.max_restarts: N` the whole node is restarted instead, up to N times; the workers
  resume from the last checkpoint (checkpoint.resume: auto).
- A failure that looks like a collective timeout (`run.collective_timeout`) prints every
  surviving rank's Python stack first (faulthandler on SIGUSR1, one file per rank).
- SIGTERM / SIGINT on the launcher: the workers get SIGTERM, finish their step, save and exit.
  They get `run.launch.sigterm_grace_s` seconds (0: the slowest step plus twice the longest save
  measured in this job, plus 10 s, at least 30 s); after that they are killed, and the launcher
  says whether a checkpoint of this stop was written or which is the last one.
- One run per run.dir: the launcher holds the run.dir lock (launcher/run_lock.py) for the job.

Workers find their settings in a job directory (LONGTRAIN_JOB_DIR): recipe.json in; one
rank_R.error line, rank_R.stack, timing.json and result.json (rank 0) out.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

JOB_DIR_ENV = "LONGTRAIN_JOB_DIR"
POLL_SECONDS = 0.1
MIN_GRACE_SECONDS = 30.0


class JobFailed(RuntimeError):
    """A worker failed and no restart is left; str() is one line naming the rank."""


class JobStopped(RuntimeError):
    """The job was stopped by a signal; str() says whether the workers saved a checkpoint."""


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------
def report_timing(kind: str, seconds: float) -> None:
    """Rank 0 records its slowest step / save, from which the launcher sizes the SIGTERM grace."""
    job_dir = os.environ.get(JOB_DIR_ENV)
    if not job_dir or os.environ.get("RANK", "0") != "0":
        return
    path = Path(job_dir) / "timing.json"
    try:
        timing = json.loads(path.read_text()) if path.is_file() else {}
        if seconds <= timing.get(kind, 0.0):
            return
        timing[kind] = seconds
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(timing))
        tmp.replace(path)
    except (OSError, ValueError):
        pass


def worker_main() -> None:
    """Entry point of a launched worker process."""
    import faulthandler
    import traceback

    job_dir = Path(os.environ[JOB_DIR_ENV])
    rank = int(os.environ["RANK"])
    stack_file = open(job_dir / f"rank_{rank}.stack", "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)  # the launcher asks for stacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which sends SIGTERM
    from longtrain.launcher.launch import _expected_failures, worker

    try:
        result = worker(json.loads((job_dir / "recipe.json").read_text()))
    except BaseException as err:  # noqa: BLE001 - every failure is reported to the launcher
        line = f"{type(err).__name__}: {' '.join(str(err).split())}"
        (job_dir / f"rank_{rank}.error").write_text(line[:2000])
        from longtrain.launcher.checkpoint import CheckpointError
        from longtrain.launcher.config import RecipeError

        if not isinstance(err, _expected_failures() + (CheckpointError, RecipeError)):
            traceback.print_exc()  # a bug: its traceback; a user-facing error: the launcher's one line
        sys.stderr.flush()
        os._exit(1)  # peers may be stuck in a collective: do not wait on them
    if rank == 0:
        (job_dir / "result.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------
# Launcher side
# ----------------------------------------------------------------------------------------------
class _LoopbackStore:
    """A TCPStore served from a socket bound to 127.0.0.1 (TCPStore itself binds every interface)."""

    def __init__(self, port: int, world_size: int, timeout_s: float):
        import torch.distributed as dist

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(max(128, world_size))
        self.port = sock.getsockname()[1]
        self.store = dist.TCPStore("127.0.0.1", self.port, world_size=world_size, is_master=True,
                                   master_listen_fd=sock.detach(), wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s), use_libuv=False)


class Supervisor:
    def __init__(self, recipe_dict: dict, nproc: int):
        launch, run = recipe_dict["run"]["launch"], recipe_dict["run"]
        self.recipe_dict = recipe_dict
        self.nproc = nproc
        self.master_port = int(launch.get("master_port") or 0)
        self.max_restarts = int(launch.get("max_restarts", 0))
        self.grace_s = float(launch.get("sigterm_grace_s", 0.0))
        self.collective_timeout = float(run.get("collective_timeout", 600.0))
        ckpt = recipe_dict["checkpoint"].get("dir") or str(Path(run["dir"]) / "checkpoints")
        self.ckpt_root = Path(ckpt)
        self.signal_name: str | None = None

    # -- the job ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run the job to the end; returns rank 0's result. Raises JobFailed or JobStopped."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            attempt = 0
            while True:
                with tempfile.TemporaryDirectory(prefix="longtrain_job_") as job_dir:
                    outcome = self._attempt(Path(job_dir), attempt)
                if outcome["kind"] != "failed":
                    return outcome["result"]
                if self.signal_name is not None or attempt >= self.max_restarts:
                    raise JobFailed(outcome["message"])
                attempt += 1
                if (self.ckpt_root / "latest").is_file():  # resume this run's own progress, not checkpoint.resume's
                    self.recipe_dict = dict(self.recipe_dict, checkpoint=dict(self.recipe_dict["checkpoint"],
                                                                              resume="auto"))
                print(f"longtrain: {outcome['message']}; restarting all workers from the last checkpoint "
                      f"(restart {attempt} of run.launch.max_restarts={self.max_restarts})", file=sys.stderr, flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        elif signum == signal.SIGINT:  # a second Ctrl-C: stop waiting for the save
            self._force = True

    _force = False

    def _attempt(self, job_dir: Path, attempt: int) -> dict:
        (job_dir / "recipe.json").write_text(json.dumps(self.recipe_dict))
        store = _LoopbackStore(self.master_port if attempt == 0 else 0, self.nproc, self.collective_timeout)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(self.nproc),
                   LOCAL_WORLD_SIZE=str(self.nproc), TORCHELASTIC_USE_AGENT_STORE="True",
                   LONGTRAIN_RESTART_COUNT=str(attempt), LONGTRAIN_RUN_LOCK_HELD="1", **{JOB_DIR_ENV: str(job_dir)})
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: gloo and NCCL listen on loopback only
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        procs = []
        for rank in range(self.nproc):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "from longtrain.launcher.supervisor import worker_main; worker_main()"],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0")))
        try:
            return self._watch(procs, job_dir)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            del store

    def _watch(self, procs: list, job_dir: Path) -> dict:
        forwarded_at = None
        while True:
            if self.signal_name is not None and forwarded_at is None:
                forwarded_at = time.monotonic()
                grace = self._grace(job_dir)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # The first to fail: a rank killed by a signal (its peers then fail on the broken
                # connection), else the earliest error written.
                first = min(failed, key=lambda r: (codes[r] > 0, _exit_order(job_dir, r)))
                message = self._failure_message(first, codes[first], job_dir)
                if _looks_like_timeout(message):
                    self._print_stacks(procs, job_dir, exclude=first)
                if forwarded_at is not None:
                    return {"kind": "stopped", "result": self._stopped(job_dir, grace, killed=False, failure=message)}
                return {"kind": "failed", "message": message}
            if all(c == 0 for c in codes):
                result = _read_json(job_dir / "result.json") or {}
                if forwarded_at is not None or result.get("stopped_by_signal"):
                    return {"kind": "stopped", "result": self._stopped(
                        job_dir, grace if forwarded_at is not None else 0.0, killed=False)}
                return {"kind": "done", "result": result}
            if forwarded_at is not None and (time.monotonic() - forwarded_at > grace or self._force):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                return {"kind": "stopped", "result": self._stopped(job_dir, grace, killed=True)}
            time.sleep(POLL_SECONDS)

    # -- reporting -------------------------------------------------------------------------------
    def _grace(self, job_dir: Path) -> float:
        if self.grace_s > 0:
            return self.grace_s
        timing = _read_json(job_dir / "timing.json") or {}
        return max(MIN_GRACE_SECONDS, timing.get("step", 0.0) + 2 * timing.get("save", 0.0) + 10.0)

    def _stopped(self, job_dir: Path, grace: float, killed: bool, failure: str = "") -> dict:
        name = self.signal_name or "SIGTERM"
        after = _latest_name(self.ckpt_root)
        result = _read_json(job_dir / "result.json") or {}
        if not killed and not failure and result.get("stop_checkpoint"):
            raise JobStopped(f"stopped by {name}: the workers saved {result['stop_checkpoint']} and exited")
        if not killed and not failure and result.get("stopped_by_signal") is False:
            raise JobStopped(f"stopped by {name} after training finished")
        why = (f"the workers did not finish their step and the save within {grace:.0f} s "
               f"(run.launch.sigterm_grace_s) and were killed" if killed else
               f"a worker failed while stopping ({failure})" if failure else "the workers exited without saving")
        last = f"the last checkpoint is {self.ckpt_root / after}" if after else "there is no checkpoint"
        raise JobStopped(f"stopped by {name}: {why}; no checkpoint of this stop was written; {last}")

    def _failure_message(self, rank: int, code: int, job_dir: Path) -> str:
        error = job_dir / f"rank_{rank}.error"
        if error.is_file():
            return f"worker rank {rank} failed: {error.read_text().strip()}"
        if code < 0:
            return f"worker rank {rank} was killed by {signal.Signals(-code).name}"
        return f"worker rank {rank} exited with code {code} (see its output above)"

    def _print_stacks(self, procs: list, job_dir: Path, exclude: int) -> None:
        alive = [r for r, p in enumerate(procs) if p.poll() is None]
        for r in alive:
            procs[r].send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        lines = [f"longtrain: a collective timed out (run.collective_timeout={self.collective_timeout:g} s); "
                 "the Python stack of every rank:"]
        for r in range(len(procs)):
            if r == exclude:
                lines.append(f"--- rank {r}: failed first; its traceback is above ---")
                continue
            stack = job_dir / f"rank_{r}.stack"
            text = stack.read_text().strip() if stack.is_file() else ""
            lines.append(f"--- rank {r} ---\n{text or '(no stack: the process had exited)'}")
        print("\n".join(lines), file=sys.stderr, flush=True)


def _exit_order(job_dir: Path, rank: int) -> float:
    """Which rank failed first: its error file's time (a killed worker has none: now)."""
    error = job_dir / f"rank_{rank}.error"
    return error.stat().st_mtime if error.is_file() else time.time()


def _looks_like_timeout(message: str) -> bool:
    text = message.lower()
    return "timed out" in text or "timeout" in text


def _latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except OSError:
        return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _local_rank_worker(rank: int, world_size: int, fn, args, backend: str, store_file: str, results) -> None:
    import traceback

    import torch.distributed as dist

    try:
        if backend == "nccl":
            import torch

            torch.cuda.set_device(rank)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        store = dist.FileStore(store_file, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=600))
        try:
            out = fn(*args)
            # by value (plain pickle): a tensor shared by file descriptor would vanish with this process
            results.put((rank, "ok", pickle.dumps(out) if rank == 0 else None))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank
        results.put((rank, "error", traceback.format_exc()))


def run_local_ranks(world_size: int, fn, *args, backend: str = "gloo", timeout_s: float | None = None):
    """fn(*args) on `world_size` local processes of one process group (a measurement between local
    ranks for `longtrain probe`, tensor-parallel decoding for `longtrain generate --nproc`); returns
    rank 0's result. A rank that fails raises JobFailed naming it, with its traceback; with
    timeout_s, a group still running then is killed and JobFailed says so."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_local_rank_worker, args=(rank, world_size, fn, args, backend, store, results))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        answer, pending = None, set(range(world_size))
        try:
            while pending:
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                try:
                    rank, status, payload = results.get(timeout=wait)
                except queue.Empty:
                    dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode not in (0, None)]
                    if dead:
                        raise JobFailed(f"local rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise JobFailed(f"local ranks {sorted(pending)} still running after {timeout_s:.0f} s") from None
                    continue
                if status == "error":
                    raise JobFailed(f"local rank {rank} failed:\n{payload}")
                pending.discard(rank)
                if rank == 0:
                    answer = pickle.loads(payload)
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        return answer
