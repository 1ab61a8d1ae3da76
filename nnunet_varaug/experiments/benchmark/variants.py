"""The models a benchmark compares, per sample source: the replicas of each fold they need, the sample sets, the
variability-augmented models and (``--stability``) their seed replicas. Each ``run_<stage>`` brings its stage's
models up to date through the plugin's own commands, skipping what is already current.
"""
from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING

from nnunet_varaug.training import sampleset
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.fileio import file_sha256
from nnunet_varaug.launch.runner import parse_devices, run_devices, train_job

if TYPE_CHECKING:
    from nnunet_varaug.experiments.benchmark.state import Benchmark


def samples_current(bench: "Benchmark", source: str = "in-fold") -> bool:
    """A complete sample set of ``source`` made by exactly the current checkpoints of the replicas (sha256)."""
    from nnunet_varaug.training.outoffold import out_of_fold_folder

    oof = source == "out-of-fold"
    folder = out_of_fold_folder(bench.preprocessed_base, bench.plans, bench.configuration) if oof \
        else bench.layout.samples_folder
    try:
        manifest = sampleset.read_manifest(folder)
    except VarAugError:
        return False
    if manifest is None or manifest.get("source", "in-fold") != source:
        return False
    by_fold = manifest.get("replicas_by_fold", {}) if oof else {bench.fold: manifest.get("replicas") or []}
    if sorted(by_fold) != sorted(str(f) for f in (bench.replica_folds if oof else [bench.fold])):
        return False
    for fold, listed in by_fold.items():
        layout = bench.fold_layout(fold)
        if [r.get("name") for r in listed] != bench.replica_names:
            return False
        if not all(os.path.isfile(layout.final_checkpoint(r["name"]))
                   and r.get("sha256") == file_sha256(layout.final_checkpoint(r["name"])) for r in listed):
            return False
    return True


def run_replicas(bench: "Benchmark") -> None:
    """K replicas of the benchmark's fold, and of every fold for out-of-fold samples (``replicas -f`` takes one
    fold: one call per fold)."""
    for fold in bench.replica_folds:
        if not all(bench.trained(n, fold) for n in bench.replica_names):
            bench.call("replicas", bench.command("replicas", bench.fold_layout(fold)) + bench.device_flags())
        _validate_finished(bench, "replicas", bench.replica_names, fold)


def _validate_finished(bench: "Benchmark", stage: str, names, fold=None) -> None:
    """``replicas`` skips a replica whose training finished; one interrupted during nnU-Net's final validation has
    no ``validation/summary.json`` yet: validate it (``nnUNetv2_train … --val``)."""
    for name in names:
        if not bench.trained(name, fold):
            bench.train(stage, name, fold)


def run_samples(bench: "Benchmark") -> None:
    """``samples -f F`` (in-fold) and/or ``samples --source out-of-fold`` (no -f: every fold)."""
    for source in bench.sources:
        if samples_current(bench, source):
            continue
        command = bench.command("samples")
        if source == "out-of-fold":
            i = command.index("-f")
            command = command[:i] + command[i + 2:] + ["--source", "out-of-fold"]
        bench.call("samples", command)


def run_varaug(bench: "Benchmark") -> None:
    """Each variability-augmented model (in-fold and/or out-of-fold) trained; with ``--devices`` and both to
    train, side by side, one per device (as ``replicas --devices`` trains replicas)."""
    todo = [trainer for trainer in bench.varaug_trainers if not bench.trained(trainer)]
    if bench.devices is not None and len(todo) > 1:
        train_side_by_side(bench, "varaug", todo)
    else:
        for trainer in todo:
            bench.train("varaug", trainer)


def train_side_by_side(bench: "Benchmark", stage: str, trainers) -> None:
    """``trainers`` of the benchmark's fold through :func:`nnunet_varaug.launch.runner.run_devices`: one per device of
    ``--devices`` at a time, each seeing only its device. Each job's output goes to its own
    ``OUT/logs/<stage>.<trainer>.log``, which the stage log names; a failed job fails the stage after the others
    ended (what finished is kept, and the rerun continues the rest)."""
    from nnunet_varaug.experiments.benchmark.state import StageFailed

    jobs = []
    for trainer in trainers:
        job = train_job(bench.layout, trainer, bench.device)
        stage_log = bench.log(stage, job.command)
        job.log = os.path.join(os.path.dirname(stage_log), f"{stage}.{trainer}.log")
        jobs.append(job)
    with open(stage_log, "a") as log:
        log.writelines(f"# nnunet_varaug: {job.name} side by side (--devices {bench.devices}), its output in "
                       f"{job.log}\n" for job in jobs)
    run_devices(jobs, parse_devices(bench.devices))
    failed = [job for job in jobs if job.returncode != 0]
    if failed:
        raise StageFailed(f"stage '{stage}' failed: " + "; ".join(
            f"`{shlex.join(job.command)}` exited {job.returncode}, see {job.log}" for job in failed)
            + ". Rerun the same command to retry it (finished models are skipped)")


def run_stability(bench: "Benchmark") -> None:
    """K seed replicas ``<varaug>_seed<k>`` of each varaug trainer, through ``replicas -tr <varaug>``."""
    for source in bench.sources:
        if not all(bench.trained(n) for n in bench.stability_names(source)):
            layout = Experiment(bench.dataset, bench.configuration, bench.fold, bench.num_replicas,
                                bench.varaug_for(source), "seed", bench.plans)
            bench.call("stability", bench.command("replicas", layout) + bench.device_flags())
        _validate_finished(bench, "stability", bench.stability_names(source))
