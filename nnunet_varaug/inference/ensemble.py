"""The replica ensemble engine: K replicas of one experiment predict the same preprocessed case, their
probabilities summed as they come.

Checks first (:func:`check_inputs`: replicas trained and from one plans/configuration, images with the dataset's
channels, labels on the images' grid, an output folder apart from the inputs); then per case
(:func:`ensemble_case`): preprocess once with nnU-Net's preprocessor, run each replica's network on the same data,
turn each replica's logits into probabilities in the input grid with nnU-Net's own export code
(``convert_predicted_logits_to_segmentation_with_correct_shape``, as ``nnUNetv2_predict --save_probabilities``),
and add them to running sums (:class:`~nnunet_varaug.evaluation.uncertainty.RunningEnsemble`). The consensus is
the argmax of the mean probability, as ``nnUNetv2_ensemble`` makes it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import List, Optional

import numpy as np

from nnunet_varaug.evaluation import calibration, uncertainty
from nnunet_varaug.inference.cases import Case, list_cases
from nnunet_varaug.inference.predictor import make_predictor, torch_device
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError

ENSEMBLE = "ensemble"
WEIGHT_CACHE_BYTES = 256 << 20
"""Replica weights are kept in memory when all checkpoints together are smaller; else read per case."""


# ---- checks (nothing is written before they pass) ----------------------------------------------------------------
def same_folder_or_nested(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def check_replicas(exp: Experiment, checkpoint: str) -> List[str]:
    """Checkpoint paths of the K replicas; all must exist and share the first replica's plans and dataset.json."""
    names = exp.replica_names
    paths = [os.path.join(exp.fold_folder(n), checkpoint) for n in names]
    missing = [n for n, p in zip(names, paths) if not os.path.isfile(p)]
    if missing:
        raise VarAugError(f"{len(missing)} of {len(names)} replicas have no {checkpoint} for {exp.dataset} "
                          f"{exp.configuration} fold {exp.fold}: {', '.join(missing)}. Train them with "
                          f"`nnunet_varaug replicas {exp.flags}`, or lower -n")
    ref = None
    for name in names:
        folder = exp.model_folder(name)
        with open(os.path.join(folder, "plans.json")) as f:
            plans = json.load(f)
        with open(os.path.join(folder, "dataset.json")) as f:
            labels = json.load(f)["labels"]
        key = (plans.get("plans_name"), json.dumps(plans["configurations"].get(exp.configuration), sort_keys=True),
               plans.get("transpose_forward"), json.dumps(labels, sort_keys=True))
        if ref is None:
            ref = (name, key)
        elif key != ref[1]:
            raise VarAugError(f"replica {name} was trained with other plans, configuration or labels than "
                              f"{ref[0]} ({os.path.join(folder, 'plans.json')} differs): the replicas of one "
                              f"ensemble must share them. Retrain it: delete {exp.fold_folder(name)} and run "
                              f"`nnunet_varaug replicas {exp.flags}`")
    return paths


def check_headers(cases: List[Case], channels: int) -> None:
    """Images with one component per file (nnU-Net's convention) and labels on their grid (header reads only)."""
    import SimpleITK as sitk

    def info(path: str):
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
        return r.GetNumberOfComponents(), r.GetSize()

    for case in cases:
        if not case.images[0].endswith((".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")):
            return  # other formats: nnU-Net's reader checks them
        for path in case.images:
            comps, size = info(path)
            if comps != 1:
                raise VarAugError(f"{path} holds {comps} channels in one file; nnU-Net expects one file per channel "
                                  f"(<case>_0000, <case>_0001, ...; this dataset has {channels}). Split it into "
                                  f"one file per channel")
        if case.label is not None and info(case.label)[1] != info(case.images[0])[1]:
            raise VarAugError(f"label {case.label} has size {info(case.label)[1]}, its image "
                              f"{info(case.images[0])[1]}: it is not the label of {case.name}. Fix -l")


