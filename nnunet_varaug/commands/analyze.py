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
import contextlib
import io
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from nnunet_varaug.inference import probsums
from nnunet_varaug.report import variability_report as report
from nnunet_varaug.evaluation import variability, voting
from nnunet_varaug.inference.cases import Case, list_cases
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_experiment_arguments, add_quiet
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.paths import require_env
from nnunet_varaug.utilities.fileio import file_sha256, replacing, write_json
from nnunet_varaug.inference.predictor import make_predictor, torch_device
from nnunet_varaug.report.variability_report import format_summary  # noqa: F401  (the demo imports both from here)

PREDICTIONS = "predictions"
FINGERPRINT = "varaug_predictions.json"


def default_output(experiments: Sequence[Experiment]) -> str:
    """``$nnUNet_results/<Dataset>/varaug_reports/<Base>_<kinds>__<Plans>__<Config>__fold_<F>__n<K>``."""
    exp = experiments[0]
    kinds = "+".join(e.kind for e in experiments)
    name = f"{exp.base}_{kinds}__{exp.plans}__{exp.configuration}__fold_{exp.fold}__n{exp.num_replicas}"
    return os.path.join(os.environ["nnUNet_results"], exp.dataset, "varaug_reports", name)


# ---- predictions ------------------------------------------------------------------------------------------------
def _prediction_state(exp: Experiment, name: str, folder: str, cases: Sequence[Case], ending: str,
                      tta: bool = True) -> tuple:
    """(identity, fingerprint dict, cases still to predict). Stale predictions (other checkpoint, or made with the
    other test-time augmentation setting) go. The identity is the checkpoint's sha256, marked when TTA is off, so
    that the mean probabilities of :mod:`probsums` are tied to both."""
    sha = file_sha256(exp.final_checkpoint(name))
    path = os.path.join(folder, FINGERPRINT)
    record = {"checkpoint_sha256": sha, "tta": tta, "trainer": name, "cases": {}}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("checkpoint_sha256") == sha and old.get("tta", True) == tta:
            record["cases"] = old.get("cases", {})
    todo = [c for c in cases if record["cases"].get(c.name) != [os.path.abspath(p) for p in c.images]
            or not os.path.isfile(os.path.join(folder, c.name + ending))]
    return (sha if tta else f"{sha}+no-tta"), record, todo


def predict(experiments: Sequence[Experiment], cases: Sequence[Case], output: str, device: str = "cuda",
            progress: bool = True, reference: Optional[str] = None, tta: bool = True) -> Dict[str, str]:
    """Predict every replica on every case with nnU-Net's ``nnUNetPredictor``, reusing valid cached predictions.

    Also keeps each kind's mean predicted probabilities per case (:mod:`probsums`, for the vote's tie-break;
    not for region-based datasets) and predicts the ``reference`` model (``<Base>_ieee``) if given. ``tta``:
    mirroring test-time augmentation, on by default as in ``nnUNetv2_predict`` (``--disable_tta`` turns it off).

    Returns ``replica -> folder`` of its predictions (``OUT/predictions/<replica>/<case><file_ending>``), in the
    input image's grid exactly as ``nnUNetv2_predict`` writes them.
    """
    import torch
    from tqdm import tqdm

    ending = experiments[0].dataset_json["file_ending"]
    keep_probs = not variability.has_regions(experiments[0].dataset_json)
    folders, plans = {}, []
    for i, exp in enumerate(experiments):
        state = {}
        for name in exp.replica_names + ([reference] if reference and i == 0 else []):
            folders[name] = os.path.join(output, PREDICTIONS, name)
            sha, record, todo = _prediction_state(exp, name, folders[name], cases, ending, tta)
            state[name] = (folders[name], record, {c.name for c in todo}, sha)
        shas = {n: state[n][3] for n in exp.replica_names}
        stale = {c.name for c in cases if keep_probs and not probsums.is_current(output, exp.kind, c.name, shas)}
        for n in exp.replica_names:  # the probability sum needs every replica of the case
            state[n][2].update(stale)
        jobs = {n: st for n, st in state.items() if st[2]}
        if jobs:
            plans.append((exp, jobs, stale, shas))
    total = sum(len(t[2]) for _, jobs, _, _ in plans for t in jobs.values())
    bar = tqdm(total=total, desc="predicting", unit="prediction", disable=not progress or total == 0)
    dev = torch_device(device) if total else None
    for exp, jobs, stale, shas in plans:
        predictor = make_predictor(exp, exp.replica_names[0], dev, tta=tta, who="analyze")
        weights = {n: torch.load(exp.final_checkpoint(n), map_location="cpu",
                                 weights_only=False)["network_weights"] for n in jobs}
        for folder, record, _, _ in jobs.values():
            os.makedirs(folder, exist_ok=True)
            write_json(os.path.join(folder, FINGERPRINT), record)  # drops entries of a stale checkpoint first
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        for case in cases:
            names = [n for n in jobs if case.name in jobs[n][2]]
            if not names:
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                data, _, props = preprocessor.run_case(case.images, None, predictor.plans_manager,
                                                       predictor.configuration_manager, predictor.dataset_json)
            data = torch.from_numpy(data)
            summed = None
            for name in names:
                folder, record, _, _ = jobs[name]
                want = case.name in stale and name in shas
                probs = _predict_one(predictor, weights[name], data, props, folder, case.name, ending, want)
                if want:
                    summed = probs if summed is None else summed + probs
                record["cases"][case.name] = [os.path.abspath(p) for p in case.images]
                write_json(os.path.join(folder, FINGERPRINT), record)
                bar.update(1)
            if summed is not None:
                probsums.save(output, exp.kind, case.name, summed, shas)
    bar.close()
    return folders


