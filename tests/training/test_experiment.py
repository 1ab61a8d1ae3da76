"""``Experiment.write_default_splits``: the splits_final.json that nnU-Net's first training writes, written once by
the ``replicas`` command before trainings start side by side (nnU-Net's ``do_split`` writes a missing file in
place, and a second training reading it half-written fails)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nnunet_varaug.training.experiment import Experiment

pytestmark = pytest.mark.unit


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder = tmp_path / "Dataset999_Fake" / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    monkeypatch.setattr(Experiment, "preprocessed_folder", property(lambda self: str(folder)))

    def make(cases, fold=0):
        for case in cases:
            (folder / f"{case}.b2nd").touch()
            (folder / f"{case}_seg.b2nd").touch()
        return Experiment("Dataset999_Fake", "3d_fullres", fold, 2, "nnUNetTrainerTiny")
    return make


def test_writes_the_split_nnunet_writes_on_its_first_training(experiment):
    """nnU-Net's do_split: generate_crossval_split of np.sort(identifiers), seed 12345, 5 folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = [f"case_{i:03d}" for i in (7, 3, 11, 0, 5, 9, 1)]
    exp = experiment(cases)
    assert exp.write_default_splits() is True
    with open(exp.splits_file) as f:
        written = json.load(f)
    want = generate_crossval_split(list(np.sort(cases)), seed=12345, n_splits=5)
    assert written == [{"train": list(s["train"]), "val": list(s["val"])} for s in want]
    assert exp.split() == (written[0]["train"], written[0]["val"])


def test_an_existing_split_is_kept(experiment):
    exp = experiment([f"case_{i}" for i in range(6)])
    with open(exp.splits_file, "w") as f:
        f.write("[]  ")  # whatever the user put there
    assert exp.write_default_splits() is False
    with open(exp.splits_file) as f:
        assert f.read() == "[]  "


@pytest.mark.parametrize("cases, fold", [(["a", "b", "c", "d"], 0), ([f"c{i}" for i in range(6)], "all")])
def test_nothing_written_for_fold_all_or_fewer_than_five_cases(experiment, cases, fold):
    exp = experiment(cases, fold)
    assert exp.write_default_splits() is False
    assert not os.path.exists(exp.splits_file)
