"""``nnunet_varaug analyze``: predict with each replica, measure how much they disagree, write the report.

Flow: build one :class:`~nnunet_varaug.training.experiment.Experiment` per ``--kind`` (all replicas must be finished);
list the cases (the fold's validation cases from ``$nnUNet_raw``, or ``-i`` raw images with optional ``-l``
labels) and check them before anything is written; predict the missing ones with nnU-Net's own
``nnUNetPredictor`` (each case preprocessed once, then every replica's weights in turn; predictions cached in
``OUT/predictions/<replica>/`` with the checkpoint's sha256, so a retrained replica is predicted again; each
kind's mean predicted probabilities per case are kept for majority-vote ties, :mod:`probsums`; the unperturbed
``<Base>_ieee`` model, when trained, is predicted too and is the reference); then,
per case, one pass of :func:`nnunet_varaug.evaluation.variability.analyze_case` per kind; finally tables, voxel maps,
figures and ``report.html`` (:mod:`nnunet_varaug.report.variability_report`), each written atomically. A failure leaves the
previous report as it was (only finished predictions are kept, for the next run).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_experiment_arguments, add_quiet
from nnunet_varaug.commands.uncertainty_flags import add_review_flags, check_review_names, review_options
from nnunet_varaug.evaluation import variability
from nnunet_varaug.evaluation.case_record import record_from_arrays
from nnunet_varaug.evaluation.uncertainty import entropy_bits
from nnunet_varaug.inference import probsums, replica_stats
from nnunet_varaug.inference.cache import load_maps, predict_replicas, reader_for, reference_model
from nnunet_varaug.inference.cases import check_ground_truth, list_cases
from nnunet_varaug.inference.sample_sources import write_source_comparison_for
from nnunet_varaug.report import overlays, variability_report as report
from nnunet_varaug.report.analysis_sections import add_calibration_section, add_uncertainty_sections
from nnunet_varaug.report.tables import format_summary
from nnunet_varaug.report.uncertainty_report import ReviewOptions
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.training.platforms import replica_warnings
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.paths import require_env


def default_output(experiments: Sequence[Experiment]) -> str:
    """``$nnUNet_results/<Dataset>/varaug_reports/<Base>_<kinds>__<Plans>__<Config>__fold_<F>__n<K>``."""
    exp = experiments[0]
    kinds = "+".join(e.kind for e in experiments)
    name = f"{exp.base}_{kinds}__{exp.plans}__{exp.configuration}__fold_{exp.fold}__n{exp.num_replicas}"
    return os.path.join(os.environ["nnUNet_results"], exp.dataset, "varaug_reports", name)


# ---- analysis ---------------------------------------------------------------------------------------------------
def analyze_experiment(experiments: Union[Experiment, Sequence[Experiment]], output: Optional[str] = None,
                       images: Optional[str] = None, labels: Optional[str] = None, device: str = "cuda",
                       progress: bool = True, calibrate: bool = False, tta: bool = True, step_size: float = 0.5,
                       review: Optional[ReviewOptions] = None):
    """The whole ``analyze`` command for one experiment, or for several kinds of one configuration side by side.

    Args:
        experiments: one ``Experiment`` per replica kind (same dataset, configuration, fold, plans, base, K).
        output: the report folder; default ``$nnUNet_results/<Dataset>/varaug_reports/<name>/``.
        images, labels: raw images (``<case>_XXXX<ending>``) and optional label maps to analyze instead of the
            fold's validation cases.
        device: ``cuda``, ``cpu`` or ``mps``, for nnU-Net's predictor.
        progress: show tqdm progress bars.
        calibrate: also measure the calibration of each replica and of their ensemble on the labelled cases and
            fit one temperature per kind, from the probabilities of the same prediction pass (a case predicted
            earlier without it is predicted again once).
        tta: mirroring test-time augmentation when predicting (nnUNetv2_predict's default; off with
            ``--disable_tta``).
        step_size: the sliding window's step (``-step_size``, nnUNetv2_predict's default 0.5).
        review: the review score's and failure detection's settings (``--min-volume``, ``--may-be-absent``,
            ``--failure-dice``, ``--instances``, ``--nsd-tolerance``).

    Returns:
        The summary table (a pandas DataFrame, as in ``summary.csv``); ``summary.attrs["report_dir"]`` and
        ``summary.attrs["report_html"]`` hold the paths.

    Raises:
        VarAugError: fewer than 2 replicas, unfinished replicas, bad or inconsistent inputs. Nothing of an
            earlier report is changed then.
    """
    experiments = [experiments] if isinstance(experiments, Experiment) else list(experiments)
    regions = bool(experiments) and variability.has_regions(experiments[0].dataset_json)
    if calibrate and regions:
        raise VarAugError(f"--calibration: {experiments[0].dataset} is region-based (sigmoid outputs per region, not "
                          f"a distribution over labels); calibration is defined here for label-based datasets, as in "
                          f"predict. Leave out --calibration")
    experiments = check_experiments(experiments)
    first = experiments[0]
    review = review or ReviewOptions()
    check_review_names(first, review)
    if output is None:
        require_env("nnUNet_results", "the default report folder lies there (or pass -o)")
        output = default_output(experiments)
    output = os.path.abspath(output)
    cases, rw = _checked_cases(first, images, labels, calibrate)
    os.makedirs(output, exist_ok=True)
    reference = reference_model(first, [e.kind for e in experiments])
    # calibration counts and NLL sums are gathered for every labelled case while its probabilities exist, so that a
    # later --calibration run reuses them instead of predicting again
    folders = predict_replicas(experiments, cases, output, device, progress, reference, tta, step_size,
                               calibrate=not regions)
    summary = _write_report(output, experiments, cases, folders, reference, rw, progress, review, calibrate, tta,
                            step_size)
    summary.attrs["report_dir"] = output
    summary.attrs["report_html"] = os.path.join(output, "report.html")
    write_source_comparison_for(experiments[0], output)  # sources.csv, when both sample sets of the fold exist
    return summary


def _checked_cases(first: Experiment, images: Optional[str], labels: Optional[str], calibrate: bool):
    """The cases to analyze and the image reader/writer, their labels checked before anything is written."""
    dj = first.dataset_json
    cases = list_cases(first, images, labels)
    rw = reader_for(dj, cases[0].images[0])
    ignore = variability.ignore_label(dj)
    check_ground_truth(rw, cases, variability.label_values(dj) + ([] if ignore is None else [ignore]))
    if calibrate and not any(c.label for c in cases):
        raise VarAugError("--calibration needs labelled cases: the fold's validation cases, or -i with -l")
    return cases, rw


def _write_report(output: str, experiments: List[Experiment], cases, folders: Dict[str, str],
                  reference: Optional[str], rw, progress: bool, review: ReviewOptions, calibrate: bool, tta: bool,
                  step_size: float):
    """The report from the cached predictions: tables and maps (staged, so a failure leaves the previous report),
    overlays, the uncertainty sections and, with ``calibrate``, the calibration section (else an earlier run's
    calibration files removed). Returns the summary table."""
    stage = report.ReportStage(output)
    try:
        results, records = analyze_cases(experiments, cases, folders, reference, rw, stage, progress, review)
        summary = report.write_report(stage, experiments, results, reference)
    except BaseException:
        stage.abort()
        raise
    overlays.add_report_section(output, cases, rw)
    add_uncertainty_sections(output, records, review, [e.kind for e in experiments])
    if calibrate:
        add_calibration_section(experiments, [c.name for c in cases if c.label], output, tta, step_size)
    else:
        for name in ("calibration.csv", "temperature.json"):  # from an earlier --calibration run
            if os.path.exists(os.path.join(output, name)):
                os.remove(os.path.join(output, name))
    return summary


def check_experiments(experiments: List[Experiment]) -> List[Experiment]:
    """The experiments analyzed together: at least 2 replicas each, one configuration, each kind once, every replica
    finished; a warning when they were trained on different platforms."""
    if not experiments:
        raise VarAugError("nothing to analyze: no experiment given")
    first = experiments[0]
    for exp in experiments:
        if exp.num_replicas < 2:
            raise VarAugError(f"-n {exp.num_replicas}: variability between replicas is undefined for fewer than 2 "
                              f"replicas; use -n 2 or more (train them with `nnunet_varaug replicas {exp.flags}`)")
        same = (exp.dataset, exp.configuration, exp.fold, exp.plans, exp.base, exp.num_replicas)
        if same != (first.dataset, first.configuration, first.fold, first.plans, first.base, first.num_replicas):
            raise VarAugError("experiments analyzed together must share dataset, configuration, fold, plans, base "
                              "trainer and number of replicas; only the kind may differ")
        if [e.kind for e in experiments].count(exp.kind) > 1:
            raise VarAugError(f"--kind {exp.kind} is given twice")
        exp.require_finished()
    for warning in replica_warnings(experiments):
        print(f"nnunet_varaug analyze: warning: {warning}", file=sys.stderr)
    return experiments


def analyze_cases(experiments: List[Experiment], cases, folders: Dict[str, str], reference: Optional[str], rw,
                  stage, progress: bool, review: ReviewOptions):
    """Per kind and case, the variability of the cached predictions (:func:`variability.analyze_case`) and the
    per-structure record (:func:`case_uncertainty`); the voxel maps go to the staging folder, only the counts
    stay in memory. Returns (results, records), each ``kind -> case -> ...``."""
    from tqdm import tqdm

    dj = experiments[0].dataset_json
    ending, output = dj["file_ending"], stage.output
    structures, values = variability.structures_from_dataset_json(dj), variability.label_values(dj)
    ignore = variability.ignore_label(dj)
    results = {e.kind: {} for e in experiments}
    records = {e.kind: {} for e in experiments}
    for case in tqdm(cases, desc="analyzing", unit="case", disable=not progress):
        gt = None if case.label is None else rw.read_seg(case.label)[0][0]
        ref = None if reference is None else load_maps(
            rw, [os.path.join(folders[reference], case.name + ending)], case.name, output)[0][0]
        for i, exp in enumerate(experiments):
            files = [os.path.join(folders[n], case.name + ending) for n in exp.replica_names]
            maps, props = load_maps(rw, files, case.name, output)
            if gt is not None and gt.shape != maps.shape[1:]:
                raise VarAugError(f"ground truth {case.label} has shape {gt.shape}, the predictions of "
                                  f"{case.name} {maps.shape[1:]}: it does not belong to this image")
            try:
                res = variability.analyze_case(maps, props["spacing"], structures, values, gt, ignore,
                                               probabilities=probsums.load(output, exp.kind, case.name),
                                               reference=ref)
            except ValueError as e:
                raise VarAugError(f"{case.name} ({exp.kind} replicas): {e}") from None
            stage.write_maps(case.name + ("" if i == 0 else f"_{exp.kind}"), res, props)
            res.majority = res.entropy = res.disagreement = None  # keep only the counts in memory
            results[exp.kind][case.name] = res
            record = case_uncertainty(output, exp, case.name, maps, props["spacing"], structures, values, gt,
                                      ignore, review)
            if record is not None:
                records[exp.kind][case.name] = record
    return results, records


def case_uncertainty(output: str, exp: Experiment, case: str, maps, spacing, structures, values, gt, ignore,
                     review: ReviewOptions) -> Optional[dict]:
    """structures.csv's record of one case and kind: consensus = argmax of the replicas' mean probability (as
    predict), entropy of that mean, mutual information from the stored sum of the replicas' entropies. None where
    no probabilities are kept (region-based datasets)."""
    import numpy as np

    mean = probsums.load(output, exp.kind, case)
    entropy_sum = replica_stats.load_entropy_sum(output, exp.kind, case)
    if mean is None or entropy_sum is None:
        return None
    consensus = np.asarray(values, dtype=maps.dtype)[np.argmax(mean, axis=0)]
    h = entropy_bits(mean)
    mi = np.maximum(h - entropy_sum / np.float32(exp.num_replicas), 0).astype(np.float32)
    return record_from_arrays(maps, consensus, mean, h, mi, spacing, structures, values, gt=gt, ignore=ignore,
                              instances=review.instances, nsd_tolerance=review.nsd_tolerance)


# ---- command line -----------------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    add_experiment_arguments(p, kind=False)
    p.add_argument("--kind", nargs="+", default=["seed"], choices=["seed", "mca"],
                   help="replica kind(s) to analyze; with 'seed mca' both are reported side by side")
    p.add_argument("-i", dest="images", default=None,
                   help="folder of raw images (<case>_XXXX<ending>) to analyze instead of the fold's validation cases")
    p.add_argument("-l", dest="labels", default=None, help="folder of ground-truth label maps for -i (optional)")
    add_device(p)
    p.add_argument("-o", dest="output", default=None,
                   help="report folder (default $nnUNet_results/<Dataset>/varaug_reports/<name>/)")
    p.add_argument("--calibration", action="store_true",
                   help="also report calibration (class-wise and top-label ECE, NLL, Brier; all voxels and ROI) of "
                        "each replica and their ensemble on the labelled cases, and fit one temperature per kind "
                        "(for predict --temperature auto)")
    p.add_argument("-step_size", type=float, default=0.5, help="as nnUNetv2_predict's -step_size")
    add_review_flags(p)
    add_disable_tta(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    review = review_options(args)  # flags first: a bad value is refused before anything is looked up
    experiments = [Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base,
                                        kind, args.plans, args.start) for kind in dict.fromkeys(args.kind)]
    summary = analyze_experiment(experiments, args.output, args.images, args.labels, args.device,
                                 progress=not args.quiet, calibrate=args.calibration, tta=not args.disable_tta,
                                 step_size=args.step_size, review=review)
    print(format_summary(summary))
    print(f"report: {summary.attrs['report_html']}")
    return 0
