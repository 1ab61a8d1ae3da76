"""``nnunet_varaug predict``: segment new images with K replicas — consensus, uncertainty maps, volumes, review list.

Flow: check everything before writing anything (replicas trained and from one plans/configuration, images with
the dataset's channels, labels on the images' grid, an output folder apart from the inputs); then per case:
preprocess once with nnU-Net's preprocessor, run each replica's network on the same data, turn each replica's
logits into probabilities in the input grid with nnU-Net's own export code
(``convert_predicted_logits_to_segmentation_with_correct_shape``, as ``nnUNetv2_predict --save_probabilities``),
add them to running sums (:class:`~nnunet_varaug.evaluation.uncertainty.RunningEnsemble`), and export once: the consensus
(``OUT/<case><ending>``, = ``nnUNetv2_ensemble`` of the replicas' probabilities), ``OUT/uncertainty/<case>_
{entropy,mutual_information,disagreement}.nii.gz``, a picture. A case is recorded in ``OUT/varaug_predict.json``
with the sha256 of its inputs once all its files are in place, so a rerun skips it unless an input or a replica
checkpoint changed. Tables (``volumes.csv``, ``review.csv``, ``calibration.csv`` with ``-l``) and
``report.html`` are rewritten at the end from the records. See docs/inference.md.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import numpy as np

from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_experiment_arguments, add_quiet
from nnunet_varaug.evaluation import uncertainty, variability
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.inference.ensemble import Weights, check_inputs, ensemble_case, load_predictor
from nnunet_varaug.report import overlays, variability_report as report
from nnunet_varaug.report.prediction import write_outputs
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import file_sha256, replacing, write_json

STATE = "varaug_predict.json"
UNCERTAINTY = "uncertainty"
FORMAT_VERSION = 1



# ---- one case -----------------------------------------------------------------------------------------------------
def predict_case(predictor, weights: Weights, case: Case, out: str, structures, names: List[str],
                 gt_reader=None, ignore: Optional[int] = None) -> dict:
    """Predict, accumulate and export one case; returns its record for the state file."""
    pm, lm = predictor.plans_manager, predictor.label_manager
    gt = None if case.label is None else gt_reader.read_seg(case.label)[0][0]
    ens, mean, consensus, props, cal = ensemble_case(predictor, weights, case, names, gt, ignore)
    entropy = ens.entropy(mean)
    del mean
    mi, dis = ens.mutual_information(entropy), ens.disagreement(consensus)
    maps = np.stack(ens.maps)
    del ens
    ending = predictor.dataset_json["file_ending"]
    os.makedirs(os.path.join(out, UNCERTAINTY), exist_ok=True)
    for what, array in (("entropy", entropy), ("mutual_information", mi), ("disagreement", dis)):
        report.write_map(array, os.path.join(out, UNCERTAINTY, f"{case.name}_{what}.nii.gz"), props)
    rw = pm.image_reader_writer_class()
    target = os.path.join(out, case.name + ending)
    with replacing(target, ending) as tmp:
        rw.write_seg(consensus.astype(np.uint8 if consensus.max(initial=0) < 256 else np.uint16), tmp, props)
    summary = uncertainty.summarize_case(maps, consensus, props["spacing"], structures)
    image = rw.read_images(case.images[:1])[0][0]
    png = overlays.render_case(os.path.join(out, "figures", f"{case.name}_overlay.png"), image, consensus, entropy, dis,
                               props["spacing"], case.name, [(s.name, s.labels) for s in structures],
                               max_entropy=float(np.log2(len(lm.all_labels))))
    return {"summary": summary.to_json(), "calibration": None if cal is None else cal.to_json(),
            "picture": os.path.relpath(png, out)}


# ---- the whole command ---------------------------------------------------------------------------------------------
def _case_inputs(case: Case) -> List[str]:
    return [file_sha256(p) for p in case.images] + ([file_sha256(case.label)] if case.label else [])


def predict_folder(exp: Experiment, images: str, output: str, labels: Optional[str] = None, device: str = "cuda",
                   checkpoint: str = "checkpoint_final.pth", tta: bool = True, step_size: float = 0.5,
                   flag_above: Optional[float] = None, pictures: int = 20, progress: bool = True) -> dict:
    """Run ``predict`` (see the module docstring); returns ``{"predicted": [...], "skipped": [...], ...}``."""
    output = os.path.abspath(output)
    cases, paths = check_inputs(exp, images, labels, output, checkpoint)
    names = exp.replica_names
    identity = {"format": FORMAT_VERSION, "dataset": exp.dataset, "plans": exp.plans,
                "configuration": exp.configuration, "fold": exp.fold, "checkpoint": checkpoint, "tta": tta,
                "step_size": step_size, "replicas": dict(zip(names, (file_sha256(p) for p in paths)))}
    state_path = os.path.join(output, STATE)
    state = {"identity": identity, "cases": {}}
    if os.path.isfile(state_path):
        try:
            with open(state_path) as f:
                old = json.load(f)
        except ValueError:  # unreadable: predict everything again
            old = {}
        if old.get("identity") == identity:
            state["cases"] = old.get("cases", {})
    dj = exp.dataset_json
    structures = variability.structures_from_dataset_json(dj)
    ignore = variability.ignore_label(dj)
    inputs = {c.name: _case_inputs(c) for c in cases}
    todo = [c for c in cases if state["cases"].get(c.name, {}).get("inputs") != inputs[c.name]
            or not os.path.isfile(os.path.join(output, c.name + dj["file_ending"]))]
    os.makedirs(output, exist_ok=True)
    if todo:
        from tqdm import tqdm

        predictor = load_predictor(exp, names[0], checkpoint, device, tta, step_size)
        weights = Weights(paths)
        reader = predictor.plans_manager.image_reader_writer_class()
        for case in tqdm(todo, desc="predicting", unit="case", disable=not progress):
            state["cases"].pop(case.name, None)
            record = predict_case(predictor, weights, case, output, structures, names, reader, ignore)
            state["cases"][case.name] = {"inputs": inputs[case.name], **record}
            write_json(state_path, state)
    write_json(state_path, state)
    records = {c.name: state["cases"][c.name] for c in cases}
    write_outputs(exp, output, records, structures, names, flag_above, pictures)
    return {"predicted": [c.name for c in todo], "skipped": [c.name for c in cases if c not in todo],
            "output": output}


# ---- command line ---------------------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    add_experiment_arguments(p)
    p.add_argument("-i", dest="images", required=True, help="folder of images named <case>_XXXX<ending>")
    p.add_argument("-o", dest="output", required=True, help="output folder (must not be or contain an input folder)")
    p.add_argument("-l", dest="labels", default=None, help="folder of label maps <case><ending>: adds calibration")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="as nnUNetv2_predict's -chk")
    p.add_argument("-step_size", type=float, default=0.5, help="as nnUNetv2_predict's -step_size")
    add_disable_tta(p)
    add_device(p)
    p.add_argument("--flag-above", dest="flag_above", type=float, default=None,
                   help="mark cases whose review score exceeds this value (review.csv column 'flagged')")
    p.add_argument("--pictures", type=int, default=20, help="cases pictured in report.html (default 20)")
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    exp = Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base, args.kind,
                               args.plans, args.start)
    if args.flag_above is not None and not 0 <= args.flag_above <= 1:
        raise VarAugError(f"--flag-above {args.flag_above}: the review score lies in [0, 1]; use e.g. 0.1")
    result = predict_folder(exp, args.images, args.output, args.labels, args.device, args.checkpoint,
                            not args.disable_tta, args.step_size, args.flag_above, args.pictures, not args.quiet)
    print(f"predicted {len(result['predicted'])} case(s), skipped {len(result['skipped'])} unchanged; "
          f"outputs in {result['output']} (review.csv, volumes.csv, report.html)")
    return 0
