"""Launchers of ``nnunet_varaug replicas``: one replica per device at a time (``--devices``), and SLURM through
submitit, driven here with submitit's local executor (the same pickled job array, run on this machine)."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from conftest import SYNTHETIC_3D_ID, TINY, device_span, run_cli, side_by_side_env
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.launch.runner import TrainJob, parse_devices, run_devices
from nnunet_varaug.launch.slurm import SLURM_RECORD, forwarded_env, parse_mem_gb, parse_slurm_time
from nnunet_varaug.launch.slurm_task import TrainReplicaTask, continued_command

REPLICAS = ("nnunet_varaug", "replicas", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-tr", TINY,
            "-device", "cpu")
HEADER = re.compile(r"^# nnunet_varaug: (\S+ \S+) start CUDA_VISIBLE_DEVICES=([^\s:]*)", re.M)


# ---- flag parsing ---------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_parse_devices():
    assert parse_devices("0,1, 3") == ["0", "1", "3"]
    assert parse_devices(None) == []
    for bad in ("", "a", "0,-1", "0,0", "cuda:0"):
        with pytest.raises(VarAugError, match="--devices"):
            parse_devices(bad)


@pytest.mark.unit
def test_parse_slurm_time_reads_slurms_formats():
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("1:30") == 2  # minutes:seconds, rounded up to whole minutes
    assert parse_slurm_time("24:00:00") == 24 * 60
    assert parse_slurm_time("1:02:03") == 63
    assert parse_slurm_time("2-00:00:00") == 2 * 24 * 60
    assert parse_slurm_time("1-12") == 36 * 60
    assert parse_slurm_time("1-2:30") == 26 * 60 + 30
    for bad in ("x", "1:2:3:4", "0", "-5"):
        with pytest.raises(VarAugError, match="--slurm-time"):
            parse_slurm_time(bad)


@pytest.mark.unit
def test_parse_mem_gb():
    assert parse_mem_gb("64G") == 64 and parse_mem_gb("64GB") == 64 and parse_mem_gb("32") == 32
    assert parse_mem_gb("16384M") == 16 and parse_mem_gb("1T") == 1024 and parse_mem_gb(None) is None
    with pytest.raises(VarAugError, match="--slurm-mem"):
        parse_mem_gb("lots")


@pytest.mark.unit
def test_jobs_carry_only_nnunet_and_thread_variables_to_a_cluster_node():
    env = {"nnUNet_results": "/r", "nnUNet_extTrainer": "/x", "VARAUG_TINY_EPOCHS": "1", "OMP_NUM_THREADS": "4",
           "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/login/bin", "CUDA_VISIBLE_DEVICES": "3", "HOME": "/home/me"}
    assert forwarded_env(env) == {"nnUNet_results": "/r", "nnUNet_extTrainer": "/x", "VARAUG_TINY_EPOCHS": "1",
                                  "OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}


# ---- one replica per device -----------------------------------------------------------------------------------------
# Each job announces itself in a shared folder (a file named after its device), then looks at who else is running:
# another job on its own device means a device ran two replicas at once. The first two jobs then wait until a job
# on the other device is running too (or the other has seen it), which can only happen if run_devices runs them
# side by side: a serial launcher makes the first one wait for its timeout, and neither records an overlap.
# Ordering, not sleeps: a loaded machine makes it slower, never wrong.
RECORDER = """
import json, os, sys, time
out, folder, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = os.environ.get("CUDA_VISIBLE_DEVICES")
mine = os.path.join(folder, f"{device}.{index}")
open(mine, "w").close()
def running():
    return [f for f in os.listdir(folder) if f != os.path.basename(mine)]
same_device = [f for f in running() if f.split(".")[0] == device]
overlap = any(f.split(".")[0] != device for f in running())
met = os.path.join(os.path.dirname(folder), "met")  # written by whichever of the first two sees the other first
deadline = time.time() + 120
while index < 2 and not overlap and not os.path.exists(met) and time.time() < deadline:
    time.sleep(0.01)
    overlap = any(f.split(".")[0] != device for f in running())
if overlap:
    open(met, "w").close()
