"""testset.py's group variability and majority vote on hand-made label files, against plain numpy."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_varaug.experiments.benchmark import testset

pytestmark = pytest.mark.unit
DATASET_JSON = {"labels": {"background": 0, "organ": 1, "lesion": 2}, "file_ending": ".nii.gz"}


def write(array, path, spacing=(0.5, 1.0, 3.0)):
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, path)


@pytest.fixture()
def groups(tmp_path):
    rng = np.random.default_rng(0)
    folders = []
    maps = {c: rng.integers(0, 3, size=(3, 6, 7, 8)) for c in ("a", "b")}
    maps["b"][:, maps["b"][0] == 2] = 1  # case b: no lesion in model 0 ...
    maps["b"][0][maps["b"][0] == 2] = 1
    for k in range(3):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        for case, m in maps.items():
            write(m[k], str(folder / f"{case}.nii.gz"))
        folders.append(str(folder))
    return folders, maps


def test_group_variability_is_pairwise_dice_and_volume_cv(groups):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folders, maps = groups
    got = testset.group_variability(folders, ["a", "b"], SimpleITKIO(), ".nii.gz", DATASET_JSON)
    for label in (1, 2):
        dice, cv, low, sd = [], [], [], []
        for case in ("a", "b"):
            masks = maps[case] == label
            pair = []
            for i, j in ((0, 1), (0, 2), (1, 2)):
                denom = masks[i].sum() + masks[j].sum()
                pair.append(1.0 if denom == 0 else 2 * (masks[i] & masks[j]).sum() / denom)
            dice.append(np.mean(pair))
            low.append(np.min(pair))
            volumes = masks.reshape(3, -1).sum(1) * 0.5 * 1.0 * 3.0
            cv.append(volumes.std(ddof=1) / volumes.mean())
            sd.append(volumes.std(ddof=1))
        row = got[str(label)]
        assert row["pairwise_dice"] == pytest.approx(np.mean(dice))
        assert row["min_pairwise_dice"] == pytest.approx(np.min(low))
        assert row["volume_cv"] == pytest.approx(np.nanmean(cv))
        assert row["volume_sd_mm3"] == pytest.approx(np.mean(sd))  # mm³: the spacing counts


def test_majority_vote_is_the_voxelwise_mode(groups, tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folders, maps = groups
    out = testset.majority_vote(folders, ["a", "b"], str(tmp_path / "vote"), SimpleITKIO(), ".nii.gz", [0, 1, 2])
    for case in ("a", "b"):
        counts = np.stack([(maps[case] == v).sum(0) for v in (0, 1, 2)])
        vote = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"{case}.nii.gz")))
        np.testing.assert_array_equal(vote, np.argmax(counts, axis=0))


def test_evaluate_folder_equals_nnunets_pool_run_without_starting_a_process(groups, tmp_path, monkeypatch):
    """The same summary file and Dice as nnU-Net's own compute_metrics_on_folder with its spawn pool; no pool and
    no process started (each spawned pool imports torch and nnU-Net again), and nnU-Net's module left as it was."""
    import json
    import multiprocessing

    from nnunetv2.evaluation import evaluate_predictions as ev
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folders, _ = groups
    labels, predictions = folders[0], folders[1]
    keys = [1, 2]

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started")

    with monkeypatch.context() as mp:
        mp.setattr(multiprocessing, "get_context", no_pool)
        ours = testset.evaluate_folder(labels, predictions, str(tmp_path / "ours.json"), SimpleITKIO(), ".nii.gz",
                                       keys, None, ["a", "b"])
    assert ev.multiprocessing is multiprocessing
    theirs = ev.compute_metrics_on_folder(labels, predictions, str(tmp_path / "theirs.json"), SimpleITKIO(),
                                          ".nii.gz", keys, None, num_processes=1)
    with open(tmp_path / "ours.json") as f, open(tmp_path / "theirs.json") as g:
        assert json.load(f) == json.load(g)
    assert ours["dice"] == {ev.label_or_region_to_key(k): float(theirs["mean"][k]["Dice"]) for k in keys}
    assert ours["num_cases"] == 2
    assert ours["foreground_mean"] == float(theirs["foreground_mean"]["Dice"])
