"""``nnunet_varaug demo``: the whole pipeline on a built-in synthetic dataset, on the CPU, in minutes (the stages:
:mod:`nnunet_varaug.experiments.demo`)."""
from __future__ import annotations

import argparse

from nnunet_varaug.experiments.demo import run_demo


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", dest="output", default="nnunet_varaug_demo",
                   help="folder for the demo's nnU-Net folders and report (default ./nnunet_varaug_demo)")
    p.add_argument("-n", dest="num_replicas", type=int, default=3, help="number of seed replicas (default 3)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each tiny training (default 10)")
    p.add_argument("--iterations", type=int, default=25, help="iterations per epoch (default 25)")
    p.add_argument("--cases", type=int, default=14, help="synthetic training cases (default 14)")
    p.add_argument("--cohort", type=int, default=30, help="held-out cases for the downstream experiment (default 30)")


def run(args: argparse.Namespace) -> int:
    return run_demo(args.output, args.num_replicas, args.epochs, args.iterations, args.cases, args.cohort)
