"""benchmark/variants.py: with ``--devices``, the varaug models train side by side through the runner, each with
its own log, and one failing model fails the stage without stopping the other. Checked with stand-in training
jobs (small Python commands that record when they ran) instead of nnUNetv2_train."""
from __future__ import annotations

import os
import sys
import types

import pytest

from nnunet_varaug.experiments.benchmark import variants
from nnunet_varaug.experiments.benchmark.state import StageFailed
from nnunet_varaug.launch.runner import TrainJob

pytestmark = pytest.mark.unit
TRAINERS = ["Tiny_varaug", "Tiny_varaug_oof"]


def stand_in(exit_codes: dict, marks: str):
    """A ``train_job`` replacement: each job appends 'start <name>' to ``marks``, waits until every job has
    started (or 20 s), appends 'end <name>' and exits with ``exit_codes[name]``."""
    script = ("import os, sys, time\n"
              "name, marks, n, code = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])\n"
              "open(marks, 'a').write(f'start {name}\\n')\n"
              "deadline = time.monotonic() + 20\n"
              "while open(marks).read().count('start ') < n and time.monotonic() < deadline:\n"
              "    time.sleep(0.05)\n"
              "open(marks, 'a').write(f'end {name}\\n')\n"
              "print('output of', name, 'on', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
              "sys.exit(code)\n")

    def train_job(layout, trainer, device, **_):
        command = [sys.executable, "-c", script, trainer, marks, str(len(exit_codes)), str(exit_codes[trainer])]
        return TrainJob(trainer, command, dict(os.environ), "unused.log")

    return train_job


def bench_stub(tmp_path, devices="0,1"):
    """The parts of a Benchmark that train_side_by_side uses: layout, device, devices, and a stage log."""
    records = {}

    def log(stage, command):
        records.setdefault(stage, []).append(command)
        os.makedirs(tmp_path / "logs", exist_ok=True)
        return str(tmp_path / "logs" / f"{stage}.log")

    return types.SimpleNamespace(layout=None, device="cpu", devices=devices, log=log, records=records)


def test_models_train_side_by_side_one_per_device_each_with_its_log(tmp_path, monkeypatch):
    marks = str(tmp_path / "marks")
    monkeypatch.setattr(variants, "train_job", stand_in({t: 0 for t in TRAINERS}, marks))
    bench = bench_stub(tmp_path)
    variants.train_side_by_side(bench, "varaug", TRAINERS)
    order = open(marks).read().split("\n")
    assert sorted(order[:2]) == [f"start {t}" for t in TRAINERS], "both started before either ended"
    logs = {t: open(tmp_path / "logs" / f"varaug.{t}.log").read() for t in TRAINERS}
    devices = {log.split("output of ")[1].split()[2] for log in logs.values()}
    assert devices == {"0", "1"}, "one model per device"
    stage_log = open(tmp_path / "logs" / "varaug.log").read()
    assert all(str(tmp_path / "logs" / f"varaug.{t}.log") in stage_log for t in TRAINERS)
    assert len(bench.records["varaug"]) == 2


def test_a_failed_model_fails_the_stage_after_the_other_finished(tmp_path, monkeypatch):
    marks = str(tmp_path / "marks")
    monkeypatch.setattr(variants, "train_job", stand_in({TRAINERS[0]: 3, TRAINERS[1]: 0}, marks))
    with pytest.raises(StageFailed) as info:
        variants.train_side_by_side(bench_stub(tmp_path), "varaug", TRAINERS)
    message = str(info.value)
    assert "exited 3" in message and f"varaug.{TRAINERS[0]}.log" in message and TRAINERS[1] not in message
    assert f"end {TRAINERS[1]}" in open(marks).read(), "the other model ran to its end"
    assert "Rerun the same command" in message
