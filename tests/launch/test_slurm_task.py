"""What a SLURM job runs, driven here without a scheduler: a driver process plays submitit (it runs the task and, on
SIGUSR2, calls its checkpoint from the signal handler, as submitit does), and a stand-in for ``nnUNetv2_train``
plays the trainer (it writes checkpoint_latest.pth, and exits like the preemption-safe trainer on a stop signal)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nnunet_varaug.launch import slurm_task
from nnunet_varaug.training import preemption

pytestmark = pytest.mark.unit

TRAINER = textwrap.dedent("""
    import os, signal, sys, time
    folder, mode = sys.argv[1], sys.argv[2]
    def stop(signum, frame):
        open(os.path.join(folder, "stopped_by"), "w").write(signal.Signals(signum).name)
        sys.exit(75)
    signal.signal(signal.SIGUSR2, stop)
    signal.signal(signal.SIGTERM, stop)
    if mode == "epoch":  # one epoch done, its checkpoint written
        open(os.path.join(folder, "checkpoint_latest.pth"), "w").close()
    open(os.path.join(folder, "running"), "w").close()
    time.sleep(120)
""")

DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from nnunet_varaug.launch.runner import TrainJob
    from nnunet_varaug.launch.slurm_task import TrainReplicaTask
    folder, trainer, mode, minutes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    job = TrainJob("x_seed0", [sys.executable, trainer, folder, mode], {}, os.path.join(folder, "train.log"))
    task = TrainReplicaTask()
    def usr2(signum, frame):  # what submitit's handler does: checkpoint, then requeue and exit
        if mode == "stuck":
            task._started -= 3600  # as if the whole time limit had passed
        try:
            again = task.checkpoint(job, {}, minutes)
        except Exception as e:
            print("REFUSED", e, flush=True)
            sys.exit(4)
        print("REQUEUE", json.dumps(again.args[0].command), flush=True)
        sys.exit(3)
    signal.signal(signal.SIGUSR2, usr2)
    print("RESULT", task(job, {}, minutes), flush=True)
""")


def drive(tmp_path, mode: str, send, minutes: int = 30) -> subprocess.CompletedProcess:
    """Start the driver, wait until the stand-in trainer runs, ``send`` a signal to (driver pid, trainer pid's
    folder), and return the finished driver."""
    (tmp_path / "trainer.py").write_text(TRAINER)
    (tmp_path / "driver.py").write_text(DRIVER)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(tmp_path / "trainer.py"),
                             mode, str(minutes)], env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "running").exists() and time.time() < deadline:
        time.sleep(0.05)
    send(proc)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the task did not stop within a minute of the signal")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_the_task_and_the_trainer_agree_on_the_stop_exit_code():
    assert slurm_task.STOPPED_EXIT_CODE == preemption.STOPPED_EXIT_CODE


def test_usr2_stops_the_trainer_keeps_its_epoch_and_requeues_the_task(tmp_path):
    """The time-limit warning: the trainer gets SIGUSR2 from the task and stops; checkpoint() (running inside a
    signal handler that interrupted the wait for that very trainer) returns the job to requeue."""
    done = drive(tmp_path, "epoch", lambda p: p.send_signal(signal.SIGUSR2))
    assert done.returncode == 3 and "REQUEUE" in done.stdout, done.stdout
    assert (tmp_path / "stopped_by").read_text() == "SIGUSR2"
    log = (tmp_path / "train.log").read_text()
    assert "SIGUSR2 (time limit near)" in log and "checkpoint_latest.pth kept; requeued, continues with --c" in log


def test_usr2_after_a_whole_time_limit_without_an_epoch_is_not_requeued(tmp_path):
    done = drive(tmp_path, "stuck", lambda p: p.send_signal(signal.SIGUSR2), minutes=1)
    assert done.returncode == 4 and "REFUSED" in done.stdout, done.stdout
    assert "no epoch ended within the job's time limit" in done.stdout and "--slurm-time" in done.stdout
    assert "not requeued" in (tmp_path / "train.log").read_text()


def test_sigterm_from_the_scheduler_is_forwarded_and_leaves_no_result(tmp_path):
    """Preemption or scontrol requeue: SLURM sends SIGTERM to the batch shell, i.e. the task (its children would get
    only SIGKILL, later). The task passes it on, the trainer exits 75, and the task leaves at once without
    returning (a result would tell the waiting command that the replica had ended)."""
    done = drive(tmp_path, "epoch", lambda p: p.send_signal(signal.SIGTERM))
    assert done.returncode == slurm_task.STOPPED_EXIT_CODE and "RESULT" not in done.stdout, done.stdout
    assert (tmp_path / "stopped_by").read_text() == "SIGTERM"
    assert "stopped by the scheduler (SIGTERM)" in (tmp_path / "train.log").read_text()
