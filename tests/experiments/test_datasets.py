"""Decathlon-format fixtures: the exact layout, the content they promise, conversion by nnU-Net's own converter,
and the checks the benchmark makes on a task folder before converting it."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from nnunet_varaug.experiments.benchmark.task import read_msd_task
from nnunet_varaug.experiments.datasets import make_msd_task, synthetic_case
from nnunet_varaug.training.experiment import VarAugError


def array(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


@pytest.fixture(scope="module")
def prostate(tmp_path_factory):
    """A two-modality task (4D NIfTI images) with the AppleDouble junk of the Decathlon's tar archives."""
    root = tmp_path_factory.mktemp("msd")
    return make_msd_task(str(root), "Task05_Prostate", num_cases=4, num_test=2, modalities=("T2", "ADC"),
                         label_names=("PZ", "TZ"), shape=(12, 16, 20), spacing=(3.0, 0.6, 0.6), seed=7,
                         macos_junk=True)


@pytest.mark.unit
def test_layout_and_dataset_json_are_the_decathlons(prostate):
    assert sorted(os.listdir(prostate)) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    with open(os.path.join(prostate, "dataset.json")) as f:
        ds = json.load(f)
    assert ds["modality"] == {"0": "T2", "1": "ADC"}
    assert ds["labels"] == {"0": "background", "1": "PZ", "2": "TZ"}
    assert ds["tensorImageSize"] == "4D" and ds["numTraining"] == 4 and ds["numTest"] == 2
    assert ds["training"][0] == {"image": "./imagesTr/prostate_000.nii.gz", "label": "./labelsTr/prostate_000.nii.gz"}
    assert ds["test"] == ["./imagesTs/prostate_004.nii.gz", "./imagesTs/prostate_005.nii.gz"]
    for entry in ds["training"]:
        for key in ("image", "label"):
            assert os.path.isfile(os.path.join(prostate, entry[key]))
    assert sorted(os.listdir(os.path.join(prostate, "labelsTr"))) == sorted(
        [f"prostate_{i:03d}.nii.gz" for i in range(4)] + [f"._prostate_{i:03d}.nii.gz" for i in range(4)])
    assert not os.path.exists(os.path.join(prostate, "labelsTs"))  # the Decathlon keeps test labels hidden


@pytest.mark.unit
def test_images_are_4d_with_the_synthetic_content(prostate):
    img = sitk.ReadImage(os.path.join(prostate, "imagesTr", "prostate_001.nii.gz"))
    assert img.GetDimension() == 4 and img.GetSize() == (20, 16, 12, 2)
    assert img.GetSpacing()[:3] == pytest.approx((0.6, 0.6, 3.0))
    # the same generator, drawn in the same order, gives the same case
    rng = np.random.default_rng(7)
    synthetic_case(rng, (12, 16, 20), 2)
    images, labels = synthetic_case(rng, (12, 16, 20), 2)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), images, rtol=1e-6)
    np.testing.assert_array_equal(array(os.path.join(prostate, "labelsTr", "prostate_001.nii.gz")), labels)
    assert set(np.unique(labels)) == {0, 1, 2}


@pytest.mark.unit
def test_one_label_task_merges_the_structures(tmp_path):
    heart = make_msd_task(str(tmp_path), "Task02_Heart", num_cases=2, num_test=0, label_names=("left atrium",),
                          shape=(8, 8, 8), seed=3)
    with open(os.path.join(heart, "dataset.json")) as f:
        ds = json.load(f)
    assert ds["labels"] == {"0": "background", "1": "left atrium"} and ds["tensorImageSize"] == "3D"
    assert ds["test"] == [] and os.path.isdir(os.path.join(heart, "imagesTs"))
    rng = np.random.default_rng(3)
    _, labels = synthetic_case(rng, (8, 8, 8), 1)
    np.testing.assert_array_equal(array(os.path.join(heart, "labelsTr", "heart_000.nii.gz")), labels > 0)
    assert array(os.path.join(heart, "imagesTr", "heart_000.nii.gz")).ndim == 3


