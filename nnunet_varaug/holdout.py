"""The benchmark's held-out test split: its cases moved out of ``imagesTr``/``labelsTr`` before nnU-Net plans.

nnU-Net's fingerprint, plans, preprocessing and every fold see exactly the cases in ``imagesTr``/``labelsTr``
(and ``numTraining`` in dataset.json must match them). Moving the test cases to ``imagesHeldOut``/``labelsHeldOut``
in the same raw dataset folder, and lowering ``numTraining``, keeps them out of all of these with no change to
nnU-Net; the folder names are not nnU-Net's, so nnU-Net never reads them. Images keep nnU-Net's naming
(``<case>_0000.nii.gz``), so ``nnUNetPredictor`` predicts ``imagesHeldOut`` as it is, and nnU-Net's
``compute_metrics_on_folder`` evaluates the predictions against ``labelsHeldOut``.

Moving is idempotent (an interrupted move is completed by running it again) and dataset.json is rewritten
atomically, last.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Sequence

from nnunet_varaug.errors import VarAugError
from nnunet_varaug.fileio import write_json

HELD_OUT_IMAGES = "imagesHeldOut"
HELD_OUT_LABELS = "labelsHeldOut"


def _dataset_json(raw_folder: str) -> dict:
    with open(os.path.join(raw_folder, "dataset.json")) as f:
        return json.load(f)


def image_files(folder: str, case: str, ending: str) -> List[str]:
    """The channel files ``<case>_XXXX<ending>`` of ``case`` in ``folder`` (names only, sorted)."""
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(re.escape(case) + r"_\d{4}" + re.escape(ending) + "$")
    return sorted(f for f in os.listdir(folder) if pattern.match(f))


def labelled_cases(raw_folder: str, labels: str = "labelsTr") -> List[str]:
    """Cases with a label file in ``raw_folder/labels``."""
    ending = _dataset_json(raw_folder)["file_ending"]
    folder = os.path.join(raw_folder, labels)
    if not os.path.isdir(folder):
        return []
    return sorted(f[: -len(ending)] for f in os.listdir(folder) if f.endswith(ending) and not f.startswith((".", "_")))


def hold_out(raw_folder: str, test_cases: Sequence[str]) -> Dict[str, int]:
    """Move ``test_cases`` (images and label) from imagesTr/labelsTr to imagesHeldOut/labelsHeldOut and set
    ``numTraining`` to the cases left. Returns ``{"training": n, "held_out": m}``.

    Raises:
        VarAugError: a test case that is in neither place, or has no image channel.
    """
    ds = _dataset_json(raw_folder)
    ending, channels = ds["file_ending"], len(ds.get("channel_names", ds.get("modality", {})))
    for sub in (HELD_OUT_IMAGES, HELD_OUT_LABELS):
        os.makedirs(os.path.join(raw_folder, sub), exist_ok=True)
    for case in test_cases:
        label_src = os.path.join(raw_folder, "labelsTr", case + ending)
        label_dst = os.path.join(raw_folder, HELD_OUT_LABELS, case + ending)
        images = image_files(os.path.join(raw_folder, "imagesTr"), case, ending)
        if not os.path.isfile(label_src) and not os.path.isfile(label_dst):
            raise VarAugError(f"held-out test case {case} has no label in {raw_folder}/labelsTr or "
                              f"{HELD_OUT_LABELS}: the raw dataset is not the one this benchmark converted; remove "
                              f"{raw_folder} and rerun")
        for name in images:  # images first, label last: a case with its label still in labelsTr is not done
            os.replace(os.path.join(raw_folder, "imagesTr", name), os.path.join(raw_folder, HELD_OUT_IMAGES, name))
        if len(image_files(os.path.join(raw_folder, HELD_OUT_IMAGES), case, ending)) != channels:
            raise VarAugError(f"held-out test case {case} has not {channels} image channel(s) in {raw_folder}; "
                              f"remove {raw_folder} and rerun")
        if os.path.isfile(label_src):
            os.replace(label_src, label_dst)
    training = labelled_cases(raw_folder)
    if ds.get("numTraining") != len(training):
        ds["numTraining"] = len(training)
        write_json(os.path.join(raw_folder, "dataset.json"), ds, indent=4)
    return {"training": len(training), "held_out": len(labelled_cases(raw_folder, HELD_OUT_LABELS))}


def is_held_out(raw_folder: str, test_cases: Sequence[str], all_cases: Sequence[str]) -> bool:
    """Whether exactly ``test_cases`` are held out and every other case of ``all_cases`` is a training case."""
    if not os.path.isfile(os.path.join(raw_folder, "dataset.json")):
        return False
    ds = _dataset_json(raw_folder)
    ending = ds["file_ending"]
    training = labelled_cases(raw_folder)
    want = sorted(set(all_cases) - set(test_cases))
    if training != want or labelled_cases(raw_folder, HELD_OUT_LABELS) != sorted(test_cases):
        return False
    if any(image_files(os.path.join(raw_folder, "imagesTr"), c, ending) for c in test_cases):
        return False
    return ds.get("numTraining") == len(want)
