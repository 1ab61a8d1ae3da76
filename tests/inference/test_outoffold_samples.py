"""The reading side of out-of-fold sample sets (what a ``_oof`` trainer checks) and the commands its errors name,
on hand-made sets: no nnU-Net planning or training."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nnunet_varaug.training import outoffold
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.folds import crossval_splits
from nnunet_varaug.training.sampleset import build_manifest, save_manifest, save_sample_array, sample_file

pytestmark = pytest.mark.unit
CASES = [f"c{i}" for i in range(6)]
FIX = "`nnunet_varaug samples -d 7 -c 3d_fullres -n 2 --source out-of-fold`"


def make_set(folder, splits, skip_fold=None, wrong=None):
    owner = {c: f for f, s in enumerate(splits) for c in s["val"]}
    entries = {}
    os.makedirs(folder, exist_ok=True)
    for case, fold in owner.items():
        if fold == skip_fold:
            continue
        maps = np.full((2, 4, 4, 4), fold, dtype=np.int8)
        digest = save_sample_array(maps, sample_file(folder, case), (4, 4, 4))
        entries[case] = {"shape": [2, 4, 4, 4], "sha256": digest, "fold": (wrong if case == "c0" and wrong is not None
                                                                          else fold)}
    identity = {"format": 1, "source": "out-of-fold", "dataset": "Dataset007_X", "plans": "nnUNetPlans",
                "configuration": "3d_fullres", "fold": "out-of-fold", "tta": True,
                "replicas": [{"name": f"T_seed{k}"} for k in (0, 1)]}
    save_manifest(folder, build_manifest(identity, entries, base="T", kind="seed", start=0, patch_size=(4, 4, 4),
                                         ignore_label=None, regions=False, command="x"))
    return owner


def check(folder, splits, fold=0, **kw):
    cases = splits[fold]["train"]
    return outoffold.validate_out_of_fold_set(str(folder), plans="nnUNetPlans", configuration="3d_fullres", fold=fold,
                                              cases=cases, splits=splits, shapes={c: (4, 4, 4) for c in cases},
                                              fix=FIX, **kw)


def test_a_complete_set_is_accepted(tmp_path):
    splits = crossval_splits(CASES, 3)
    make_set(tmp_path / "s", splits)
    assert check(tmp_path / "s", splits)["source"] == "out-of-fold"


def test_a_set_missing_a_folds_cases_names_the_fold_and_the_command(tmp_path):
    splits = crossval_splits(CASES, 3)
    make_set(tmp_path / "s", splits, skip_fold=2)
    with pytest.raises(VarAugError) as e:
        check(tmp_path / "s", splits, fold=0)
    assert "has no maps of 2 training case(s) of fold 0" in str(e.value)
    assert "replicas of fold(s) 2 make" in str(e.value) and FIX in str(e.value)
    check(tmp_path / "s", splits, fold=2)  # fold 2 trains on folds 0 and 1's cases: complete for it


def test_maps_from_another_fold_than_the_splits_say_are_refused(tmp_path):
    splits = crossval_splits(CASES, 3)
    owner = make_set(tmp_path / "s", splits, wrong=None)
    bad = (owner["c0"] + 1) % 3
    make_set(tmp_path / "t", splits, wrong=bad)
    fold = next(f for f in range(3) if "c0" in splits[f]["train"])
    with pytest.raises(VarAugError, match="come from fold .* but splits_final.json has it validated by fold"):
        check(tmp_path / "t", splits, fold=fold)


def test_an_in_fold_set_or_a_corrupt_file_is_refused(tmp_path):
    splits = crossval_splits(CASES, 3)
    make_set(tmp_path / "s", splits)
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"] = "in-fold"
    path.write_text(json.dumps(manifest))
    with pytest.raises(VarAugError, match="holds a 'in-fold' sample set, not an out-of-fold one"):
        check(tmp_path / "s", splits)
    make_set(tmp_path / "u", splits)
    case = splits[0]["train"][0]
    with open(sample_file(str(tmp_path / "u"), case), "ab") as f:
        f.write(b"x")
    with pytest.raises(VarAugError, match=f"samples of case {case} are corrupt"):
        check(tmp_path / "u", splits)
    with pytest.raises(VarAugError, match="no out-of-fold variability samples"):
        check(tmp_path / "none", splits)


def test_fix_command_lists_one_replicas_call_per_unfinished_fold(tmp_path, monkeypatch):
    results = tmp_path / "results"
    for fold in (0, 2):  # folds 0 and 2 have both replicas, fold 1 only one
        for k in (0, 1):
            d = results / "Dataset007_X" / f"T_seed{k}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
            d.mkdir(parents=True)
            (d / "checkpoint_final.pth").write_bytes(b"")
    d = results / "Dataset007_X" / "T_seed0__nnUNetPlans__3d_fullres" / "fold_1"
    d.mkdir(parents=True)
    (d / "checkpoint_final.pth").write_bytes(b"")
    monkeypatch.setenv("nnUNet_results", str(results))
    fix = outoffold.trainer_fix_command("Dataset007_X", "nnUNetPlans", "3d_fullres", "T", 3)
    assert fix == ("`nnunet_varaug replicas -d 7 -c 3d_fullres -f 1 -n 2 -tr T` (one call per fold), then "
                   "`nnunet_varaug samples -d 7 -c 3d_fullres -n 2 -tr T --source out-of-fold`")
    (results / "Dataset007_X" / "T_seed1__nnUNetPlans__3d_fullres" / "fold_1").mkdir(parents=True)
    (results / "Dataset007_X" / "T_seed1__nnUNetPlans__3d_fullres" / "fold_1" / "checkpoint_final.pth").write_bytes(b"")
    assert outoffold.trainer_fix_command("Dataset007_X", "nnUNetPlans", "3d_fullres", "T", 3) == \
        "`nnunet_varaug samples -d 7 -c 3d_fullres -n 2 -tr T --source out-of-fold`"
