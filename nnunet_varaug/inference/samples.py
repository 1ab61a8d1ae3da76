"""The sample-set writer behind ``nnunet_varaug samples``, one for both sources: the replicas' label maps of the
training cases, predicted and stored in the format of :mod:`nnunet_varaug.training.sampleset`.

* **in-fold** (``samples -f F``): fold F's K replicas predict fold F's training cases
  (``varaug/<Plans>__<Config>__fold_F/``);
* **out-of-fold** (``samples --source out-of-fold``): each case is predicted by the K replicas of the fold whose
  validation set holds it (``splits_final.json``), one set for every fold
  (``varaug/<Plans>__<Config>__out-of-fold/``; what the set means: :mod:`nnunet_varaug.training.outoffold`).

Every case is loaded with nnU-Net's dataset class; each replica runs nnU-Net's own sliding-window predictor on the
preprocessed array (no resampling); the label manager turns logits into a label map (regions included); the ground
truth's -1 (outside the nonzero mask) and ignore-label voxels are copied into every map. A case is predicted again
when the replicas that make it (checkpoint sha256s), the TTA setting or its preprocessed segmentation changed. The
manifest is written last; until then ``manifest.partial.json`` records the finished cases, so an interrupted run
resumes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from nnunet_varaug.inference.predictor import make_predictor, torch_device
from nnunet_varaug.training import sampleset as S
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.training.outoffold import OUT_OF_FOLD, out_of_fold_folder, replicas_commands
from nnunet_varaug.utilities import folds as folds_module
from nnunet_varaug.utilities import paths
from nnunet_varaug.utilities.errors import VarAugError, require_single_stage
from nnunet_varaug.utilities.fileio import file_sha256, write_json


@dataclass
class SetPlan:
    """What one run writes: the folder, the identity recorded in the manifest, which replicas predict which cases,
    the extra fields of each case's entry, and when an entry of an earlier run is still current."""

    folder: str
    identity: dict
    groups: List[Tuple[Experiment, List[str]]]  # replicas (one experiment) and the cases they predict
    extra: Dict[str, dict]  # per case, extra manifest fields (the out-of-fold set's "fold")
    is_current: Callable[[str, dict, dict], bool]  # (case, entry, earlier manifest) -> entry still valid
    command: str
    describe: str


def replica_records(exp: Experiment) -> List[dict]:
    """``{"name", "checkpoint", "sha256"}`` of each replica, in channel order (the checkpoint relative to
    ``$nnUNet_results``)."""
    return [{"name": n, "checkpoint": os.path.relpath(exp.final_checkpoint(n), os.environ["nnUNet_results"]),
             "sha256": file_sha256(exp.final_checkpoint(n))} for n in exp.replica_names]


def remove_stale(folder: str) -> None:
    """Temporary files of interrupted runs (never trusted, never reused)."""
    for f in os.listdir(folder):
        if f.endswith(S.PARTIAL_SUFFIX) or f.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, f))
            except OSError:
                pass


def predict_case_maps(predictors, data: np.ndarray, seg: np.ndarray, ignore_label: Optional[int],
                      progress=None) -> np.ndarray:
    """K label maps ``(K, X, Y, Z)`` int8 of one preprocessed case, GT's -1 and ignore voxels copied in."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    maps = np.empty((len(predictors), *seg.shape[1:]), dtype=S.SAMPLE_DTYPE)
    keep = seg[0] == -1
    if ignore_label is not None:
        keep |= seg[0] == ignore_label
    for k, predictor in enumerate(predictors):
        logits = predictor.predict_sliding_window_return_logits(x)
        labels = predictor.label_manager.convert_logits_to_segmentation(logits)
        labels = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
        maps[k] = labels.astype(S.SAMPLE_DTYPE)
        maps[k][keep] = seg[0][keep]
        if progress is not None:
            progress.update(1)
    return maps


def configuration_of(exp: Experiment, what: str):
    """(configuration manager, label manager), refusing cascades and labels that do not fit the int8 maps."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(exp.plans_json)
    config = plans_manager.get_configuration(exp.configuration)
    require_single_stage(exp.configuration, config.previous_stage_name, what)
    label_manager = plans_manager.get_label_manager(exp.dataset_json)
    if max(label_manager.all_labels) > np.iinfo(S.SAMPLE_DTYPE).max:
        raise VarAugError(f"{exp.dataset} has labels up to {max(label_manager.all_labels)}; variability samples are "
                          f"stored as int8 and support labels up to {np.iinfo(S.SAMPLE_DTYPE).max}")
    return config, label_manager


