"""``predict``'s flags and settings checked before anything is written: the command line's values
(:func:`check_flags`) and ``--temperature`` resolved to a number (:func:`resolve_temperature`)."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence, Union

from nnunet_varaug.inference.replica_stats import load_temperature, temperature_path
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.paths import parse_fold


def check_flags(args: argparse.Namespace) -> List[Union[int, str]]:
    """The folds; every flag that is wrong or not supported refused (nothing written)."""
    if args.prev_stage_predictions is not None:
        raise VarAugError("-prev_stage_predictions: predict does not run cascades (3d_cascade_fullres). Ensemble "
                          "replicas of 3d_fullres (or 3d_lowres) instead, or predict the cascade with "
                          "nnUNetv2_predict -prev_stage_predictions")
    if args.flag_above is not None and not 0 <= args.flag_above <= 1:
        raise VarAugError(f"--flag-above {args.flag_above}: the review score lies in [0, 1]; use e.g. 0.1")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise VarAugError(f"-num_parts {args.num_parts} -part_id {args.part_id}: part ids run from 0 to "
                          f"num_parts - 1 (e.g. -num_parts 2 with -part_id 0 and -part_id 1)")
    for flag in ("npp", "nps"):
        if getattr(args, flag) < 0:
            raise VarAugError(f"-{flag} {getattr(args, flag)}: use 0 (none) or more")
    if args.num_replicas < 2:
        raise VarAugError(f"-n {args.num_replicas}: one model gives no spread, so no uncertainty, review list or "
                          f"volume interval; use -n 2 or more (train them with `nnunet_varaug replicas`), or "
                          f"nnUNetv2_predict for a single model")
    if args.temperature is not None and args.temperature != "auto":
        try:
            ok = float(args.temperature) > 0
        except ValueError:
            ok = False
        if not ok:
            raise VarAugError(f"--temperature {args.temperature}: give a number above 0 (e.g. 1.5) or 'auto'")
    if not args.weights_memory > 0:
        raise VarAugError(f"--weights-memory {args.weights_memory}: give the GiB allowed, e.g. 4")
    folds = [parse_fold(f) for f in args.fold]
    if len(set(folds)) != len(folds):
        raise VarAugError(f"-f {' '.join(args.fold)}: a fold is given twice")
    return folds


def resolve_temperature(experiments: Sequence[Experiment], given, shas: dict) -> Optional[float]:
    """``--temperature``: a number, or 'auto' = the fit of ``analyze --calibration`` for exactly these replicas
    (one fold). Refused, before anything is written, when there is no such fit."""
    if given is None:
        return None
    if given != "auto":
        return float(given)
    if len(experiments) > 1:
        raise VarAugError("--temperature auto with several folds: each fold has its own fit; give the number")
    exp = experiments[0]
    path = temperature_path(os.environ.get("nnUNet_results", ""), exp.dataset, exp.base, exp.kind, exp.plans,
                            exp.configuration, exp.fold)
    try:
        return float(load_temperature(path, {n: shas[n] for n in exp.replica_names if n in shas})["temperature"])
    except ValueError as e:
        raise VarAugError(f"--temperature auto: {e}. Fit it with `nnunet_varaug analyze {exp.flags} "
                          f"--calibration` (on the fold's validation cases), or give a number") from None
