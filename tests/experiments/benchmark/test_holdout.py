"""holdout.py: the benchmark's test cases leave imagesTr/labelsTr (and numTraining) before nnU-Net plans; moving
is idempotent. Checked on a raw folder of placeholder files against plain file listings."""
from __future__ import annotations

import json
import os

import pytest

from nnunet_varaug.experiments.benchmark import holdout

pytestmark = pytest.mark.unit
CASES = [f"heart_{i:03d}" for i in range(6)]


@pytest.fixture()
def raw(tmp_path):
    folder = tmp_path / "Dataset902_Heart"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for case in CASES:
        for c in range(2):
            (folder / "imagesTr" / f"{case}_{c:04d}.nii.gz").write_text(f"{case} {c}")
        (folder / "labelsTr" / f"{case}.nii.gz").write_text(case)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "numTraining": 6,
                                                     "file_ending": ".nii.gz", "labels": {"background": 0}}))
    return str(folder)


def test_test_cases_leave_the_training_folders(raw):
    test = ["heart_001", "heart_004"]
    assert not holdout.is_held_out(raw, test, CASES)
    assert holdout.hold_out(raw, test) == {"training": 4, "held_out": 2}
    train = sorted(set(CASES) - set(test))
    assert sorted(os.listdir(os.path.join(raw, "labelsTr"))) == [f"{c}.nii.gz" for c in train]
    assert sorted(os.listdir(os.path.join(raw, "imagesTr"))) == [f"{c}_{k:04d}.nii.gz" for c in train for k in (0, 1)]
    assert sorted(os.listdir(os.path.join(raw, holdout.HELD_OUT_IMAGES))) == [
        f"{c}_{k:04d}.nii.gz" for c in test for k in (0, 1)]
    with open(os.path.join(raw, holdout.HELD_OUT_LABELS, "heart_004.nii.gz")) as f:
        assert f.read() == "heart_004"  # moved, not rewritten
    with open(os.path.join(raw, "dataset.json")) as f:
        assert json.load(f)["numTraining"] == 4
    assert holdout.is_held_out(raw, test, CASES)
    assert not holdout.is_held_out(raw, ["heart_001"], CASES)


def test_interrupted_move_is_completed(raw):
    os.makedirs(os.path.join(raw, holdout.HELD_OUT_IMAGES))
    os.replace(os.path.join(raw, "imagesTr", "heart_002_0000.nii.gz"),
               os.path.join(raw, holdout.HELD_OUT_IMAGES, "heart_002_0000.nii.gz"))  # one channel moved, then killed
    assert not holdout.is_held_out(raw, ["heart_002"], CASES)
    holdout.hold_out(raw, ["heart_002"])
    holdout.hold_out(raw, ["heart_002"])  # and again: nothing left to do
    assert holdout.is_held_out(raw, ["heart_002"], CASES)
