"""The demo's environment (demo.py's ``demo_env``); the demo itself runs in ``bash .ci/demo``, not in the suite."""
from __future__ import annotations

import pytest

from nnunet_varaug.experiments.demo import demo_env

pytestmark = pytest.mark.unit


def test_demo_runs_one_thread_per_process_unless_the_user_says_otherwise(monkeypatch, tmp_path):
    """nnU-Net's export worker runs beside the trainer: one OpenMP thread per process (nnUNetv2_train itself then
    sets torch's own count); the user's OMP_NUM_THREADS is kept, and the tiny trainings get the demo's length."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = demo_env(str(tmp_path), 2, 3)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["VARAUG_TINY_EPOCHS"] == "2" and env["VARAUG_TINY_ITERATIONS"] == "3"
    assert env["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert demo_env(str(tmp_path), 2, 3)["OMP_NUM_THREADS"] == "2", "the user's own setting is kept"


def test_replicas_train_two_at_a_time_where_there_are_two_cores(monkeypatch):
    """Two processes at once need sleeping OpenMP threads (spinning ones ran many times slower); one core: one."""
    from nnunet_varaug.experiments import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert demo.side_by_side() == (["--devices", "0,1"], {"OMP_WAIT_POLICY": "PASSIVE"})
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 1)
    assert demo.side_by_side() == ([], {})
