"""A real two-node Slurm cluster on this one machine, for the tests (and `python tests/slurm_cluster.py
--install` for CI).

Debian's slurm-wlm (slurmctld, slurmd) and munge, run as root, everything under one temp dir:

    netns <ctl>:   bridge 10.231.S.254 "ctl"   slurmctld
    netns <node1>: veth   10.231.S.1   "node1" slurmd -N node1   (its job steps run here)
    netns <node2>: veth   10.231.S.2   "node2" slurmd -N node2
    (root netns):  munged, on a socket file every namespace sees.

Every process of the cluster (daemons, batch scripts, job tasks, and the test's client commands
sbatch, squeue, scontrol, scancel, run inside <ctl>) enters its namespace through `nsenter --net`
plus `unshare --mount --uts` (not `ip netns exec`, which remounts /sys and so hides the cgroup
mounts slurmd 22.05 opens at start). The addresses exist only inside the namespaces. Names
resolve as a real cluster's DNS would make them: /etc/netns/<ns>/hosts (ctl, node1, node2) is
bind-mounted over /etc/hosts in each process's mount namespace, so `scontrol show hostnames` ->
node1 -> MASTER_ADDR resolves on both nodes; and each daemon has its own hostname (UTS namespace)
= its node name, so gethostname(), from which srun and gloo pick the address that peers dial,
resolves to the node's own address instead of this machine's.
Teardown kills everything left in the namespaces and deletes them and their hosts files.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol"]


class Unavailable(RuntimeError):
    """Why this machine cannot run the cluster (the test is skipped with this reason)."""


def _missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def install() -> None:
    """apt-get the packages when a daemon is missing; Unavailable says why that cannot happen."""
    if not _missing():
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{', '.join(_missing())} not installed and not root, so apt-get cannot install {PACKAGES}")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(_missing())} not installed and no apt-get to install {PACKAGES}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise Unavailable(f"`{' '.join(cmd)}` failed: {tail[0]}")
    if _missing():
        raise Unavailable(f"{', '.join(_missing())} still missing after installing {PACKAGES}")


def check_namespaces() -> None:
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise Unavailable("no `ip` (iproute2) or `unshare`/`nsenter` (util-linux) to build network namespaces")
    name = f"ltprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"`ip netns add` fails here: {proc.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _sh(*cmd: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


class SlurmCluster:
    NODES = ("node1", "node2")

    def __init__(self, cpus_per_node: int = 2):
        self.tag = f"{os.getpid() % 100000}"
        self.subnet = f"10.231.{os.getpid() % 200 + 20}"
        self.cpus_per_node = cpus_per_node
        self.root = Path(tempfile.mkdtemp(prefix="longtrain-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.ns = {"ctl": f"ltctl{self.tag}", **{n: f"lt{n}x{self.tag}" for n in self.NODES}}
        self.addr = {"ctl": f"{self.subnet}.254", **{n: f"{self.subnet}.{i + 1}" for i, n in enumerate(self.NODES)}}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- set-up -------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        try:
            self._network()
            self._munge()
            self._config()
            self._daemon("slurmctld", "ctl", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for node in self.NODES:
                self._daemon(f"slurmd-{node}", node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        ctl = self.ns["ctl"]
        for ns in self.ns.values():
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            hosts = Path("/etc/netns", ns)
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{self.addr[name]} {name}\n" for name in self.addr))
        bridge = f"ltbr{self.tag}"
        _sh("ip", "-n", ctl, "link", "add", bridge, "type", "bridge")
        _sh("ip", "-n", ctl, "addr", "add", f"{self.addr['ctl']}/24", "dev", bridge)
        _sh("ip", "-n", ctl, "link", "set", bridge, "up")
        for i, node in enumerate(self.NODES):
            inner, outer = f"lt{i}n{self.tag}", f"lt{i}b{self.tag}"
            _sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            _sh("ip", "link", "set", inner, "netns", self.ns[node])
            _sh("ip", "link", "set", outer, "netns", ctl)
            _sh("ip", "-n", ctl, "link", "set", outer, "master", bridge)
            _sh("ip", "-n", ctl, "link", "set", outer, "up")
            _sh("ip", "-n", self.ns[node], "addr", "add", f"{self.addr[node]}/24", "dev", inner)
            _sh("ip", "-n", self.ns[node], "link", "set", inner, "up")

    def _munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = d / "munge.socket"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                               f"--seed-file={d / 'munged.seed'}"])
        _wait(lambda: self.munge_socket.exists(), 20, "munged never opened its socket", self)

    def _config(self) -> None:
        r = self.root
        (r / "state").mkdir()
        (r / "spool").mkdir()
        for node in self.NODES:
            (r / "spool" / node).mkdir()
        nodes = "".join(f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs={self.cpus_per_node} "
                        f"RealMemory=1000 State=UNKNOWN\n" for n in self.NODES)
        self.conf.write_text(f"""\
