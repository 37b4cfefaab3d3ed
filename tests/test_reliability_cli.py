"""Faults through the `longtrain` command, as users meet them (tests/faults/sitecustomize.py
plants them in the job's processes from outside): kill -9 of the whole job during a save and of
one worker, restarts under run.launch.max_restarts, SIGTERM during a long step, two runs on one
run.dir, a hung rank, loopback-only listening, a bad record under one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
FAULTS = str(Path(__file__).resolve().parent / "faults")
JOB = ["model.name=tiny", "data.seq_len=32", "data.batch_size=2", "run.tensorboard=false", "run.progress=false",
       "--nproc", "2", "parallel.tp=1", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2",
       "train.steps=6", "optim.warmup_steps=2"]


def start(run_dir, *extra, fault=None, nproc_job=JOB):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if fault is not None:
        env["PYTHONPATH"] = FAULTS + os.pathsep + env.get("PYTHONPATH", "")
        env["LONGTRAIN_FAULT"] = json.dumps(fault)
    return subprocess.Popen([sys.executable, "-m", "longtrain.launcher.cli", "train", DEBUG, *nproc_job,
                             f"run.dir={run_dir}", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s: {err[-3000:]}")
    return proc.returncode, out, err


def wait_for(path: Path, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {path.name}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


def losses(run_dir) -> dict:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("longtrain: error:")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = finish(start(run))
    assert code == 0, err[-3000:]
    return {"losses": losses(run), "run": run}


def test_kill9_during_a_save_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    run, ready = tmp_path / "run", tmp_path / "saving"
    proc = start(run, fault={"stall_save_at": 4, "ready": str(ready)})
    wait_for(ready, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-save
    proc.communicate()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / ".tmp_step_00000004").is_dir() and not (ckpts / "step_00000004").exists()
    code, out, err = finish(start(run))
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "step_00000002" in out, out[-2000:]
    assert losses(run) == uninterrupted["losses"]  # steps 3-4 replayed, each logged once
    assert not (ckpts / ".tmp_step_00000004").exists()


def test_max_restarts_resumes_equal_to_an_uninterrupted_run(tmp_path, uninterrupted):
    run = tmp_path / "run"
    started = time.time()
    code, _, err = finish(start(run, "run.launch.max_restarts=1", fault={"kill_rank": 1, "at_step": 5}))
    assert code == 0, err[-3000:]
    assert "worker rank 1 was killed by SIGKILL; restarting all workers from the last checkpoint (restart 1 of " \
           "run.launch.max_restarts=1)" in err, err[-3000:]
    assert losses(run) == uninterrupted["losses"]
    assert time.time() - started < 200


def test_kill9_of_one_worker_ends_the_job_naming_the_rank(tmp_path):
    run = tmp_path / "run"
    proc = start(run, fault={"kill_rank": 1, "at_step": 2})
    code, _, err = finish(proc, timeout=120)
    assert code == 1, err[-3000:]
    assert error_lines(err) == ["longtrain: error: worker rank 1 was killed by SIGKILL"], err[-3000:]


def _listening_addresses(pids: set) -> list:
    """Local addresses of the LISTEN sockets the given processes hold (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:
                found.append(parts[1].split(":")[0])
    return found


def _job_pids(root_pid: int) -> set:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == root_pid:
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


def test_sigterm_during_a_long_step_saves_reports_and_locks_the_run_dir(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "slow"
    proc = start(run, "train.steps=100", fault={"slow_step": 3, "seconds": 20, "ready": str(ready)})
    wait_for(ready, proc)
    # a single-node job listens on loopback only (store, gloo)
    addresses = _listening_addresses(_job_pids(proc.pid))
    assert addresses and all(a in ("0100007F", "00000000000000000000000001000000") for a in addresses), addresses
    # a second run on the same run.dir fails at once, naming the holder
    second = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train", DEBUG, *JOB, f"run.dir={run}"],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert second.returncode == 2, second.stderr[-2000:]
    line = error_lines(second.stderr)
    assert len(line) == 1 and f"is in use by another run (pid {proc.pid} on host " in line[0], second.stderr[-2000:]
    signalled = time.time()
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job gets it
    code, _, err = finish(proc, timeout=120)
    assert code == 143, err[-3000:]
    assert f"longtrain: stopped by SIGTERM: the workers saved {run / 'checkpoints' / 'step_00000003'} and exited" \
           in err, err[-3000:]
    assert time.time() - signalled < 40  # the 20 s step ends, the save is written, and the job exits promptly
    assert max(losses(run)) == 3


def test_sigterm_grace_too_short_is_reported_truthfully(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "slow"
    proc = start(run, "train.steps=100", "run.launch.sigterm_grace_s=1",
                 fault={"slow_step": 3, "seconds": 30, "ready": str(ready)})
    wait_for(ready, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc, timeout=60)
    assert code == 143, err[-3000:]
    assert "did not finish their step and the save within 1 s (run.launch.sigterm_grace_s) and were killed; " \
           f"no checkpoint of this stop was written; the last checkpoint is {run / 'checkpoints' / 'step_00000002'}" \
           in err, err[-3000:]


def test_a_hung_rank_ends_the_job_with_every_ranks_stack(tmp_path):
    run = tmp_path / "run"
    started = time.time()
    code, _, err = finish(start(run, "run.collective_timeout=5", fault={"hang_rank": 1, "at_step": 3}), timeout=150)
    assert code == 1, err[-3000:]
    assert "a collective timed out (run.collective_timeout=5 s); the Python stack of every rank:" in err, err[-3000:]
    rank1 = err.split("--- rank 1 ---", 1)[1]
    assert "sitecustomize.py" in rank1 and "train_step" in rank1, err[-3000:]  # where rank 1 hangs
    assert "--- rank 0: failed first" in err
    line = error_lines(err)
    assert len(line) == 1 and line[0].startswith("longtrain: error: worker rank 0 failed: "), err[-3000:]
    assert time.time() - started < 120


def test_a_bad_record_under_one_process_is_one_line_and_skips_are_counted(tmp_path):
    data = tmp_path / "docs.jsonl"
    good = [json.dumps({"text": "hello world " * 20})] * 30
    data.write_text("\n".join(good[:1] + ["{not json"] + good[1:]) + "\n")
    one = ["model.name=tiny", "data.seq_len=32", "data.batch_size=2", "run.tensorboard=false", "run.progress=false",
           "--nproc", "1", "parallel.tp=1", "train.log_every=1", "train.eval_every=0", "train.steps=6",
           f"data.source={data}", "data.packing=concat", "data.num_workers=0", "checkpoint.save_at_end=false"]
    code, _, err = finish(start(tmp_path / "a", nproc_job=one), timeout=120)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    line = error_lines(err)
    assert len(line) == 1 and "BadRecord" in line[0] and str(data) in line[0], err[-3000:]
    code, out, err = finish(start(tmp_path / "b", "data.skip_bad_records=true", nproc_job=one), timeout=120)
    assert code == 0, err[-3000:]
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_records"] == 1 and "skipped 1 bad records in all" in out, (records[-1], out[-1000:])


def test_nan_stops_before_the_step_and_its_save(tmp_path):
    run = tmp_path / "run"
    code, _, err = finish(start(run, fault={"nan_at_step": 4}), timeout=150)
    assert code == 1, err[-3000:]
    line = error_lines(err)
    assert len(line) == 1 and "NonFiniteError: non-finite loss at step 4" in line[0], err[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # step 4 was never saved
    assert max(losses(run)) == 3


@pytest.mark.parametrize("target", ["__1_0.distcp"])  # every file kind: test_reliability_checkpoint.py
def test_a_corrupted_checkpoint_file_is_one_line_naming_it(tmp_path, uninterrupted, target):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted["run"] / "checkpoints", run / "checkpoints")
    bad = run / "checkpoints" / "step_00000006" / target
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    code, _, err = finish(start(run, "train.steps=8"), timeout=150)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    line = error_lines(err)
    assert len(line) == 1 and line[0].startswith("longtrain: error: worker rank ") and str(bad) in line[0], err[-3000:]
