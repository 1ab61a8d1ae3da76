"""The flags of ``predict`` and ``analyze`` that say how the review score and the failure detection are defined
(docs/inference.md), declared and checked once."""
from __future__ import annotations

import argparse

from nnunet_varaug.evaluation import failure_detection, structures, variability
from nnunet_varaug.report.uncertainty_report import ReviewOptions
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError


def add_review_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", nargs="+", default=[], metavar="LABEL",
                   help="structures (name or label value) to count as lesions: connected components of the "
                        "consensus and each replica, matched (lesions.csv, lesion_counts.csv)")
    p.add_argument("--failure-dice", dest="failure_dice", type=float, default=failure_detection.FAILURE_DICE,
                   help=f"with labels: a Dice below this is a failure (default {failure_detection.FAILURE_DICE})")
    p.add_argument("--min-volume", dest="min_volume", type=float, default=structures.MIN_VOLUME_MM3,
                   help=f"review score: disagreement about structures smaller than this (mm³) counts in proportion "
                        f"to their size (default {structures.MIN_VOLUME_MM3:g})")
    p.add_argument("--may-be-absent", dest="may_be_absent", nargs="+", default=[], metavar="LABEL",
                   help="structures (name or label value) that may be missing from an image: when every replica "
                        "leaves them empty that is agreement (score 0), else it scores 1")
    p.add_argument("--nsd-tolerance", dest="nsd_tolerance", type=float, default=failure_detection.NSD_TOLERANCE_MM,
                   help=f"with labels: tolerance of the normalized surface Dice in mm (default "
                        f"{failure_detection.NSD_TOLERANCE_MM:g})")


def review_options(args: argparse.Namespace) -> ReviewOptions:
    """The flags checked (a refusal names the fix) and gathered."""
    if not 0 < args.failure_dice <= 1:
        raise VarAugError(f"--failure-dice {args.failure_dice}: a Dice threshold in (0, 1], e.g. 0.8")
    if args.min_volume < 0:
        raise VarAugError(f"--min-volume {args.min_volume}: a volume in mm³, 0 or more (e.g. 100)")
    if not args.nsd_tolerance > 0:
        raise VarAugError(f"--nsd-tolerance {args.nsd_tolerance}: a distance in mm above 0 (e.g. 2)")
    return ReviewOptions(min_volume=args.min_volume, may_be_absent=tuple(args.may_be_absent),
                         flag_above=getattr(args, "flag_above", None), failure_dice=args.failure_dice,
                         instances=tuple(args.instances), nsd_tolerance=args.nsd_tolerance)


def check_review_names(exp: Experiment, review: ReviewOptions) -> None:
    """--may-be-absent and --instances name structures of the experiment's dataset (else VarAugError)."""
    try:
        structures.check_structure_names(list(review.may_be_absent) + list(review.instances),
                                         variability.structures_from_dataset_json(exp.dataset_json),
                                         "--may-be-absent/--instances")
    except ValueError as e:
        raise VarAugError(str(e)) from None
