"""A real single-node SLURM cluster for the launcher's tests (the fixture ``slurm_cluster``; a test module imports
it: ``from slurm_cluster import slurm_cluster``. It is not in a ``tests/launch/conftest.py``: a second
``conftest`` module would shadow tests/conftest.py for every ``from conftest import`` collected after it): Debian's ``munged``, ``slurmctld`` and ``slurmd``
(packages ``munge`` and ``slurm-wlm``, installed by ``.ci/setup`` where the machine allows it) started with a
temporary configuration, and stopped after the tests (their folder removed, unless ``VARAUG_TEST_KEEP_SLURM=1``
keeps it, with the daemons' logs, for reading after a failure).

Everything the daemons write lives in a temporary folder: the munge key and socket, ``slurm.conf`` (free ports, a
random first job id, so that two such clusters on one machine do not meet), state, spool, logs. The clients
(``sbatch``, ``squeue``, ``scontrol``) find it through ``SLURM_CONF``, which the fixture sets for the tests; jobs
inherit it with the rest of the submitting environment. The cluster keeps no accounting, as many small clusters
do. Where the machine's cgroup v1 memory controller lets ``slurmd`` run with ``task/cgroup``, a job's ``--mem`` is
enforced (a job above it ends ``OUT_OF_MEMORY``); otherwise processes are tracked without cgroups and the
tests that need the enforcement skip, saying so. Where the daemons are missing or do not start, every test using
the fixture skips with the reason.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from typing import Dict, Optional

import pytest

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODE = "varaugnode"
FEATURE = "varaugtest"  # the node's feature, for --slurm-constraint
PARTITION = "varaugq"


@dataclass
class SlurmCluster:
    """A running test cluster: its folder, the environment its clients need, and its node's resources."""

    root: str
    env: Dict[str, str]
    cpus: int
    mem_mb: int
    memory_enforced: bool

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (``Key=Value`` pairs)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", str(job_id), check=False).stdout
        return next((line.split("|")[1] for line in out.splitlines() if line.split("|")[0] == str(job_id)), "")

    def start_now(self, job_id: str) -> None:
        """A requeued job waits 2 minutes (SLURM's BeginTime); this test cluster lets it start 5 s from now. Not at
        once: a launch in the same second as the requeue carries a credential no newer than the one slurmd revoked
        for the previous run, and slurmd kills it ("Job credential revoked"; the job ends FAILED)."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> Optional[str]:
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root; this user is not"
    absent = [p for p in DAEMONS.values() if not os.access(p, os.X_OK)] + \
             [c for c in CLIENTS if shutil.which(c) is None]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} missing): `apt-get install slurm-wlm munge` as root "
                f"(.ci/setup does it where apt is available)")
    return None


def _conf(root: str, sock: str, cpus: int, mem_mb: int, cgroup: bool) -> str:
    tracking = ("ProctrackType=proctrack/cgroup\nTaskPlugin=task/cgroup" if cgroup else
                "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none")
    return textwrap.dedent(f"""\
        ClusterName=varaugtest
        SlurmctldHost={socket.gethostname()}
        SlurmctldPort={_free_port()}
        SlurmdPort={_free_port()}
        AuthType=auth/munge
        AuthInfo=socket={sock}
        CredType=cred/munge
        SlurmUser=root
        SlurmdUser=root
        FirstJobId={random.randint(10_000, 9_000_000)}
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool
        SlurmctldPidFile={root}/slurmctld.pid
        SlurmdPidFile={root}/slurmd.pid
        SlurmctldLogFile={root}/slurmctld.log
        SlurmdLogFile={root}/slurmd.log
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core_Memory
        SchedulerType=sched/backfill
        SchedulerParameters=sched_interval=2,bf_interval=2
        AccountingStorageType=accounting_storage/none
        JobAcctGatherType=jobacct_gather/none
        JobCompType=jobcomp/none
        MpiDefault=none
        ReturnToService=2
        KillWait=10
        """) + tracking + textwrap.dedent(f"""
        NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Feature={FEATURE} State=UNKNOWN
        PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
        """)


def _pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _stop(pid_file: str, timeout: float = 20.0) -> None:
    """SIGTERM the daemon whose pid ``pid_file`` holds (one this fixture started), SIGKILL after ``timeout``."""
    pid = _pid(pid_file)
    if pid is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _start(root: str, cgroup: bool) -> SlurmCluster:
    for d in ("state", "spool", "munge"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    munge = os.path.join(root, "munge")
    os.chmod(munge, 0o700)
    key = os.path.join(munge, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(munge, "munge.socket")
    subprocess.run([DAEMONS["munged"], "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                    f"--seed-file={munge}/munged.seed"], check=True, capture_output=True, timeout=30)
    cpus = os.cpu_count() or 1
    with open("/proc/meminfo") as f:
        mem_mb = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) // 1024 // 2
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(root, sock, cpus, mem_mb, cgroup))
    with open(os.path.join(root, "cgroup.conf"), "w") as f:
        f.write("CgroupPlugin=cgroup/v1\nConstrainRAMSpace=yes\nCgroupAutomount=no\n")
    env = dict(os.environ, SLURM_CONF=conf)
    for daemon, args in (("slurmctld", ["-c", "-i"]), ("slurmd", ["-N", NODE])):
        subprocess.run([DAEMONS[daemon], *args], env=env, check=True, capture_output=True, timeout=60)
    cluster = SlurmCluster(root, env, cpus, mem_mb, memory_enforced=cgroup)
    deadline = time.time() + 30
    while time.time() < deadline:
        if cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle":
            return cluster
        time.sleep(0.3)
    raise RuntimeError(f"the node did not come up: {cluster.run('sinfo', check=False).stdout}")


def _shutdown(root: str) -> None:
    """Cancel the cluster's jobs (their processes outlive slurmd), then stop slurmd, slurmctld and munged."""
    conf = os.path.join(root, "slurm.conf")
    if os.path.isfile(conf) and _pid(os.path.join(root, "slurmctld.pid")) is not None:
        env = dict(os.environ, SLURM_CONF=conf)
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True,
                                                         timeout=30).stdout.strip():
            time.sleep(0.5)
    for name in ("slurmd.pid", "slurmctld.pid", os.path.join("munge", "munged.pid")):
        _stop(os.path.join(root, name))


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-3:])
    except OSError:
        return "no log"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node test cluster (module docstring); the tests that use it skip where it cannot run."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = tempfile.mkdtemp(prefix="varaug_slurm_")
    cluster, errors = None, []
    cgroup_possible = os.path.isdir("/sys/fs/cgroup/memory")
    for cgroup in ((True, False) if cgroup_possible else (False,)):
        attempt = os.path.join(root, "cgroup" if cgroup else "plain")
        try:
            cluster = _start(attempt, cgroup)
            break
        except (subprocess.SubprocessError, OSError, RuntimeError) as e:
            errors.append(f"{'task/cgroup' if cgroup else 'proctrack/linuxproc'}: {e}; slurmd log: "
                          f"{_tail(os.path.join(attempt, 'slurmd.log'))}")
            _shutdown(attempt)
    if cluster is None:
        pytest.skip("the test SLURM cluster did not start: " + " ; ".join(errors))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        yield cluster
    _shutdown(cluster.root)
    if os.environ.get("VARAUG_TEST_KEEP_SLURM"):  # the daemons' logs and state, to read after a failure
        print(f"\nthe test SLURM cluster's folder is kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
