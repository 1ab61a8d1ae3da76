"""``nnunet_varaug compare``: is trainer B better than trainer A beyond seed noise? K seed replicas of each.

Flow: one :class:`~nnunet_varaug.training.experiment.Experiment` per trainer (``-tr A B [C …]``, K seed replicas
``<X>_seed<k>`` each); every missing replica is named with the exact ``nnunet_varaug replicas`` command that trains
it, before anything is written. The cases (the fold's validation cases, or ``-i`` images with ``-l`` labels) are
checked, then every replica predicts them through :func:`nnunet_varaug.inference.cache.predict_replicas` (the engine
and cache of ``analyze``; a rerun predicts nothing again), into ``OUT/trainers/<X>/predictions/<replica>/``. Per
case and replica: Dice to the labels per structure (nnU-Net's convention, :func:`variability.analyze_case`) and the
structure's volume against the labels' volume. Per pair of trainers and structure (and the mean over structures):
:func:`nnunet_varaug.evaluation.comparison.compare`; the report: :mod:`nnunet_varaug.report.comparison`.
"""
from __future__ import annotations

import argparse
import itertools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_quiet, add_start
from nnunet_varaug.evaluation import comparison, variability
from nnunet_varaug.inference.cache import load_maps, predict_replicas, reader_for
from nnunet_varaug.inference.cases import check_ground_truth, list_cases
from nnunet_varaug.report.comparison import MEAN_KEY, Row, write_outputs
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities import paths
from nnunet_varaug.utilities.errors import VarAugError

TRAINERS = "trainers"
"""``OUT/trainers/<trainer>/predictions/<replica>/``: each trainer's cached predictions."""


def experiments_for(dataset, configuration: str, fold, num_replicas: int, trainers: Sequence[str],
                    plans: str = "nnUNetPlans", start: int = 0) -> List[Experiment]:
    """One checked experiment per trainer; an error naming the ``replicas`` command of every trainer whose
    replicas are not all trained."""
    if len(trainers) < 2:
        raise VarAugError(f"-tr needs at least two trainers to compare, got {' '.join(trainers) or 'none'}")
    twice = sorted({t for t in trainers if list(trainers).count(t) > 1})
    if twice:
        raise VarAugError(f"-tr lists {', '.join(twice)} more than once; name each trainer once")
    if num_replicas is None or int(num_replicas) < 2:
        raise VarAugError(f"-n {num_replicas}: compare needs at least 2 seed replicas of each trainer to measure "
                          f"seed noise (and {comparison.MIN_REPLICAS} for a verdict)")
    experiments = [Experiment.from_args(dataset, configuration, fold, num_replicas, t, "seed", plans, start)
                   for t in trainers]
    missing = []
    for exp in experiments:
        absent = [n for n in exp.replica_names if exp.replica_state(n) != "finished"]
        if absent:
            missing.append(f"  {exp.base}: {', '.join(absent)} not trained; run\n"
                           f"    nnunet_varaug replicas {exp.flags}")
    if missing:
        first = experiments[0]
        raise VarAugError(f"compare needs {first.num_replicas} finished seed replicas of each trainer "
                          f"({first.dataset} {first.configuration} fold {first.fold}):\n" + "\n".join(missing))
    return experiments


def score_cases(experiments: Sequence[Experiment], cases, folders: Dict[str, str], rw, output: str):
    """Per trainer ``(S, n, K)`` arrays of Dice to the labels and of absolute volume differences (mm³), and the
    long table of every value (``scores.csv``)."""
    import pandas as pd

    dj = experiments[0].dataset_json
    ending, structures = dj["file_ending"], variability.structures_from_dataset_json(dj)
    values, ignore = variability.label_values(dj), variability.ignore_label(dj)
    dice = {e.base: np.empty((len(structures), len(cases), e.num_replicas)) for e in experiments}
    volume = {e.base: np.empty_like(dice[e.base]) for e in experiments}
    rows = []
    for i, case in enumerate(cases):
        gt = rw.read_seg(case.label)[0][0]
        for exp in experiments:
            maps, props = load_maps(rw, [os.path.join(folders[n], case.name + ending) for n in exp.replica_names],
                                    case.name, output)
            if gt.shape != maps.shape[1:]:
                raise VarAugError(f"labels {case.label} have shape {gt.shape}, the predictions of {case.name} "
                                  f"{maps.shape[1:]}: they do not belong to this image")
            res = variability.analyze_case(maps, props["spacing"], structures, values, gt, ignore)
            k = exp.num_replicas
            predicted = res.gt_pred_volume[:, :k] * res.voxel_volume
            truth = res.gt_volume * res.voxel_volume
            dice[exp.base][:, i] = res.dice_to_gt
            volume[exp.base][:, i] = np.abs(predicted - truth[:, None])
            rows += [{"case": case.name, "trainer": exp.base, "replica": name, "structure": s.name, "label": s.key,
                      "dice": res.dice_to_gt[j, r], "volume_mm3": predicted[j, r], "label_volume_mm3": truth[j],
                      "volume_abs_diff_mm3": volume[exp.base][j, i, r]}
                     for r, name in enumerate(exp.replica_names) for j, s in enumerate(structures)]
    return structures, dice, volume, pd.DataFrame(rows)


