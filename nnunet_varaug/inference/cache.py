"""The replicas' predictions of a set of cases, cached in a folder: ``OUT/predictions/<replica>/<case><ending>``.

Each replica's folder holds ``varaug_predictions.json``: the checkpoint's sha256, the test-time augmentation
setting and step size, and per case the sha256 of the input files it was predicted from (their content, not their
path: an image replaced under the same name is predicted again, a moved one is not); a prediction is made again
when any of them changes. While a case's probabilities exist, each kind's entropy sum, calibration counts and
temperature NLL sums are gathered too (:mod:`.replica_stats`). Every case is preprocessed once with nnU-Net's preprocessor and predicted by each replica in turn with
nnU-Net's ``nnUNetPredictor`` (its weights swapped in), then exported exactly as ``nnUNetv2_predict`` exports it.
Each kind's mean predicted probabilities per case are kept for majority-vote ties (:mod:`.probsums`).
``analyze`` reads its predictions from here; so can any command that compares replicas.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation import variability
from nnunet_varaug.inference import probsums, replica_stats
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.inference.predictor import make_predictor, torch_device
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities import names
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import file_sha256, replacing, write_json

PREDICTIONS = "predictions"
FINGERPRINT = "varaug_predictions.json"


def image_hashes(cases: Sequence[Case]) -> Dict[str, list]:
    """``case -> sha256 of each image file``: what a cached prediction is keyed by."""
    return {c.name: [file_sha256(p) for p in c.images] for c in cases}


def prediction_state(exp: Experiment, name: str, folder: str, cases: Sequence[Case], ending: str,
                     tta: bool = True, step_size: float = 0.5, hashes: Optional[Dict[str, list]] = None) -> tuple:
    """(identity, fingerprint dict, cases still to predict). Stale predictions (other checkpoint, other test-time
    augmentation or step size, other image content) go. The identity is the checkpoint's sha256, marked when TTA is
    off or the step size is not 0.5, so that the mean probabilities of :mod:`probsums` are tied to all three."""
    sha = file_sha256(exp.final_checkpoint(name))
    hashes = image_hashes(cases) if hashes is None else hashes
    path = os.path.join(folder, FINGERPRINT)
    record = {"checkpoint_sha256": sha, "tta": tta, "step_size": step_size, "trainer": name, "cases": {}}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if (old.get("checkpoint_sha256") == sha and old.get("tta", True) == tta
                and old.get("step_size", 0.5) == step_size):
            record["cases"] = old.get("cases", {})
    todo = [c for c in cases if record["cases"].get(c.name) != hashes[c.name]
            or not os.path.isfile(os.path.join(folder, c.name + ending))]
    identity = sha + ("" if tta else "+no-tta") + ("" if step_size == 0.5 else f"+step{step_size:g}")
    return identity, record, todo


def predict_replicas(experiments: Sequence[Experiment], cases: Sequence[Case], output: str, device: str = "cuda",
                     progress: bool = True, reference: Optional[str] = None, tta: bool = True,
                     step_size: float = 0.5, calibrate: bool = False) -> Dict[str, str]:
    """Predict every replica on every case with nnU-Net's ``nnUNetPredictor``, reusing valid cached predictions.

    Also keeps each kind's mean predicted probabilities per case (:mod:`probsums`, for the vote's tie-break;
    not for region-based datasets) and predicts the ``reference`` model (``<Base>_ieee``) if given. ``tta``:
    mirroring test-time augmentation, on by default as in ``nnUNetv2_predict`` (``--disable_tta`` turns it off);
    ``step_size``: the sliding window's step (``-step_size``). With ``calibrate``, the labelled cases' calibration
    counts and temperature NLL sums are gathered while the probabilities exist (:mod:`.replica_stats`); a case
    without them is predicted again.

    Returns ``replica -> folder`` of its predictions (``OUT/predictions/<replica>/<case><file_ending>``), in the
    input image's grid exactly as ``nnUNetv2_predict`` writes them.
    """
    from tqdm import tqdm

    ending = experiments[0].dataset_json["file_ending"]
    keep_probs = not variability.has_regions(experiments[0].dataset_json)
    hashes = image_hashes(cases)
    folders, plans = _plan_predictions(experiments, cases, output, reference, ending, tta, step_size, hashes,
                                       keep_probs, calibrate)
    total = sum(len(t[2]) for _, jobs, _, _ in plans for t in jobs.values())
    bar = tqdm(total=total, desc="predicting", unit="prediction", disable=not progress or total == 0)
    dev = torch_device(device) if total else None
    for exp, jobs, stale, shas in plans:
        _predict_experiment(exp, jobs, stale, shas, cases, output, dev, tta, step_size, ending, hashes, calibrate,
                            bar)
    bar.close()
    return folders


def _plan_predictions(experiments: Sequence[Experiment], cases: Sequence[Case], output: str, reference: Optional[str],
                      ending: str, tta: bool, step_size: float, hashes: dict, keep_probs: bool, calibrate: bool):
    """What :func:`predict_replicas` must predict: ``replica -> folder``, and per experiment with work left
    ``(exp, jobs, stale, shas)``: ``jobs`` ``replica -> (folder, record, cases to predict, sha)``, ``stale`` the cases
    whose probability sum and replica statistics must be made again (every replica predicted), ``shas`` the
    replicas' checkpoint hashes."""
    folders, plans = {}, []
    for i, exp in enumerate(experiments):
        state = {}
        for name in exp.replica_names + ([reference] if reference and i == 0 else []):
            folders[name] = os.path.join(output, PREDICTIONS, name)
            sha, record, todo = prediction_state(exp, name, folders[name], cases, ending, tta, step_size, hashes)
            state[name] = (folders[name], record, {c.name for c in todo}, sha)
        shas = {n: state[n][3] for n in exp.replica_names}
        stale = {c.name for c in cases if keep_probs and not (
            probsums.is_current(output, exp.kind, c.name, shas)
            and replica_stats.is_current(output, exp.kind, c.name, stats_identity(shas, hashes[c.name], c),
                                         calibrate and c.label is not None))}
        for n in exp.replica_names:  # the probability sum needs every replica of the case
            state[n][2].update(stale)
        jobs = {n: st for n, st in state.items() if st[2]}
        if jobs:
            plans.append((exp, jobs, stale, shas))
    return folders, plans


