"""How long one epoch of a replica takes, read from the replicas' own training logs, and the shortest SLURM time
limit in which a job still completes an epoch.

A replica requeued at its time limit continues from the checkpoint of its last completed epoch
(:mod:`nnunet_varaug.training.preemption`), so a job makes progress only if it starts nnU-Net, trains one whole
epoch and writes its checkpoint before the scheduler's warning. The figures come from the launcher logs
``<fold>/nnunet_varaug_train.log`` of the experiment's replicas on the same ``-device``: each run in them starts
with the launcher's marker line, nnU-Net then logs ``<time>: Epoch <n>`` when an epoch starts and
``Epoch time: <s> s`` when it ends. The slowest epoch and the slowest start-up (marker to first epoch: imports,
data loading, worker start) make the estimate.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from nnunet_varaug.utilities.errors import VarAugError

_START = re.compile(r"^# nnunet_varaug: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) start .*?: (.*)$")
_EPOCH_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)?: Epoch \d+$")
_EPOCH_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: Epoch time: ([0-9.]+) s$")
_DEVICE = re.compile(r"(?:^|\s)-device\s+(\S+)")
#: SLURM may send the time-limit signal up to a minute before the requested moment (sbatch --signal).
SIGNAL_SLACK_S = 60


@dataclass(frozen=True)
class EpochTimes:
    """The slowest epoch and the slowest start-up found in the logs, and where the slowest epoch was logged."""

    epoch_s: float
    startup_s: float
    log: str
    epochs: int

    def shortest_limit_min(self, warning_s: int) -> int:
        """Minutes a job needs to finish one epoch before the scheduler's warning ``warning_s`` before its end."""
        return int(math.ceil((self.startup_s + self.epoch_s + warning_s + SIGNAL_SLACK_S) / 60.0))


def _seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def _device(command: str) -> str:
    found = _DEVICE.search(command)
    return found.group(1) if found else "cuda"  # nnUNetv2_train's default


def read_epoch_times(logs: Iterable[str], device: str) -> Optional[EpochTimes]:
    """The epoch times of every run in ``logs`` (launcher logs; missing files are skipped) whose command trained on
    ``device``; None when no such run finished an epoch."""
    slowest, startup, where, count = 0.0, 0.0, "", 0
    for path in logs:
        if not os.path.isfile(path):
            continue
        run_start: Optional[float] = None
        same_device = False
        with open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                start = _START.match(line)
                if start is not None:
                    run_start, same_device = _seconds(start.group(1)), _device(start.group(2)) == device
                    continue
                if not same_device:
                    continue
                epoch = _EPOCH_START.match(line)
                if epoch is not None and run_start is not None:
                    startup = max(startup, _seconds(epoch.group(1)) - run_start)
                    run_start = None  # the first epoch of this run only
                    continue
                took = _EPOCH_TIME.match(line)
                if took is not None:
                    count += 1
                    if float(took.group(1)) >= slowest:
                        slowest, where = float(took.group(1)), path
    if count == 0:
        return None
    return EpochTimes(epoch_s=slowest, startup_s=startup, log=where, epochs=count)


def check_time_limit(limit_min: int, times: Optional[EpochTimes], warning_s: int, flag: str = "--slurm-time") -> str:
    """Refuse a time limit in which no job can complete an epoch; return a line saying what was checked."""
    if times is None:
        return (f"{flag} {limit_min} min not checked: no replica of this experiment has logged an epoch on this "
                f"device yet (a job that cannot finish one epoch before its limit stops instead of requeueing)")
    need = times.shortest_limit_min(warning_s)
    if limit_min < need:
        raise VarAugError(
            f"{flag} {limit_min} min leaves no time for one epoch: an epoch of these replicas took up to "
            f"{times.epoch_s:.0f} s and a start {times.startup_s:.0f} s (logged in {times.log}), and SLURM warns "
            f"the job {warning_s} s before its limit (up to {SIGNAL_SLACK_S} s earlier); use at least {flag} {need}")
    return (f"{flag} {limit_min} min: room for about {max(1, int((limit_min * 60 - times.startup_s - warning_s) // times.epoch_s))} "
            f"epoch(s) per job (slowest epoch {times.epoch_s:.0f} s, start {times.startup_s:.0f} s, from {times.log})")
