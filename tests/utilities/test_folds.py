"""folds.py: the fold that validates each case, nnU-Net's K-fold split, the held-out test split and the splits file
that leaves it out. Oracles: nnU-Net's own ``generate_crossval_split`` and plain set arithmetic."""
from __future__ import annotations

import json

import pytest

from nnunet_varaug.utilities import folds
from nnunet_varaug.utilities import names
from nnunet_varaug.training.experiment import VarAugError

pytestmark = pytest.mark.unit

CASES = [f"case_{i:03d}" for i in range(12)]


def test_every_case_maps_to_the_one_fold_that_validates_it():
    splits = folds.crossval_splits(CASES, 3)
    owner = folds.check_cross_validation(splits, CASES)
    assert sorted(owner) == CASES
    for case, fold in owner.items():
        assert case in splits[fold]["val"]
        assert all(case in s["train"] for g, s in enumerate(splits) if g != fold)
    # the teachers of fold 0's training cases (the folds that validate them) are exactly the other folds
    assert sorted({owner[c] for c in splits[0]["train"]}) == [1, 2]


def test_crossval_split_is_nnunets_own():
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ours = folds.crossval_splits(list(reversed(CASES)), 5)  # order of the input does not matter
    theirs = generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)
    assert ours == [{"train": list(s["train"]), "val": list(s["val"])} for s in theirs]
    with pytest.raises(VarAugError, match="need 2..12 folds"):
        folds.crossval_splits(CASES, 1)


@pytest.mark.parametrize("splits, message", [
    ([{"train": ["a", "b"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}], "trains and validates on the same"),
    ([{"train": ["b"], "val": ["a"]}, {"train": ["b"], "val": ["a"]}], "validated by folds 0 and 1"),
    ([{"train": ["b"], "val": ["a"]}, {"train": ["a"], "val": ["b", "c"]}], "does not train on exactly"),
])
def test_broken_splits_are_named(splits, message):
    with pytest.raises(VarAugError, match=message):
        folds.check_cross_validation(splits)


def test_splits_must_cover_the_dataset():
    splits = folds.crossval_splits(CASES[:6], 2)
    with pytest.raises(VarAugError, match="not validated by any fold: case_006"):
        folds.check_cross_validation(splits, CASES[:7])


def test_test_split_is_deterministic_sized_and_order_free():
    a = folds.choose_test_cases(CASES, 0.2, seed=7)
    assert a == folds.choose_test_cases(list(reversed(CASES)), 0.2, seed=7)
    assert len(a) == round(0.2 * 12) == 2 and set(a) <= set(CASES) and a == sorted(a)
    assert folds.choose_test_cases(CASES, 0.2, seed=8) != a or folds.choose_test_cases(CASES, 0.2, seed=9) != a
    assert len(folds.choose_test_cases(CASES, 0.01)) == 1  # never an empty test split
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(VarAugError, match="--test-fraction must be within"):
            folds.choose_test_cases(CASES, bad)
    with pytest.raises(VarAugError, match="leaves 1 for training"):
        folds.choose_test_cases(CASES[:4], 0.75)


def test_written_splits_leave_the_test_split_out(tmp_path):
    test = folds.choose_test_cases(CASES, 0.25, seed=3)
    train = [c for c in CASES if c not in test]
    path = str(tmp_path / folds.SPLITS_FILE)
    folds.write_splits(path, folds.crossval_splits(train, 3), held_out=test)
    splits = folds.read_splits(path)
    with open(path) as f:
        assert json.load(f) == splits  # plain nnU-Net format
    assert len(splits) == 3
    used = {c for s in splits for c in s["train"] + s["val"]}
    assert used == set(train) and not used & set(test)
    leaky = folds.crossval_splits(CASES, 3)
    with pytest.raises(VarAugError, match="uses held-out test case"):
        folds.write_splits(str(tmp_path / "leaky.json"), leaky, held_out=test)
    assert not (tmp_path / "leaky.json").exists()


def test_unreadable_splits_file(tmp_path):
    with pytest.raises(VarAugError, match="does not exist"):
        folds.read_splits(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text('{"train": []}')
    with pytest.raises(VarAugError, match="not nnU-Net's splits format"):
        folds.read_splits(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name, expected", [
    ("nnUNetTrainer_varaug_oof", ("nnUNetTrainer", "varaug", {"p": 0.5, "source": "out-of-fold"})),
    ("nnUNetTrainer_varaug_p30_oof", ("nnUNetTrainer", "varaug", {"p": 0.3, "source": "out-of-fold"})),
    ("nnUNetTrainer_varaug_oof_seed1", ("nnUNetTrainer_varaug_oof", "seed", {"seed": 1})),
    ("nnUNetTrainer_varaug", ("nnUNetTrainer", "varaug", {"p": 0.5})),
])
def test_grammar_names_the_out_of_fold_source(name, expected):
    assert names.parse(name) == expected


@pytest.mark.parametrize("name", ["nnUNetTrainer_varaug_oof_p30", "nnUNetTrainer_varaug_ooff"])
def test_malformed_source_suffix_is_refused(name):
    with pytest.raises(names.TrainerNameError, match="not a valid trainer name"):
        names.parse(name)
