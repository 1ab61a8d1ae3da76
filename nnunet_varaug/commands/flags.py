"""The flags several commands share, each declared once: the experiment's ``-d -c -f -n -tr -p --kind``,
``--start``, ``-device``, ``--disable_tta``, ``--quiet`` — with nnU-Net's spelling and meaning."""
from __future__ import annotations

import argparse
from typing import Optional

DEVICES = ["cuda", "cpu", "mps"]


def add_experiment_arguments(p: argparse.ArgumentParser, kind: bool = True, fold_help: Optional[str] = None,
                             start: bool = True) -> None:
    """The flags that name a :class:`~nnunet_varaug.training.experiment.Experiment`: -d -c -f -n [-p] [-tr]
    [--kind] [--start].

    Args:
        kind: add ``--kind seed|mca`` (one kind).
        fold_help: -f is optional (default None) with this help text, for a command that checks it itself.
        start: add ``--start``.
    """
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    if fold_help is None:
        p.add_argument("-f", dest="fold", required=True, help="fold (0..4 or 'all')")
    else:
        p.add_argument("-f", dest="fold", default=None, help=fold_help)
    p.add_argument("-n", dest="num_replicas", type=int, required=True, help="number of replicas K")
    add_trainer_arguments(p)
    if kind:
        p.add_argument("--kind", default="seed", choices=["seed", "mca"],
                       help="seed replicas (_seed<K>) or numerical replicas (_mca<K>)")
    if start:
        add_start(p)


def add_trainer_arguments(p: argparse.ArgumentParser) -> None:
    """``-tr BASE`` and ``-p PLANS``, as nnU-Net's commands name them."""
    p.add_argument("-tr", dest="base", default="nnUNetTrainer", help="base trainer (default nnUNetTrainer)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")


def add_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", type=int, default=0, help="index of the first replica (default 0)")


def add_device(p: argparse.ArgumentParser, like: str = "nnUNetv2_predict") -> None:
    p.add_argument("-device", default="cuda", choices=DEVICES, help=f"as {like}'s -device")


def add_disable_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable_tta", action="store_true",
                   help="as nnUNetv2_predict's --disable_tta: no mirroring test-time augmentation")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
