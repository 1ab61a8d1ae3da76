"""``nnunet_varaug samples --source out-of-fold``: every case predicted by the K replicas of the fold whose validation
set holds it, stored as one sample set for every fold (:mod:`nnunet_varaug.training.outoffold` describes the set and holds
its reading side, which trainers use; this is the command side).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnunet_varaug.utilities import folds as folds_module
from nnunet_varaug.utilities.errors import VarAugError, require_single_stage
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.fileio import file_sha256, write_json
from nnunet_varaug.training.outoffold import (OUT_OF_FOLD, out_of_fold_folder, replicas_commands, samples_command,
                                     write_source_comparison)


def command_of(exp: Experiment) -> str:
    return samples_command(exp.dataset_id, exp.configuration, exp.num_replicas, exp.base, exp.kind, exp.plans,
                           exp.start)


def fold_experiments(exp: Experiment, num_folds: int) -> List[Experiment]:
    """``exp``'s replicas on each fold 0..num_folds-1 (same dataset, configuration, plans, base, kind, K)."""
    return [Experiment(exp.dataset, exp.configuration, f, exp.num_replicas, exp.base, exp.kind, exp.plans, exp.start)
            for f in range(num_folds)]


def read_cross_validation(exp: Experiment) -> Tuple[folds_module.Splits, Dict[str, int]]:
    """The dataset's ``splits_final.json`` and the fold that validates each case, checked as a K-fold split."""
    path = os.path.join(exp.preprocessed_base, folds_module.SPLITS_FILE)
    if not os.path.isfile(path):
        first = Experiment(exp.dataset, exp.configuration, 0, exp.num_replicas, exp.base, exp.kind, exp.plans,
                           exp.start)
        raise VarAugError(f"out-of-fold samples need nnU-Net's folds ({path} is missing; nnU-Net writes it on the "
                          f"first training): train the replicas of every fold first, starting with "
                          f"`nnunet_varaug replicas {first.flags}`")
    splits = folds_module.read_splits(path)
    return splits, folds_module.check_cross_validation(splits)


def require_all_folds(exp: Experiment, splits: folds_module.Splits) -> List[Experiment]:
    """The experiment of every fold, or an error listing the folds whose replicas are unfinished and the exact
    ``replicas`` call for each."""
    experiments = fold_experiments(exp, len(splits))
    missing = {e.fold: [n for n in e.replica_names if e.replica_state(n) != "finished"] for e in experiments}
    missing = {f: names for f, names in missing.items() if names}
    if missing:
        detail = "; ".join(f"fold {f}: {', '.join(names)}" for f, names in missing.items())
        calls = replicas_commands(exp.dataset_id, exp.configuration, sorted(missing), exp.num_replicas, exp.base,
                                  exp.kind, exp.plans, exp.start)
        raise VarAugError(f"out-of-fold samples need {exp.num_replicas} finished replicas of each of the "
                          f"{len(splits)} folds of {exp.dataset} {exp.configuration}; not finished: {detail}. Run "
                          f"{calls} (one call per fold), then `{command_of(exp)}`")
    return experiments


def _replica_records(e: Experiment) -> List[dict]:
    return [{"name": n, "checkpoint": os.path.relpath(e.final_checkpoint(n), os.environ["nnUNet_results"]),
             "sha256": file_sha256(e.final_checkpoint(n))} for n in e.replica_names]


