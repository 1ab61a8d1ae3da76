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
import contextlib
import io
import json
import os
from typing import Dict, List, Optional

import numpy as np

from nnunet_varaug.evaluation import calibration, uncertainty, variability
from nnunet_varaug.report import overlays, variability_report as report
from nnunet_varaug.inference.cases import Case, list_cases
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_experiment_arguments, add_quiet
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.fileio import file_sha256, replacing, write_json, write_text
from nnunet_varaug.inference.predictor import make_predictor, torch_device

STATE = "varaug_predict.json"
UNCERTAINTY = "uncertainty"
FORMAT_VERSION = 1
ENSEMBLE = "ensemble"
WEIGHT_CACHE_BYTES = 256 << 20
"""Replica weights are kept in memory when all checkpoints together are smaller; else read per case."""


# ---- checks (nothing is written before they pass) ----------------------------------------------------------------
def _same_folder_or_nested(a: str, b: str) -> bool:
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


def _check_headers(cases: List[Case], channels: int) -> None:
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
        if folder is not None and _same_folder_or_nested(output, folder):
            raise VarAugError(f"-o {output} is (or overlaps) the input folder {flag} {folder}: predictions must "
                              f"not mix with inputs. Choose another output folder, e.g. -o {os.path.abspath(images)}"
                              f"_predictions")
    paths = check_replicas(exp, checkpoint)
    cases = list_cases(exp, images, labels)
    _check_headers(cases, len(dj.get("channel_names", dj.get("modality", {}))))
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


def format_volume(mm3: float) -> str:
    """Volumes as people write them: mL from 1 mL up (569.4 mL), else mm³."""
    return f"{mm3 / 1000:.1f} mL" if abs(mm3) >= 1000 else f"{mm3:.0f} mm³"


CALIBRATION_TITLE = "Calibration against the labels: single replicas and their ensemble"


def calibration_html(counts: calibration.CalibrationCounts, out: str, names: List[str], structures) -> str:
    """Write ``calibration.csv`` and ``figures/reliability.png`` into ``out``; return the report section's body."""
    import pandas as pd

    label_names = {0: "background", **{int(st.labels[0]): st.name for st in structures}}
    cal = pd.DataFrame(counts.rows(label_names))
    write_text(os.path.join(out, "calibration.csv"), cal.to_csv(index=False, float_format="%.10g"))
    png = calibration.reliability_diagram(counts, os.path.join(out, "figures", "reliability.png"), ENSEMBLE,
                                          label_names)
    wide = cal[cal["label"] != "all"].pivot(index="model", columns="name", values="ece").reindex(names + [ENSEMBLE])
    brier = cal[cal["label"] == "all"].set_index("model")["brier"].reindex(names + [ENSEMBLE])
    table = wide.add_prefix("ECE ").assign(**{"Brier (all labels)": brier}).reset_index()
    return (f"<p class=\"note\">Voxel-wise, every voxel of the image grid except the ignore label. ECE: "
            f"{counts.bins} equal-width bins, one-vs-rest per label (Guo et al. 2017); Brier: multi-class, the sum "
            f"over labels of the one-vs-rest mean squared error. See docs/inference.md.</p>"
            + table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0)
            + overlays.embed_png(png, "reliability diagram"))


def add_calibration_section(exp: Experiment, cases: List[Case], report_dir: str, device: str = "cuda") -> bool:
    """``analyze --calibration``: calibration of the replicas and their ensemble on the labelled ``cases`` (one more
    prediction pass with probabilities), into report_dir's calibration.csv and report.html. False: no labels."""
    labelled = [c for c in cases if c.label]
    if not labelled:
        return False
    names = exp.replica_names
    predictor = load_predictor(exp, names[0], "checkpoint_final.pth", device, True, 0.5)
    weights, reader = Weights(check_replicas(exp, "checkpoint_final.pth")), \
        predictor.plans_manager.image_reader_writer_class()
    counts = None
    for case in labelled:
        gt = reader.read_seg(case.label)[0][0]
        cal = ensemble_case(predictor, weights, case, names, gt, variability.ignore_label(exp.dataset_json))[-1]
        counts = cal if counts is None else (counts.merge(cal) or counts)
    structures = variability.structures_from_dataset_json(exp.dataset_json)
    report.add_html_section(report_dir, "calibration", CALIBRATION_TITLE,
                            calibration_html(counts, report_dir, names, structures))
    return True