ClusterName=longtrain
SlurmctldHost=ctl({self.addr['ctl']})
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=120
{nodes}PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _daemon(self, name: str, where: str, cmd: list[str]) -> None:
        """A daemon in `where`'s network namespace, with its own hostname (UTS namespace)."""
        self._spawn(name, self._inside(where, cmd, hostname=where))

    def _inside(self, where: str, cmd: list[str], hostname: str | None = None) -> list[str]:
        """`cmd` in `where`'s network namespace, seeing the cluster's /etc/hosts (and, for a daemon, with
        hostname `hostname` in a UTS namespace of its own). Not `ip netns exec`: that remounts /sys,
        hiding the cgroup mounts slurmd 22.05 insists on opening."""
        name = f" && hostname {hostname}" if hostname else ""
        return ["nsenter", f"--net=/run/netns/{self.ns[where]}", "unshare", "--mount", "--uts", "sh", "-c",
                f'mount --bind /etc/netns/{self.ns[where]}/hosts /etc/hosts{name} && exec "$@"', "sh", *cmd]

    def _wait_idle(self, timeout: float) -> None:
        def idle():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.logs()}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            return all(states.get(n, "").startswith("idle") for n in self.NODES)
        _wait(idle, timeout, "the nodes never became idle", self)

    # ---- use ----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, where: str = "ctl",
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """A command (sbatch, squeue, longtrain slurm --submit ...) inside a namespace of the cluster."""
        proc = subprocess.run(self._inside(where, list(cmd)), capture_output=True, text=True,
                              env=self.env, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict:
        info = {}

        def reached():
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in states
        _wait(reached, timeout, f"job {job_id} never reached {sorted(states)}", self, lambda: info)
        return info

    def task_pids(self, node: str, marker: str) -> dict[int, int]:
        """{SLURM_PROCID: pid} of the job tasks on `node` whose command line contains `marker`."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True).stdout.split()
        found = {}
        for pid in map(int, pids):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"SLURM_PROCID=")]
            if marker in cmdline and rank and "srun" not in cmdline.split()[0]:
                found[int(rank[0])] = pid
        return found

    def logs(self) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # ---- teardown -----------------------------------------------------------------------------
    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "munged"):  # munged last
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    _killpg(proc.pid)
        for ns in self.ns.values():  # job processes left behind in the namespaces
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in map(int, pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster, detail=lambda: "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout:.0f} s ({detail()})\n{cluster.logs()}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:
        install()
        print("slurm-wlm and munge installed:", ", ".join(shutil.which(d) or f"/usr/sbin/{d}" for d in DAEMONS))
    elif sys.argv[1:] == ["--smoke"]:
        check_namespaces()
        cluster = SlurmCluster().start()
        try:
            print(cluster.run("sinfo").stdout)
            print(cluster.run("srun", "-N2", "-n2", "-l", "sh", "-c", "hostname; hostname -i; echo $SLURM_JOB_NODELIST",
                              timeout=60).stdout)
        finally:
            cluster.stop()
    else:
        sys.exit("usage: python tests/slurm_cluster.py --install | --smoke")
