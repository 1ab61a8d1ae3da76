"""SLURM for ``nnunet_varaug replicas --launcher slurm``: the replicas submitted as one job array through submitit,
watched until they end, and resubmitted after a node failure or an out-of-memory kill (``--slurm-retries``).

Each job runs :class:`~nnunet_varaug.launch.slurm_task.TrainReplicaTask`: the replica's ``nnUNetv2_train``,
continued with ``--c`` after a requeue. The job script asks for ``--requeue`` and ``--signal=B:USR2@90`` and
makes the batch shell the task's Python process (``exec``), so the time-limit warning reaches the task alone.
Each submission is recorded in ``<fold>/nnunet_varaug_slurm.json``, so a rerun of the command skips replicas whose
job is still queued or running. Job states come from ``squeue``, and from ``sacct`` only for jobs the controller
has forgotten (:mod:`nnunet_varaug.launch.slurm_state`). Only :mod:`nnunet_varaug.commands.replicas` imports this
module, and with it submitit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from nnunet_varaug.launch.epochs import check_time_limit, read_epoch_times
from nnunet_varaug.launch.runner import TRAIN_LOG, TrainJob
from nnunet_varaug.launch.slurm_state import ACTIVE_STATES, JobStates, judge, summary
from nnunet_varaug.launch.slurm_task import TrainReplicaTask
from nnunet_varaug.utilities import names
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import write_json

if TYPE_CHECKING:
    from nnunet_varaug.training.experiment import Experiment

SLURM_RECORD = "nnunet_varaug_slurm.json"
#: Requeues at the time limit that submitit allows; a job that ended no epoch is not requeued (slurm_task).
MAX_REQUEUES = 1000
# what the pickled jobs carry from the submitting shell even where the cluster exports no environment
_FORWARDED_ENV = ("nnUNet", "VARAUG_", "OMP_", "MKL_NUM_THREADS")  # OMP_: thread count and OMP_WAIT_POLICY


@dataclasses.dataclass(frozen=True)
class SlurmSettings:
    """What the replicas' jobs ask SLURM for, and how the command waits for them (built by the command layer)."""

    time_min: int = 24 * 60
    gpus_per_node: int = 1
    partition: Optional[str] = None
    mem_gb: Optional[float] = None
    cpus_per_task: Optional[int] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: Optional[int] = None  # at most this many replicas' jobs run at once (the array's %N)
    retries: int = 0  # resubmissions of a replica whose job ended NODE_FAIL, BOOT_FAIL or OUT_OF_MEMORY
    executor: str = "slurm"  # or "local": submitit's local executor, the same job array on this machine
    wait: bool = True
    poll_s: float = 30.0
    warning_s: int = 90  # the USR2 comes this long before the time limit


def forwarded_env(env: Dict[str, str]) -> Dict[str, str]:
    """The submitter's variables each job sets again on its node (nnU-Net's, the plugin's, thread counts)."""
    return {k: v for k, v in env.items() if k.startswith(_FORWARDED_ENV)}


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


def epoch_logs(exp: "Experiment") -> List[str]:
    """The launcher logs of every replica of ``exp``'s kind and base trainer, plans and configuration (any index,
    any fold): the replicas whose epochs take as long as ``exp``'s."""
    results = os.path.join(os.environ["nnUNet_results"], exp.dataset)
    logs = []
    for entry in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        parts = entry.split("__")
        if len(parts) != 3 or parts[1:] != [exp.plans, exp.configuration]:
            continue
        try:
            parsed = names.parse(parts[0])
        except names.TrainerNameError:
            continue
        if parsed is None or parsed[:2] != (exp.base, exp.kind):
            continue
        model = os.path.join(results, entry)
        logs += [os.path.join(model, fold, TRAIN_LOG) for fold in sorted(os.listdir(model)) if fold.startswith("fold_")]
    return logs


def check_slurm_time(exp: "Experiment", settings: SlurmSettings, device: str) -> str:
    """Refuse a time limit shorter than one epoch of ``exp``'s replicas (from their logs); what was checked."""
    return check_time_limit(settings.time_min, read_epoch_times(epoch_logs(exp), device), settings.warning_s)


def make_executor(folder: str, settings: SlurmSettings, name: str):
    """A submitit executor with ``settings``; for SLURM, a job script whose batch shell becomes the task."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=settings.executor, slurm_max_num_timeout=MAX_REQUEUES,
                                     local_max_num_timeout=MAX_REQUEUES)
    params = dict(timeout_min=settings.time_min, gpus_per_node=settings.gpus_per_node or None,  # 0: ask for none
                  tasks_per_node=1, nodes=1, name=name, mem_gb=settings.mem_gb, cpus_per_task=settings.cpus_per_task)
    if settings.executor == "slurm":
        task = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                         shlex.quote(str(Path(folder).expanduser().absolute()))])
        params.update(
            slurm_partition=settings.partition, slurm_account=settings.account, slurm_qos=settings.qos,
            slurm_constraint=settings.constraint, slurm_array_parallelism=settings.array_parallelism or 256,
            slurm_signal_delay_s=settings.warning_s, slurm_use_srun=False,
            # submitit would run the task as a foreground child of the batch shell, which cannot act on a trapped
            # signal before that child ends: the shell becomes the task, and USR2 with B: reaches it alone
            slurm_setup=["export SUBMITIT_EXECUTOR=slurm", f"exec {task}"],
            slurm_additional_parameters={"signal": f"B:USR2@{settings.warning_s}", "requeue": True})
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _record_path(job: TrainJob) -> str:
    return os.path.join(os.path.dirname(job.log), SLURM_RECORD)


def read_record(folder: str) -> Optional[dict]:
    path = os.path.join(folder, SLURM_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _local_alive(record: dict) -> bool:
    """Whether submitit's local controller of a ``--slurm-executor local`` job still runs."""
    try:
        with open(f"/proc/{int(record['pid'])}/cmdline", "rb") as f:
            return b"submitit" in f.read()
    except (OSError, ValueError, KeyError):
        return False