def check_inputs(exp: Experiment, images: str, labels: Optional[str], output: str, checkpoint: str):
    """(cases, checkpoint paths): every bad input raises VarAugError naming the fix; nothing is written."""
    dj = exp.dataset_json
    if dj.get("regions_class_order") is not None:
        raise VarAugError(f"{exp.dataset} is region-based: predict's consensus and entropy are defined for "
                          f"label-based (softmax) datasets only")
    if not os.path.isdir(images or ""):
        raise VarAugError(f"-i {images}: no such folder of images (<case>_XXXX{dj['file_ending']})")
    for flag, folder in (("-i", images), ("-l", labels)):
        if folder is not None and same_folder_or_nested(output, folder):
            raise VarAugError(f"-o {output} is (or overlaps) the input folder {flag} {folder}: predictions must "
                              f"not mix with inputs. Choose another output folder, e.g. -o {os.path.abspath(images)}"
                              f"_predictions")
    paths = check_replicas(exp, checkpoint)
    cases = list_cases(exp, images, labels)
    check_headers(cases, len(dj.get("channel_names", dj.get("modality", {}))))
    return cases, paths


# ---- the predictor ------------------------------------------------------------------------------------------------
def load_predictor(exp: Experiment, first: str, checkpoint: str, device: str, tta: bool, step_size: float):
    """nnU-Net's ``nnUNetPredictor`` for the first replica's folder (its plans, preprocessing and network), with
    ``nnUNetv2_predict``'s CPU thread setting."""
    import torch

    dev = torch_device(device)
    if dev.type == "cpu":  # as nnUNetv2_predict does
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
    return make_predictor(exp, first, dev, tta=tta, who="predict", checkpoint=checkpoint, step_size=step_size)


class Weights:
    """Replica weights, all in memory when small (:data:`WEIGHT_CACHE_BYTES`), else read from disk when used."""

    def __init__(self, paths: List[str]) -> None:
        self.paths = paths
        self.cache = {} if sum(os.path.getsize(p) for p in paths) <= WEIGHT_CACHE_BYTES else None

    def __getitem__(self, k: int) -> dict:
        import torch

        if self.cache is not None and k in self.cache:
            return self.cache[k]
        w = torch.load(self.paths[k], map_location="cpu", weights_only=False)["network_weights"]
        if self.cache is not None:
            self.cache[k] = w
        return w


# ---- one case -----------------------------------------------------------------------------------------------------
def ensemble_case(predictor, weights: Weights, case: Case, names: List[str], gt: Optional[np.ndarray] = None,
                  ignore: Optional[int] = None):
    """Preprocess once, predict with each replica, accumulate. Returns (ensemble, mean probability, consensus,
    properties, calibration counts or None)."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    pm, cm, dj, lm = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json, \
        predictor.label_manager
    with contextlib.redirect_stdout(io.StringIO()):
        data, _, props = cm.preprocessor_class(verbose=False).run_case(case.images, None, pm, cm, dj)
    data = torch.from_numpy(data)
    cal = None if gt is None else calibration.CalibrationCounts(lm.all_labels)
    ens = uncertainty.RunningEnsemble()
    for k, name in enumerate(names):
        predictor.list_of_parameters = [weights[k]]
        try:
            logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
        except RuntimeError as e:
            raise VarAugError(f"predicting {case.name} with {name} failed: {str(e).splitlines()[0]}") from None
        seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, props, True)
        del logits
        ens.add(probs, seg)
        if cal is not None:
            cal.add(name, probs, gt, ignore)
        del probs, seg
    mean = ens.mean()
    consensus = lm.convert_probabilities_to_segmentation(mean)
    consensus = np.asarray(consensus.cpu().numpy() if hasattr(consensus, "cpu") else consensus)
    if cal is not None:
        cal.add(ENSEMBLE, mean, gt, ignore)
    return ens, mean, consensus, props, cal
