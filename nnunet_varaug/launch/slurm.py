"""SLURM for ``nnunet_varaug replicas --launcher slurm``: one job per replica, one job array through submitit.

A job that hits its time limit (or is preempted) is requeued by submitit and resumes from
``checkpoint_latest.pth``; each submission is recorded in ``<fold>/nnunet_varaug_slurm.json`` so that a rerun of
the command skips replicas whose job is still queued or running. Each job runs the replica's ``nnUNetv2_train``
through :func:`nnunet_varaug.launch.runner.run_logged`, like the local launchers. Only the command layer
(:mod:`nnunet_varaug.commands.replicas`) imports this module, and with it submitit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Optional

import submitit.helpers

from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import write_json
from nnunet_varaug.launch.runner import TrainJob, run_logged

if TYPE_CHECKING:
    from nnunet_varaug.training.experiment import Experiment

# ---- SLURM through submitit ----------------------------------------------------------------------------------------
SLURM_RECORD = "nnunet_varaug_slurm.json"
_ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                        "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
# what a SLURM job carries over from the submitting shell; everything else comes from the compute node
_FORWARDED_ENV = ("nnUNet", "VARAUG_", "OMP_", "MKL_NUM_THREADS")  # OMP_: thread count and OMP_WAIT_POLICY


def forwarded_env(env: Dict[str, str]) -> Dict[str, str]:
    """The submitter's variables a job needs (nnU-Net's, the plugin's, thread counts); the node keeps the rest
    (PATH, CUDA_VISIBLE_DEVICES from SLURM, …)."""
    return {k: v for k, v in env.items() if k.startswith(_FORWARDED_ENV)}


class TrainReplicaTask(submitit.helpers.Checkpointable):
    """What each array task runs: one replica's ``nnUNetv2_train``, in the node's environment plus the forwarded
    variables. On timeout or preemption submitit calls :meth:`checkpoint`, which stops the training and requeues
    it with ``--c`` so it continues from ``checkpoint_latest.pth``."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def __getstate__(self) -> dict:
        return {"_proc": None}  # a running process is not sent anywhere

    def __call__(self, job: TrainJob, forwarded: Dict[str, str]) -> int:
        env = dict(os.environ, **forwarded)
        where = (f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} "
                 f"SLURM_JOB_ID={env.get('SLURM_JOB_ID', '')} pid={os.getpid()}")
        return run_logged(job.command, job.log, env, where, started=self._keep)

    def _keep(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def checkpoint(self, job: TrainJob, forwarded: Dict[str, str]) -> "submitit.helpers.DelayedSubmission":
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        folder = os.path.dirname(job.log)
        command = list(job.command)
        if os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")) and "--c" not in command:
            command.append("--c")
        resumed = TrainJob(job.name, command, job.env, job.log, resumed=True)
        return submitit.helpers.DelayedSubmission(TrainReplicaTask(), resumed, forwarded)


def parse_slurm_time(text: str) -> int:
    """A SLURM time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) -> minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(text).strip())
    if m is None:
        raise VarAugError(f"--slurm-time takes SLURM's formats, e.g. 90 (minutes), 24:00:00 or 2-00:00:00; "
                          f"got '{text}'")
    fields = [int(x) for x in m.group(2).split(":")]
    if m.group(1) is None:  # M | M:S | H:M:S
        seconds = {1: lambda: fields[0] * 60, 2: lambda: fields[0] * 60 + fields[1],
                   3: lambda: fields[0] * 3600 + fields[1] * 60 + fields[2]}[len(fields)]()
    else:  # D-H | D-H:M | D-H:M:S
        fields += [0] * (3 - len(fields))
        seconds = int(m.group(1)) * 86400 + fields[0] * 3600 + fields[1] * 60 + fields[2]
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise VarAugError(f"--slurm-time must be at least one minute, got '{text}'")
    return minutes


def parse_mem_gb(text: Optional[str]) -> Optional[float]:
    """``"64G"``, ``"64GB"``, ``"64000M"``, ``"64"`` (GB) -> GB."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", str(text).strip().upper())
    if m is None:
        raise VarAugError(f"--slurm-mem takes a size such as 64G or 64000M; got '{text}'")
    scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "": 1, "G": 1, "T": 1024}[m.group(2)]
    return float(m.group(1)) * scale


def _record_path(job: TrainJob) -> str:
    return os.path.join(os.path.dirname(job.log), SLURM_RECORD)


