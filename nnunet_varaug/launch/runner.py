"""Logged subprocess runs: nnU-Net's and the plugin's commands, each appending to a log between marker lines.

Every training this package starts (``replicas`` locally, on several GPUs or as SLURM jobs; the benchmark's
baseline and ``_varaug`` models) is one ``nnUNetv2_train`` process built by :func:`train_job` and run by
:func:`run_logged`, which writes ``# nnunet_varaug: <time> start <where>: <command>`` before and
``# nnunet_varaug: <time> end exit=<code>`` after the process's output. The local launchers (one after the other,
or one replica per GPU at a time) live here too; SLURM is :mod:`nnunet_varaug.launch.slurm`.
"""
from __future__ import annotations

import os
import queue
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from nnunet_varaug.training import registry
from nnunet_varaug.utilities.errors import VarAugError

if TYPE_CHECKING:
    from nnunet_varaug.training.experiment import Experiment

TRAIN_LOG = "nnunet_varaug_train.log"


@dataclass
class TrainJob:
    """One replica's ``nnUNetv2_train`` call, its environment and its log file."""

    name: str
    command: List[str]
    env: Dict[str, str]
    log: str
    resumed: bool = False
    returncode: Optional[int] = field(default=None)
    device: Optional[str] = field(default=None)
    note: str = ""  # what the launcher has to say about the run (a SLURM job's end, its retries)


def nnunet_command(tool: str) -> List[str]:
    """The nnU-Net (or plugin) console script ``tool`` of this Python environment (falls back to PATH)."""
    local = os.path.join(os.path.dirname(sys.executable), tool)
    if os.path.isfile(local):
        return [local]
    found = shutil.which(tool)
    if found is None:
        raise VarAugError(f"{tool} not found: install nnunetv2 in this environment (`pip install nnunetv2`)")
    return [found]


def plugin_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment with nnUNet_extTrainer extended by the plugin's folder (what ``env`` prints)."""
    env = dict(os.environ if base is None else base)
    env["nnUNet_extTrainer"] = registry.ext_trainer_value(env.get("nnUNet_extTrainer", ""))
    return env


def stamp() -> str:
    """The time as the launcher's marker lines write it."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_logged(command: Sequence[str], log_path: str, env: Dict[str, str], where: str = "",
               started: Optional[Callable[[subprocess.Popen], None]] = None) -> int:
    """Run ``command``, its stdout and stderr appended to ``log_path`` between a start and an end marker line.

    Args:
        command: the argument list.
        log_path: the log file (appended to; its folder must exist).
        env: the process's environment.
        where: what the start marker says about where it runs (e.g. ``CUDA_VISIBLE_DEVICES=1``).
        started: called with the process once it runs (the SLURM task keeps it to stop it on preemption).

    Returns:
        The exit code. An exception while waiting (Ctrl-C) kills the process and is raised again.
    """
    with open(log_path, "a") as log:
        log.write(f"# nnunet_varaug: {stamp()} start {where}: {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
        if started is not None:
            started(proc)
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        log.write(f"# nnunet_varaug: {stamp()} end exit={code}\n")
    return code


def train_job(exp: "Experiment", trainer: str, device: str = "cuda", npz: bool = False, log: Optional[str] = None) -> TrainJob:
    """The ``nnUNetv2_train`` job that brings ``trainer`` of ``exp``'s fold to a finished state.

    A training with only ``checkpoint_latest.pth`` continues (``--c``); a finished one without its validation
    predictions only validates (``--val``); anything else starts from scratch. The log defaults to
    ``<fold folder>/nnunet_varaug_train.log``.
    """
    folder = exp.fold_folder(trainer)
    os.makedirs(folder, exist_ok=True)
    command = nnunet_command("nnUNetv2_train") + [str(exp.dataset_id), exp.configuration, str(exp.fold),
                                                  "-tr", trainer, "-p", exp.plans, "-device", device]
    if npz:
        command.append("--npz")
    state = exp.replica_state(trainer)
    if state == "finished":
        command.append("--val")
    elif state == "interrupted":
        command.append("--c")
    return TrainJob(trainer, command, plugin_env(), log or os.path.join(folder, TRAIN_LOG),
                    resumed=state == "interrupted")


def run_job(job: TrainJob, env: Optional[Dict[str, str]] = None) -> int:
    """Run one job in the foreground (:func:`run_logged`); its exit code is also stored in ``job.returncode``."""
    env = job.env if env is None else env
    where = f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}" if job.device is not None else ""
    job.returncode = run_logged(job.command, job.log, env, where)
    return job.returncode


def run_local(jobs: List[TrainJob]) -> None:
    """One after the other in this machine's foreground, output to each replica's log."""
    from tqdm import tqdm

    for job in tqdm(jobs, desc="replicas", unit="replica", disable=not jobs):
        tqdm.write(f"{'resuming' if job.resumed else 'training'} {job.name} (log: {job.log})")
        run_job(job)


def parse_devices(text: Optional[str]) -> List[str]:
    """``"0,1,3"`` -> ``["0", "1", "3"]``: distinct non-negative GPU indices, as CUDA_VISIBLE_DEVICES takes them."""
    if text is None:
        return []
    devices = [d.strip() for d in str(text).split(",") if d.strip()]
    bad = [d for d in devices if not d.isdigit()]
    if not devices or bad:
        raise VarAugError(f"--devices takes GPU indices separated by commas, e.g. --devices 0,1,2; got '{text}'")
    if len(set(devices)) != len(devices):
        raise VarAugError(f"--devices lists a GPU twice: '{text}'; each GPU trains one replica at a time")
    return devices


def run_devices(jobs: List[TrainJob], devices: Sequence[str]) -> None:
    """One replica per device at a time: each process sees only its device (``CUDA_VISIBLE_DEVICES``), and a
    device takes the next waiting replica as soon as its current one ends."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    free: "queue.Queue[str]" = queue.Queue()
    for d in devices:
        free.put(str(d))
    progress = tqdm(total=len(jobs), desc="replicas", unit="replica", disable=not jobs)

    def one(job: TrainJob) -> None:
        device = free.get()
        try:
            job.device = device
            tqdm.write(f"{'resuming' if job.resumed else 'training'} {job.name} on device {device} (log: {job.log})")
            run_job(job, dict(job.env, CUDA_VISIBLE_DEVICES=device))
        finally:
            free.put(device)
            progress.update(1)

    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        list(pool.map(one, jobs))
    progress.close()
