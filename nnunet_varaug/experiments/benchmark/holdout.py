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

from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.experiments.benchmark.task import nii_files
from nnunet_varaug.utilities.fileio import write_json

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


# ---- the benchmark's two stages before and after planning -----------------------------------------------------------
def training_cases(bench) -> List[str]:
    """The task's cases that nnU-Net may plan, preprocess, train and validate on (all but the test split)."""
    test = set(bench.test_cases)
    return [c for c in bench.task.training_cases if c not in test]


def run_holdout(bench) -> None:
    """Move the test split out of imagesTr/labelsTr; refuse when nnU-Net already planned with it inside."""
    fingerprint = os.path.join(bench.preprocessed_base, "dataset_fingerprint.json")
    if os.path.isfile(fingerprint):
        raise VarAugError(f"{bench.preprocessed_base} was planned before the test split was held out (its "
                          f"fingerprint has seen the test cases): remove {bench.preprocessed_base} and rerun, so that "
                          f"no plan or preprocessing step sees the test split")
    hold_out(bench.raw_folder, bench.test_cases)


def holdout_done(bench) -> bool:
    return is_held_out(bench.raw_folder, bench.test_cases, bench.task.training_cases)


def check_preprocessed_without_test(bench, cases: Sequence[str]) -> None:
    """Raise if the preprocessed data or nnU-Net's fingerprint saw a test case."""
    leaked = sorted(set(cases) & set(bench.test_cases))
    fingerprint = os.path.join(bench.preprocessed_base, "dataset_fingerprint.json")
    seen = None
    if os.path.isfile(fingerprint):
        with open(fingerprint) as f:
            seen = len(json.load(f).get("spacings", []))
    if leaked or (seen is not None and seen != len(training_cases(bench))):
        raise VarAugError(f"{bench.preprocessed_base} was planned or preprocessed with the held-out test case(s) "
                          f"{', '.join(leaked[:3]) or f'(the fingerprint counts {seen} cases)'}: remove it and rerun "
                          f"the benchmark, so that plan_preprocess runs after the test split is held out")


def preprocessed_done(bench) -> bool:
    """Plans with the configuration, and exactly the training cases preprocessed (refused: a test case)."""
    layout = bench.layout
    if not os.path.isfile(layout.plans_file):
        return False
    configurations = layout.plans_json["configurations"]
    if bench.configuration not in configurations:
        raise VarAugError(f"configuration '{bench.configuration}' is not in {layout.plans_file} (nnU-Net planned: "
                          f"{', '.join(sorted(configurations))}): pass one of them with -c")
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = layout.preprocessed_folder
    if not os.path.isdir(folder):
        return False
    cases = infer_dataset_class(folder).get_identifiers(folder)
    gt = os.path.join(layout.preprocessed_base, "gt_segmentations")
    gt_cases = [f[: -len(".nii.gz")] for f in nii_files(gt)] if os.path.isdir(gt) else []
    check_preprocessed_without_test(bench, list(cases) + gt_cases)
    want = sorted(training_cases(bench))
    return sorted(cases) == want and sorted(gt_cases) == want


def splits_path(bench) -> str:
    from nnunet_varaug.utilities import folds

    return os.path.join(bench.preprocessed_base, folds.SPLITS_FILE)


def splits_done(bench) -> bool:
    """splits_final.json is a ``--folds``-fold split of exactly the training cases."""
    from nnunet_varaug.utilities import folds

    path = splits_path(bench)
    if not os.path.isfile(path):
        return False
    splits = folds.read_splits(path)
    folds.check_excluded(splits, bench.test_cases)
    try:
        folds.check_cross_validation(splits, training_cases(bench))
    except VarAugError:
        return False
    return len(splits) == bench.num_folds


def run_splits(bench) -> None:
    """Write nnU-Net's K-fold split of the training cases (``generate_crossval_split``, seed 12345, as nnU-Net)
    unless one is there; an existing one with other folds is refused, never overwritten."""
    from nnunet_varaug.utilities import folds

    path = splits_path(bench)
    if os.path.isfile(path):
        splits = folds.read_splits(path)
        folds.check_excluded(splits, bench.test_cases)
        raise VarAugError(f"{path} exists but is not a {bench.num_folds}-fold split of the "
                          f"{len(training_cases(bench))} "
                          f"training cases (it has {len(splits)} folds): pass --folds {len(splits)} to use it, or "
                          f"remove it (and the models trained on it) to let the benchmark write its own")
    folds.write_splits(path, folds.crossval_splits(training_cases(bench), bench.num_folds), held_out=bench.test_cases)
