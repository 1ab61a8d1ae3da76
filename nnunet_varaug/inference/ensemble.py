"""The replica ensemble engine: M models (K replicas, of one fold or of several) predict the same preprocessed case,
their probabilities summed as they come.

Checks first (:func:`check_inputs`: replicas trained and from one plans/configuration, images with the dataset's
channels, labels on the images' grid, an output folder apart from the inputs). Each model's weights are read once
per run (:class:`Weights`, within a memory budget). Per case: preprocess once with nnU-Net's preprocessor, run
each model's network on the same data (:func:`predict_model`), turn its logits into probabilities in the input
grid with nnU-Net's own export code (``convert_predicted_logits_to_segmentation_with_correct_shape``, as
``nnUNetv2_predict --save_probabilities``), and add them to running sums
(:class:`~nnunet_varaug.evaluation.uncertainty.RunningEnsemble`). The consensus (:func:`consensus_of`) is nnU-Net's
``convert_probabilities_to_segmentation`` of the mean probability, as ``nnUNetv2_ensemble`` makes it: the argmax,
or for region-based datasets each region's mean sigmoid above 0.5, painted in ``regions_class_order``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import List, Optional, Sequence, Union

import numpy as np

from nnunet_varaug.evaluation import calibration, uncertainty
from nnunet_varaug.evaluation.chunked import label_dtype, row_chunks
from nnunet_varaug.inference.cases import Case, list_cases
from nnunet_varaug.inference.predictor import make_predictor, torch_device
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError

ENSEMBLE = "ensemble"
DEFAULT_WEIGHTS_GIB = 4.0
"""Memory for all models' network weights kept together (``predict --weights-memory``). float32: 4 bytes per
parameter; nnU-Net's default 3d_fullres U-Net has about 31 million parameters (125 MB), so 10 replicas take 1.25 GB."""


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


def check_inputs(experiments: Union[Experiment, Sequence[Experiment]], images: str, labels: Optional[str],
                 output: str, checkpoint: str):
    """(cases, checkpoint paths of every fold's replicas, fold by fold): every bad input raises VarAugError naming
    the fix; nothing is written."""
    experiments = [experiments] if isinstance(experiments, Experiment) else list(experiments)
    exp = experiments[0]
    dj = exp.dataset_json
    if labels is not None and dj.get("regions_class_order") is not None:
        require_label_based(dj, "-l (calibration)", "leave out -l")
    if not os.path.isdir(images or ""):
        raise VarAugError(f"-i {images}: no such folder of images (<case>_XXXX{dj['file_ending']})")
    for flag, folder in (("-i", images), ("-l", labels)):
        if folder is not None and same_folder_or_nested(output, folder):
            raise VarAugError(f"-o {output} is (or overlaps) the input folder {flag} {folder}: predictions must "
                              f"not mix with inputs. Choose another output folder, e.g. -o {os.path.abspath(images)}"
                              f"_predictions")
    paths = [p for e in experiments for p in check_replicas(e, checkpoint)]
    cases = list_cases(exp, images, labels)
    check_headers(cases, len(dj.get("channel_names", dj.get("modality", {}))))
    return cases, paths


def require_label_based(dataset_json: dict, what: str, instead: str) -> None:
    """Refuse ``what`` for a region-based dataset (calibration here is one-vs-rest over softmax labels)."""
    if dataset_json.get("regions_class_order") is not None:
        raise VarAugError(f"{what} is defined for label-based (softmax) datasets only, and this dataset is "
                          f"region-based (regions_class_order in dataset.json): {instead}")


def model_labels(experiments: Sequence[Experiment]) -> List[str]:
    """How tables name the models: the replica names for one fold, ``fold_<f>/<replica>`` for several."""
    if len(experiments) == 1:
        return list(experiments[0].replica_names)
    return [f"fold_{e.fold}/{n}" for e in experiments for n in e.replica_names]


# ---- the predictor and the models' weights ----------------------------------------------------------------------
def load_predictor(exp: Experiment, first: str, checkpoint: str, device: str, tta: bool, step_size: float,
                   verbose: bool = False):
    """nnU-Net's ``nnUNetPredictor`` for the first replica's folder (its plans, preprocessing and network), with
    ``nnUNetv2_predict``'s CPU thread setting."""
    import torch

    dev = torch_device(device)
    if dev.type == "cpu":  # as nnUNetv2_predict does
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
    predictor = make_predictor(exp, first, dev, tta=tta, who="predict", checkpoint=checkpoint, step_size=step_size)
    predictor.verbose = verbose
    return predictor


