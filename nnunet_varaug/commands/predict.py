"""``nnunet_varaug predict``: segment new images with K replicas — consensus, uncertainty maps, volumes, review list.

Flow: check everything before writing anything (replicas of every fold given with ``-f`` trained and from one
plans/configuration, images with the dataset's channels, labels on the images' grid, an output folder apart from
the inputs); then this part's cases (``-num_parts``/``-part_id``, as ``nnUNetv2_predict``) go through the engine
(:mod:`nnunet_varaug.inference.schedule`: each model's weights read once per run, each case preprocessed once,
every model's probabilities in the input grid added to running sums) and each finished case is exported once
(:func:`export_case`): the consensus (``OUT/<case><ending>``, = ``nnUNetv2_ensemble`` of the models'
probabilities), with ``--save_probabilities`` the mean probabilities as ``OUT/<case>.npz`` + ``.pkl`` (as
``nnUNetv2_predict`` writes them), ``OUT/uncertainty/<case>_{entropy,mutual_information,disagreement}.nii.gz``
(per region for region-based datasets), a picture. ``dataset.json`` and ``plans.json`` are copied into ``OUT``
as nnU-Net's commands do. A case is recorded in the part's state file (``OUT/varaug_predict.json``, or
``varaug_predict_part<i>of<n>.json``) with the sha256 of its inputs once all its files are in place, so a rerun
skips it unless an input or a checkpoint changed. Tables (``volumes.csv``, ``review.csv``, ``folds.csv`` with
several folds, ``calibration.csv`` with ``-l``) and ``report.html`` are rewritten at the end from the records of
all parts. See docs/inference.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pickle
import re
from typing import List, Optional, Sequence, Union

import numpy as np

from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_quiet, add_start, add_trainer_arguments
from nnunet_varaug.commands.predict_checks import check_flags, resolve_temperature
from nnunet_varaug.commands.uncertainty_flags import add_review_flags, check_review_names, review_options
from nnunet_varaug.evaluation import case_record, structures as structure_stats
from nnunet_varaug.report.uncertainty_report import ReviewOptions
from nnunet_varaug.evaluation import uncertainty, variability
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.inference.ensemble import (DEFAULT_WEIGHTS_GIB, ENSEMBLE, Weights, add_calibration, check_inputs,
                                              consensus_of, load_predictor, model_labels)
from nnunet_varaug.inference.schedule import Finished, Scratch, ensembles
from nnunet_varaug.report import overlays, variability_report as report
from nnunet_varaug.report.prediction import write_outputs
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.fileio import file_sha256, replacing, write_json, write_text

STATE = "varaug_predict.json"
UNCERTAINTY = "uncertainty"
FORMAT_VERSION = 2


# ---- one case -----------------------------------------------------------------------------------------------------
def tag(name: str) -> str:
    """A structure's name as it appears in file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_probabilities(out: str, case: str, mean: np.ndarray, props: dict) -> None:
    """``<case>.npz`` (key ``probabilities``, float32) and ``<case>.pkl`` (the properties), as
    ``export_prediction_from_logits`` of ``nnUNetv2_predict --save_probabilities`` writes them."""
    with replacing(os.path.join(out, case + ".npz"), ".npz") as tmp:
        np.savez_compressed(tmp, probabilities=mean)
    with replacing(os.path.join(out, case + ".pkl"), ".pkl") as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(props, f)