def current_entries(plan: SetPlan, cases: List[str], seg_digests: Dict[str, Optional[str]]) -> Dict[str, dict]:
    """Entries of an earlier run (finished or interrupted) that are still valid: same producer, same preprocessed
    segmentation, file intact."""
    found: Dict[str, dict] = {}
    for name in (S.MANIFEST, S.PARTIAL):
        try:
            old = S.read_manifest(plan.folder, name)
        except VarAugError:
            continue
        if old is None:
            continue
        for case, entry in old["cases"].items():
            path = S.sample_file(plan.folder, case)
            if (case in seg_digests and case not in found and entry.get("seg_sha256") == seg_digests[case]
                    and plan.is_current(case, entry, old) and os.path.isfile(path)
                    and file_sha256(path) == entry.get("sha256")):
                found[case] = entry
    return found


def write_set(exp: Experiment, plan: SetPlan, device: str, tta: bool, force: bool, progress: bool) -> str:
    """Write (or complete) the set ``plan`` describes; cases still current are kept unless ``force``."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm

    config, label_manager = configuration_of(exp, "variability samples")
    cases = sorted(c for _, group in plan.groups for c in group)
    os.makedirs(plan.folder, exist_ok=True)
    remove_stale(plan.folder)
    seg_digests = {c: S.seg_digest(exp.preprocessed_folder, c) for c in cases}
    done = {} if force else current_entries(plan, cases, seg_digests)
    todo = [c for c in cases if c not in done]
    manifest_path = os.path.join(plan.folder, S.MANIFEST)
    if not todo and os.path.isfile(manifest_path):
        old = S.read_manifest(plan.folder)
        if {k: old.get(k) for k in plan.identity} == plan.identity and sorted(old["cases"]) == cases:
            print(f"sample set up to date: {plan.folder} {plan.describe}")
            return plan.folder
    if os.path.isfile(manifest_path):  # from here on the old manifest no longer describes the folder
        os.remove(manifest_path)
    state = {**plan.identity, "cases": dict(done)}
    write_json(os.path.join(plan.folder, S.PARTIAL), state, indent=1)
    dataset = infer_dataset_class(exp.preprocessed_folder)(exp.preprocessed_folder, list(cases))
    dev = torch_device(device) if todo else None
    bar = tqdm(total=len(todo) * exp.num_replicas, desc="samples (cases x replicas)", unit="map",
               disable=not progress, file=sys.stderr)
    with bar:
        for group_exp, group in plan.groups:
            mine = [c for c in todo if c in set(group)]
            if not mine:
                continue
            predictors = [make_predictor(group_exp, n, dev, tta, "variability samples") for n in group_exp.replica_names]
            for case in mine:
                data, seg, _, _ = dataset.load_case(case)
                seg = np.asarray(seg[:])
                maps = predict_case_maps(predictors, np.asarray(data[:]), seg, label_manager.ignore_label, bar)
                state["cases"][case] = S.write_case(plan.folder, case, maps, config.patch_size, seg_digests[case],
                                                    **plan.extra.get(case, {}))
                write_json(os.path.join(plan.folder, S.PARTIAL), state, indent=1)
    S.finish_set(plan.folder, plan.identity, {c: state["cases"][c] for c in cases}, base=exp.base, kind=exp.kind,
                 start=exp.start, patch_size=config.patch_size, ignore_label=label_manager.ignore_label,
                 regions=label_manager.has_regions, command=plan.command + ("" if tta else " --no-tta"))
    print(f"wrote {len(todo)} case(s), kept {len(cases) - len(todo)}: {plan.folder} {plan.describe}")
    return plan.folder


# ---- in-fold ------------------------------------------------------------------------------------------------------
def write_samples(exp: Experiment, device: str = "cpu", tta: bool = True, force: bool = False,
                  progress: bool = True) -> str:
    """Write (or complete) the in-fold sample set of ``exp``'s replicas (fold ``exp.fold``) and return its folder.

    Raises:
        VarAugError: replicas missing or unfinished, a cascade configuration, labels that do not fit int8.
    """
    names = exp.require_finished()
    identity = S.sample_set_identity(exp.dataset, exp.plans, exp.configuration, exp.fold, replica_records(exp), tta)
    cases = sorted(exp.split()[0])
    plan = SetPlan(exp.samples_folder, identity, [(exp, cases)], {},
                   lambda case, entry, old: {k: old.get(k) for k in identity} == identity,
                   paths.samples_command(exp.dataset_id, exp.configuration, exp.fold, exp.num_replicas, exp.base,
                                         exp.kind, exp.plans, exp.start),
                   f"({len(cases)} cases x {len(names)} replicas)")
    return write_set(exp, plan, device, tta, force, progress)


# ---- out-of-fold --------------------------------------------------------------------------------------------------
def out_of_fold_command(exp: Experiment) -> str:
    return paths.samples_command(exp.dataset_id, exp.configuration, None, exp.num_replicas, exp.base, exp.kind,
                                 exp.plans, exp.start, source=OUT_OF_FOLD)


def fold_experiments(exp: Experiment, num_folds: int) -> List[Experiment]:
    """``exp``'s replicas on each fold 0..num_folds-1 (same dataset, configuration, plans, base, kind, K)."""
    return [Experiment(exp.dataset, exp.configuration, f, exp.num_replicas, exp.base, exp.kind, exp.plans, exp.start)
            for f in range(num_folds)]


