"""The ``evaluate`` stage of ``nnunet_varaug benchmark``: per-label Dice of every model on the fold's validation cases.

All numbers come from nnU-Net's ``compute_metrics_on_folder`` against ``gt_segmentations``: the baseline's, each
replica's and the ``_varaug`` model's are nnU-Net's own ``validation/summary.json``; the replicas' majority vote is
computed here from their exported validation predictions and evaluated the same way. ``evaluation/dice.json``
records the sha256 of every checkpoint it was computed from, so a retrained model makes it stale.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from nnunet_varaug.errors import VarAugError
from nnunet_varaug.fileio import write_json

if TYPE_CHECKING:
    from nnunet_varaug.benchmark.stages import Benchmark


def evaluate(bench: "Benchmark") -> dict:
    """Per-label Dice on the fold's validation cases, all from nnU-Net's ``compute_metrics_on_folder``: the
    baseline, each replica and the varaug model (their ``validation/summary.json``), and the replicas' majority
    vote (computed here from their exported validation predictions, evaluated the same way)."""
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import (compute_metrics_on_folder, label_or_region_to_key,
                                                          load_summary_json)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_varaug.variability import voxel_maps

    exp = bench.experiment()
    plans_manager = PlansManager(exp.plans_json)
    dataset_json = exp.dataset_json
    label_manager = plans_manager.get_label_manager(dataset_json)
    ending = dataset_json["file_ending"]
    rw = plans_manager.image_reader_writer_class()
    val_cases = sorted(exp.split()[1])
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    gt_folder = os.path.join(exp.preprocessed_base, "gt_segmentations")
    out = os.path.join(bench.out, "evaluation")
    os.makedirs(out, exist_ok=True)

    def folder_of(trainer: str) -> str:
        folder = os.path.join(exp.fold_folder(trainer), "validation")
        missing = [c for c in val_cases if not os.path.isfile(os.path.join(folder, c + ending))]
        if missing:
            raise VarAugError(f"{trainer} has no validation prediction of {len(missing)} case(s) in {folder} "
                              f"(e.g. {missing[0]}): run `nnUNetv2_train {bench.dataset_id} {bench.configuration} "
                              f"{bench.fold} -tr {trainer} -p {bench.plans} --val`")
        return folder

    def summarize(result: dict) -> dict:
        return {"dice": {label_or_region_to_key(k): float(result["mean"][k]["Dice"]) for k in keys},
                "foreground_mean": float(result["foreground_mean"]["Dice"]),
                "num_cases": len(result["metric_per_case"])}

    def trained(trainer: str) -> dict:
        """nnU-Net's own evaluation of the model's validation predictions (``validation/summary.json``, written
        by ``compute_metrics_on_folder`` at the end of training), copied to ``evaluation/<trainer>.json``."""
        folder = folder_of(trainer)
        result = load_summary_json(os.path.join(folder, "summary.json"))
        evaluated = sorted(os.path.basename(c["prediction_file"])[: -len(ending)] for c in result["metric_per_case"])
        if evaluated != val_cases:
            raise VarAugError(f"{folder}/summary.json does not cover the {len(val_cases)} validation cases of fold "
                              f"{bench.fold}: run `nnUNetv2_train {bench.dataset_id} {bench.configuration} {bench.fold} "
                              f"-tr {trainer} -p {bench.plans} --val` to evaluate it again")
        shutil.copyfile(os.path.join(folder, "summary.json"), os.path.join(out, f"{trainer}.json"))
        return {"trainer": trainer, **summarize(result)}

    models = {"baseline": trained(bench.base)}
    for name in bench.replica_names:
        models[name] = trained(name)

    # the replicas' majority vote of each validation case, in the raw grid of their exported predictions
    vote_folder = os.path.join(out, "majority_vote")
    shutil.rmtree(vote_folder, ignore_errors=True)
    os.makedirs(vote_folder)
    labels = sorted(int(v) for v in label_manager.all_labels)
    folders = [folder_of(n) for n in bench.replica_names]
    for case in val_cases:
        segs, props = [], None
        for folder in folders:
            seg, p = rw.read_seg(os.path.join(folder, case + ending))
            segs.append(seg[0])
            props = props or p
        majority = voxel_maps(np.stack(segs), labels)[0]
        rw.write_seg(majority.astype(np.uint8 if max(labels) < 256 else np.int16),
                     os.path.join(vote_folder, case + ending), props)
    result = compute_metrics_on_folder(gt_folder, vote_folder, os.path.join(out, "majority_vote.json"), rw, ending,
                                       keys, label_manager.ignore_label, num_processes=1)
    models["majority_vote"] = {"trainer": f"majority vote of {', '.join(bench.replica_names)}", **summarize(result)}
    models["varaug"] = trained(bench.varaug_trainer)

    names = {}
    for name, value in dataset_json["labels"].items():
        key = label_or_region_to_key(tuple(value) if isinstance(value, (list, tuple)) else int(value))
        if key in {label_or_region_to_key(k) for k in keys}:
            names[key] = name
    summary = {"dataset": bench.dataset, "configuration": bench.configuration, "fold": bench.fold,
               "validation_cases": val_cases, "labels": names, "models": models,
               "inputs": bench.evaluation_inputs()}
    write_json(os.path.join(out, "dice.json"), summary)
    return summary
