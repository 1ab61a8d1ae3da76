"""analyze.platform_warning: replicas trained on different machines or software (their debug.json's
``determinism.platform``) are named with what differs; agreeing or missing records give no warning."""
from __future__ import annotations

import json
import os
import types

import pytest

from nnunet_varaug.training.platforms import platform_warning

pytestmark = pytest.mark.unit
EPYC = {"cpu": "AMD EPYC", "simd": "avx512f", "torch_threads": 2, "os": "Linux-6.18", "python": "3.11.7",
        "torch": "2.14.1", "numpy": "2.4.6", "nnunetv2": "2.8.1", "cuda": None, "cudnn": None, "gpu": None}


def replicas(tmp_path, platforms: dict):
    """A stand-in experiment whose replica ``name`` has ``platforms[name]`` in its debug.json (None: no record)."""
    for name, platform in platforms.items():
        folder = tmp_path / name
        folder.mkdir()
        record = {"trainer": name} if platform is None else {"determinism": {"platform": platform}}
        (folder / "debug.json").write_text(json.dumps({"nnunet_varaug": record}))
    return types.SimpleNamespace(replica_names=list(platforms),
                                 fold_folder=lambda name: os.path.join(tmp_path, name))


def test_one_platform_gives_no_warning(tmp_path):
    exp = replicas(tmp_path, {"T_seed0": EPYC, "T_seed1": dict(EPYC, os="Linux-6.19", python="3.11.9"),
                              "T_seed2": None})
    assert platform_warning([exp]) is None  # kernel and python versions do not change the arithmetic


def test_replicas_from_two_machines_are_named_with_what_differs(tmp_path):
    xeon = dict(EPYC, cpu="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", simd="avx512f")
    exp = replicas(tmp_path, {"T_seed0": EPYC, "T_seed1": xeon, "T_seed2": EPYC})
    warning = platform_warning([exp])
    assert warning.startswith("the replicas were trained on 2 different platforms")
    assert "T_seed0, T_seed2: cpu=AMD EPYC" in warning and "T_seed1: cpu=Intel(R) Xeon(R)" in warning
    assert "simd" not in warning and "torch=" not in warning, "only what differs is named"


def test_kinds_are_compared_together(tmp_path):
    (tmp_path / "seed").mkdir()
    (tmp_path / "mca").mkdir()
    seed = replicas(tmp_path / "seed", {"T_seed0": EPYC, "T_seed1": EPYC})
    mca = replicas(tmp_path / "mca", {"T_mca0": dict(EPYC, torch="2.15.0"), "T_mca1": dict(EPYC, torch="2.15.0")})
    assert "torch=2.15.0" in platform_warning([seed, mca])