def read_cross_validation(exp: Experiment) -> Tuple[folds_module.Splits, Dict[str, int]]:
    """The dataset's ``splits_final.json`` and the fold that validates each case, checked as a K-fold split."""
    path = os.path.join(exp.preprocessed_base, folds_module.SPLITS_FILE)
    if not os.path.isfile(path):
        first = fold_experiments(exp, 1)[0]
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
                          f"{calls} (one call per fold), then `{out_of_fold_command(exp)}`")
    return experiments


def write_out_of_fold_samples(exp: Experiment, device: str = "cpu", tta: bool = True, force: bool = False,
                              progress: bool = True) -> str:
    """Write (or complete) the out-of-fold sample set of ``exp``'s replicas on every fold; return its folder.

    ``exp.fold`` is not used: the set covers every case of ``splits_final.json``.

    Raises:
        VarAugError: no splits file, splits that are not a K-fold split, replicas of a fold missing or unfinished,
            a cascade configuration, labels that do not fit int8, cases of the splits not preprocessed.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    splits, owner = read_cross_validation(exp)
    experiments = require_all_folds(exp, splits)
    available = set(infer_dataset_class(exp.preprocessed_folder).get_identifiers(exp.preprocessed_folder))
    absent = sorted(set(owner) - available)
    if absent:
        raise VarAugError(f"{len(absent)} case(s) of splits_final.json are not preprocessed (e.g. {absent[0]}): run "
                          f"`nnUNetv2_plan_and_preprocess -d {exp.dataset_id} -c {exp.configuration}`")
    by_fold = {str(e.fold): replica_records(e) for e in experiments}
    identity = S.sample_set_identity(exp.dataset, exp.plans, exp.configuration, OUT_OF_FOLD,
                                     [{"name": n, "checkpoint": None, "sha256": None} for n in exp.replica_names],
                                     tta, replicas_by_fold=by_fold)

    def is_current(case: str, entry: dict, old: dict) -> bool:
        fold = str(owner[case])
        return (old.get("source") == OUT_OF_FOLD and str(entry.get("fold")) == fold and old.get("tta") == bool(tta)
                and (old.get("replicas_by_fold") or {}).get(fold) == by_fold[fold])

    folder = out_of_fold_folder(exp.preprocessed_base, exp.plans, exp.configuration)
    plan = SetPlan(folder, identity, [(e, sorted(c for c in owner if owner[c] == e.fold)) for e in experiments],
                   {c: {"fold": int(f)} for c, f in owner.items()}, is_current, out_of_fold_command(exp),
                   f"({len(owner)} cases x {exp.num_replicas} replicas, {len(splits)} folds)")
    return write_set(exp, plan, device, tta, force, progress)
