"""The state of SLURM jobs, from ``squeue`` and, for jobs the controller has forgotten, ``sacct``; and what a job's
end means for its replica (finished, retry, failed).

``squeue -t all`` lists every job the controller holds: queued and running ones, and finished ones for
``MinJobAge`` (5 minutes by default) after their end, with the state they ended in. Only a job older than that
needs the accounting database (``sacct``). Whether the cluster has one is asked once per :class:`JobStates`; a
cluster without it (``sacct``: "Slurm accounting storage is disabled") is said once and never asked again, so
polling prints nothing.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

#: States of a job that is not over (it may still run, or run again after a requeue).
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
#: Ends that a resubmission may cure (``--slurm-retries``): the node, not the training, failed.
RETRY_STATES = {"NODE_FAIL": "node failure", "BOOT_FAIL": "node failed to boot",
                "OUT_OF_MEMORY": "out of memory"}
#: A job the controller and the accounting (if any) no longer know.
UNKNOWN = "UNKNOWN"

Runner = Callable[[List[str]], subprocess.CompletedProcess]


def _run(command: List[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(command, 127, "", str(e))


def _first_word(state: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``OUT_OF_ME+`` (sacct's truncation) is not produced with ``-P``."""
    return state.split()[0].upper() if state.split() else UNKNOWN


class JobStates:
    """Job id -> state, from the queue first and the accounting database second (if the cluster keeps one)."""

    def __init__(self, run: Runner = _run, say: Callable[[str], None] = print) -> None:
        self._run = run
        self._say = say
        self.accounting: Optional[bool] = None  # None: not asked yet

    def has_accounting(self, probe_id: str) -> bool:
        """Ask ``sacct`` once whether this cluster keeps accounting."""
        if self.accounting is None:
            out = self._run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-j", str(probe_id)])
            text = (out.stdout + out.stderr).lower()
            self.accounting = out.returncode == 0 and "disabled" not in text and "error" not in text
            if not self.accounting:
                self._say("this cluster keeps no job accounting (sacct: "
                          f"{(out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout).strip() else 'unavailable'}"
                          "); job states come from squeue, which keeps a finished job for a few minutes")
        return self.accounting

    def query(self, job_ids: Sequence[str]) -> Dict[str, str]:
        """The state of each job id (``123``, or an array task ``123_4``); :data:`UNKNOWN` if nobody knows it."""
        ids = [str(j) for j in job_ids]
        if not ids:
            return {}
        states = parse_squeue(self._run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)]).stdout)
        missing = [j for j in ids if j not in states]
        if missing and self.has_accounting(missing[0]):
            states.update(parse_sacct(self._run(["sacct", "-n", "-X", "-P", "-o", "JobID,State",
                                                 "-j", ",".join(missing)]).stdout))
        return {j: states.get(j, UNKNOWN) for j in ids}


def parse_squeue(text: str) -> Dict[str, str]:
    """``squeue -h -r -o '%i|%T'`` lines -> {job id: state}."""
    out = {}
    for line in text.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            out[job.strip()] = _first_word(state)
    return out


def parse_sacct(text: str) -> Dict[str, str]:
    """``sacct -n -X -P -o JobID,State`` lines -> {job id: state}; the last line of a requeued job wins."""
    return parse_squeue(text)


@dataclass(frozen=True)
class Ending:
    """What a job's end means for its replica: ``verdict`` is ``finished``, ``retry`` or ``failed``."""

    verdict: str
    why: str


def judge(state: str, result: Optional[tuple], retries_left: int) -> Optional[Ending]:
    """The meaning of a job's end, or None while it is not over.

    Args:
        state: the scheduler's state of the job (:class:`JobStates`).
        result: submitit's result, ``("success", exit code of nnUNetv2_train)`` or ``("error", traceback)``, or
            None if the job wrote none.
        retries_left: resubmissions still allowed (``--slurm-retries``).
    """
    if result is not None and result[0] == "success" and result[1] == 0:
        return Ending("finished", "")
    if state in ACTIVE_STATES:
        return None  # running, requeued, or still writing its result
    if state in RETRY_STATES:  # the scheduler killed it: the node or the memory, not the training
        why = f"{state} ({RETRY_STATES[state]})"
        return Ending("retry", why) if retries_left > 0 else Ending("failed", why)
    if result is not None and result[0] == "success":
        return Ending("failed", f"nnUNetv2_train exited {result[1]}")
    if result is not None:
        lines = [x for x in str(result[1]).strip().splitlines() if x.strip()]
        return Ending("failed", lines[-1] if lines else "the job raised")
    return Ending("failed", f"job ended {state} without a result" if state != UNKNOWN else
                  "the job is gone from the queue and left no result (no accounting to ask)")


def summary(attempts: Iterable[dict]) -> str:
    """``retried 2x: NODE_FAIL (job 12_0), OUT_OF_MEMORY (job 14)`` from a record's attempts."""
    ended = [a for a in attempts if a.get("retried")]
    if not ended:
        return ""
    return f"retried {len(ended)}x: " + ", ".join(f"{a['retried']} (job {a['job_id']})" for a in ended)