def reference_model(exp: Experiment, kinds: Sequence[str]) -> Optional[str]:
    """``<Base>_ieee`` when its final checkpoint exists (the unperturbed twin of numerical replicas), else None;
    with ``--kind mca`` and no such model, a note says how to train it."""
    name = f"{exp.base}_ieee"
    if os.path.isfile(exp.final_checkpoint(name)):
        return name
    if "mca" in kinds:
        print(f"note: no {name} model (fold {exp.fold}): significant digits use the replicas' mean as reference; "
              f"train it with `nnUNetv2_train {exp.dataset} {exp.configuration} {exp.fold} -tr {name}`",
              file=sys.stderr)
    return None


def _predict_one(predictor, weights: dict, data, props: dict, folder: str, case: str, ending: str,
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


# ---- analysis ---------------------------------------------------------------------------------------------------
def _reader(dataset_json: dict, example: str):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    with contextlib.redirect_stdout(io.StringIO()):
        return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)()


def _load_maps(rw, files: Sequence[str], case: str, out: str):
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
                              f"rerun analyze to predict it again")
        arrays.append(seg.astype(np.uint8 if seg.size == 0 or seg.max() < 256 else np.uint16))
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        listing = ", ".join(f"{os.path.relpath(f, out)} {tuple(a.shape)}" for f, a in zip(files, arrays))
        raise VarAugError(f"the replicas' predictions of {case} have different shapes ({listing}); delete the wrong "
                          f"one(s) and rerun analyze to predict them again")
    return np.stack(arrays), props


def check_ground_truth(rw, cases: Sequence[Case], allowed: Sequence[int]) -> None:
    """Every ground-truth file holds only labels of dataset.json (checked before any prediction is made)."""
    for case in cases:
        if case.label is None:
            continue
        try:
            voting.check_labels(rw.read_seg(case.label)[0], allowed, case.label)
        except ValueError as e:
            raise VarAugError(f"{e}. Fix the label map, or the labels in dataset.json") from None


PLATFORM_KEYS = ("cpu", "simd", "torch_threads", "torch", "numpy", "nnunetv2", "cuda", "cudnn", "gpu")


