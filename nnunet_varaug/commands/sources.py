"""``nnunet_varaug sources``: which source of randomness drives the replicas' disagreement, per structure.

Flow: the seed replicas ``<Base>_seed0..K-1`` change every source at once; each one-source set changes one
(:mod:`nnunet_varaug.training.trainers.one_source`, :mod:`nnunet_varaug.training.trainers.mca`): ``init``,
``order`` and ``aug`` are ``<Base>_seed0`` (bitwise their replica 0) plus ``<Base>_<source>1..K-1``; ``mca``
and ``nondet`` are ``<Base>_<source>0..K-1``. Checked before anything is written; the missing replicas are
trained with the ``replicas`` command's launchers (:mod:`nnunet_varaug.launch.runner`: one after the other, or one
per GPU with ``--devices``; resumable) or, with ``--no-train``, their commands printed. Then the cases (the
fold's validation cases, or ``-i``) are predicted with ``analyze``'s engine and cache
(:func:`nnunet_varaug.inference.cache.predict_replicas`, ``OUT/predictions/<replica>/``), each case's volumes
and pairwise Dice are counted per set, and :mod:`nnunet_varaug.evaluation.attribution` attributes the
variance; :mod:`nnunet_varaug.report.randomness_sources` writes ``sources.csv``, ``figures/sources.png``
and ``sources.md`` into ``-o``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnunet_varaug.commands.flags import add_device, add_disable_tta, add_experiment_arguments, add_quiet
from nnunet_varaug.evaluation import variability
from nnunet_varaug.evaluation.attribution import REFERENCE, attribute
from nnunet_varaug.inference.cache import load_maps, predict_replicas, reader_for
from nnunet_varaug.inference.cases import list_cases
from nnunet_varaug.launch.runner import (nnunet_command, parse_devices, plugin_env, run_devices, run_local,
                                         train_job)
from nnunet_varaug.report import randomness_sources as report
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.training.seeding import STREAM_LAYOUT, layout_warning
from nnunet_varaug.utilities.errors import VarAugError

SOURCES = ("init", "order", "aug", "mca", "nondet")
DEFAULT_SOURCES = ("init", "order", "aug", "mca")
SHARES_SEED0 = ("init", "order", "aug")  # K = 0 of these is bitwise <Base>_seed0: not trained again


def source_sets(seed: Experiment, sources) -> List[Tuple[str, Experiment]]:
    """``(source, experiment)`` of the replicas to train and predict: the seed replicas first, then per source
    its own replicas (``init``/``order``/``aug`` from 1: their replica 0 is ``<Base>_seed0``)."""
    sets = [(REFERENCE, seed)]
    for source in sources:
        start = 1 if source in SHARES_SEED0 else 0
        sets.append((source, dataclasses.replace(seed, kind=source, start=start,
                                                 num_replicas=seed.num_replicas - start)))
    return sets


def compared(sets: List[Tuple[str, Experiment]]) -> Dict[str, List[str]]:
    """source -> the replica names compared for it (``<Base>_seed0`` first for init, order and aug)."""
    seed0 = sets[0][1].replica_names[0]
    return {s: ([seed0] if s in SHARES_SEED0 else []) + exp.replica_names for s, exp in sets}


def check_request(args: argparse.Namespace) -> Tuple[str, ...]:
    """The sources asked for, refused before anything is built when they cannot be measured here."""
    sources = tuple(dict.fromkeys(args.sources))
    if args.num_replicas is not None and args.num_replicas < 2:
        raise VarAugError(f"-n {args.num_replicas}: a variance between replicas needs at least 2 per source; use "
                          f"-n 3 or more")
    if "nondet" in sources and args.device != "cuda":
        raise VarAugError(f"--sources nondet needs -device cuda: it measures the GPU's non-deterministic kernels, "
                          f"and with -device {args.device} PyTorch's kernels are deterministic (the run would be "
                          f"<Base>_seed0 again). Leave nondet out, or run on a GPU")
    return sources


def print_commands(sets: List[Tuple[str, Experiment]], missing: List[str], device: str) -> None:
    """What ``--no-train`` prints: one ``nnUNetv2_train`` command per missing replica, with the environment."""
    by_name = {n: exp for _, exp in sets for n in exp.replica_names}
    ext = shlex.quote(plugin_env()["nnUNet_extTrainer"])
    print(f"# {len(missing)} replica(s) to train; each command can run on any machine that shares nnUNet_results:")
    for name in missing:
        exp = by_name[name]
        command = nnunet_command("nnUNetv2_train") + [str(exp.dataset_id), exp.configuration, str(exp.fold),
                                                      "-tr", name, "-p", exp.plans, "-device", device]
        resume = " --c" if exp.replica_state(name) == "interrupted" else ""
        print(f"nnUNet_extTrainer={ext} {shlex.join(command)}{resume}")
    print("# then rerun this command (without --no-train, or with it: nothing left to train) to measure them")


def train_missing(sets, missing: List[str], device: str, devices: List[str]) -> None:
    """Train the missing replicas with the replicas command's launchers; an error names the failed ones."""
    by_name = {n: exp for _, exp in sets for n in exp.replica_names}
    jobs = [train_job(by_name[n], n, device) for n in missing]
    if devices:
        run_devices(jobs, devices)
    else:
        run_local(jobs)
    failed = [j for j in jobs if j.returncode != 0 or by_name[j.name].replica_state(j.name) != "finished"]
    if failed:
        raise VarAugError(f"{len(failed)} replica(s) failed to train: "
                          + "; ".join(f"{j.name} (exit {j.returncode}, log {j.log})" for j in failed)
                          + ". Rerun the same command to retry them (finished ones are kept)")


