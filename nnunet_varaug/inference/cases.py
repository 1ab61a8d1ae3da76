"""The cases a command reads, checked before anything is written: a fold's validation cases (raw images from
``$nnUNet_raw``) or a folder of raw images in nnU-Net's naming (``-i``) with optional label maps (``-l``).
Used by ``analyze`` and ``predict``."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.evaluation import voting
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.paths import require_env


@dataclass
class Case:
    """One input case: its image files (one per channel) and, optionally, its ground-truth label file."""

    name: str
    images: List[str]
    label: Optional[str] = None


# ---- inputs -----------------------------------------------------------------------------------------------------
def _channel_files(folder: str, files: Sequence[str], case: str, ending: str) -> List[str]:
    pattern = re.compile(re.escape(case) + r"_\d\d\d\d" + re.escape(ending))
    return [os.path.join(folder, f) for f in files if pattern.fullmatch(f)]


def _image_lists(folder: str, ending: str, cases: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """``case -> channel files`` of an nnU-Net image folder (``<case>_XXXX<ending>``), without a process pool."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(ending))
    if cases is None:
        cases = sorted({f[: -len(ending) - 5] for f in files if re.fullmatch(r".+_\d\d\d\d" + re.escape(ending), f)})
    return {c: _channel_files(folder, files, c, ending) for c in cases}


def list_cases(exp: Experiment, images: Optional[str] = None, labels: Optional[str] = None) -> List[Case]:
    """The cases to analyze, checked: every case has all its channels and, where labels are used, a label file.

    Default: the fold's validation cases, images from ``$nnUNet_raw/<Dataset>/imagesTr`` and ground truth from
    ``labelsTr``. With ``images``: every case of that folder, ground truth from ``labels`` if given.
    """
    dj = exp.dataset_json
    ending = dj["file_ending"]
    channels = len(dj.get("channel_names", dj.get("modality", {})))
    if images is None:
        if labels is not None:
            raise VarAugError("-l needs -i: without -i the ground truth comes from the dataset's labelsTr")
        raw = os.path.join(require_env("nnUNet_raw", "analyze reads the validation cases' raw images"), exp.dataset)
        val = exp.split()[1]
        if "dataset" in dj:  # dataset.json lists the files itself
            from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

            listed = get_filenames_of_train_images_and_targets(raw, dj)
            cases = [Case(c, listed[c]["images"], listed[c]["label"]) for c in val if c in listed]
        else:
            folder = os.path.join(raw, "imagesTr")
            if not os.path.isdir(folder):
                raise VarAugError(f"{folder} is missing: analyze predicts the validation cases from the raw images "
                                  f"(or pass a folder of raw images with -i)")
            lists = _image_lists(folder, ending, val)
            cases = [Case(c, lists[c], os.path.join(raw, "labelsTr", c + ending)) for c in val]
        where = os.path.join(raw, "imagesTr")
    else:
        if not os.path.isdir(images):
            raise VarAugError(f"-i {images}: no such folder of raw images")
        lists = _image_lists(images, ending)
        if not lists:
            raise VarAugError(f"-i {images} holds no images named <case>_XXXX{ending} (nnU-Net's naming)")
        cases = [Case(c, f, None if labels is None else os.path.join(labels, c + ending)) for c, f in lists.items()]
        where = images
        if labels is not None:
            if not os.path.isdir(labels):
                raise VarAugError(f"-l {labels}: no such folder of label maps")
            missing = [c.name for c in cases if not os.path.isfile(c.label)]
            if missing:
                raise VarAugError(f"-l {labels} lacks the label maps of {len(missing)} of {len(cases)} cases: "
                                  f"{', '.join(m + ending for m in missing[:10])}{' ...' if len(missing) > 10 else ''}"
                                  f". Add them, or leave out -l to analyze without ground truth")
    if not cases:
        raise VarAugError(f"no cases to analyze for {exp.dataset} fold {exp.fold}")
    bad = [c.name for c in cases if len(c.images) != channels]
    if bad:
        raise VarAugError(f"{where}: {len(bad)} case(s) do not have exactly {channels} channel file(s) "
                          f"<case>_0000{ending}..: {', '.join(bad[:10])}")
    nolabel = [c.label for c in cases if c.label is not None and not os.path.isfile(c.label)]
    if nolabel:
        raise VarAugError(f"ground truth missing for {len(nolabel)} case(s): {', '.join(nolabel[:5])}")
    check_grids(cases)
    return cases


# ---- headers: readable files, labels on their image's grid -----------------------------------------------------
HEADER_FORMATS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
GRID_TOLERANCE = 1e-4
"""Spacing, origin and direction of a label and its image may differ by this much (relative to the largest value)."""


def read_header(path: str):
    """(size, spacing, origin, direction) of an image file (header only), or VarAugError naming the file."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line.split("ERROR:", 1)[1].strip() for line in lines if "ERROR:" in line),
                      lines[-1] if lines else "unknown error")
        raise VarAugError(f"{path} is not a readable image: SimpleITK says \"{reason[:200]}\" (a file of another "
                          f"format, truncated or not an image at all). Replace it with the image file, or move the "
                          f"case out of the folder") from None
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _differs(a, b) -> bool:
    a, b = [float(x) for x in a], [float(x) for x in b]
    scale = max([1.0] + [abs(x) for x in a + b])
    return len(a) != len(b) or any(abs(x - y) > GRID_TOLERANCE * scale for x, y in zip(a, b))


def check_grids(cases: Sequence[Case]) -> None:
    """Every image and label file readable, and every label on its image's grid: size, spacing, origin and
    direction (header reads only; formats other than NIfTI/NRRD/MetaImage are left to nnU-Net's reader)."""
    for case in cases:
        if not case.images[0].endswith(HEADER_FORMATS):
            return
        headers = [read_header(p) for p in case.images]
        if case.label is None:
            continue
        label = read_header(case.label)
        wrong = [f"{what} {theirs} vs {mine}" for what, mine, theirs in
                 zip(("size", "spacing", "origin", "direction"), headers[0], label)
                 if (mine != theirs if what == "size" else _differs(mine, theirs))]
        if wrong:
            raise VarAugError(f"label {case.label} is not on the grid of its image {case.images[0]} "
                              f"({'; '.join(wrong)}): it is not the label of {case.name}, or it was resampled. Fix "
                              f"-l (the label must share the image's size, spacing, origin and direction)")


def check_ground_truth(rw, cases: Sequence[Case], allowed: Sequence[int]) -> None:
    """Every ground-truth file holds only labels of dataset.json (checked before any prediction is made)."""
    for case in cases:
        if case.label is None:
            continue
        try:
            voting.check_labels(rw.read_seg(case.label)[0], allowed, case.label)
        except ValueError as e:
            raise VarAugError(f"{e}. Fix the label map, or the labels in dataset.json") from None
