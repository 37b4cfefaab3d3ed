"""One run per run.dir: a second run fails in one line naming the holder's pid and host (two runs
on one directory mixed their checkpoints and metrics); the lock dies with its holder."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from distributed import run_group
from longtrain.launcher.run_lock import RunDirLocked, RunLock
from reliability_cases import train_in


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from longtrain.launcher.run_lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked) as err:
            RunLock(tmp_path).acquire()
        assert f"run.dir: {tmp_path} is in use by another run (pid {holder.pid} on host {socket.gethostname()}" \
               in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path).acquire().release()  # no stale lock after kill -9


def test_the_trainer_refuses_a_run_dir_in_use(tmp_path):
    with RunLock(tmp_path / "run"):
        error = run_group(1, train_in, str(tmp_path / "run"))
    assert error is not None and error.startswith("RunDirLocked: run.dir: ") and f"pid {os.getpid()}" in error, error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert run_group(1, train_in, str(tmp_path / "run")) is None  # free again
