"""``nnunet_varaug downstream``: the paper's augmentation experiment on per-replica features (the experiment itself:
:mod:`nnunet_varaug.experiments.downstream`)."""
from __future__ import annotations

import argparse
import os

from nnunet_varaug.experiments.downstream import format_verdict, output_folder, run_experiment
from nnunet_varaug.experiments.downstream_data import read_csv
from nnunet_varaug.experiments.downstream_protocol import ARMS, MODELS, TEST_FEATURES


def test_size(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The paper's augmentation experiment: train a regressor on N replica rows per subject "
                          "(N = 1..K) against the reference model alone, two Gaussian-noise controls (independent, "
                          "correlated) and replica rows + noise; MAE/RMSE/R² on test subjects split by group.")
    parser.add_argument("--features", required=True,
                        help="tidy CSV: subject, replica, feature columns; or analyze's cases.csv (pivoted to one "
                             "volume column per label, subject = case)")
    parser.add_argument("--targets", required=True,
                        help="CSV: subject, target (or subject plus one column, e.g. age)")
    parser.add_argument("-o", "--output", required=True, dest="output",
                        help="output folder; an analyze report folder gets OUT/downstream/ and a report section")
    parser.add_argument("--model", default="rf", choices=MODELS, help="regressor (default rf)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--n-max", type=int, default=None, help="largest N (default: all replicas)")
    parser.add_argument("--combinations", type=int, default=10,
                        help="at most this many replica combinations (and noise draws) per N (default 10)")
    parser.add_argument("--test-size", type=test_size, default=0.1,
                        help="test fraction of subjects, or a number of subjects (default 0.1)")
    parser.add_argument("--test-features", "--test-on", dest="test_features", default="reference",
                        choices=TEST_FEATURES,
                        help="describe test subjects by the reference model's features, the mean of their replica "
                             "rows, or all their replica rows with predictions averaged per subject (default "
                             "reference; --test-on is the old name)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, combinations, noise and models")
    parser.add_argument("--splits", type=int, default=1,
                        help="repeat with this many group shuffle splits (default 1)")
    parser.add_argument("--grid", action="store_true",
                        help="tune hyperparameters with an inner GroupKFold over training subjects")
    parser.add_argument("--reference", default=None,
                        help="the model that plays the single model, taken out of the replica pool (default: the "
                             "features' <Base>_ieee model; without one, this flag is required)")


def run(args: argparse.Namespace) -> int:
    features = read_csv(args.features, "--features")
    targets = read_csv(args.targets, "--targets")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    summary = run_experiment(features, targets, args.output, progress=True, model=args.model, arms=arms,
                             n_max=args.n_max, combinations=args.combinations, test_size=args.test_size,
                             test_features=args.test_features, seed=args.seed, grid=args.grid, reference=args.reference,
                             splits=args.splits)
    folder, report_dir = output_folder(args.output)
    print(format_verdict(summary, str(summary["reference"].iat[0])))
    print(f"results: {os.path.join(folder, 'results.csv')}, {os.path.join(folder, 'summary.csv')}, "
          f"{os.path.join(folder, 'figures', 'mae_vs_n.png')}"
          + (f"; section added to {os.path.join(report_dir, 'report.html')}" if report_dir else ""))
    return 0
