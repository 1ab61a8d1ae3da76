"""``nnunet_varaug samples``: the replicas' label maps of the training cases, written as a sample set (in-fold for
one fold, or out-of-fold for every fold); the writer is :mod:`nnunet_varaug.inference.samples`."""
from __future__ import annotations

import argparse

from nnunet_varaug.commands.flags import add_device, add_experiment_arguments
from nnunet_varaug.inference.samples import write_out_of_fold_samples, write_samples
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError


def configure_parser(p: argparse.ArgumentParser) -> None:
    # -f names the fold of an in-fold set; an out-of-fold set covers every fold
    add_experiment_arguments(p, fold_help="fold (0..4 or 'all'); required for --source in-fold, left out for "
                                          "out-of-fold")
    p.add_argument("--source", default="in-fold", choices=["in-fold", "out-of-fold"],
                   help="in-fold (default): fold F's replicas predict fold F's training cases; out-of-fold: each case "
                        "is predicted by the replicas of the fold that validates it (needs K replicas of every fold; "
                        "writes varaug/<Plans>__<Config>__out-of-fold/)")
    add_device(p)
    p.add_argument("--tta", dest="tta", action="store_true", default=True,
                   help="predict with mirroring test-time augmentation, as nnUNetv2_predict does (default)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="predict without mirroring (faster; maps then differ from nnUNetv2_predict's)")
    p.add_argument("--force", action="store_true", help="rebuild every case even if it is up to date")


def run(args: argparse.Namespace) -> int:
    source = getattr(args, "source", "in-fold")
    fold = args.fold
    if source == "out-of-fold":
        if fold is not None:
            raise VarAugError(f"-f {fold}: an out-of-fold sample set covers every fold (each case predicted by the "
                              f"replicas of the fold that validates it); leave out -f")
        fold = 0  # only to check the experiment's flags; every fold is used
    elif fold is None:
        raise VarAugError("-f is required for in-fold samples (the fold whose replicas predict its own training "
                          "cases); or pass --source out-of-fold")
    exp = Experiment.from_args(args.dataset, args.configuration, fold, args.num_replicas, args.base,
                               args.kind, args.plans, getattr(args, "start", 0))
    if source == "out-of-fold":
        write_out_of_fold_samples(exp, device=args.device, tta=args.tta, force=args.force)
    else:
        write_samples(exp, device=args.device, tta=args.tta, force=args.force)
    return 0