json.dump({"device": device, "same_device": same_device, "overlap": overlap}, open(out, "w"))
os.remove(mine)
"""


@pytest.mark.unit
def test_run_devices_gives_each_process_one_device_and_keeps_all_devices_busy(tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    jobs = [TrainJob(f"job{i}", [sys.executable, "-c", RECORDER, str(tmp_path / f"job{i}.json"), str(running),
                                 str(i)], dict(os.environ), str(tmp_path / f"job{i}.log")) for i in range(5)]
    run_devices(jobs, ["0", "3"])
    runs = []
    for i, job in enumerate(jobs):
        assert job.returncode == 0
        with open(tmp_path / f"job{i}.json") as f:
            runs.append(json.load(f))
        header = HEADER.search(open(job.log).read())
        assert header and header.group(2) == runs[-1]["device"] == job.device
    assert {r["device"] for r in runs} == {"0", "3"}
    assert all(r["same_device"] == [] for r in runs), "a device ran two replicas at once"
    assert runs[0]["overlap"] or runs[1]["overlap"], "the two devices did not work at the same time"


@pytest.mark.unit
def test_a_requeued_task_continues_from_its_latest_checkpoint(tmp_path):
    """A requeued job runs the same pickled task again: it adds --c once the replica has a checkpoint, and drops a
    --c whose checkpoint is gone."""
    job = TrainJob("x_seed0", ["nnUNetv2_train", "1", "3d_fullres", "0", "-tr", "x_seed0"], {},
                   str(tmp_path / "nnunet_varaug_train.log"))
    assert continued_command(job) == job.command  # nothing to continue from yet
    stale = TrainJob(job.name, job.command + ["--c"], {}, job.log)
    assert continued_command(stale) == job.command
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"")
    assert continued_command(job) == job.command + ["--c"] and continued_command(stale) == job.command + ["--c"]
    validate = TrainJob(job.name, job.command + ["--val"], {}, job.log)
    assert continued_command(validate) == validate.command  # a finished replica only validates
    again = TrainReplicaTask().checkpoint(job, {"nnUNet_results": "/r"}, 30)  # USR2 before any process ran
    assert again.args == (job, {"nnUNet_results": "/r"}, 30) and isinstance(again.function, TrainReplicaTask)
    assert isinstance(pickle.loads(pickle.dumps(again.function)), TrainReplicaTask)


# ---- end to end with nnU-Net ------------------------------------------------------------------------------------------
def fold_folder(synthetic, trainer: str) -> str:
    return os.path.join(os.environ["nnUNet_results"], synthetic["name"], f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")


def status(stdout: str) -> dict:
    return {line.split()[0]: line for line in stdout.splitlines() if line.startswith(f"{TINY}_seed")}


@pytest.mark.e2e
def test_devices_launcher_trains_one_replica_per_device_in_parallel(seed_replicas):
    """The shared replicas were trained with ``replicas -n 3 --devices 0,1`` (tests/conftest.py): seed0 and seed1
    trained at the same time, one per device, and seed2 started on a device only after that device's replica
    ended."""
    lines = status(seed_replicas["replicas_stdout"])
    assert set(lines) == set(seed_replicas["names"])
    assert all(line.split()[1] == "trained" for line in lines.values()), seed_replicas["replicas_stdout"]
    spans = {k: device_span(os.path.join(fold_folder(seed_replicas, f"{TINY}_seed{k}"), "nnunet_varaug_train.log"))
             for k in (0, 1, 2)}
    assert {spans[0][0], spans[1][0]} == {"0", "1"}, "each process sees exactly one device of --devices"
    (_, s0, e0), (_, s1, e1) = spans[0], spans[1]
    assert s0 <= e1 and s1 <= e0, "the first two replicas trained at the same time"
    device2, start2 = spans[2][:2]
    before = next(k for k in (0, 1) if spans[k][0] == device2)
    assert spans[before][2] <= start2, "the third replica waits until its device's replica has ended"


@pytest.mark.e2e
def test_slurm_launcher_through_submitit_trains_skips_and_does_not_resubmit(synthetic_3d):
    args = (*REPLICAS, "-n", "2", "--start", "20", "--launcher", "slurm", "--slurm-executor", "local",
            "--slurm-time", "20")
    first = run_cli(*args, env=side_by_side_env())  # the local executor runs the array's 2 tasks at once
    lines = status(first.stdout)
    assert all(lines[f"{TINY}_seed{k}"].split()[1] == "trained" for k in (20, 21)), first.stdout + first.stderr
    assert first.stdout.count("submitted ") == 2
    for k in (20, 21):
        folder = fold_folder(synthetic_3d, f"{TINY}_seed{k}")
        assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
        with open(os.path.join(folder, SLURM_RECORD)) as f:
            record = json.load(f)
        assert record["cluster"] == "local" and f"{TINY}_seed{k}" in record["command"]
        # the job array's tasks ran through submitit: its result pickle holds nnUNetv2_train's exit code
        with open(os.path.join(record["folder"], f"{record['job_id']}_0_result.pkl"), "rb") as f:
            assert pickle.load(f) == ("success", 0)
    again = run_cli(*args)
    assert "submitted" not in again.stdout
    assert all("finished (skipped)" in line for line in status(again.stdout).values())


@pytest.mark.e2e
def test_slurm_launcher_leaves_a_queued_or_running_job_alone(synthetic_3d):
    """A rerun while an earlier submission is still alive must not submit the replica a second time."""
    name = f"{TINY}_seed30"
    folder = fold_folder(synthetic_3d, name)
    os.makedirs(folder, exist_ok=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "submitit"])
    try:
        with open(os.path.join(folder, SLURM_RECORD), "w") as f:
            json.dump({"job_id": str(alive.pid), "pid": alive.pid, "cluster": "local", "folder": str(folder)}, f)
        proc = run_cli(*REPLICAS, "-n", "1", "--start", "30", "--launcher", "slurm", "--slurm-executor", "local",
                       "--no-wait")
        assert f"queued/running (job {alive.pid})" in status(proc.stdout)[name]
        assert "submitted" not in proc.stdout
        assert not os.path.isfile(os.path.join(folder, "checkpoint_latest.pth"))
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.nnunet
@pytest.mark.parametrize("extra, message", [
    (("--devices", "0,0"), "lists a GPU twice"),
    (("--devices", "gpu0"), "--devices takes GPU indices"),
    (("--launcher", "slurm", "--devices", "0,1"), "--devices is for --launcher local"),
    (("--slurm-mem", "64G", "--slurm-partition", "gpu"), "--slurm-partition, --slurm-mem only apply to --launcher slurm"),
    (("--slurm-retries", "2"), "--slurm-retries only applies to --launcher slurm"),
    (("--slurm-qos", "high", "--no-wait"), "--slurm-qos, --no-wait only apply to --launcher slurm"),
    (("--launcher", "slurm", "--slurm-array-parallelism", "0"), "--slurm-array-parallelism must be at least 1"),
    (("--launcher", "slurm", "--slurm-retries", "-1"), "--slurm-retries must be at least 0"),
    (("--launcher", "slurm", "--slurm-time", "a day"), "--slurm-time takes SLURM's formats"),
    (("--launcher", "slurm", "--slurm-mem", "lots"), "--slurm-mem takes a size"),
])
def test_bad_launcher_flags_are_refused_before_anything_runs(nnunet_env, extra, message):
    proc = run_cli(*REPLICAS, "-n", "2", *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.nnunet
def test_a_time_limit_shorter_than_one_epoch_is_refused_with_the_limit_that_works(synthetic_3d, tmp_path):
    """The epoch time comes from the launcher logs of any replica of the same base trainer (here seed 7, fold 1,
    an epoch of 400 s after a 50 s start on the CPU); a replica of another base trainer does not count."""
    results = tmp_path / "results"
    runs = {f"{TINY}_seed7": ("50", "400.0"), "nnUNetTrainer_seed0": ("10", "9000.0")}
    for trainer, (start, epoch) in runs.items():
        folder = results / synthetic_3d["name"] / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_1"
        folder.mkdir(parents=True)
        (folder / "nnunet_varaug_train.log").write_text(
            f"# nnunet_varaug: 2026-01-05 10:00:00 start CUDA_VISIBLE_DEVICES= pid=1: /b/nnUNetv2_train 101 3d_fullres "
            f"1 -tr {trainer} -p nnUNetPlans -device cpu\n2026-01-05 10:00:{start}.5: Epoch 0\n"
            f"2026-01-05 10:07:00.1: Epoch time: {epoch} s\n")
    before = sorted(str(p) for p in results.rglob("*"))
    need = -(-(50 + 400 + 90 + 60) // 60)  # start + epoch + the warning 90 s before the limit + SLURM's minute
    proc = run_cli(*REPLICAS, "-n", "2", "--launcher", "slurm", "--slurm-time", str(need - 1), check=False,
                   env=dict(os.environ, nnUNet_results=str(results)))
    assert proc.returncode == 2 and f"use at least --slurm-time {need}" in proc.stderr, proc.stderr
    assert "400 s" in proc.stderr and f"{TINY}_seed7" in proc.stderr
    assert sorted(str(p) for p in results.rglob("*")) == before, "a refused command writes nothing"