def check_layouts(seed: Experiment, names: Dict[str, List[str]], missing: List[str]) -> Optional[str]:
    """An error when ``<Base>_seed0`` or a one-source replica was (or, for the ``missing`` ones, will be) trained
    with another stream layout than the rest (their isolation holds only within one layout); a warning (returned)
    when only seed replicas differ. Checked before anything is trained."""
    def record(name: str):
        if name in missing:
            return {"streams": {"layout": STREAM_LAYOUT}}  # what this version will record
        try:
            with open(os.path.join(seed.fold_folder(name), "debug.json")) as f:
                return json.load(f).get("nnunet_varaug")
        except (OSError, ValueError):
            return None

    records = {n: record(n) for group in names.values() for n in group}
    strict = {n: r for n, r in records.items() if n not in names[REFERENCE][1:]}
    error = layout_warning(strict)
    if error:
        raise VarAugError(error)
    return layout_warning(records)


def case_measures(rw, folders, names, case, ending, structures, output):
    """Per source: ``(S, K)`` volumes in mm^3 and ``(S,)`` mean pairwise Dice of one case."""
    volumes, dice = {}, {}
    for source, group in names.items():
        maps, props = load_maps(rw, [os.path.join(folders[n], case.name + ending) for n in group], case.name, output)
        counts = variability.overlap_counts(maps, structures)
        voxels = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
        volumes[source] = voxels * float(np.prod(props["spacing"]))
        pairs = variability.pair_indices(len(group))
        matrix = variability.dice_matrix(counts)
        dice[source] = np.mean([matrix[:, a, b] for a, b in pairs], axis=0)
    return volumes, dice


def measure_sources(args: argparse.Namespace) -> int:
    """The whole command (see the module docstring); returns the exit status."""
    sources = check_request(args)
    devices = parse_devices(getattr(args, "devices", None))
    seed = Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base, "seed",
                                args.plans)
    sets = source_sets(seed, sources)
    names = compared(sets)
    cases = list_cases(seed, args.images, args.labels)
    missing = list(dict.fromkeys(n for _, exp in sets for n in exp.replica_names
                                 if exp.replica_state(n) != "finished"))
    warning = check_layouts(seed, names, missing)
    if missing and args.no_train:
        print_commands(sets, missing, args.device)
        return 0
    if missing:
        train_missing(sets, missing, args.device, devices)
    if warning:
        print(f"nnunet_varaug sources: warning: {warning}", file=sys.stderr)
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    folders = predict_replicas([exp for _, exp in sets], cases, output, args.device, not args.quiet,
                               tta=not args.disable_tta)
    dj = seed.dataset_json
    structures = variability.structures_from_dataset_json(dj)
    rw = reader_for(dj, cases[0].images[0])
    per_case = [case_measures(rw, folders, names, c, dj["file_ending"], structures, output) for c in cases]
    volumes = {s: np.stack([v[s] for v, _ in per_case]) for s in names}
    dice = {s: np.stack([d[s] for _, d in per_case]) for s in names}
    rows, sums = attribute(volumes, dice, [st.name for st in structures], resamples=args.resamples)
    written = report.write_report(output, rows, sums, [st.name for st in structures], names, len(cases),
                                  [warning] if warning else None)
    for line in report.verdict(rows, sums, [st.name for st in structures]):
        print(line.replace("**", ""))
    print(f"report: {written[report.MARKDOWN]} (table: {written[report.CSV]}, figure: {written[report.FIGURE]})")
    return 0


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_experiment_arguments(p, kind=False, start=False)
    p.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=list(SOURCES),
                   help="sources of randomness to measure one at a time against the seed replicas (default: "
                        "init order aug mca; nondet needs -device cuda)")
    add_device(p, "nnUNetv2_train and nnUNetv2_predict")
    p.add_argument("--devices", default=None, metavar="0,1,…",
                   help="train the missing replicas one per GPU at a time (as `replicas --devices`)")
    p.add_argument("--no-train", action="store_true",
                   help="print the nnUNetv2_train commands of the missing replicas instead of training them")
    p.add_argument("-i", dest="images", default=None,
                   help="folder of raw images (<case>_XXXX<ending>) to measure on instead of the fold's validation "
                        "cases (more cases, narrower intervals)")
    p.add_argument("-l", dest="labels", default=None, help="their label maps (optional; not needed for this report)")
    p.add_argument("-o", dest="output", required=True,
                   help="output folder: sources.md, sources.csv, figures/sources.png and the cached predictions")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples over cases (default 2000)")
    add_disable_tta(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    return measure_sources(args)
