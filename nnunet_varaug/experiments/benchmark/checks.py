"""The benchmark's checks before any stage runs: the trainer names parse, and every stage asked for has its inputs
on disk or made earlier in the same run (else the command that makes them)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from nnunet_varaug.utilities.errors import VarAugError

if TYPE_CHECKING:
    from nnunet_varaug.experiments.benchmark.state import Benchmark


def check_trainers(bench: "Benchmark") -> None:
    """The base trainer must be one nnU-Net can find; its ``_seed``/``_varaug`` names must parse."""
    from nnunet_varaug.utilities import names
    from nnunet_varaug.training import registry

    try:
        registry.resolve(bench.base)
        for name in [*bench.replica_names, *bench.varaug_trainers, *bench.all_stability_names]:
            names.parse(name)
    except names.TrainerNameError as e:
        raise VarAugError(f"unknown base trainer '{bench.base}': {e}") from None


def check_requirements(bench: "Benchmark", stage: str, planned: Sequence[str],
                       done: Callable[["Benchmark", str], bool]) -> None:
    """A stage asked for before its inputs exist (``done(bench, need)`` false, and not about to be made by this run)
    is an error."""
    from nnunet_varaug.experiments.benchmark.state import REQUIRES

    for need in REQUIRES[stage]:
        if need in planned or done(bench, need):
            continue
        raise VarAugError(f"stage '{stage}' needs stage '{need}' first ({_what(bench, need)} not on disk): run "
                          f"`nnunet_varaug benchmark {bench.flags} --stages {need}`, or leave out --stages to run "
                          f"every stage in order")


def _what(bench: "Benchmark", stage: str) -> str:
    return {"convert": f"{bench.raw_folder}",
            "plan_preprocess": f"plans and preprocessed {bench.configuration} data",
            "holdout": "the held-out test split", "splits": f"a {bench.num_folds}-fold splits_final.json",
            "baseline": f"a finished {bench.base} of fold {bench.fold}",
            "replicas": f"{bench.num_replicas} finished replicas {bench.base}_seed0..{bench.num_replicas - 1} of "
                        f"fold(s) {', '.join(map(str, bench.replica_folds))}",
            "samples": "the replicas' variability samples",
            "varaug": f"finished {', '.join(bench.varaug_trainers)}",
            "stability": f"finished {', '.join(bench.all_stability_names)}",
            "evaluate": "the evaluation", "analyze": "the variability report"}[stage]