def write_outputs(exp: Experiment, out: str, records: Dict[str, dict], structures, names: List[str],
                  flag_above: Optional[float], pictures: int) -> None:
    """volumes.csv, review.csv, calibration.csv (with labels) and report.html from the per-case records."""
    import pandas as pd

    summaries = {c: uncertainty.CaseSummary.from_json(r["summary"]) for c, r in records.items()}
    volumes = pd.DataFrame([row for c, s in summaries.items() for row in uncertainty.volume_rows(c, s, structures)])
    review = pd.DataFrame(uncertainty.review_rows(summaries, structures, flag_above))
    review = review[["rank", "case", "score", "flagged", "least_agreeing_structure", "min_mean_pairwise_dice",
                     "uncertain_volume_mm3"]]
    write_text(os.path.join(out, "volumes.csv"), volumes.to_csv(index=False, float_format="%.10g"))
    write_text(os.path.join(out, "review.csv"), review.to_csv(index=False, float_format="%.10g"))
    cal_html = ""
    if records and all(r.get("calibration") for r in records.values()):
        counts = None
        for r in records.values():
            c = calibration.CalibrationCounts.from_json(r["calibration"])
            counts = c if counts is None else (counts.merge(c) or counts)
        cal_html = report.section("calibration", CALIBRATION_TITLE, calibration_html(counts, out, names, structures))
    shown = review.assign(score=review["score"].map("{:.4f}".format),
                          min_mean_pairwise_dice=review["min_mean_pairwise_dice"].map("{:.4f}".format),
                          uncertain_volume=review["uncertain_volume_mm3"].map(format_volume)).drop(
        columns=["uncertain_volume_mm3"])
    vol = volumes.assign(**{c: volumes[c].map(format_volume) for c in volumes.columns if c.endswith("_mm3")})
    vol.columns = [c.replace("_mm3", "") for c in vol.columns]
    flag_note = "" if flag_above is None else f" Flagged: score above {flag_above}."
    top = [(f"#{r['rank']} {r['case']} (score {r['score']:.3f})", os.path.join(out, records[r["case"]]["picture"]))
           for _, r in review.head(pictures).iterrows()]
    sections = [
        report.section("overview", "Prediction", f"<p>{exp.dataset}, <code>{exp.configuration}</code>, fold "
                       f"{exp.fold}, plans <code>{exp.plans}</code>: ensemble of {len(names)} {exp.kind} replicas "
                       f"({', '.join(names)}), {len(records)} case(s). Consensus = argmax of the mean probability "
                       f"(as <code>nnUNetv2_ensemble</code>). See docs/inference.md.</p>"),
        report.section("review", "Review list (most doubtful first)",
                       "<p class=\"note\">Score = 1 − mean pairwise Dice of the replicas on the structure that agrees "
                       f"least; uncertain volume: where any replica differs from the consensus.{flag_note}</p>"
                       + shown.to_html(index=False, border=0)),
        report.section("volumes", "Volumes: consensus and replicas", vol.to_html(index=False, border=0)),
        cal_html,
        report.section("pictures", "Where the replicas disagree",
                       overlays.section_html(top, overlays.PICTURE_NOTE.format(what="consensus"))),
    ]
    write_text(os.path.join(out, report.REPORT),
               report.page(f"Replica ensemble prediction — {exp.dataset} {exp.configuration} fold {exp.fold}",
                           [s for s in sections if s]))


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