def _predict_experiment(exp: Experiment, jobs: dict, stale: set, shas: Dict[str, str], cases: Sequence[Case],
                        output: str, dev, tta: bool, step_size: float, ending: str, hashes: dict, calibrate: bool,
                        bar) -> None:
    """One experiment's planned predictions (:func:`_plan_predictions`): each case preprocessed once, then every
    replica's weights in turn; the probability sum and replica statistics saved for the stale cases."""
    import torch

    predictor = make_predictor(exp, exp.replica_names[0], dev, tta=tta, who="analyze", step_size=step_size)
    weights = {n: torch.load(exp.final_checkpoint(n), map_location="cpu",
                             weights_only=False)["network_weights"] for n in jobs}
    for folder, record, _, _ in jobs.values():
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, FINGERPRINT), record)  # drops entries of a stale checkpoint first
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    reader = predictor.plans_manager.image_reader_writer_class()
    ignore = variability.ignore_label(exp.dataset_json)
    for case in cases:
        names = [n for n in jobs if case.name in jobs[n][2]]
        if not names:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, props = preprocessor.run_case(case.images, None, predictor.plans_manager,
                                                   predictor.configuration_manager, predictor.dataset_json)
        data = torch.from_numpy(data)
        summed, stats = None, None
        if case.name in stale:
            gt = None if not (calibrate and case.label) else reader.read_seg(case.label)[0][0]
            stats = replica_stats.Accumulator(predictor.label_manager.all_labels, gt, ignore, props["spacing"],
                                              calibrate)
        for name in names:
            folder, record, _, _ = jobs[name]
            want = case.name in stale and name in shas
            probs = predict_one(predictor, weights[name], data, props, folder, case.name, ending, want)
            if want:
                summed = probs if summed is None else summed + probs
                stats.add(name, probs)
                del probs
            record["cases"][case.name] = hashes[case.name]
            write_json(os.path.join(folder, FINGERPRINT), record)
            bar.update(1)
        if summed is not None:
            probsums.save(output, exp.kind, case.name, summed, shas)
            stats.add_ensemble(probsums.load(output, exp.kind, case.name))
            stats.save(output, exp.kind, case.name, stats_identity(shas, hashes[case.name], case))