def uncertainty_maps(ens: uncertainty.RunningEnsemble, consensus: np.ndarray, structures, folder: str, case: str,
                     props: dict, keep: Optional[dict] = None):
    """Write the entropy, mutual information and disagreement maps (per region too, for region-based
    ensembles), one map in memory at a time; the sums are used up. Returns (entropy for the picture: the
    entropy, or the largest region entropy; its maximum possible value; disagreement)."""
    def write(array, what):
        report.write_map(array, os.path.join(folder, f"{case}_{what}.nii.gz"), props)

    dis = ens.disagreement(consensus)
    write(dis, "disagreement")
    if not ens.regions:
        entropy = ens.entropy()
        ens.sum = None  # the mean is no longer needed
        write(entropy, "entropy")
        mi = ens.mutual_information(entropy, in_place=True)
        write(mi, "mutual_information")
        if keep is not None:  # the per-structure record needs it (one more map held until the case is exported)
            keep["mi"] = mi
        ens.entropy_sum = None
        return entropy, None, dis
    shown = np.zeros(consensus.shape, dtype=np.float32)
    for r, st in enumerate(structures):
        h = ens.entropy(channel=r)
        write(h, f"entropy_{tag(st.name)}")
        np.maximum(shown, h, out=shown)
        write(ens.mutual_information(h, channel=r, in_place=True), f"mutual_information_{tag(st.name)}")
        del h
        write(ens.disagreement(consensus, st), f"disagreement_{tag(st.name)}")
    ens.sum = ens.entropy_sum = None
    return shown, 1.0, dis


def export_case(predictor, fin: Finished, out: str, structures, groups: Optional[List[List[int]]],
                save_probabilities: bool, ignore: Optional[int], review: Optional[ReviewOptions] = None) -> dict:
    """Finish one case's ensemble and write its files; returns its record for the state file."""
    lm, rw = predictor.label_manager, predictor.plans_manager.image_reader_writer_class()
    case, ens, props = fin.case, fin.ensemble, fin.properties
    mean = ens.finish()
    consensus = consensus_of(lm, mean)
    if fin.calibration is not None:
        add_calibration(fin.calibration, ENSEMBLE, mean, fin.gt, ignore, props["spacing"])
    if save_probabilities:
        write_probabilities(out, case.name, mean, props)
    per_structure = review is not None and not ens.regions
    soft = structure_stats.soft_voxels(mean, structures, lm.all_labels) if per_structure else None
    del mean
    os.makedirs(os.path.join(out, UNCERTAINTY), exist_ok=True)
    kept = {}
    shown, top, dis = uncertainty_maps(ens, consensus, structures, os.path.join(out, UNCERTAINTY), case.name, props,
                                       kept)
    extra = {}
    if per_structure:  # issue 19: structures.csv, lesions, label agreement (docs/inference.md)
        spacing = props["spacing"]
        extra = case_record.case_record(
            ens.maps, consensus, spacing, structures, soft, structure_stats.map_means(shown, consensus, structures,
                                                                                      spacing),
            structure_stats.map_means(kept["mi"], consensus, structures, spacing), mi_map=kept["mi"], gt=fin.gt,
            ignore=ignore, instances=review.instances, nsd_tolerance=review.nsd_tolerance)
    kept.clear()
    top = top or float(np.log2(len(lm.all_labels)))
    summary = uncertainty.summarize_case(ens.maps, consensus, props["spacing"], structures, groups)
    summary, folds = summary if groups else (summary, None)
    ens.maps.remove()
    ending = predictor.dataset_json["file_ending"]
    with replacing(os.path.join(out, case.name + ending), ending) as tmp:
        rw.write_seg(consensus, tmp, props)
    image = rw.read_images(case.images[:1])[0][0]
    png = overlays.render_case(os.path.join(out, "figures", f"{case.name}_overlay.png"), image, consensus, shown, dis,
                               props["spacing"], case.name, [(s.name, s.labels) for s in structures],
                               max_entropy=top)
    record = {"summary": summary.to_json(), "calibration": None if fin.calibration is None else
              fin.calibration.to_json(), "picture": os.path.relpath(png, out)}
    if folds is not None:
        record["folds"] = [s.to_json() for s in folds]
    record.update(extra)
    return record


# ---- the state of a run, over parts ----------------------------------------------------------------------------------
def state_name(part_id: int, num_parts: int) -> str:
    return STATE if num_parts == 1 else f"varaug_predict_part{part_id}of{num_parts}.json"


