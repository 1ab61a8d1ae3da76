"""What replicas analysed together must share (training/platforms.py, printed by analyze): platform, stream layout
and noise generator, each difference named; agreeing or missing records give no warning."""
from __future__ import annotations

import json
import os
import types

import pytest

from nnunet_varaug.training.platforms import platform_warning, replica_warnings

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


def records(tmp_path, by_name: dict):
    """A stand-in experiment whose replica ``name`` has the ``nnunet_varaug`` record ``by_name[name]``."""
    for name, record in by_name.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "debug.json").write_text(json.dumps({"nnunet_varaug": record}))
    return types.SimpleNamespace(replica_names=list(by_name), fold_folder=lambda name: os.path.join(tmp_path, name))


def test_replicas_of_two_stream_layouts_are_named(tmp_path):
    exp = records(tmp_path, {"T_seed0": {"streams": {"layout": 2}}, "T_seed1": {"seed": {}, "determinism": {}},
                             "T_seed2": {"streams": {"layout": 2}}})
    warnings = replica_warnings([exp])
    assert len(warnings) == 1 and "layout 1: T_seed1; layout 2: T_seed0, T_seed2" in warnings[0]
    assert "Train T_seed1 again" in warnings[0]


def test_numerical_replicas_of_two_generators_are_named(tmp_path):
    philox = {"name": "Philox4x32-10", "version": 1}
    exp = records(tmp_path, {"T_mca0": {"numerics": {"kind": "mca", "generator": philox}},
                             "T_mca1": {"numerics": {"kind": "mca"}},
                             "T_ieee": {"numerics": {"kind": "ieee"}}})
    warnings = replica_warnings([exp])
    assert len(warnings) == 1 and "T_mca0: Philox4x32-10 version 1" in warnings[0]
    assert "T_mca1: no generator recorded" in warnings[0] and "T_ieee" not in warnings[0]


def test_agreeing_replicas_give_no_warning(tmp_path):
    same = {"streams": {"layout": 2}, "determinism": {"platform": EPYC},
            "numerics": {"kind": "mca", "generator": {"name": "Philox4x32-10", "version": 1}}}
    assert replica_warnings([records(tmp_path, {"T_mca0": same, "T_mca1": same})]) == []
