"""The ``evaluate`` stage of ``nnunet_varaug benchmark``: per-label Dice of every model, on two sets of cases.

* **held-out test split** (the comparison): every model — baseline, each replica, their majority vote, each
  variability-augmented model (one per sample source) and, with ``--stability``, each of its seed replicas —
  predicts the test images with nnU-Net's predictor, and nnU-Net's ``compute_metrics_on_folder`` evaluates them
  against the test labels (:mod:`nnunet_varaug.experiments.benchmark.testset`). With ``--stability`` the seed replicas of
  each varaug model and the plain replicas also get their disagreement on the same cases (pairwise Dice and
  volume spread per label).
* **fold F's validation cases**: nnU-Net's own ``validation/summary.json`` of each model, and the replicas'
  majority vote of their exported validation predictions evaluated the same way. Optimistic for out-of-fold
  models: their teachers (replicas of the other folds) were trained on fold F's validation cases.

``evaluation/dice.json`` records the sha256 of every checkpoint it was computed from, so a retrained model makes
it stale.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Dict, List

from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import write_json

if TYPE_CHECKING:
    from nnunet_varaug.experiments.benchmark.state import Benchmark


def evaluate(bench: "Benchmark") -> dict:
    """Both evaluations; writes and returns ``evaluation/dice.json``."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    exp = bench.experiment()
    plans_manager = PlansManager(exp.plans_json)
    dataset_json = exp.dataset_json
    label_manager = plans_manager.get_label_manager(dataset_json)
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    context = {"exp": exp, "rw": plans_manager.image_reader_writer_class(), "ending": dataset_json["file_ending"],
               "keys": keys, "ignore": label_manager.ignore_label,
               "labels": sorted(int(v) for v in label_manager.all_labels), "dataset_json": dataset_json}
    out = os.path.join(bench.out, "evaluation")
    os.makedirs(out, exist_ok=True)
    names = {}
    for name, value in dataset_json["labels"].items():
        key = label_or_region_to_key(tuple(value) if isinstance(value, (list, tuple)) else int(value))
        if key in {label_or_region_to_key(k) for k in keys}:
            names[key] = name
    summary = {"dataset": bench.dataset, "configuration": bench.configuration, "fold": bench.fold,
               "labels": names, "test": _test(bench, context, os.path.join(out, "test")),
               "validation": _validation(bench, context, os.path.join(out, "validation")),
               "inputs": bench.evaluation_inputs()}
    write_json(os.path.join(out, "dice.json"), summary)
    return summary


def _models(bench: "Benchmark") -> List[str]:
    return [bench.base, *bench.replica_names, *bench.varaug_trainers, *bench.all_stability_names]


def _test(bench: "Benchmark", c: dict, out: str) -> dict:
    from nnunet_varaug.experiments.benchmark import testset
    from nnunet_varaug.experiments.benchmark.holdout import HELD_OUT_IMAGES, HELD_OUT_LABELS

    images = os.path.join(bench.raw_folder, HELD_OUT_IMAGES)
    labels = os.path.join(bench.raw_folder, HELD_OUT_LABELS)
    cases = testset.test_cases(images, c["ending"])
    if cases != sorted(bench.test_cases):
        raise VarAugError(f"{images} holds {cases}, not the recorded test split {sorted(bench.test_cases)}: rerun the "
                          f"holdout stage")
    folders: Dict[str, str] = {}
    models = {}
    for trainer in _models(bench):
        folders[trainer] = testset.predict_folder(c["exp"].model_folder(trainer), int(bench.fold), images,
                                                  os.path.join(out, "predictions", trainer), bench.device)
        models[trainer] = {"trainer": trainer, **testset.evaluate_folder(
            labels, folders[trainer], os.path.join(out, f"{trainer}.json"), c["rw"], c["ending"], c["keys"],
            c["ignore"], cases)}
    vote = testset.majority_vote([folders[n] for n in bench.replica_names], cases, os.path.join(out, "majority_vote"),
                                 c["rw"], c["ending"], c["labels"])
    models["majority_vote"] = {"trainer": f"majority vote of {', '.join(bench.replica_names)}",
                               **testset.evaluate_folder(labels, vote, os.path.join(out, "majority_vote.json"),
                                                         c["rw"], c["ending"], c["keys"], c["ignore"], cases)}
    stability = {}
    if bench.stability:
        groups = {"replicas": bench.replica_names,
                  **{bench.varaug_for(x): bench.stability_names(x) for x in bench.sources}}
        for group, members in groups.items():
            stability[group] = {"members": members, "labels": testset.group_variability(
                [folders[m] for m in members], cases, c["rw"], c["ending"], c["dataset_json"])}
    return {"cases": cases, "models": models, "stability": stability}


def _validation(bench: "Benchmark", c: dict, out: str) -> dict:
    from nnunet_varaug.experiments.benchmark import testset

    exp = c["exp"]
    val_cases = sorted(exp.split()[1])
    gt_folder = os.path.join(exp.preprocessed_base, "gt_segmentations")
    os.makedirs(out, exist_ok=True)

    def folder_of(trainer: str) -> str:
        folder = os.path.join(exp.fold_folder(trainer), "validation")
        missing = [case for case in val_cases if not os.path.isfile(os.path.join(folder, case + c["ending"]))]
        if missing:
            raise VarAugError(f"{trainer} has no validation prediction of {len(missing)} case(s) in {folder} "
                              f"(e.g. {missing[0]}): run `nnUNetv2_train {bench.dataset_id} {bench.configuration} "
                              f"{bench.fold} -tr {trainer} -p {bench.plans} --val`")
        return folder

    def trained(trainer: str) -> dict:
        """nnU-Net's own evaluation of the model's validation predictions (``validation/summary.json``, written
        by ``compute_metrics_on_folder`` at the end of training), copied to ``evaluation/validation/``."""
        from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key, load_summary_json

        folder = folder_of(trainer)
        result = load_summary_json(os.path.join(folder, "summary.json"))
        evaluated = sorted(os.path.basename(e["prediction_file"])[: -len(c["ending"])]
                           for e in result["metric_per_case"])
        if evaluated != val_cases:
            raise VarAugError(f"{folder}/summary.json does not cover the {len(val_cases)} validation cases of fold "
                              f"{bench.fold}: run `nnUNetv2_train {bench.dataset_id} {bench.configuration} "
                              f"{bench.fold} "
                              f"-tr {trainer} -p {bench.plans} --val` to evaluate it again")
        shutil.copyfile(os.path.join(folder, "summary.json"), os.path.join(out, f"{trainer}.json"))
        return {"trainer": trainer,
                "dice": {label_or_region_to_key(k): float(result["mean"][k]["Dice"]) for k in c["keys"]},
                "foreground_mean": float(result["foreground_mean"]["Dice"]), "num_cases": len(evaluated)}

    models = {t: trained(t) for t in _models(bench)}
    vote = testset.majority_vote([folder_of(n) for n in bench.replica_names], val_cases,
                                 os.path.join(out, "majority_vote"), c["rw"], c["ending"], c["labels"])
    models["majority_vote"] = {"trainer": f"majority vote of {', '.join(bench.replica_names)}",
                               **testset.evaluate_folder(gt_folder, vote, os.path.join(out, "majority_vote.json"),
                                                         c["rw"], c["ending"], c["keys"], c["ignore"], val_cases)}
    return {"cases": val_cases, "models": models}