def read_records(output: str, identity: dict) -> dict:
    """``case -> record`` from every state file in ``output`` (all parts) made with ``identity``."""
    records = {}
    for path in sorted(glob.glob(os.path.join(output, "varaug_predict*.json")), key=os.path.getmtime):  # newest last
        try:
            with open(path) as f:
                state = json.load(f)
        except ValueError:  # unreadable: its cases are predicted again
            continue
        if state.get("identity") == identity:
            records.update(state.get("cases", {}))
    return records


def case_inputs(case: Case) -> List[str]:
    return [file_sha256(p) for p in case.images] + ([file_sha256(case.label)] if case.label else [])


def copy_nnunet_files(predictor, output: str) -> None:
    """dataset.json and plans.json of the models, as nnUNetv2_predict and nnUNetv2_ensemble leave them beside
    their predictions (nnUNetv2_ensemble, nnUNetv2_apply_postprocessing and nnUNetv2_evaluate_folder read them)."""
    write_text(os.path.join(output, "dataset.json"), json.dumps(predictor.dataset_json, indent=4) + "\n")
    write_text(os.path.join(output, "plans.json"), json.dumps(predictor.plans_manager.plans, indent=4) + "\n")


# ---- the whole command ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    """predict's settings beyond the experiments and folders (flags of nnUNetv2_predict where it has them)."""

    labels: Optional[str] = None
    device: str = "cuda"
    checkpoint: str = "checkpoint_final.pth"
    tta: bool = True
    step_size: float = 0.5
    flag_above: Optional[float] = None
    pictures: int = 20
    progress: bool = True
    save_probabilities: bool = False
    num_parts: int = 1
    part_id: int = 0
    npp: int = 0
    nps: int = 0
    verbose: bool = False
    weights_gib: float = DEFAULT_WEIGHTS_GIB
    review: ReviewOptions = dataclasses.field(default_factory=ReviewOptions)
    temperature: Optional[Union[float, str]] = None  # a number, or "auto" (analyze --calibration's fit)


def predict_folder(experiments: Union[Experiment, Sequence[Experiment]], images: str, output: str,
                   options: Optional[Options] = None, **settings) -> dict:
    """Run ``predict`` (see the module docstring) with one Experiment per fold; ``settings`` are
    :class:`Options` fields. Returns ``{"predicted": [...], "skipped": [...], "output", "loads", "resident"}``."""
    opt = dataclasses.replace(options or Options(), **settings)
    experiments = [experiments] if isinstance(experiments, Experiment) else list(experiments)
    first = experiments[0]
    output = os.path.abspath(output)
    cases, paths = check_inputs(experiments, images, opt.labels, output, opt.checkpoint)
    labels = model_labels(experiments)
    folds = [e.fold for e in experiments]
    shas = dict(zip(labels, (file_sha256(p) for p in paths)))
    opt = dataclasses.replace(opt, temperature=resolve_temperature(experiments, opt.temperature, shas))
    check_review_names(first, opt.review)
    identity = {"format": FORMAT_VERSION, "dataset": first.dataset, "plans": first.plans,
                "configuration": first.configuration, "folds": folds, "checkpoint": opt.checkpoint, "tta": opt.tta,
                "step_size": opt.step_size, "replicas": shas, "temperature": opt.temperature,
                "instances": list(opt.review.instances), "nsd_tolerance": opt.review.nsd_tolerance}
    mine = cases[opt.part_id::opt.num_parts]
    records = read_records(output, identity)
    dj = first.dataset_json
    structures = variability.structures_from_dataset_json(dj)
    ignore = variability.ignore_label(dj)
    inputs = {c.name: case_inputs(c) for c in mine}
    wanted = [dj["file_ending"]] + ([".npz", ".pkl"] if opt.save_probabilities else [])
    todo = [c for c in mine if records.get(c.name, {}).get("inputs") != inputs[c.name]
            or not all(os.path.isfile(os.path.join(output, c.name + w)) for w in wanted)]
    state_path = os.path.join(output, state_name(opt.part_id, opt.num_parts))
    state = {"identity": identity, "cases": {c.name: records[c.name] for c in mine
                                             if c not in todo and c.name in records}}
    predictor = load_predictor(first, first.replica_names[0], opt.checkpoint, opt.device, opt.tta, opt.step_size,
                               opt.verbose)
    predictor.varaug_temperature = opt.temperature  # applied to each model's probabilities (inference.schedule)
    os.makedirs(output, exist_ok=True)  # only now: every check above has passed
    copy_nnunet_files(predictor, output)
    weights = None
    groups = None
    if len(experiments) > 1:
        k = first.num_replicas
        groups = [list(range(f * k, (f + 1) * k)) for f in range(len(experiments))]
    if todo:
        weights = Weights(paths, opt.weights_gib * 2 ** 30, first=predictor.list_of_parameters[0])
        run_cases(predictor, weights, labels, todo, output, opt, structures, groups, ignore,
                  lambda case, record: record_case(state, state_path, case, inputs, record))
    write_json(state_path, state)
    write_tables(experiments, output, identity, cases, structures, labels, folds, opt)
    return {"predicted": [c.name for c in todo], "skipped": [c.name for c in mine if c not in todo],
            "output": output, "loads": dict(weights.loads) if weights else {},
            "resident": weights.resident if weights else None}