def state_bytes(state: dict) -> int:
    """Bytes of a state dict's tensors, each storage counted once (nnU-Net's U-Net decoder holds the encoder, so
    its state dict names every encoder tensor twice)."""
    seen, total = set(), 0
    for t in state.values():
        if hasattr(t, "untyped_storage"):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def read_network_weights(path: str) -> dict:
    """A checkpoint's ``network_weights``, copied into memory (tensors that share storage stay shared); the rest
    (optimizer state, logs) is memory-mapped by ``torch.load(mmap=True)`` and never read."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format checkpoint (legacy torch.save): read it whole
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    copies, weights = {}, {}
    for name, t in checkpoint["network_weights"].items():
        if not hasattr(t, "untyped_storage"):
            weights[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in copies:
            copies[key] = t.clone()
        weights[name] = copies[key]
    del checkpoint
    return weights


class Weights:
    """The models' network weights, each read from its checkpoint once per run when all fit the budget.

    ``resident``: ``models x bytes of one network's weights <= budget`` (the weights' own size, never the
    checkpoint file's, which holds the optimizer state too). Then every model is kept after its first read.
    Otherwise only the model last asked for is kept, and the caller goes model by model over a batch of cases
    (:mod:`nnunet_varaug.inference.schedule`), so that each model is read once per batch. ``loads`` counts the
    reads per checkpoint. ``first``: model 0's weights when nnU-Net's predictor has already read them.
    """

    def __init__(self, paths: List[str], budget_bytes: float = DEFAULT_WEIGHTS_GIB * 2 ** 30,
                 first: Optional[dict] = None) -> None:
        from collections import Counter

        self.paths = list(paths)
        self.budget = float(budget_bytes)
        self.loads: Counter = Counter()
        w0 = first if first is not None else self.read(0)
        self.model_bytes = state_bytes(w0)
        self.resident = self.model_bytes * len(self.paths) <= self.budget
        self.cache = {0: w0}

    def read(self, k: int) -> dict:
        self.loads[self.paths[k]] += 1
        return read_network_weights(self.paths[k])

    def __getitem__(self, k: int) -> dict:
        if k not in self.cache:
            if not self.resident:
                self.cache.clear()
            self.cache[k] = self.read(k)
        return self.cache[k]

    def describe(self) -> str:
        total = self.model_bytes * len(self.paths) / 2 ** 30
        how = "all kept in memory" if self.resident else "over the budget: model by model over batches of cases"
        return (f"{len(self.paths)} models x {self.model_bytes / 2 ** 20:.1f} MiB of network weights = {total:.2f} "
                f"GiB, budget {self.budget / 2 ** 30:.2f} GiB: {how}")


# ---- one model on one case ----------------------------------------------------------------------------------------
def preprocess(predictor, images: List[str], verbose: bool = False):
    """(data tensor, properties): nnU-Net's preprocessor of the predictor's configuration, as nnUNetv2_predict."""
    import torch

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        data, _, props = cm.preprocessor_class(verbose=verbose).run_case(images, None, pm, cm,
                                                                          predictor.dataset_json)
    return torch.from_numpy(data), props


def predict_model(predictor, weights: Weights, k: int, label: str, case: str, data, props):
    """Model ``k`` on one preprocessed case: (probabilities, label map) in the input image's grid, as
    ``nnUNetv2_predict --save_probabilities`` exports them."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    predictor.list_of_parameters = [weights[k]]
    try:
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
    except RuntimeError as e:
        raise VarAugError(f"predicting {case} with {label} failed: {str(e).splitlines()[0]}") from None
    seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props, True)
    del logits
    return probs, seg


def consensus_of(label_manager, mean: np.ndarray) -> np.ndarray:
    """nnU-Net's ``convert_probabilities_to_segmentation`` of the mean probability (as ``nnUNetv2_ensemble``),
    row chunk by row chunk; uint8 (uint16 beyond 255 labels)."""
    out = np.zeros(mean.shape[1:], dtype=label_dtype(max(label_manager.all_labels)))
    for a, b in row_chunks(mean.shape[1:], mean.shape[0]):
        seg = label_manager.convert_probabilities_to_segmentation(np.ascontiguousarray(mean[:, a:b]))
        out[a:b] = np.asarray(seg.cpu().numpy() if hasattr(seg, "cpu") else seg)
    return out


def add_calibration(counts: "calibration.CalibrationCounts", model: str, probabilities: np.ndarray,
                    gt: np.ndarray, ignore: Optional[int], spacing: Optional[Sequence[float]] = None) -> None:
    """Add one model's probabilities of a case to the calibration counts, row chunk by row chunk (the counts are
    sums over voxels). With ``spacing`` the ``roi`` scope too: :func:`calibration.model_roi
    <nnunet_varaug.evaluation.calibration.model_roi>`'s region, its argmax taken chunk by chunk."""
    roi = None
    if spacing is not None:
        labels = np.asarray(counts.labels)
        foreground = np.zeros(gt.shape, dtype=bool)
        for a, b in row_chunks(gt.shape, probabilities.shape[0] * 8):
            foreground[a:b] = labels[np.argmax(probabilities[:, a:b], axis=0)] != labels[0]
        foreground |= (gt != labels[0]) if ignore is None else (gt != labels[0]) & (gt != ignore)
        roi = calibration.roi_mask(foreground, spacing)
        del foreground
    for a, b in row_chunks(gt.shape, probabilities.shape[0] * 8):
        counts.add(model, probabilities[:, a:b], gt[a:b], ignore, None if roi is None else roi[a:b])


def ensemble_case(predictor, weights: Weights, case: Case, names: List[str], gt: Optional[np.ndarray] = None,
                  ignore: Optional[int] = None):
    """Preprocess once, predict with each model, accumulate (label maps in memory). Returns (ensemble, mean
    probability, consensus, properties, calibration counts or None)."""
    lm = predictor.label_manager
    if gt is not None:
        require_label_based(predictor.dataset_json, "calibration", "leave out the labels")
    data, props = preprocess(predictor, case.images)
    cal = None if gt is None else calibration.CalibrationCounts(lm.all_labels)
    ens = uncertainty.RunningEnsemble(regions=lm.has_regions)
    for k, name in enumerate(names):
        probs, seg = predict_model(predictor, weights, k, name, case.name, data, props)
        if cal is not None:
            add_calibration(cal, name, probs, gt, ignore, props["spacing"])
        ens.add(probs, seg, own=True)
        del probs, seg
    mean = ens.finish()
    consensus = consensus_of(lm, mean)
    if cal is not None:
        add_calibration(cal, ENSEMBLE, mean, gt, ignore, props["spacing"])
    return ens, mean, consensus, props, cal
