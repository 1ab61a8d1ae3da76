"""The epoch-time estimate behind ``--slurm-time``'s check, on launcher logs written here with known times: the
slowest epoch and the slowest start-up of the runs on the same device, and the limit they call for."""
from __future__ import annotations

import math

import pytest

from nnunet_varaug.launch.epochs import SIGNAL_SLACK_S, check_time_limit, read_epoch_times
from nnunet_varaug.utilities.errors import VarAugError

pytestmark = pytest.mark.unit


def run(start: str, device: str, first_epoch: str, epoch_times, command_extra: str = "") -> str:
    """One run as the launcher logs it: its start marker, nnU-Net's lines, epoch starts and ends."""
    lines = [f"# nnunet_varaug: 2026-01-05 {start} start CUDA_VISIBLE_DEVICES=0 pid=1: /v/bin/nnUNetv2_train 4 "
             f"3d_fullres 0 -tr nnUNetTrainer_seed0 -p nnUNetPlans -device {device}{command_extra}",
             "Using trainer 'nnUNetTrainer_seed0'", f"2026-01-05 {first_epoch}.123456: Epoch 0"]
    for i, took in enumerate(epoch_times):
        lines += [f"2026-01-05 {first_epoch}.5: train_loss 0.5", f"2026-01-05 {first_epoch}.6: Epoch time: {took} s"]
        if i + 1 < len(epoch_times):
            lines.append(f"2026-01-05 {first_epoch}.7: Epoch {i + 1}")
    return "\n".join(lines + ["# nnunet_varaug: 2026-01-05 23:59:59 end exit=0"]) + "\n"


def test_the_slowest_epoch_and_start_of_runs_on_the_same_device(tmp_path):
    a, b, cpu = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "cpu.log"
    a.write_text(run("10:00:00", "cuda", "10:01:35", [130.5, 121.2]) +  # start-up 95 s
                 run("12:00:00", "cuda", "12:02:10", [118.0], " --c"))  # a continued run: start-up 130 s
    b.write_text(run("11:00:00", "cuda", "11:00:50", [140.25, 99.0]))
    cpu.write_text(run("09:00:00", "cpu", "09:10:00", [4000.0]))  # a CPU try: not this device's epochs
    times = read_epoch_times([str(a), str(tmp_path / "missing.log"), str(b), str(cpu)], "cuda")
    assert times.epoch_s == 140.25 and times.startup_s == 130 and times.epochs == 5 and times.log == str(b)
    assert read_epoch_times([str(cpu)], "cuda") is None
    assert read_epoch_times([str(cpu)], "cpu").epoch_s == 4000.0


def test_a_limit_shorter_than_one_epoch_is_refused_with_the_limit_that_works(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(run("10:00:00", "cuda", "10:01:35", [1712.0, 1650.0]))
    times = read_epoch_times([str(log)], "cuda")
    need = math.ceil((95 + 1712 + 90 + SIGNAL_SLACK_S) / 60)  # start-up + epoch + warning + SLURM's early signal
    assert need == 33
    with pytest.raises(VarAugError) as refused:
        check_time_limit(need - 1, times, 90)
    message = str(refused.value)
    assert f"use at least --slurm-time {need}" in message and "1712 s" in message and str(log) in message
    assert "epoch" in check_time_limit(need, times, 90)
    assert "not checked" in check_time_limit(5, None, 90)