def record_case(state: dict, path: str, case: Case, inputs: dict, record: dict) -> None:
    state["cases"][case.name] = {"inputs": inputs[case.name], **record}
    write_json(path, state)


def run_cases(predictor, weights, labels, todo, output, opt: Options, structures, groups, ignore, done) -> None:
    """The engine over this part's cases; each finished case exported (in ``-nps`` background threads) and
    recorded (``done``) in case order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    scratch = Scratch(os.path.join(output, ".varaug_scratch" + ("" if opt.num_parts == 1 else f"_part{opt.part_id}")))
    pool = ThreadPoolExecutor(opt.nps) if opt.nps > 0 else None
    pending = deque()
    try:
        work = ensembles(predictor, weights, labels, todo, scratch, opt.npp, ignore, opt.verbose)
        for fin in tqdm(work, total=len(todo), desc="predicting", unit="case", disable=not opt.progress):
            if pool is None:
                done(fin.case, export_case(predictor, fin, output, structures, groups, opt.save_probabilities, ignore,
                                           opt.review))
                scratch.drop(fin.case.name)
                continue
            while len(pending) >= opt.nps:
                case, future = pending.popleft()
                done(case, future.result())
                scratch.drop(case.name)
            pending.append((fin.case, pool.submit(export_case, predictor, fin, output, structures, groups,
                                                  opt.save_probabilities, ignore, opt.review)))
            del fin
        while pending:
            case, future = pending.popleft()
            done(case, future.result())
            scratch.drop(case.name)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        scratch.close()


def write_tables(experiments, output: str, identity: dict, cases, structures, labels, folds, opt: Options) -> None:
    """volumes.csv, review.csv, calibration.csv, folds.csv (several folds) and report.html from the records of all
    parts; cases of parts not finished yet are left out and named."""
    records = read_records(output, identity)
    done = {c.name: records[c.name] for c in cases if c.name in records}
    missing = [c.name for c in cases if c.name not in records]
    if missing:
        print(f"note: the tables cover {len(done)} of {len(cases)} cases; not predicted yet (other parts?): "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The last part to finish writes "
              f"complete tables")
    if not done:
        return
    shown = experiments[0] if len(folds) == 1 else dataclasses.replace(experiments[0],
                                                                       fold=" ".join(map(str, folds)))
    write_outputs(shown, output, done, structures, labels, opt.flag_above, opt.pictures, opt.review,
                  opt.temperature)
    if len(folds) > 1:
        import pandas as pd

        rows = [row for c, r in done.items() for row in uncertainty.fold_rows(
            c, folds, [uncertainty.CaseSummary.from_json(s) for s in r["folds"]], structures)]
        write_text(os.path.join(output, "folds.csv"), pd.DataFrame(rows).to_csv(index=False, float_format="%.10g"))


# ---- command line ---------------------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", dest="fold", nargs="+", required=True,
                   help="fold(s): 0..4 or 'all'; with several, the ensemble of every fold's K replicas")
    p.add_argument("-n", dest="num_replicas", type=int, required=True, help="number of replicas K (per fold)")
    add_trainer_arguments(p)
    p.add_argument("--kind", default="seed", choices=["seed", "mca"],
                   help="seed replicas (_seed<K>) or numerical replicas (_mca<K>)")
    add_start(p)
    p.add_argument("-i", dest="images", required=True, help="folder of images named <case>_XXXX<ending>")
    p.add_argument("-o", dest="output", required=True, help="output folder (must not be or contain an input folder)")
    p.add_argument("-l", dest="labels", default=None, help="folder of label maps <case><ending>: adds calibration")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="as nnUNetv2_predict's -chk")
    p.add_argument("-step_size", type=float, default=0.5, help="as nnUNetv2_predict's -step_size")
    add_disable_tta(p)
    add_device(p)
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write the mean probabilities as <case>.npz + <case>.pkl, as nnUNetv2_predict does")
    p.add_argument("-npp", type=int, default=1,
                   help="background processes preprocessing the next cases (0: in this process; default 1)")
    p.add_argument("-nps", type=int, default=0,
                   help="background threads exporting finished cases while the next is predicted (default 0; each "
                        "holds one more case's mean probabilities)")
    p.add_argument("-num_parts", type=int, default=1, help="as nnUNetv2_predict: split the cases into this many parts")
    p.add_argument("-part_id", type=int, default=0, help="as nnUNetv2_predict: which part this run predicts (0-based)")
    p.add_argument("--continue_prediction", "--c", action="store_true",
                   help="accepted for nnUNetv2_predict's command lines: predict always continues (finished cases "
                        "are skipped)")
    p.add_argument("-prev_stage_predictions", default=None, help="refused: cascades are not supported")
    p.add_argument("--weights-memory", dest="weights_memory", type=float, default=DEFAULT_WEIGHTS_GIB,
                   help=f"GiB for all models' network weights together (default {DEFAULT_WEIGHTS_GIB:g}); beyond, "
                        f"predict goes model by model over batches of cases")
    p.add_argument("--flag-above", dest="flag_above", type=float, default=None,
                   help="mark cases whose review score exceeds this value (review.csv column 'flagged')")
    p.add_argument("--pictures", type=int, default=20, help="cases pictured in report.html (default 20)")
    p.add_argument("--verbose", action="store_true", help="nnU-Net's messages, the order of work and timings")
    add_quiet(p)
    p.add_argument("--disable_progress_bar", dest="quiet", action="store_true", help="as --quiet (nnU-Net's name)")
    add_review_flags(p)
    p.add_argument("--temperature", default=None, metavar="T|auto",
                   help="scale every replica's probabilities by softmax(z / T) before averaging; 'auto': the T that "
                        "`analyze --calibration` fitted for these replicas")


def run(args: argparse.Namespace) -> int:
    folds = check_flags(args)
    review = review_options(args)
    experiments = [Experiment.from_args(args.dataset, args.configuration, f, args.num_replicas, args.base, args.kind,
                                        args.plans, args.start) for f in folds]
    result = predict_folder(experiments, args.images, args.output, Options(
        args.labels, args.device, args.checkpoint, not args.disable_tta, args.step_size, args.flag_above,
        args.pictures, not args.quiet, args.save_probabilities, args.num_parts, args.part_id, args.npp, args.nps,
        args.verbose, args.weights_memory, review, args.temperature))
    part = "" if args.num_parts == 1 else f"part {args.part_id} of {args.num_parts}: "
    print(f"{part}predicted {len(result['predicted'])} case(s), skipped {len(result['skipped'])} unchanged; "
          f"outputs in {result['output']} (review.csv, volumes.csv, report.html)")
    return 0
