"""The demo's environment (demo.py's ``demo_env``); the demo itself runs in ``bash .ci/demo``, not in the suite."""
from __future__ import annotations

import pytest

from nnunet_varaug.demo import demo_env

pytestmark = pytest.mark.unit


def test_demo_processes_share_two_cores_without_spinning(monkeypatch, tmp_path):
    """nnUNetv2_train gives torch one thread per core whatever OMP_NUM_THREADS says; passive OpenMP waiting keeps
    the training and its export worker from stalling each other (benchmarks/bench_omp_wait.py)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = demo_env(str(tmp_path), 2, 3)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "1"
    assert env["VARAUG_TINY_EPOCHS"] == "2" and env["VARAUG_TINY_ITERATIONS"] == "3"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert demo_env(str(tmp_path), 2, 3)["OMP_WAIT_POLICY"] == "ACTIVE", "the user's own setting is kept"