def active_submission(exp: "Experiment", name: str) -> Optional[str]:
    """The job id of ``name``'s earlier submission if that job is still queued or running, else None."""
    path = os.path.join(exp.fold_folder(name), SLURM_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("cluster") == "local":  # submitit's local executor: the job id is the controller's pid
        try:
            with open(f"/proc/{int(record['pid'])}/cmdline", "rb") as f:
                alive = b"submitit" in f.read()
        except (OSError, ValueError, KeyError):
            alive = False
        return record["job_id"] if alive else None
    import submitit

    state = submitit.SlurmJob(record["folder"], record["job_id"]).state.split()[0].upper()
    if state in ("UNKNOWN", "NONE", ""):  # no accounting (sacct) on this cluster: ask the queue itself
        try:
            queued = subprocess.run(["squeue", "-h", "-j", str(record["job_id"]), "-o", "%T"], capture_output=True,
                                    text=True, timeout=60).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            queued = []
        state = queued[0].upper() if queued else state
    return record["job_id"] if state in _ACTIVE_SLURM_STATES else None


def slurm_executor(folder: str, args, num_jobs: int, name: str = "varaug"):
    """A submitit executor for the replicas: SLURM, or submitit's local executor (``--slurm-executor local``),
    which runs the very same pickled job array on this machine."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=args.slurm_executor,
                                     slurm_max_num_timeout=20, local_max_num_timeout=20)
    gpus = args.slurm_gpus_per_node if args.slurm_gpus_per_node is not None else (1 if args.device == "cuda" else 0)
    params = dict(timeout_min=parse_slurm_time(args.slurm_time), gpus_per_node=gpus, tasks_per_node=1, nodes=1,
                  name=name,
                  slurm_array_parallelism=max(1, num_jobs))
    mem = parse_mem_gb(args.slurm_mem)
    if mem is not None:
        params["mem_gb"] = mem
    if args.slurm_cpus_per_task is not None:
        params["cpus_per_task"] = args.slurm_cpus_per_task
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    executor.update_parameters(**params)
    return executor


def run_slurm(exp: "Experiment", jobs: List[TrainJob], args) -> Dict[str, str]:
    """Submit ``jobs`` as one job array; wait for them unless ``--no-wait``. Returns each replica's outcome for
    the status table (only for replicas that are not known to have finished)."""
    outcome: Dict[str, str] = {}
    pending = []
    for job in jobs:
        running = active_submission(exp, job.name)
        if running is not None:
            outcome[job.name] = f"queued/running (job {running})"
        else:
            pending.append(job)
    if not pending:
        return outcome
    folder = os.path.join(os.environ["nnUNet_results"], exp.dataset, "varaug_slurm",
                          f"{exp.plans}__{exp.configuration}__fold_{exp.fold}")
    os.makedirs(folder, exist_ok=True)
    executor = slurm_executor(folder, args, len(pending), name=f"varaug_{exp.dataset}")
    forwarded = forwarded_env(pending[0].env)
    # the pickled jobs carry only the forwarded variables, not the whole login environment
    shipped = [dataclasses.replace(job, env={}) for job in pending]
    submitted = executor.map_array(TrainReplicaTask(), shipped, [forwarded] * len(pending))
    for job, sub in zip(pending, submitted):
        record = {"job_id": sub.job_id, "folder": folder, "cluster": args.slurm_executor,
                  "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "command": job.command}
        if args.slurm_executor == "local":
            record["pid"] = int(str(sub.job_id).split("_")[0])
        write_json(_record_path(job), record)
        outcome[job.name] = f"submitted (job {sub.job_id})"
        print(f"submitted {job.name}: job {sub.job_id} (training log: {job.log}; submitit logs: {folder})")
    if args.no_wait:
        print("not waiting (--no-wait): rerun this command to see the status; it submits nothing that is queued, "
              "running or finished")
        return outcome
    print(f"waiting for {len(submitted)} job(s); Ctrl-C stops waiting, not the jobs")
    for job, sub in zip(pending, submitted):
        try:
            job.returncode = int(sub.result())
        except KeyboardInterrupt:
            print("stopped waiting; the jobs keep running. Rerun this command to see their status.", file=sys.stderr)
            break
        except Exception as e:  # the job itself failed (killed, out of memory, not requeued, …)
            job.returncode = -1
            print(f"{job.name}: job {sub.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                  f" (submitit log: {sub.paths.stderr})", file=sys.stderr)
        outcome.pop(job.name, None)
    return outcome