def mean_over_structures(table: np.ndarray) -> np.ndarray:
    """``(S, n, K)`` -> ``(n, K)``: per case and replica, the mean Dice over the structures with a defined Dice
    (NaN only where every structure's Dice is NaN)."""
    defined = np.isfinite(table)
    total = np.where(defined, table, 0.0).sum(0)
    count = defined.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def comparison_rows(trainers: Sequence[str], structures, dice, volume,
                    target_halfwidth: Optional[float]) -> List[Row]:
    rows = []
    for a, b in itertools.combinations(trainers, 2):
        for j, s in enumerate(structures):
            rows.append(Row(a, b, "dice", s.name, s.key, comparison.compare(dice[a][j], dice[b][j], True,
                                                                           target_halfwidth)))
        if len(structures) > 1:
            rows.append(Row(a, b, "dice", "mean over structures", MEAN_KEY, comparison.compare(
                mean_over_structures(dice[a]), mean_over_structures(dice[b]), True, target_halfwidth)))
        for j, s in enumerate(structures):
            rows.append(Row(a, b, "volume", s.name, s.key,
                            comparison.compare(volume[a][j], volume[b][j], higher_is_better=False)))
    return rows


def compare_trainers(dataset, configuration: str, fold, num_replicas: int, trainers: Sequence[str], output: str,
                     plans: str = "nnUNetPlans", start: int = 0, images: Optional[str] = None,
                     labels: Optional[str] = None, target_halfwidth: Optional[float] = None, device: str = "cuda",
                     progress: bool = True, tta: bool = True) -> Tuple[List[Row], str]:
    """The whole ``compare`` command: ``(rows in compare.csv's order, path of compare.md)``. Raises VarAugError,
    with nothing written, on missing replicas and bad input."""
    if target_halfwidth is not None and not target_halfwidth > 0:
        raise VarAugError(f"--target-halfwidth must be a positive Dice difference (e.g. 0.005), got {target_halfwidth}")
    if images is not None and labels is None:
        raise VarAugError("compare measures Dice against labels: pass -l LABELS with -i IMAGES")
    experiments = experiments_for(dataset, configuration, fold, num_replicas, trainers, plans, start)
    first = experiments[0]
    cases = list_cases(first, images, labels)
    rw = reader_for(first.dataset_json, cases[0].images[0])
    ignore = variability.ignore_label(first.dataset_json)
    check_ground_truth(rw, cases, variability.label_values(first.dataset_json) + ([] if ignore is None else [ignore]))
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    folders: Dict[str, str] = {}
    for exp in experiments:  # one cache per trainer: analyze's mean probabilities are kept per kind, not per trainer
        folders.update(predict_replicas([exp], cases, os.path.join(output, TRAINERS, exp.base), device, progress,
                                        None, tta))
    structures, dice, volume, scores = score_cases(experiments, cases, folders, rw, output)
    rows = comparison_rows(list(trainers), structures, dice, volume, target_halfwidth)
    where = (f"fold {first.fold}'s validation cases" if images is None else f"the images of {images}")
    intro = [f"{first.dataset}, configuration `{first.configuration}`, fold {first.fold}, plans `{first.plans}`: "
             f"{first.num_replicas} seed replicas of each trainer "
             f"({', '.join(f'`{e.replica_names[0]}`…`{e.replica_names[-1]}`' for e in experiments)}), "
             f"{len(cases)} cases ({where}), test-time mirroring {'on' if tta else 'off'}.",
             "Each difference is B − A over cases and replicas; its 95 % interval treats both the cases and the "
             "trainings as random, so it says how the trainers compare on new cases of this kind when trained "
             "again with new seeds (docs/compare.md)."]
    more = {e.base: f"nnunet_varaug replicas {paths.experiment_flags(e.dataset_id, e.configuration, e.fold, comparison.MIN_REPLICAS, e.base, 'seed', e.plans, e.start)}"
            for e in experiments} if first.num_replicas < comparison.MIN_REPLICAS else None
    title = f"Trainer comparison — {first.dataset} {first.configuration} fold {first.fold}"
    return rows, write_outputs(output, title, intro, rows, list(trainers), scores, more)


# ---- command line -----------------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", dest="fold", required=True, help="fold (0..4 or 'all')")
    p.add_argument("-tr", dest="trainers", nargs="+", required=True, metavar="TRAINER",
                   help="two or more base trainers; each needs K seed replicas <TRAINER>_seed<k>")
    p.add_argument("-n", dest="num_replicas", type=int, required=True,
                   help=f"seed replicas K of each trainer (>= 2; >= {comparison.MIN_REPLICAS} for a verdict)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    add_start(p)
    p.add_argument("--cases", choices=["validation"], default="validation",
                   help="the cases: the fold's validation cases (default), or -i/-l")
    p.add_argument("-i", dest="images", default=None, help="folder of raw images (<case>_XXXX<ending>) instead")
    p.add_argument("-l", dest="labels", default=None, help="folder of their label maps (needed with -i)")
    p.add_argument("--target-halfwidth", type=float, default=None, metavar="H",
                   help="also say how many replicas give a 95 %% interval of +-H Dice (e.g. 0.005)")
    add_device(p)
    p.add_argument("-o", dest="output", required=True, help="output folder (compare.md, compare.csv, figures)")
    add_disable_tta(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    rows, path = compare_trainers(args.dataset, args.configuration, args.fold, args.num_replicas, args.trainers,
                            args.output, args.plans, args.start, args.images, args.labels, args.target_halfwidth,
                            args.device, progress=not args.quiet, tta=not args.disable_tta)
    from nnunet_varaug.report.comparison import verdict

    for row in rows:
        if row.measure == "dice":
            label = "" if row.label == MEAN_KEY else f" ({row.label})"
            print(f"{row.structure}{label}, {row.trainer_b} vs {row.trainer_a}: {verdict(row).replace('`', '').replace('**', '')}")
    print(f"report: {path}")
    return 0