def stats_identity(shas: Dict[str, str], images: list, case: Case) -> dict:
    """What a case's :mod:`.replica_stats` depend on: the replicas (checkpoints, TTA, step size), the images' and
    the label's content."""
    return {"replicas": dict(shas), "images": list(images),
            "label": file_sha256(case.label) if case.label else None}


def predict_one(predictor, weights: dict, data, props: dict, folder: str, case: str, ending: str,
                 probabilities: bool = False) -> Optional[np.ndarray]:
    """Write one prediction as ``nnUNetv2_predict`` does (``export_prediction_from_logits``' two steps); return
    the probabilities in the image's grid when asked."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    predictor.list_of_parameters = [weights]
    try:
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
    except RuntimeError as e:
        raise VarAugError(f"predicting {case} failed: {str(e).splitlines()[0]}") from None
    label_manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    out = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, label_manager, props,
        return_probabilities=probabilities)
    seg, probs = out if probabilities else (out, None)
    with replacing(os.path.join(folder, case + ending), ending) as tmp:
        predictor.plans_manager.image_reader_writer_class().write_seg(seg, tmp, props)
    return None if probs is None else np.asarray(probs, dtype=np.float32)


def reader_for(dataset_json: dict, example: str):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    with contextlib.redirect_stdout(io.StringIO()):
        return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)()


def load_maps(rw, files: Sequence[str], case: str, out: str):
    """``(K, *spatial)`` label maps of one case, the first file's properties; shapes must agree.

    Each map is narrowed to uint8/uint16 as soon as it is read (readers return float32: 4x the memory).
    """
    arrays, props = [], None
    for f in files:
        seg, p = rw.read_seg(f)
        seg = seg[0]
        if props is None:
            props = p
        if seg.size and (seg.min() < 0 or not np.array_equal(seg, np.rint(seg))):
            raise VarAugError(f"{f} is not a label map (it holds negative or non-integer values); delete it and "
                              f"run the command again to predict it again")
        arrays.append(seg.astype(np.uint8 if seg.size == 0 or seg.max() < 256 else np.uint16))
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        listing = ", ".join(f"{os.path.relpath(f, out)} {tuple(a.shape)}" for f, a in zip(files, arrays))
        raise VarAugError(f"the replicas' predictions of {case} have different shapes ({listing}); delete the wrong "
                          f"one(s) and run the command again to predict them again")
    return np.stack(arrays), props


def reference_model(exp: Experiment, kinds: Sequence[str]) -> Optional[str]:
    """``<Base>_ieee`` when its final checkpoint exists (the unperturbed twin of numerical replicas), else None;
    with ``--kind mca`` and no such model, a note says how to train it."""
    name = names.replica_name(exp.base, "ieee")
    if os.path.isfile(exp.final_checkpoint(name)):
        return name
    if "mca" in kinds:
        print(f"note: no {name} model (fold {exp.fold}): significant digits use the replicas' mean as reference; "
              f"train it with `nnUNetv2_train {exp.dataset} {exp.configuration} {exp.fold} -tr {name}`",
              file=sys.stderr)
    return None
