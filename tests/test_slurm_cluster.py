"""longtrain on a real two-node Slurm cluster (tests/slurm_cluster.py: slurmctld and two slurmd in
network namespaces of this machine), submitted with the script `longtrain slurm` writes, unchanged.

- a 2 nodes x 2 tasks job (gloo) trains to the same losses as the same layout launched locally;
- `scancel --signal=TERM` makes it checkpoint and exit; `scontrol requeue` resumes from that
  checkpoint; killing a rank on the second node ends the job, and its output names that rank.

Skipped (with the reason) only where the cluster cannot exist: not root, no network namespaces, no
apt to install slurm-wlm and munge. CI sets LONGTRAIN_REQUIRE_SLURM=1, which turns the skip into a
failure.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, Unavailable, check_namespaces, install  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
# The tiny model, fp32 on CPU, 2 x 2 ranks of the debug layout (tp 2 x dp_shard 2), gloo.
TINY = ["model.name=tiny", "data.seq_len=32", "data.batch_size=2", "run.tensorboard=false", "run.progress=false",
        "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "train.device=cpu"]
CLUSTER = ["run.launch.nnodes=2", "run.launch.nproc_per_node=2"]
ENV = dict(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    try:
        install()
        check_namespaces()
    except Unavailable as why:
        if os.environ.get("LONGTRAIN_REQUIRE_SLURM"):
            raise
        pytest.skip(f"no Slurm test cluster on this machine: {why}")
    c = SlurmCluster().start()
    c.env.update(ENV)
    yield c
    c.stop()


def submit(cluster, workdir: Path, *overrides: str) -> tuple[str, Path]:
    """`longtrain slurm RECIPE ... --submit`, run on the cluster's controller host; (job id, script)."""
    proc = cluster.run(sys.executable, "-m", "longtrain.launcher.cli", "slurm", DEBUG, *TINY, *CLUSTER, *overrides,
                       "--nodes", "2", "--gpus-per-node", "0", "--submit", cwd=workdir)
    job = re.search(r"submitted job (\d+)", proc.stdout)
    script = re.search(r"wrote (\S+)", proc.stdout)
    assert job and script, proc.stdout + proc.stderr
    return job.group(1), Path(script.group(1))


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def output(run: Path, job: str) -> str:
    return (run / f"slurm-{job}.out").read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str, cluster, job: str, run: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    out = output(run, job) if (run / f"slurm-{job}.out").exists() else "(no job output)"
    raise AssertionError(f"{what} within {timeout} s; job {cluster.job(job)}\n{out[-3000:]}\n{cluster.logs()}")


def release_requeued(cluster, job: str, timeout: float = 120) -> None:
    """Slurm holds a requeued job for the credential lifetime (AuthInfo cred_expire, 10 s on the
    test cluster instead of the default 120 s): until then the nodes still hold the first run's
    revoked credential and refuse to launch it ("Job credential revoked"), so the hold is waited
    out, not overridden."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cluster.job(job).get("JobState") == "RUNNING":
            return
        time.sleep(1)
    raise AssertionError(f"the requeued job {job} never ran: {cluster.job(job)}\n{cluster.logs()}")


def test_job_on_two_nodes_equals_local_launch(cluster, tmp_path):
    run = tmp_path / "slurm_run"
    job, script = submit(cluster, tmp_path, "train.steps=4", f"run.dir={run}")
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --requeue" in text
    # Meanwhile, the same layout launched locally: 4 workers on this machine.
    local = tmp_path / "local_run"
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train", DEBUG, *TINY, "train.steps=4",
                           "--nproc", "4", f"run.dir={local}"], capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, **ENV))
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=400)
    log = output(run, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-3000:]}\n{cluster.logs()}"
    assert info["NodeList"] == "node[1-2]" and info["NumTasks"] == "4", info
    expected = losses(local)
    assert sorted(expected) == [1, 2, 3, 4]
    got = losses(run)
    assert sorted(got) == sorted(expected), log[-3000:]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)


def test_scancel_checkpoints_requeue_resumes_node_failure_names_rank(cluster, tmp_path):
    run = tmp_path / "run"
    job, _ = submit(cluster, tmp_path, "train.steps=100000", f"run.dir={run}")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(losses(run)) >= 2, 300, "no two steps logged", cluster, job, run)

    # scancel --signal=TERM: every rank finishes its step, saves a checkpoint and exits.
    cluster.run("scancel", "--signal=TERM", job)
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=180)
    assert info["JobState"] == "COMPLETED", f"{info}\n{output(run, job)[-3000:]}"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((run / "checkpoints" / latest / "meta.json").read_text())["step"]
    stopped_at = max(losses(run))
    assert 2 <= saved == stopped_at < 100000

    # Requeued, the same script resumes from that checkpoint: the next step logged is saved + 1.
    cluster.run("scontrol", "requeue", job)
    release_requeued(cluster, job)
    lines_before = len(metrics.read_text().splitlines())

    def resumed_steps():
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines()[lines_before:]
                if "loss" in json.loads(line)]
    wait_for(lambda: len(resumed_steps()) >= 1, 300, "the requeued job logged no step", cluster, job, run)
    assert resumed_steps()[0] == saved + 1, resumed_steps()
    assert f"resumed from {run / 'checkpoints' / latest}" in output(run, job)

    # A node failure: rank 3's process on node2 dies. The job ends, and srun names the rank.
    tasks = cluster.task_pids("node2", "longtrain.launcher.cli")
    assert sorted(tasks) == [2, 3], tasks  # ranks 2 and 3 run in node2's namespace
    os.kill(tasks[3], signal.SIGKILL)
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=180)
    log = output(run, job)
    assert info["JobState"] == "FAILED", f"{info}\n{log[-3000:]}"
    assert re.search(r"node2: task 3: Killed", log), log[-3000:]
