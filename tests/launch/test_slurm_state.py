"""Job states without a scheduler: what ``squeue``/``sacct`` print is replayed by a fake runner, so the accounting
check (once per watcher, and quiet) and the verdict on each way a job can end are tested against the rules of
``--slurm-retries``: retry what the scheduler killed (node, memory), never a training that failed by itself."""
from __future__ import annotations

import subprocess

import pytest

from nnunet_varaug.launch.slurm_state import UNKNOWN, JobStates, judge, parse_squeue, summary

pytestmark = pytest.mark.unit

NO_ACCOUNTING = "Slurm accounting storage is disabled\n"  # what Debian's slurm-wlm 22.05 prints, exit status 0


class FakeSlurm:
    """Answers squeue and sacct from tables; records every call."""

    def __init__(self, queue: dict, accounting: dict = None) -> None:
        self.queue, self.accounting, self.calls = queue, accounting, []

    def __call__(self, command):
        self.calls.append(command)
        ids = command[command.index("-j") + 1].split(",")
        if command[0] == "squeue":
            out = "".join(f"{j}|{self.queue[j]}\n" for j in ids if j in self.queue)
            return subprocess.CompletedProcess(command, 0, out, "")
        if self.accounting is None:
            return subprocess.CompletedProcess(command, 0, "", NO_ACCOUNTING)
        out = "".join(f"{j}|{self.accounting[j]}\n" for j in ids if j in self.accounting)
        return subprocess.CompletedProcess(command, 0, out, "")


def test_squeue_lines_are_read_per_array_task():
    text = "12_0|RUNNING\n12_1|PENDING\n13|OUT_OF_MEMORY\n14|CANCELLED by 0\n"
    assert parse_squeue(text) == {"12_0": "RUNNING", "12_1": "PENDING", "13": "OUT_OF_MEMORY", "14": "CANCELLED"}


def test_without_accounting_the_queue_is_asked_and_sacct_only_once_quietly():
    said = []
    slurm = FakeSlurm({"12_0": "RUNNING", "12_1": "NODE_FAIL"})
    states = JobStates(run=slurm, say=said.append)
    for _ in range(5):
        assert states.query(["12_0", "12_1", "9"]) == {"12_0": "RUNNING", "12_1": "NODE_FAIL", "9": UNKNOWN}
    sacct = [c for c in slurm.calls if c[0] == "sacct"]
    assert len(sacct) == 1 and states.accounting is False
    assert len([c for c in slurm.calls if c[0] == "squeue"]) == 5
    assert len(said) == 1 and "no job accounting" in said[0] and "storage is disabled" in said[0]


def test_with_accounting_a_job_the_queue_forgot_comes_from_sacct():
    slurm = FakeSlurm({"12_0": "RUNNING"}, accounting={"9": "OUT_OF_MEMORY", "12_0": "RUNNING"})
    states = JobStates(run=slurm, say=lambda _: pytest.fail("nothing to say on a cluster with accounting"))
    assert states.query(["12_0", "9"]) == {"12_0": "RUNNING", "9": "OUT_OF_MEMORY"}
    assert states.query(["12_0"]) == {"12_0": "RUNNING"}  # all in the queue: sacct is not asked
    sacct = [c for c in slurm.calls if c[0] == "sacct"]
    assert [c[c.index("-j") + 1] for c in sacct] == ["9", "9"]  # the probe, then the query for the missing job


# (state, result, retries left) -> verdict, from the rules of --slurm-retries
CASES = [
    ("COMPLETED", ("success", 0), 1, "finished"),
    ("RUNNING", ("success", 0), 0, "finished"),  # the result is written just before the job ends
    ("RUNNING", None, 1, None),
    ("PENDING", None, 1, None),  # requeued (time limit, preemption): it will run again
    ("REQUEUED", None, 1, None),
    ("RUNNING", ("success", 1), 1, None),  # a failure is judged once the scheduler has said how the job ended
    ("NODE_FAIL", None, 1, "retry"),
    ("BOOT_FAIL", None, 2, "retry"),
    ("OUT_OF_MEMORY", ("success", -9), 1, "retry"),  # the kernel killed nnUNetv2_train inside the job's cgroup
    ("OUT_OF_MEMORY", ("success", 1), 1, "retry"),  # a worker was killed and nnU-Net raised about it
    ("NODE_FAIL", None, 0, "failed"),  # no retries left
    ("COMPLETED", ("success", 1), 3, "failed"),  # the training raised: not the scheduler's doing
    ("COMPLETED", ("error", "Traceback ...\nVarAugError: no epoch ended"), 3, "failed"),
    ("FAILED", None, 3, "failed"),
    ("CANCELLED", None, 3, "failed"),
    ("TIMEOUT", None, 3, "failed"),
    (UNKNOWN, None, 3, "failed"),  # gone from the queue, no accounting: nothing to go on
]


@pytest.mark.parametrize("state, result, left, verdict", CASES)
def test_judge_retries_only_what_the_scheduler_killed(state, result, left, verdict):
    ending = judge(state, result, left)
    assert (ending.verdict if ending else None) == verdict
    if verdict == "failed":
        assert ending.why


def test_failure_reasons_name_the_state_or_the_error():
    assert judge("OUT_OF_MEMORY", None, 0).why == "OUT_OF_MEMORY (out of memory)"
    assert judge("COMPLETED", ("success", 1), 1).why == "nnUNetv2_train exited 1"
    assert judge("COMPLETED", ("error", "Traceback\n  x\nVarAugError: no epoch ended\n"), 1).why == \
        "VarAugError: no epoch ended"


def test_summary_lists_each_retry_and_its_cause():
    attempts = [{"job_id": "12_0", "retried": "NODE_FAIL (node failure)"},
                {"job_id": "15", "retried": "OUT_OF_MEMORY (out of memory)"}, {"job_id": "16"}]
    assert summary(attempts) == ("retried 2x: NODE_FAIL (node failure) (job 12_0), "
                                 "OUT_OF_MEMORY (out of memory) (job 15)")
    assert summary([{"job_id": "3"}]) == ""
