"""Bad input to `nnunet_varaug replicas`: a clear message naming the fix, exit code 2, nothing written."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from conftest import SYNTHETIC_3D_ID, TINY
from nnunet_varaug import cli


def snapshot(root: str) -> set:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files} | \
           {d for d, _, _ in os.walk(root)}


def run_replicas(capsys, *flags: str):
    before = snapshot(os.environ["nnUNet_results"]) | snapshot(os.environ["nnUNet_preprocessed"])
    code = cli.main(["replicas", *flags, "-device", "cpu"])
    err = capsys.readouterr().err
    after = snapshot(os.environ["nnUNet_results"]) | snapshot(os.environ["nnUNet_preprocessed"])
    assert after == before, f"bad input wrote files: {sorted(after - before)}"
    return code, err


@pytest.mark.nnunet
@pytest.mark.parametrize("flags, message", [
    (("-d", "977", "-c", "3d_fullres", "-f", "0", "-n", "2"), "unknown dataset '977'"),
    (("-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "0"), "-n must be at least 1"),
    (("-d", str(SYNTHETIC_3D_ID), "-c", "2d_huge", "-f", "0", "-n", "2"), "configuration '2d_huge' is not in"),
    (("-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "7", "-n", "2"), "fold 7 does not exist"),
    (("-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "2", "-tr", "NoSuchTrainer"),
     "unknown base trainer 'NoSuchTrainer'"),
    (("-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "2", "-p", "OtherPlans"),
     f"run `nnUNetv2_plan_and_preprocess -d {SYNTHETIC_3D_ID}`"),
])
def test_bad_replicas_input(synthetic_3d, capsys, flags, message):
    code, err = run_replicas(capsys, *flags)
    assert code == 2 and message in err, err


@pytest.mark.nnunet
def test_dataset_without_plans_names_the_planning_command(nnunet_env, capsys):
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    make_synthetic_dataset(102, num_cases=5, shape=(8, 8, 8), name="Unplanned")
    code, err = run_replicas(capsys, "-d", "102", "-c", "3d_fullres", "-f", "0", "-n", "2", "-tr", TINY)
    assert code == 2 and "run `nnUNetv2_plan_and_preprocess -d 102`" in err, err


@pytest.mark.nnunet
def test_results_folder_unset(synthetic_3d, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_results")
    code = cli.main(["replicas", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "2"])
    assert code == 2 and "nnUNet_results is not set" in capsys.readouterr().err


@pytest.mark.nnunet
def test_the_console_script_exits_2_with_the_message(synthetic_3d):
    cmd = [os.path.join(os.path.dirname(sys.executable), "nnunet_varaug"), "replicas", "-d", str(SYNTHETIC_3D_ID),
           "-c", "3d_fullres", "-f", "0", "-n", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2, shlex.join(cmd)
    assert proc.stderr.strip() == "nnunet_varaug replicas: error: -n must be at least 1 (the number of replicas), got 0"


@pytest.mark.unit
def test_env_prints_an_export_line_keeping_user_folders(monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", "/my/trainers")
    assert cli.main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export nnUNet_extTrainer=/my/trainers" + os.pathsep)
    assert line.endswith(os.path.join("nnunet_varaug", "_lookup"))
