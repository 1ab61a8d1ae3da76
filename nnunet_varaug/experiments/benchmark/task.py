"""The Decathlon task folder of ``nnunet_varaug benchmark``: checked before anything is converted.

A task (``TaskNN_Name`` with imagesTr, labelsTr, imagesTs and a Decathlon dataset.json) must have the layout and
keys nnU-Net's ``nnUNetv2_convert_MSD_dataset`` needs, and the nnU-Net dataset id it is converted to must be free
or hold this very task. Every error says what to fix.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List

from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.paths import dataset_id_of

MSD_KEYS = ("modality", "labels", "numTraining", "training")


@dataclass
class MsdTask:
    """A Decathlon task folder, checked: ``TaskNN_Name`` with the layout and dataset.json the converter needs."""

    folder: str
    task_id: int
    name: str
    dataset_json: dict

    @property
    def folder_name(self) -> str:
        return os.path.basename(self.folder)

    @property
    def training_cases(self) -> List[str]:
        return sorted(os.path.basename(e["label"])[: -len(".nii.gz")] for e in self.dataset_json["training"])

    @property
    def label_names(self) -> Dict[int, str]:
        return {int(k): v for k, v in self.dataset_json["labels"].items()}


def nii_files(folder: str) -> List[str]:
    """NIfTI files as nnU-Net's converter lists them (hidden and AppleDouble ``._`` files left out)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz") and not f.startswith((".", "_")))


def read_msd_task(folder: str) -> MsdTask:
    """Check a Decathlon task folder before anything is converted; every error says what to fix.

    Raises:
        VarAugError: wrong folder name, missing subfolder or dataset.json, missing keys, listed files absent.
    """
    folder = os.path.abspath(folder.rstrip("/\\"))
    name = os.path.basename(folder)
    how = ("download and extract the task from http://medicaldecathlon.com (e.g. Task04_Hippocampus.tar) and pass "
           "the folder that holds imagesTr, labelsTr, imagesTs and dataset.json")
    if not os.path.isdir(folder):
        raise VarAugError(f"--msd {folder} is not a folder: {how}")
    m = re.fullmatch(r"Task(\d+)_([A-Za-z0-9]+)", name)
    if m is None:
        raise VarAugError(f"--msd folder '{name}' is not named like a Decathlon task 'TaskNN_Name' (e.g. "
                          f"Task04_Hippocampus, exactly one underscore): nnU-Net's converter takes the dataset id "
                          f"and name from it; rename the folder")
    missing = [s for s in ("imagesTr", "labelsTr", "imagesTs") if not os.path.isdir(os.path.join(folder, s))]
    if missing:
        nested = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d, "imagesTr"))]
        hint = f" (it holds {nested[0]}/: pass --msd {os.path.join(folder, nested[0])})" if nested else ""
        raise VarAugError(f"{folder} is not a Decathlon task folder: {', '.join(missing)} missing{hint}; {how}")
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise VarAugError(f"{path} is missing; {how}")
    try:
        with open(path) as f:
            dataset = json.load(f)
    except (OSError, ValueError) as e:
        raise VarAugError(f"{path} is not readable JSON ({e}); extract the task again") from None
    absent = [k for k in MSD_KEYS if k not in dataset]
    if absent:
        raise VarAugError(f"{path} lacks the Decathlon key(s) {', '.join(absent)} (a Decathlon dataset.json has "
                          f"'modality', 'labels' (index -> name), 'numTraining', 'training' and 'test'); this looks "
                          f"like {'an nnU-Net v2 dataset.json: use it with nnUNetv2_plan_and_preprocess directly' if 'channel_names' in dataset else 'a damaged file: extract the task again'}")
    labels = dataset["labels"]
    if not isinstance(labels, dict) or not all(str(k).isdigit() for k in labels) or "0" not in labels:
        raise VarAugError(f"{path}: 'labels' must map label values to names with '0' for background, e.g. "
                          f'{{"0": "background", "1": "Anterior"}}; got {labels}')
    training = dataset["training"]
    if not isinstance(training, list) or not training or not all(
            isinstance(e, dict) and "image" in e and "label" in e for e in training):
        raise VarAugError(f"{path}: 'training' must be a non-empty list of {{\"image\": …, \"label\": …}} entries")
    if int(dataset["numTraining"]) != len(training):
        raise VarAugError(f"{path}: numTraining is {dataset['numTraining']} but 'training' lists {len(training)} "
                          f"cases; fix numTraining or extract the task again")
    absent_files = [e[k] for e in training for k in ("image", "label")
                    if not os.path.isfile(os.path.join(folder, e[k]))]
    if absent_files:
        raise VarAugError(f"{len(absent_files)} file(s) listed in {path} are missing, e.g. {absent_files[0]}: "
                          f"the download is incomplete; extract the task again")
    labels_on_disk = nii_files(os.path.join(folder, "labelsTr"))
    if len(labels_on_disk) != len(training):
        raise VarAugError(f"{folder}/labelsTr holds {len(labels_on_disk)} label files but dataset.json lists "
                          f"{len(training)} training cases; remove stray files or extract the task again")
    return MsdTask(folder, int(m.group(1)), m.group(2), dataset)



def free_dataset_id(task: MsdTask) -> int:
    """A dataset id no nnU-Net folder uses yet, to suggest in messages (500 + the task's number if free)."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    for candidate in [500 + task.task_id, *range(500, 1000)]:
        if candidate <= 999 and len(find_candidate_datasets(candidate)) == 0:
            return candidate
    return 999


def check_dataset_id(task: MsdTask, dataset_id: int, dataset: str) -> None:
    """The target id must be free or hold this very task; the task must not be converted under another id.

    Args:
        task: the checked task folder.
        dataset_id, dataset: the nnU-Net id and name (``DatasetNNN_Name``) it is (to be) converted to.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    raw_folder = os.path.join(os.environ["nnUNet_raw"], dataset)
    taken = sorted(set(find_candidate_datasets(dataset_id)) - {dataset})
    if taken:
        raise VarAugError(f"dataset id {dataset_id} is taken by {taken[0]} (nnUNet_raw, nnUNet_preprocessed "
                          f"or nnUNet_results): pass -d with a free id to convert {task.folder_name} there, "
                          f"e.g. -d {free_dataset_id(task)}")
    others = sorted({os.path.basename(p) for root in ("nnUNet_raw", "nnUNet_preprocessed")
                     for p in glob.glob(os.path.join(os.environ[root], f"Dataset[0-9][0-9][0-9]_{task.name}"))
                     if os.path.basename(p) != dataset})
    if others and not os.path.isdir(raw_folder):
        other_id = dataset_id_of(others[0])
        raise VarAugError(f"{task.folder_name} was already converted as {others[0]}: benchmark that one with "
                          f"-d {other_id} (its preprocessed data and models are reused), or delete it to "
                          f"convert the task again under id {dataset_id}")
    if os.path.isfile(os.path.join(raw_folder, "dataset.json")):
        # the benchmark's held-out test cases sit in labelsHeldOut (benchmark/holdout.py): they are this task's too
        have = sorted(f[: -len(".nii.gz")] for sub in ("labelsTr", "labelsHeldOut")
                      if os.path.isdir(os.path.join(raw_folder, sub))
                      for f in nii_files(os.path.join(raw_folder, sub)))
        if have and have != task.training_cases:
            raise VarAugError(f"{raw_folder} holds other cases than {task.folder}/dataset.json lists "
                              f"(e.g. {sorted(set(have) ^ set(task.training_cases))[0]}): it is not this "
                              f"task; pass -d with a free id, e.g. -d {free_dataset_id(task)}")