def platform_warning(experiments: Sequence[Experiment]) -> Optional[str]:
    """A warning when the replicas compared were trained on different machines or software, as their debug.json
    records it (``determinism.platform``, written by seed and numerical replicas): the same replica trained on
    another CPU gives other weights, so their disagreement would mix platform differences into the variability
    measured. None when the records agree; replicas without a record are left out."""
    groups: Dict[tuple, List[str]] = {}
    for exp in experiments:
        for name in exp.replica_names:
            try:
                with open(os.path.join(exp.fold_folder(name), "debug.json")) as f:
                    record = json.load(f)["nnunet_varaug"]["determinism"]["platform"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            groups.setdefault(tuple(record.get(k) for k in PLATFORM_KEYS), []).append(name)
    if len(groups) < 2:
        return None
    differ = [i for i, k in enumerate(PLATFORM_KEYS) if len({key[i] for key in groups}) > 1]
    described = "; ".join(", ".join(names) + ": " + ", ".join(f"{PLATFORM_KEYS[i]}={key[i]}" for i in differ)
                          for key, names in groups.items())
    return (f"the replicas were trained on {len(groups)} different platforms ({described}); the same replica "
            f"gives other weights on another machine, so their disagreement is not seed or rounding variability "
            f"alone. Train the replicas you compare on one kind of machine with the same software")


def analyze_experiment(experiments: Union[Experiment, Sequence[Experiment]], output: Optional[str] = None,
                       images: Optional[str] = None, labels: Optional[str] = None, device: str = "cuda",
                       progress: bool = True, calibrate: bool = False, tta: bool = True):
    """The whole ``analyze`` command for one experiment, or for several kinds of one configuration side by side.

    Args:
        experiments: one ``Experiment`` per replica kind (same dataset, configuration, fold, plans, base, K).
        output: the report folder; default ``$nnUNet_results/<Dataset>/varaug_reports/<name>/``.
        images, labels: raw images (``<case>_XXXX<ending>``) and optional label maps to analyze instead of the
            fold's validation cases.
        device: ``cuda``, ``cpu`` or ``mps``, for nnU-Net's predictor.
        progress: show tqdm progress bars.
        calibrate: also measure the calibration of each replica and of their ensemble on the labelled cases
            (one more prediction pass, with probabilities; :mod:`nnunet_varaug.commands.predict`).
        tta: mirroring test-time augmentation when predicting (nnUNetv2_predict's default; off with
            ``--disable_tta``).

    Returns:
        The summary table (a pandas DataFrame, as in ``summary.csv``); ``summary.attrs["report_dir"]`` and
        ``summary.attrs["report_html"]`` hold the paths.

    Raises:
        VarAugError: fewer than 2 replicas, unfinished replicas, bad or inconsistent inputs. Nothing of an
            earlier report is changed then.
    """
    experiments = [experiments] if isinstance(experiments, Experiment) else list(experiments)
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
    warning = platform_warning(experiments)
    if warning:
        print(f"nnunet_varaug analyze: warning: {warning}", file=sys.stderr)
    if output is None:
        require_env("nnUNet_results", "the default report folder lies there (or pass -o)")
        output = default_output(experiments)
    output = os.path.abspath(output)
    dj = first.dataset_json
    structures = variability.structures_from_dataset_json(dj)
    values = variability.label_values(dj)
    ignore = variability.ignore_label(dj)
    cases = list_cases(first, images, labels)

    ending = dj["file_ending"]
    rw = _reader(dj, cases[0].images[0])
    check_ground_truth(rw, cases, values + ([] if ignore is None else [ignore]))

    os.makedirs(output, exist_ok=True)
    reference = reference_model(first, [e.kind for e in experiments])
    folders = predict(experiments, cases, output, device, progress, reference, tta)

    from tqdm import tqdm

    stage = report.ReportStage(output)
    results = {e.kind: {} for e in experiments}
    try:
        for case in tqdm(cases, desc="analyzing", unit="case", disable=not progress):
            gt = None if case.label is None else rw.read_seg(case.label)[0][0]
            ref = None if reference is None else _load_maps(
                rw, [os.path.join(folders[reference], case.name + ending)], case.name, output)[0][0]
            for i, exp in enumerate(experiments):
                files = [os.path.join(folders[n], case.name + ending) for n in exp.replica_names]
                maps, props = _load_maps(rw, files, case.name, output)
                if gt is not None and gt.shape != maps.shape[1:]:
                    raise VarAugError(f"ground truth {case.label} has shape {gt.shape}, the predictions of "
                                      f"{case.name} {maps.shape[1:]}: it does not belong to this image")
                try:
                    res = variability.analyze_case(maps, props["spacing"], structures, values, gt, ignore,
                                                   probabilities=probsums.load(output, exp.kind, case.name),
                                                   reference=ref)
                except ValueError as e:
                    raise VarAugError(f"{case.name} ({exp.kind} replicas): {e}") from None
                suffix = "" if i == 0 else f"_{exp.kind}"
                stage.write_maps(case.name + suffix, res, props)
                res.majority = res.entropy = res.disagreement = None  # keep only the counts in memory
                results[exp.kind][case.name] = res
        summary = report.write_report(stage, experiments, results, reference)
    except BaseException:
        stage.abort()
        raise
    from nnunet_varaug.report import overlays  # pictures and calibration (issue 13): sections added to report.html
    overlays.add_report_section(output, cases, rw)
    if calibrate:
        from nnunet_varaug.commands.predict import add_calibration_section
        add_calibration_section(first, cases, output, device)
    elif os.path.exists(os.path.join(output, "calibration.csv")):  # from an earlier --calibration run
        os.remove(os.path.join(output, "calibration.csv"))
    summary.attrs["report_dir"] = output
    summary.attrs["report_html"] = os.path.join(output, "report.html")
    from nnunet_varaug.inference.outoffold_samples import write_source_comparison_for

    write_source_comparison_for(experiments[0], output)  # sources.csv, when both sample sets of the fold exist
    return summary


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
                   help="also report ECE, Brier score and reliability of each replica and their ensemble (labelled cases)")
    add_disable_tta(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    experiments = [Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base,
                                        kind, args.plans, args.start) for kind in dict.fromkeys(args.kind)]
    summary = analyze_experiment(experiments, args.output, args.images, args.labels, args.device,
                                 progress=not args.quiet, calibrate=args.calibration, tta=not args.disable_tta)
    print(format_summary(summary))
    print(f"report: {summary.attrs['report_html']}")
    return 0