@pytest.mark.nnunet
def test_nnunet_converts_the_fixture(prostate, nnunet_env):
    """``nnUNetv2_convert_MSD_dataset`` splits each 4D image into one file per modality, copies the labels,
    skips the AppleDouble files and writes an nnU-Net v2 dataset.json."""
    run_cli("nnUNetv2_convert_MSD_dataset", "-i", prostate, "-overwrite_id", "905", "-np", "1")
    raw = os.path.join(nnunet_env["nnUNet_raw"], "Dataset905_Prostate")
    with open(os.path.join(raw, "dataset.json")) as f:
        ds = json.load(f)
    assert ds["channel_names"] == {"0": "T2", "1": "ADC"}
    assert ds["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    assert ds["numTraining"] == 4 and ds["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(os.path.join(raw, "imagesTr"))) == [
        f"prostate_{i:03d}_{c:04d}.nii.gz" for i in range(4) for c in range(2)]
    assert sorted(os.listdir(os.path.join(raw, "imagesTs"))) == [
        f"prostate_{i:03d}_{c:04d}.nii.gz" for i in (4, 5) for c in range(2)]
    four_d = array(os.path.join(prostate, "imagesTr", "prostate_002.nii.gz"))
    for c in range(2):
        np.testing.assert_array_equal(array(os.path.join(raw, "imagesTr", f"prostate_002_{c:04d}.nii.gz")), four_d[c])
    np.testing.assert_array_equal(array(os.path.join(raw, "labelsTr", "prostate_002.nii.gz")),
                                  array(os.path.join(prostate, "labelsTr", "prostate_002.nii.gz")))


# ---- bad task folders -------------------------------------------------------------------------------------------
def broken_copy(src: str, dst_root, name: str = None) -> str:
    dst = os.path.join(str(dst_root), name or os.path.basename(src))
    shutil.copytree(src, dst)
    return dst


def edit_json(folder: str, change) -> None:
    path = os.path.join(folder, "dataset.json")
    with open(path) as f:
        ds = json.load(f)
    change(ds)
    with open(path, "w") as f:
        json.dump(ds, f)


@pytest.mark.unit
def test_read_msd_task_accepts_the_fixture(prostate):
    task = read_msd_task(prostate + "/")
    assert (task.task_id, task.name, task.folder_name) == (5, "Prostate", "Task05_Prostate")
    assert task.training_cases == [f"prostate_{i:03d}" for i in range(4)]
    assert task.label_names == {0: "background", 1: "PZ", 2: "TZ"}


@pytest.mark.unit
@pytest.mark.parametrize("breakage, message", [
    ("name", "not named like a Decathlon task"),
    ("nested", "pass --msd"),
    ("no_imagesTs", "imagesTs missing"),
    ("no_dataset_json", "dataset.json is missing"),
    ("no_modality", "lacks the Decathlon key(s) modality"),
    ("v2_json", "an nnU-Net v2 dataset.json"),
    ("labels", "'labels' must map label values to names"),
    ("num_training", "numTraining is 5 but 'training' lists 4"),
    ("missing_file", "are missing, e.g. ./labelsTr/prostate_003.nii.gz"),
])
def test_bad_task_folders_name_the_problem(prostate, tmp_path, breakage, message):
    if breakage == "name":
        folder = broken_copy(prostate, tmp_path, "Task05_Prostate_v2")
    elif breakage == "nested":
        outer = tmp_path / "Task05_Prostate"
        outer.mkdir()
        broken_copy(prostate, outer)
        folder = str(outer)
    else:
        folder = broken_copy(prostate, tmp_path)
    if breakage == "no_imagesTs":
        shutil.rmtree(os.path.join(folder, "imagesTs"))
    elif breakage == "no_dataset_json":
        os.remove(os.path.join(folder, "dataset.json"))
    elif breakage == "no_modality":
        edit_json(folder, lambda ds: ds.pop("modality"))
    elif breakage == "v2_json":
        edit_json(folder, lambda ds: (ds.pop("modality"), ds.update(channel_names={"0": "T2"})))
    elif breakage == "labels":
        edit_json(folder, lambda ds: ds.update(labels={"background": 0, "PZ": 1}))
    elif breakage == "num_training":
        edit_json(folder, lambda ds: ds.update(numTraining=5))
    elif breakage == "missing_file":
        os.remove(os.path.join(folder, "labelsTr", "prostate_003.nii.gz"))
    with pytest.raises(VarAugError) as err:
        read_msd_task(folder)
    assert message in str(err.value)
