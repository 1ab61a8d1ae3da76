"""What a SLURM job of ``replicas --launcher slurm`` runs on its node: one replica's ``nnUNetv2_train``, continued
with ``--c`` whenever a checkpoint exists, and stopped cleanly when the scheduler says so.

The job's batch shell *is* this task's Python process (see :func:`nnunet_varaug.launch.slurm.make_executor`), so
the scheduler's signals reach it and the training process as follows:

* **SIGUSR2**, sent with ``--signal=B:USR2@N`` to the batch shell only, N seconds before the time limit: submitit
  calls :meth:`TrainReplicaTask.checkpoint`, which forwards it to ``nnUNetv2_train`` (the trainer exits at once,
  its ``checkpoint_latest.pth`` holding the last completed epoch), then submitit requeues the job
  (``scontrol requeue``). A job that ended no epoch in its whole time limit is not requeued: it would never progress.
* **SIGTERM**, sent on preemption, ``scontrol requeue`` or ``scancel`` to the batch shell (this process; its
  children get SIGKILL only, ``KillWait`` seconds later): the task forwards it to ``nnUNetv2_train``, which exits
  with ``STOPPED_EXIT_CODE`` (:mod:`nnunet_varaug.training.preemption`); the task then leaves without a result,
  and SLURM requeues the job (or, after ``scancel``, ends it).

A requeued job runs the same pickled task again, which adds ``--c``: the replica continues at the epoch after its
last checkpoint and ends bitwise identical to an uninterrupted training.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional

import submitit.helpers

from nnunet_varaug.launch.runner import TrainJob, run_logged, stamp
from nnunet_varaug.utilities.errors import VarAugError

_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")
#: nnunet_varaug.training.preemption.STOPPED_EXIT_CODE, the trainer's exit status after a stop signal (a test checks
#: the two agree); not imported, so that the job's own process does not load torch beside nnUNetv2_train's
STOPPED_EXIT_CODE = 75
#: How long the trainer may take to stop after SIGUSR2 (it exits at once, or after the checkpoint it is writing).
STOP_WAIT_S = 60


def continued_command(job: TrainJob) -> List[str]:
    """``job``'s command with ``--c`` if its fold folder holds a checkpoint to continue from."""
    command = [c for c in job.command if c != "--c"]
    folder = os.path.dirname(job.log)
    if "--val" not in command and any(os.path.isfile(os.path.join(folder, c)) for c in _CHECKPOINTS):
        command.append("--c")
    return command


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether child ``pid`` exits within ``timeout`` seconds, leaving it to be reaped by whoever waits for it.

    :meth:`TrainReplicaTask.checkpoint` runs in a signal handler that interrupted ``Popen.wait`` on this very
    child; ``Popen.wait`` would block forever on the lock that interrupted call holds, so this polls with
    ``waitid(WNOWAIT)``, which reaps nothing.
    """
    deadline = time.time() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.05)


def _note(job: TrainJob, text: str) -> None:
    with open(job.log, "a") as log:
        log.write(f"# nnunet_varaug: {stamp()} {text}\n")


class TrainReplicaTask(submitit.helpers.Checkpointable):
    """One replica's training inside a SLURM job (module docstring)."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._started = 0.0
        self._timeout_s = 0.0

    def __getstate__(self) -> dict:
        return {}  # a running process is not sent anywhere

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, job: TrainJob, forwarded: Dict[str, str], timeout_min: int = 0) -> int:
        env = dict(os.environ, **forwarded)
        command = continued_command(job)
        self._started, self._timeout_s = time.time(), 60.0 * timeout_min
        where = (f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} "
                 f"SLURM_JOB_ID={env.get('SLURM_JOB_ID', '')} restarts={env.get('SLURM_RESTART_COUNT', '0')} "
                 f"pid={os.getpid()}")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._forward)  # instead of submitit's handler, which only logs it
        code = run_logged(command, job.log, env, where, started=self._keep)
        if code in (STOPPED_EXIT_CODE, -signal.SIGTERM):
            # the scheduler stopped the job (preemption, scontrol requeue, scancel) and requeues or ends it itself:
            # a result now would tell the waiting command that this replica is over
            _note(job, "stopped by the scheduler (SIGTERM); a requeued job continues with --c")
            os._exit(STOPPED_EXIT_CODE)
        return code

    def _keep(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def _forward(self, signum, frame) -> None:
        """SIGTERM reached the batch shell only: pass it on to the training (no wait here, see wait_for_exit)."""
        if self._proc is not None:
            try:
                os.kill(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    def checkpoint(self, job: TrainJob, forwarded: Dict[str, str],
                   timeout_min: int = 0) -> "submitit.helpers.DelayedSubmission":
        """Submitit's answer to SIGUSR2 (the time limit is near): stop the training, keep its last epoch."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR2)
            if not wait_for_exit(proc.pid, STOP_WAIT_S):
                proc.kill()
                wait_for_exit(proc.pid, 10)
        latest = os.path.join(os.path.dirname(job.log), "checkpoint_latest.pth")
        progressed = os.path.isfile(latest) and os.path.getmtime(latest) >= self._started
        ran = time.time() - self._started
        if not progressed and self._timeout_s and ran >= 0.8 * self._timeout_s:
            _note(job, f"SIGUSR2 after {ran:.0f} s without a completed epoch: not requeued")
            raise VarAugError(f"{job.name}: no epoch ended within the job's time limit ({self._timeout_s / 60:.0f} "
                              f"min, {ran:.0f} s of it used): give --slurm-time more than one epoch plus start-up "
                              f"(the epoch times are in {job.log})")
        _note(job, f"SIGUSR2 (time limit near) after {ran:.0f} s: training stopped"
                   f"{', checkpoint_latest.pth kept' if os.path.isfile(latest) else ''}; requeued, continues with --c")
        return submitit.helpers.DelayedSubmission(TrainReplicaTask(), job, forwarded, timeout_min)
