"""Names of things on disk and on the command line, as pure functions of an experiment's settings.

Where a fold's sample set lives, where nnU-Net keeps a trainer's checkpoints, the flags that name an experiment
and the exact ``nnunet_varaug samples`` command that (re)builds a sample set; the nnU-Net environment variables, dataset
names and folds as the user gives them, checked. :class:`nnunet_varaug.training.experiment.Experiment` and the trainers
that run inside ``nnUNetv2_train`` both derive their paths and messages from here.
"""
from __future__ import annotations

import os
from typing import Optional, Union

from nnunet_varaug.utilities.errors import VarAugError

Fold = Union[int, str]


def dataset_id_of(name: str) -> int:
    """``"Dataset004_Hippocampus"`` -> ``4``."""
    return int(name[len("Dataset"):len("Dataset") + 3])


def samples_folder_for(preprocessed_base: str, plans: str, configuration: str, fold: Fold) -> str:
    """Where a fold's sample set lives: ``<preprocessed_base>/varaug/<plans>__<configuration>__fold_<fold>``."""
    return os.path.join(preprocessed_base, "varaug", f"{plans}__{configuration}__fold_{fold}")


def model_folder_for(results: str, dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder: ``<results>/<dataset>/<trainer>__<plans>__<configuration>``."""
    return os.path.join(results, dataset, f"{trainer}__{plans}__{configuration}")


def fold_folder_for(model_folder: str, fold: Fold) -> str:
    """``<model_folder>/fold_<fold>``."""
    return os.path.join(model_folder, f"fold_{fold}")


def final_checkpoint_in(fold_folder: str) -> str:
    """The checkpoint a finished training leaves: ``<fold_folder>/checkpoint_final.pth``."""
    return os.path.join(fold_folder, "checkpoint_final.pth")


def latest_checkpoint_in(fold_folder: str) -> str:
    """The checkpoint an interrupted training continues from: ``<fold_folder>/checkpoint_latest.pth``."""
    return os.path.join(fold_folder, "checkpoint_latest.pth")


def experiment_flags(dataset_id: int, configuration: str, fold: Optional[Fold], num_replicas: int,
                     base: str = "nnUNetTrainer", kind: str = "seed", plans: str = "nnUNetPlans",
                     start: int = 0) -> str:
    """The ``-d -c -f -n [-p] [-tr] [--kind] [--start]`` flags that name an experiment, defaults left out
    (``fold`` None: no ``-f``)."""
    extra = "" if plans == "nnUNetPlans" else f" -p {plans}"
    extra += "" if base == "nnUNetTrainer" else f" -tr {base}"
    extra += "" if kind == "seed" else f" --kind {kind}"
    extra += "" if int(start) == 0 else f" --start {int(start)}"
    fold_flag = "" if fold is None else f" -f {fold}"
    return f"-d {int(dataset_id)} -c {configuration}{fold_flag} -n {int(num_replicas)}{extra}"


def samples_command(dataset_id: int, configuration: str, fold: Optional[Fold], num_replicas: int,
                    base: str = "nnUNetTrainer", kind: str = "seed", plans: str = "nnUNetPlans", start: int = 0,
                    force: bool = False, source: str = "in-fold") -> str:
    """The exact ``nnunet_varaug samples …`` command line, for error messages: in-fold for ``fold``, or
    ``--source out-of-fold`` (no ``-f``: that set covers every fold)."""
    if source == "out-of-fold":
        fold = None
    flags = experiment_flags(dataset_id, configuration, fold, num_replicas, base, kind, plans, start)
    return (f"nnunet_varaug samples {flags}" + (f" --source {source}" if source != "in-fold" else "")
            + (" --force" if force else ""))


def require_env(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise VarAugError(f"{name} is not set: {what}. Set it, e.g. `export {name}=/data/{name}` (see nnU-Net's "
                          f"documentation/setting_up_paths.md).")
    return value


def dataset_name(dataset: Union[int, str]) -> str:
    """``4`` / ``"4"`` / ``"Dataset004_Hippocampus"`` -> ``"Dataset004_Hippocampus"``, with a clear error."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise VarAugError(f"unknown dataset '{dataset}': no such dataset in nnUNet_raw, nnUNet_preprocessed or "
                          f"nnUNet_results ({str(e).splitlines()[0]}). Convert it to nnU-Net's format first "
                          f"(e.g. `nnUNetv2_convert_MSD_dataset -i TaskXX_Name`).") from None


def parse_fold(fold: Union[int, str]) -> Union[int, str]:
    if str(fold) == "all":
        return "all"
    try:
        value = int(fold)
    except ValueError:
        raise VarAugError(f"fold must be an integer or 'all', got '{fold}'") from None
    if value < 0:
        raise VarAugError(f"fold must be >= 0, got {value}")
    return value
