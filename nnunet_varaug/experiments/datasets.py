"""Synthetic nnU-Net datasets for tests and the demo.

Each case holds two structures whose shape, size and position vary from case to case: an ellipsoid
("organ", label 1) with a smaller ellipsoid inside it ("lesion", label 2), on a noisy background with a smooth
intensity bias. The lesion's contrast to the organ is about three noise standard deviations, so short trainings
disagree about its border: replicas have something to disagree about. Images are written as NIfTI with the requested spacing; dataset.json comes from
nnU-Net's own ``generate_dataset_json``.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_varaug.utilities.fileio import replacing


def _ellipsoid(shape, center, radii, rotation: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    coords = np.stack([g - c for g, c in zip(grids, center)], axis=-1) @ rotation.T
    return (sum((coords[..., i] / radii[i]) ** 2 for i in range(len(shape)))) <= 1.0


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def synthetic_case(rng: np.random.Generator, shape: Sequence[int], num_channels: int = 1,
                   ignore_label: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One case: images ``(C, *shape)`` float32 and labels ``shape`` uint8 (0 background, 1 organ, 2 lesion)."""
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    size = np.array(shape, dtype=np.float32)
    center = size / 2 + rng.uniform(-0.12, 0.12, nd) * size
    radii = size * rng.uniform(0.18, 0.32, nd)
    rotation = _random_rotation(rng, nd)
    organ = _ellipsoid(shape, center, radii, rotation)
    lesion_center = center + rng.uniform(-0.35, 0.35, nd) * radii
    lesion = _ellipsoid(shape, lesion_center, radii * rng.uniform(0.4, 0.6, nd), _random_rotation(rng, nd)) & organ
    labels = organ.astype(np.uint8)
    labels[lesion] = 2

    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    images = []
    for c in range(num_channels):
        bias = 1 + 0.2 * sum(rng.uniform(-1, 1) * g for g in grids)
        contrast = (1.0 + 0.3 * c, 1.8 - 0.2 * c)  # organ, lesion intensities differ per channel
        img = np.zeros(shape, np.float32)
        img[organ] = contrast[0]
        img[lesion] = contrast[1]
        img = img * bias + rng.normal(0, 0.25, shape).astype(np.float32)
        images.append(100 * img + 50 * c)
    if ignore_label is not None:
        # an unannotated slab, as in sparse annotations
        axis, start = int(rng.integers(nd)), int(rng.integers(0, shape[0] // 4 + 1))
        index = [slice(None)] * nd
        index[axis] = slice(start, start + max(1, shape[axis] // 8))
        labels[tuple(index)] = ignore_label
    return np.stack(images).astype(np.float32), labels


def write_image(array: np.ndarray, spacing: Sequence[float], path: str) -> None:
    """Write a (z, y, x)-ordered numpy array with spacing given in the same order, atomically."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing[::-1]])
    with replacing(path, ".nii.gz") as tmp:
        sitk.WriteImage(img, tmp)


def _partial_folder(folder: str, overwrite: bool) -> Optional[str]:
    """The empty temporary folder to build ``folder`` in (renamed into place when complete), or None when
    ``folder`` exists and is kept."""
    if os.path.isdir(folder):
        if not overwrite:
            return None
        shutil.rmtree(folder)
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def make_synthetic_dataset(dataset_id: int, raw_root: Optional[str] = None, name: str = "VarAugSynthetic",
                           num_cases: int = 10, shape: Sequence[int] = (32, 32, 32),
                           spacing: Sequence[float] = (1.0, 1.0, 1.0), num_channels: int = 1,
                           regions: bool = False, ignore_label: bool = False, num_test_cases: int = 0,
                           seed: int = 0, overwrite: bool = False) -> str:
    """Write a raw nnU-Net dataset ``DatasetXXX_<name>`` and return its folder.

    Args:
        dataset_id: nnU-Net dataset id (1..999).
        raw_root: where to write; defaults to ``$nnUNet_raw``.
        shape, spacing: array shape and voxel spacing, both in (z, y, x) order as nnU-Net reads them.
        regions: label organ and lesion as the nested regions "whole" (1, 2) and "lesion" (2).
        ignore_label: add an "ignore" label (3) covering an unannotated slab in each case.
        num_test_cases: extra cases in imagesTs with their labels in labelsTs (outside nnU-Net's splits).
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    raw_root = raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise RuntimeError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (or pass raw_root)")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be within 1..999, got {dataset_id}")
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    tmp = _partial_folder(folder, overwrite)
    if tmp is None:
        return folder
    rng = np.random.default_rng(seed)
    for split, count in (("Tr", num_cases), ("Ts", num_test_cases)):
        if count == 0:
            continue
        os.makedirs(os.path.join(tmp, f"images{split}"))
        os.makedirs(os.path.join(tmp, f"labels{split}"))
        for i in range(count):
            case = f"case_{split.lower()}{i:03d}"
            images, labels = synthetic_case(rng, shape, num_channels, 3 if ignore_label else None)
            for c in range(num_channels):
                write_image(images[c], spacing, os.path.join(tmp, f"images{split}", f"{case}_{c:04d}.nii.gz"))
            write_image(labels, spacing, os.path.join(tmp, f"labels{split}", f"{case}.nii.gz"))
    if regions:
        labels_json = {"background": 0, "whole": [1, 2], "lesion": 2}
    else:
        labels_json = {"background": 0, "organ": 1, "lesion": 2}
    if ignore_label:
        labels_json["ignore"] = 3
    generate_dataset_json(tmp, {c: ("MRI" if c == 0 else f"MRI{c}") for c in range(num_channels)}, labels_json,
                          num_cases, ".nii.gz", regions_class_order=(1, 2) if regions else None,
                          dataset_name=f"Dataset{dataset_id:03d}_{name}",
                          description="synthetic dataset written by nnunet_varaug.experiments.datasets",
                          license="CC0", converted_by="nnunet_varaug")
    os.replace(tmp, folder)
    return folder


# ---- Medical Segmentation Decathlon fixtures ---------------------------------------------------------------------
# A tiny task folder laid out exactly as the Decathlon ships its tasks (http://medicaldecathlon.com), so that the
# benchmark's whole path, starting with nnU-Net's own `nnUNetv2_convert_MSD_dataset`, runs in CI on the CPU.


def write_4d_image(channels: np.ndarray, spacing: Sequence[float], path: str) -> None:
    """Write ``(C, z, y, x)`` channels as one 4D NIfTI (x, y, z, c on disk, as the Decathlon's multi-modal tasks),
    atomically. ``spacing`` is in (z, y, x) order; the fourth axis gets spacing 1."""
    volumes = []
    for c in channels:
        vol = sitk.GetImageFromArray(np.ascontiguousarray(c))
        vol.SetSpacing([float(s) for s in spacing[::-1]])
        volumes.append(vol)
    img = sitk.JoinSeries(volumes)  # 4D: x, y, z, modality
    with replacing(path, ".nii.gz") as tmp:
        sitk.WriteImage(img, tmp)


def make_msd_task(root: str, task: str = "Task04_Hippocampus", num_cases: int = 10, num_test: int = 2,
                  modalities: Sequence[str] = ("MRI",), label_names: Sequence[str] = ("Anterior", "Posterior"),
                  shape: Sequence[int] = (32, 32, 32), spacing: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0,
                  macos_junk: bool = False, overwrite: bool = False) -> str:
    """Write a tiny Decathlon task ``root/TaskNN_Name`` and return its folder.

    The layout is the Decathlon's: ``imagesTr/`` (one NIfTI per case, 4D with one volume per modality when there
    are several modalities, 3D otherwise), ``labelsTr/``, ``imagesTs/`` (images only) and a ``dataset.json`` with
    "modality" and "labels" as index -> name, "training" as [{"image", "label"}], "test" as a list of image paths,
    "numTraining", "numTest" and "tensorImageSize" (the original files even spell "relase" so; kept). Content
    comes from :func:`synthetic_case`.

    Args:
        root: the folder that receives ``TaskNN_Name``.
        task: ``TaskNN_Name``; nnU-Net's converter takes the id from ``NN`` and needs exactly one underscore.
        num_cases, num_test: training cases (with labels) and test cases (images only).
        modalities: modality names ("MRI"; or ("T2", "ADC") for a two-modality 4D task).
        label_names: one or two foreground labels; with one, the synthetic lesion is merged into the organ.
        shape, spacing: (z, y, x) array shape and voxel spacing.
        macos_junk: add the ``._*.nii.gz`` AppleDouble files found in the Decathlon's tar archives.
        overwrite: rewrite an existing folder instead of returning it.
    """
    import json
    import re

    if re.fullmatch(r"Task\d{2,3}_[A-Za-z0-9]+", task) is None:
        raise ValueError(f"task must look like 'Task04_Hippocampus' (one underscore), got '{task}'")
    if len(label_names) not in (1, 2):
        raise ValueError(f"label_names must name one or two foreground labels, got {list(label_names)}")
    if not modalities:
        raise ValueError("modalities must name at least one modality")
    folder = os.path.join(root, task)
    tmp = _partial_folder(folder, overwrite)
    if tmp is None:
        return folder
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(tmp, sub))
    prefix = task.split("_", 1)[1].lower()
    rng = np.random.default_rng(seed)
    training, test = [], []
    for i in range(num_cases + num_test):
        case = f"{prefix}_{i:03d}.nii.gz"
        split = "Tr" if i < num_cases else "Ts"
        _write_msd_case(tmp, case, split, rng, shape, spacing, len(modalities), len(label_names), macos_junk)
        if split == "Tr":
            training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
        else:
            test.append(f"./imagesTs/{case}")
    dataset = _msd_dataset_json(task, modalities, label_names, num_cases, num_test, training, test)
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(dataset, f, indent=4)
    os.replace(tmp, folder)
    return folder


def _write_msd_case(tmp: str, case: str, split: str, rng, shape: Sequence[int], spacing: Sequence[float],
                    num_modalities: int, num_labels: int, macos_junk: bool) -> None:
    """One case of :func:`make_msd_task`: its image (4D with several modalities) in ``images<split>``, its label map
    in ``labelsTr`` for a training case, and the AppleDouble files when asked."""
    images, labels = synthetic_case(rng, shape, num_modalities)
    if num_labels == 1:
        labels = (labels > 0).astype(np.uint8)
    image_path = os.path.join(tmp, f"images{split}", case)
    if num_modalities > 1:
        write_4d_image(images, spacing, image_path)
    else:
        write_image(images[0], spacing, image_path)
    if split == "Tr":
        write_image(labels, spacing, os.path.join(tmp, "labelsTr", case))
    if macos_junk:
        for sub in (f"images{split}",) + (("labelsTr",) if split == "Tr" else ()):
            with open(os.path.join(tmp, sub, f"._{case}"), "wb") as f:
                f.write(b"\x00\x05\x16\x07AppleDouble")


def _msd_dataset_json(task: str, modalities: Sequence[str], label_names: Sequence[str], num_cases: int,
                      num_test: int, training: list, test: list) -> dict:
    """The Decathlon's dataset.json of :func:`make_msd_task` (its "relase" spelling kept)."""
    return {
        "name": task.split("_", 1)[1],
        "description": "tiny synthetic task in the Medical Segmentation Decathlon's format (nnunet_varaug)",
        "reference": "nnunet_varaug.experiments.datasets.make_msd_task",
        "licence": "CC0",
        "relase": "1.0",
        "tensorImageSize": "4D" if len(modalities) > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"0": "background", **{str(i + 1): n for i, n in enumerate(label_names)}},
        "numTraining": num_cases,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