def active_submission(exp: "Experiment", name: str, states: JobStates) -> Optional[str]:
    """The job id of ``name``'s recorded submission if that job is still queued or running, else None."""
    record = read_record(exp.fold_folder(name))
    if record is None:
        return None
    if record.get("cluster") == "local":
        return record["job_id"] if _local_alive(record) else None
    state = states.query([record["job_id"]])[record["job_id"]]
    return record["job_id"] if state in ACTIVE_STATES else None


def _submit(executor, jobs: List[TrainJob], settings: SlurmSettings) -> list:
    """Submit ``jobs`` (an array if several); the pickles carry the forwarded variables, not the environment."""
    forwarded = forwarded_env(jobs[0].env)
    shipped = [dataclasses.replace(job, env={}) for job in jobs]
    n = len(jobs)
    return executor.map_array(TrainReplicaTask(), shipped, [forwarded] * n, [settings.time_min] * n)


def _write_record(job: TrainJob, sub, folder: str, settings: SlurmSettings, attempts: List[dict]) -> None:
    record = {"job_id": sub.job_id, "folder": folder, "cluster": settings.executor,
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "command": job.command, "attempts": attempts}
    if settings.executor == "local":
        record["pid"] = int(str(sub.job_id).split("_")[0])
    write_json(_record_path(job), record)


def _result(sub) -> Optional[tuple]:
    path = sub.paths.result_pickle
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def run_slurm(exp: "Experiment", jobs: List[TrainJob], settings: SlurmSettings,
              states: Optional[JobStates] = None) -> Dict[str, str]:
    """Submit ``jobs`` as one job array and, unless ``settings.wait`` is off, wait for them (retrying node failures
    and out-of-memory kills). Sets each waited job's ``returncode`` and ``note``; returns the status of the
    replicas not waited for (queued or running)."""
    states = states or JobStates()
    outcome: Dict[str, str] = {}
    pending = []
    for job in jobs:
        running = active_submission(exp, job.name, states)
        if running is not None:
            outcome[job.name] = f"queued/running (job {running})"
        else:
            pending.append(job)
    if not pending:
        return outcome
    folder = os.path.join(os.environ["nnUNet_results"], exp.dataset, "varaug_slurm",
                          f"{exp.plans}__{exp.configuration}__fold_{exp.fold}")
    os.makedirs(folder, exist_ok=True)
    executor = make_executor(folder, settings, name=f"varaug_{exp.dataset}")
    submitted = _submit(executor, pending, settings)
    attempts: Dict[str, List[dict]] = {}
    for job, sub in zip(pending, submitted):
        attempts[job.name] = [{"job_id": sub.job_id}]
        _write_record(job, sub, folder, settings, attempts[job.name])
        outcome[job.name] = f"submitted (job {sub.job_id})"
        print(f"submitted {job.name}: job {sub.job_id} (training log: {job.log}; submitit logs: {folder})")
    if not settings.wait:
        print("not waiting (--no-wait): rerun this command to see the status; it submits nothing that is queued, "
              "running or finished")
        return outcome
    print(f"waiting for {len(submitted)} job(s); Ctrl-C stops waiting, not the jobs")
    try:
        if settings.executor == "local":
            _wait_local(list(zip(pending, submitted)))
        else:
            _wait_slurm(list(zip(pending, submitted)), executor, folder, settings, states, attempts)
    except KeyboardInterrupt:
        print("stopped waiting; the jobs keep running. Rerun this command to see their status.", file=sys.stderr)
        return {job.name: outcome[job.name] for job in pending if job.returncode is None}
    for job in pending:
        outcome.pop(job.name, None)
    return outcome


def _wait_local(subs: List[Tuple[TrainJob, object]]) -> None:
    for job, sub in subs:
        try:
            job.returncode = int(sub.result())
        except Exception as e:  # the job itself failed
            job.returncode = -1
            job.note = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def _wait_slurm(subs: List[Tuple[TrainJob, object]], executor, folder: str, settings: SlurmSettings,
                states: JobStates, attempts: Dict[str, List[dict]]) -> None:
    """Poll the jobs until each has ended; resubmit one that the scheduler killed (node, memory) while retries
    are left."""
    pending = list(subs)
    while pending:
        time.sleep(settings.poll_s)
        known = states.query([sub.job_id for _, sub in pending])
        for job, sub in list(pending):
            tried = attempts[job.name]
            ending = judge(known[sub.job_id], _result(sub), settings.retries - (len(tried) - 1))
            if ending is None:
                continue
            pending.remove((job, sub))
            if ending.verdict == "retry":
                tried[-1]["retried"] = ending.why
                again = _submit(executor, [job], settings)[0]
                tried.append({"job_id": again.job_id})
                _write_record(job, again, folder, settings, tried)
                print(f"{job.name}: job {sub.job_id} ended {ending.why}; resubmitted as job {again.job_id} "
                      f"(retry {len(tried) - 1} of {settings.retries})")
                pending.append((job, again))
                continue
            job.returncode = 0 if ending.verdict == "finished" else -1
            retried = summary(tried)
            if ending.verdict == "failed":
                tried[-1]["ended"] = ending.why
                _write_record(job, sub, folder, settings, tried)
                print(f"{job.name}: job {sub.job_id} failed: {ending.why} (submitit log: {sub.paths.stderr})",
                      file=sys.stderr)
            job.note = "; ".join(x for x in (ending.why if ending.verdict == "failed" else "", retried) if x)