def write_out_of_fold_samples(exp: Experiment, device: str = "cpu", tta: bool = True, force: bool = False,
                              progress: bool = True) -> str:
    """Write (or complete) the out-of-fold sample set of ``exp``'s replicas on every fold; return its folder.

    ``exp.fold`` is not used: the set covers every case of ``splits_final.json``. A case written earlier is kept
    unless ``force`` when its fold, that fold's replica checkpoints (sha256), the TTA setting and the case's
    preprocessed segmentation are unchanged. The manifest is written last.

    Raises:
        VarAugError: no splits file, splits that are not a K-fold split, replicas of a fold missing or unfinished,
            a cascade configuration, labels that do not fit int8.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    from nnunet_varaug.training import sampleset as S
    from nnunet_varaug.inference.predictor import make_predictor, torch_device
    from nnunet_varaug.inference.samples import _remove_stale, predict_case_maps

    splits, owner = read_cross_validation(exp)
    experiments = require_all_folds(exp, splits)
    plans_manager = PlansManager(exp.plans_json)
    config = plans_manager.get_configuration(exp.configuration)
    require_single_stage(exp.configuration, config.previous_stage_name, "out-of-fold variability samples")
    label_manager = plans_manager.get_label_manager(exp.dataset_json)
    if max(label_manager.all_labels) > np.iinfo(S.SAMPLE_DTYPE).max:
        raise VarAugError(f"{exp.dataset} has labels up to {max(label_manager.all_labels)}; variability samples are "
                          f"stored as int8")
    available = set(infer_dataset_class(exp.preprocessed_folder).get_identifiers(exp.preprocessed_folder))
    absent = sorted(set(owner) - available)
    if absent:
        raise VarAugError(f"{len(absent)} case(s) of splits_final.json are not preprocessed (e.g. {absent[0]}): run "
                          f"`nnUNetv2_plan_and_preprocess -d {exp.dataset_id} -c {exp.configuration}`")
    fix = command_of(exp)
    dev = torch_device(device)

    by_fold = {str(e.fold): _replica_records(e) for e in experiments}
    identity = {"format": S.FORMAT_VERSION, "source": OUT_OF_FOLD, "dataset": exp.dataset, "plans": exp.plans,
                "configuration": exp.configuration, "fold": OUT_OF_FOLD, "tta": bool(tta),
                "replicas": [{"name": n, "checkpoint": None, "sha256": None} for n in exp.replica_names],
                "replicas_by_fold": by_fold, "num_folds": len(splits)}
    folder = out_of_fold_folder(exp.preprocessed_base, exp.plans, exp.configuration)
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder)
    cases = sorted(owner)
    seg_digests = {c: S.seg_digest(exp.preprocessed_folder, c) for c in cases}

    def current(case: str, entry: dict, old: dict) -> bool:
        fold = str(owner[case])
        path = S.sample_file(folder, case)
        return (str(entry.get("fold")) == fold and entry.get("seg_sha256") == seg_digests[case]
                and (old.get("replicas_by_fold") or {}).get(fold) == by_fold[fold] and old.get("tta") == bool(tta)
                and os.path.isfile(path) and file_sha256(path) == entry.get("sha256"))

    done: Dict[str, dict] = {}
    if not force:
        for name in (S.MANIFEST, S.PARTIAL):
            try:
                old = S.read_manifest(folder, name)
            except VarAugError:
                continue
            if old is None or old.get("source") != OUT_OF_FOLD:
                continue
            for case, entry in old["cases"].items():
                if case in owner and case not in done and current(case, entry, old):
                    done[case] = entry
    manifest_path = os.path.join(folder, S.MANIFEST)
    todo = [c for c in cases if c not in done]
    if not todo and os.path.isfile(manifest_path):
        old = S.read_manifest(folder)
        if {k: old.get(k) for k in identity} == identity and sorted(old["cases"]) == cases:
            print(f"out-of-fold sample set up to date: {folder} ({len(cases)} cases x {exp.num_replicas} replicas, "
                  f"{len(splits)} folds)")
            return folder
    if os.path.isfile(manifest_path):
        os.remove(manifest_path)
    state = {**identity, "cases": dict(done)}
    write_json(os.path.join(folder, S.PARTIAL), state, indent=1)
    dataset = infer_dataset_class(exp.preprocessed_folder)(exp.preprocessed_folder, list(cases))
    bar = tqdm(total=len(todo) * exp.num_replicas, desc="out-of-fold samples (cases x replicas)", unit="map",
               disable=not progress, file=sys.stderr)
    with bar:
        for e in experiments:
            mine = [c for c in todo if owner[c] == e.fold]
            if not mine:
                continue
            predictors = [make_predictor(e, n, dev, tta, "out-of-fold variability samples") for n in e.replica_names]
            for case in mine:
                data, seg, _, _ = dataset.load_case(case)
                seg = np.asarray(seg[:])
                maps = predict_case_maps(predictors, np.asarray(data[:]), seg, label_manager.ignore_label, bar)
                path = S.sample_file(folder, case)
                digest = S.save_sample_array(maps, path, config.patch_size)
                state["cases"][case] = {"shape": [int(s) for s in maps.shape], "sha256": digest,
                                        "bytes": os.path.getsize(path), "seg_sha256": seg_digests[case],
                                        "fold": int(e.fold)}
                write_json(os.path.join(folder, S.PARTIAL), state, indent=1)
    for f in os.listdir(folder):
        if f.endswith(".b2nd") and f[:-5] not in state["cases"]:
            os.remove(os.path.join(folder, f))
    manifest = S.build_manifest(identity, {c: state["cases"][c] for c in cases}, base=exp.base, kind=exp.kind,
                                start=exp.start, patch_size=config.patch_size,
                                ignore_label=label_manager.ignore_label, regions=label_manager.has_regions,
                                command=fix + ("" if tta else " --no-tta"))
    S.save_manifest(folder, manifest)
    os.remove(os.path.join(folder, S.PARTIAL))
    print(f"wrote {len(todo)} case(s), kept {len(cases) - len(todo)}: {folder} ({len(cases)} cases x "
          f"{exp.num_replicas} replicas, {len(splits)} folds)")
    return folder



def write_source_comparison_for(exp: Experiment, output: str) -> Optional[str]:
    """:func:`write_source_comparison` of ``exp``'s fold: its in-fold set against the out-of-fold set, on the fold's
    training cases (the cases both hold). None when the fold is 'all' or a set is missing."""
    if exp.fold == "all":
        return None
    oof = out_of_fold_folder(exp.preprocessed_base, exp.plans, exp.configuration)
    path = write_source_comparison(exp.samples_folder, oof, exp.dataset_json, None, output)
    if path is not None:
        print(f"in-fold versus out-of-fold maps of fold {exp.fold}'s training cases: {path}")
    return path
