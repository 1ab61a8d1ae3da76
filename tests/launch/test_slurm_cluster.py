"""``replicas --launcher slurm`` against SLURM's own daemons (tests/launch/slurm_cluster.py): a job array of two
replicas trains through a requeue each, one by ``scontrol requeue`` (SIGTERM, as a preemption), one by the
time-limit warning (SIGUSR2 to the batch shell), and both end bitwise identical to the same replicas trained
without an interruption (the shared ``seed_replicas``); the rerun submits nothing; the resources asked for reach
``scontrol show job``; a job the scheduler kills for its memory is retried ``--slurm-retries`` times."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import SYNTHETIC_3D_ID, TINY, side_by_side_env
from nnunet_varaug.launch.slurm import SLURM_RECORD
from nnunet_varaug.training.preemption import CONTINUING
from nnunet_varaug.training.registry import ext_trainer_value
from pausing_trainer import PAUSING_TRAINER
from slurm_cluster import FEATURE, PARTITION, slurm_cluster  # noqa: F401 (slurm_cluster: the fixture)

pytestmark = pytest.mark.e2e

REPLICAS = ("replicas", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-device", "cpu",
            "--launcher", "slurm", "--slurm-partition", PARTITION, "--slurm-time", "30")


def varaug(*args: str, env: dict, wait: bool = True):
    command = [os.path.join(os.path.dirname(sys.executable), "nnunet_varaug"), *args]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fold0(results: str, dataset: str, trainer: str) -> str:
    return os.path.join(results, dataset, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")


def job_of(results: str, dataset: str, trainer: str, timeout: float = 300) -> str:
    path = os.path.join(fold0(results, dataset, trainer), SLURM_RECORD)
    deadline = time.time() + timeout
    while not os.path.isfile(path) and time.time() < deadline:
        time.sleep(0.2)
    with open(path) as f:
        return json.load(f)["job_id"]


def wait_for(condition, what: str, timeout: float = 600, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def requeued_replicas(slurm_cluster, synthetic_3d, tmp_path_factory):
    """``replicas -n 2 -tr PausingTiny`` as one job array; PausingTiny_seed0's job is requeued with
    ``scontrol requeue`` and PausingTiny_seed1's gets the time-limit warning, each after its first epoch; both
    requeued jobs are let start at once (SLURM holds a requeued job for 2 minutes); then the same command again."""
    root = tmp_path_factory.mktemp("slurm_replicas")
    (root / "trainers").mkdir()
    (root / "trainers" / "pausing_tiny.py").write_text(PAUSING_TRAINER)
    (root / "pause").mkdir()
    results = str(root / "results")
    env = side_by_side_env(dict(os.environ, nnUNet_results=results, VARAUG_SLURM_POLL_SECONDS="1",
                                nnUNet_extTrainer=ext_trainer_value(str(root / "trainers")),
                                VARAUG_TEST_PAUSE=str(root / "pause")))
    args = (*REPLICAS, "-n", "2", "-tr", "PausingTiny", "--slurm-cpus-per-task", "1", "--slurm-mem", "3G")
    first = varaug(*args, env=env, wait=False)
    ds, cluster = synthetic_3d["name"], slurm_cluster
    jobs = {k: job_of(results, ds, f"PausingTiny_seed{k}") for k in (0, 1)}
    for k, stop in ((0, ("scontrol", "requeue")), (1, ("scancel", "--batch", "--signal=USR2"))):
        wait_for(lambda: (root / "pause" / f"PausingTiny_seed{k}.paused").exists(), f"seed{k}'s first epoch")
        cluster.run(*stop, jobs[k])
    for k in (0, 1):
        wait_for(lambda: cluster.state(jobs[k]) == "PENDING", f"job {jobs[k]} requeued")
        cluster.start_now(jobs[k])
    out, err = first.communicate(timeout=900)
    again = varaug(*args, env=env)
    return {"first": subprocess.CompletedProcess(first.args, first.returncode, out, err), "again": again,
            "results": results, "dataset": ds, "jobs": jobs}


def test_a_job_array_trains_through_a_requeue_each_and_a_rerun_submits_nothing(requeued_replicas, seed_replicas):
    first, again = requeued_replicas["first"], requeued_replicas["again"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("submitted PausingTiny_seed") == 2
    lines = {line.split()[0]: line for line in first.stdout.splitlines() if line.startswith("PausingTiny_seed")}
    assert all(lines[f"PausingTiny_seed{k}"].split()[1] == "trained" for k in (0, 1)), first.stdout
    assert "sacct" not in first.stdout + first.stderr, "no accounting here: states come from squeue, quietly"
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stdout
    assert again.stdout.count("finished (skipped)") == 2


@pytest.mark.parametrize("k, stopped_by", [(0, "stopped by the scheduler (SIGTERM)"),
                                           (1, "SIGUSR2 (time limit near)")])
def test_a_requeued_replica_continues_from_its_checkpoint_and_ends_as_if_never_stopped(requeued_replicas,
                                                                                         seed_replicas, k, stopped_by):
    results, ds = requeued_replicas["results"], requeued_replicas["dataset"]
    folder = fold0(results, ds, f"PausingTiny_seed{k}")
    with open(os.path.join(folder, "nnunet_varaug_train.log")) as f:
        log = f.read()
    starts = [line for line in log.splitlines() if line.startswith("# nnunet_varaug:") and " start " in line]
    assert len(starts) == 2 and not starts[0].endswith("--c") and starts[1].endswith("--c"), starts
    assert stopped_by in log and "restarts=1" in starts[1]
    assert f"{CONTINUING} 1" in log.split(starts[1])[1], "the requeued run continued at epoch 1"
    mine = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    reference = torch.load(os.path.join(fold0(os.environ["nnUNet_results"], ds, f"{TINY}_seed{k}"),
                                        "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    a, b = mine["network_weights"], reference["network_weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), \
        f"PausingTiny_seed{k}, requeued after epoch 0, differs from {TINY}_seed{k} trained without a stop"


def test_partition_cpus_memory_throttle_account_and_constraint_reach_the_scheduler(slurm_cluster, synthetic_3d,
                                                                                     tmp_path):
    """Submitted to a drained node (nothing runs), read back with scontrol, then cancelled."""
    cluster = slurm_cluster
    env = dict(os.environ, nnUNet_results=str(tmp_path / "results"))
    cluster.run("scontrol", "update", "NodeName=varaugnode", "State=DRAIN", "Reason=varaug-test")
    try:
        proc = varaug(*REPLICAS, "-n", "3", "--start", "40", "-tr", TINY, "--slurm-cpus-per-task", "2",
                      "--slurm-mem", "1500M", "--slurm-array-parallelism", "1", "--slurm-account", "lab42",
                      "--slurm-qos", "normal", "--slurm-constraint", FEATURE, "--no-wait", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        array = job_of(str(tmp_path / "results"), synthetic_3d["name"], f"{TINY}_seed40").split("_")[0]
        job = cluster.job(array)
        assert job["Partition"] == PARTITION and job["ArrayTaskThrottle"] == "1" and job["ArrayTaskId"] == "0-2%1"
        assert job["NumCPUs"] == "2" and job["MinMemoryNode"] == "1500M" and job["Account"] == "lab42"
        assert job["Features"] == FEATURE and job["Requeue"] == "1" and job["TimeLimit"] == "00:30:00"
        script = cluster.run("scontrol", "write", "batch_script", array, "-").stdout
        assert "#SBATCH --qos=normal" in script and "#SBATCH --signal=B:USR2@90" in script
    finally:
        cluster.run("scancel", "--user", "root", check=False)
        cluster.run("scontrol", "update", "NodeName=varaugnode", "State=RESUME")


def test_a_replica_the_scheduler_kills_for_its_memory_is_retried_n_times(slurm_cluster, synthetic_3d, tmp_path):
    """200 MB cannot hold nnUNetv2_train's imports: each job ends OUT_OF_MEMORY, is resubmitted twice
    (--slurm-retries 2), and the replica is then reported failed, with its retries and why."""
    if not slurm_cluster.memory_enforced:
        pytest.skip("this machine's test cluster runs without task/cgroup, so --mem is not enforced")
    env = dict(os.environ, nnUNet_results=str(tmp_path / "results"), VARAUG_SLURM_POLL_SECONDS="1")
    proc = varaug(*REPLICAS, "-n", "1", "--start", "50", "-tr", TINY, "--slurm-mem", "200M", "--slurm-retries", "2",
                  env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("resubmitted as job") == 2 and "(retry 2 of 2)" in proc.stdout, proc.stdout
    line = next(x for x in proc.stdout.splitlines() if re.match(rf"{TINY}_seed50\s+FAILED", x))
    assert "FAILED (OUT_OF_MEMORY (out of memory); retried 2x: OUT_OF_MEMORY" in line, line
    with open(os.path.join(fold0(str(tmp_path / "results"), synthetic_3d["name"], f"{TINY}_seed50"),
                           SLURM_RECORD)) as f:
        record = json.load(f)
    assert len(record["attempts"]) == 3 and len({a["job_id"] for a in record["attempts"]}) == 3
    assert [a.get("retried") for a in record["attempts"][:2]] == ["OUT_OF_MEMORY (out of memory)"] * 2
