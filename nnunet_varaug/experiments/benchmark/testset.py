"""Models on the benchmark's held-out test split: nnU-Net's predictor, a majority vote, nnU-Net's metrics.

Each model (a trained ``fold_F`` folder) predicts the raw test images with ``nnUNetPredictor`` (the class behind
``nnUNetv2_predict``, with its defaults: mirroring, Gaussian weighting, step 0.5), and nnU-Net's
``compute_metrics_on_folder`` evaluates the predictions against the test labels. Predictions are cached per model
with the checkpoint's sha256: a retrained model is predicted again, an unchanged one is not.

``compute_metrics_on_folder`` starts a "spawn" process pool on every call, and a spawned process imports torch
and nnU-Net again (3 to 5 s on a small CPU) to evaluate a few cases in milliseconds; the benchmark evaluates a
dozen folders. :func:`evaluate_folder` therefore runs it with that pool in this process
(:func:`nnunet_varaug.utilities.inprocess.pools_in_this_process`): the same function on each case (nnU-Net's
``compute_metrics``) and the same summary code, so the same numbers and summary file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from typing import Dict, List, Sequence

import numpy as np

from nnunet_varaug.inference.predictor import nnunet_predictor, torch_device
from nnunet_varaug.utilities.fileio import file_sha256, write_json
from nnunet_varaug.utilities.inprocess import pools_in_this_process

STAMP = "predicted_by.json"


def test_cases(images: str, ending: str) -> List[str]:
    """Case names of the ``<case>_0000<ending>`` files in ``images``."""
    tail = "_0000" + ending
    return sorted(f[: -len(tail)] for f in os.listdir(images) if f.endswith(tail) and not f.startswith("."))


def predict_folder(model_folder: str, fold, images: str, output: str, device: str = "cuda",
                   checkpoint: str = "checkpoint_final.pth") -> str:
    """Predict every image of ``images`` with ``model_folder``'s ``fold_<fold>`` into ``output``; return it.

    Skipped when ``output`` holds a prediction of every case made from the same checkpoint (sha256).
    """
    path = os.path.join(model_folder, f"fold_{fold}", checkpoint)
    stamp = {"checkpoint": path, "sha256": file_sha256(path), "images": os.path.abspath(images)}
    with open(os.path.join(model_folder, "dataset.json")) as f:
        ending = json.load(f)["file_ending"]
    cases = test_cases(images, ending)
    stamp_path = os.path.join(output, STAMP)
    if os.path.isfile(stamp_path) and all(os.path.isfile(os.path.join(output, c + ending)) for c in cases):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return output
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)
    predictor = nnunet_predictor(model_folder, fold, torch_device(device), checkpoint=checkpoint)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.predict_from_files_sequential(images, output, save_probabilities=False, overwrite=True)
    write_json(stamp_path, stamp)
    return output


def majority_vote(folders: Sequence[str], cases: Sequence[str], output: str, reader_writer, ending: str,
                  labels: Sequence[int]) -> str:
    """Per voxel the label most of ``folders``' predictions give (ties: the smaller label), one file per case."""
    from nnunet_varaug.evaluation.voting import voxel_maps

    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)
    for case in cases:
        segs, props = [], None
        for folder in folders:
            seg, p = reader_writer.read_seg(os.path.join(folder, case + ending))
            segs.append(seg[0])
            props = props or p
        vote = voxel_maps(np.stack(segs), sorted(int(v) for v in labels))[0]
        reader_writer.write_seg(vote.astype(np.uint8 if max(labels) < 256 else np.int16),
                                os.path.join(output, case + ending), props)
    return output


def evaluate_folder(labels: str, predictions: str, output_file: str, reader_writer, ending: str, keys,
                    ignore_label, cases: Sequence[str]) -> Dict[str, object]:
    """nnU-Net's ``compute_metrics_on_folder`` of ``predictions`` against ``labels``, summarized as
    ``{"dice": {key: mean Dice}, "foreground_mean", "num_cases"}``; refuses a result that misses a case."""
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, label_or_region_to_key

    with pools_in_this_process(evaluate_predictions):
        result = compute_metrics_on_folder(labels, predictions, output_file, reader_writer, ending, keys,
                                           ignore_label, num_processes=1)
    evaluated = sorted(os.path.basename(c["prediction_file"])[: -len(ending)] for c in result["metric_per_case"])
    if evaluated != sorted(cases):
        raise RuntimeError(f"{output_file} covers {evaluated}, expected {sorted(cases)}")
    return {"dice": {label_or_region_to_key(k): float(result["mean"][k]["Dice"]) for k in keys},
            "foreground_mean": float(result["foreground_mean"]["Dice"]), "num_cases": len(evaluated)}


def group_variability(folders: Sequence[str], cases: Sequence[str], reader_writer, ending: str,
                      dataset_json: dict) -> Dict[str, Dict[str, float]]:
    """How much K models (one prediction folder each) disagree on the same cases, per structure.

    Per case: the mean Dice over the K(K-1)/2 pairs of models, and the coefficient of variation (sd with ddof=1
    over mean) and sd of the structure's volume in mm³ across the K models; then the mean over cases. The same
    metrics as ``analyze`` (``variability.pairwise_dice``, ``volume_stats.volume_spread``). Returns
    ``{structure key: {"name", "pairwise_dice", "min_pairwise_dice", "volume_cv", "volume_sd_mm3"}}``.
    """
    from nnunet_varaug.evaluation.variability import pair_indices, pairwise_dice, structures_from_dataset_json
    from nnunet_varaug.evaluation.volume_stats import volume_spread

    structures = structures_from_dataset_json(dataset_json)
    dice, low, cv, sd = [], [], [], []
    for case in cases:
        maps, spacing = [], None
        for folder in folders:
            seg, props = reader_writer.read_seg(os.path.join(folder, case + ending))
            maps.append(seg[0])
            spacing = props["spacing"]
        maps = np.stack(maps)
        matrix = pairwise_dice(maps, structures)
        pairs = pair_indices(len(folders))
        per_pair = np.array([[matrix[s, a, b] for a, b in pairs] for s in range(len(structures))])
        dice.append(per_pair.mean(axis=1))
        low.append(per_pair.min(axis=1))
        voxel = float(np.prod(spacing))
        volumes = np.array([[np.isin(m, s.labels).sum() * voxel for s in structures] for m in maps])
        spread = volume_spread(volumes)
        cv.append(spread["cv"])
        sd.append(spread["std"])
    out = {}
    for j, s in enumerate(structures):
        out[s.key] = {"name": s.name, "pairwise_dice": float(np.mean([d[j] for d in dice])),
                      "min_pairwise_dice": float(np.min([d[j] for d in low])),
                      "volume_cv": float(np.nanmean([c[j] for c in cv])) if any(np.isfinite(c[j]) for c in cv)
                      else float("nan"),
                      "volume_sd_mm3": float(np.mean([v[j] for v in sd]))}
    return out
