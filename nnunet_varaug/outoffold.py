"""Out-of-fold variability samples: every case's K maps made by the replicas of the fold that validates it.

In-fold samples (``samples -f F``) predict fold F's training cases with replicas trained on those very cases, so
their maps sit close to the ground truth and their disagreement understates what the replicas do on unseen
images. Out-of-fold samples (``samples --source out-of-fold``) take each case's maps from the K replicas of the
fold whose validation set holds it (nnU-Net's ``splits_final.json``), so no map was made by a model that saw that
case's label. They need K finished replicas of every fold, and one set serves every fold::

    $nnUNet_preprocessed/DatasetXXX_Name/varaug/<Plans>__<Config>__out-of-fold/
        <case>.b2nd        the K maps of <case> (int8, preprocessed grid), channel k from replica k of its fold
        manifest.json      source "out-of-fold"; per case the fold whose replicas made it ("fold"); per fold the
                           replicas' checkpoints and sha256s; written last

A ``<Base>_varaug[_p<NN>]_oof`` trainer of fold F reads the maps of F's training cases from it and refuses a set
whose maps do not come from the folds that validate those cases under the current splits.

The leak: the teachers of fold F's training cases (replicas of the other folds) were trained on fold F's
validation cases, so fold F's validation Dice of an out-of-fold model is optimistic; compare models on a test split
that no training saw (``benchmark --test-fraction``).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.errors import VarAugError, require_single_stage
from nnunet_varaug.experiment import Experiment
from nnunet_varaug.fileio import file_sha256, write_json
from nnunet_varaug import folds as folds_module
from nnunet_varaug import paths

IN_FOLD = "in-fold"
OUT_OF_FOLD = "out-of-fold"
SOURCES = (IN_FOLD, OUT_OF_FOLD)


def out_of_fold_folder(preprocessed_base: str, plans: str, configuration: str) -> str:
    """``<preprocessed_base>/varaug/<plans>__<configuration>__out-of-fold``: one set for every fold."""
    return os.path.join(preprocessed_base, "varaug", f"{plans}__{configuration}__{OUT_OF_FOLD}")


def fold_experiments(exp: Experiment, num_folds: int) -> List[Experiment]:
    """``exp``'s replicas on each fold 0..num_folds-1 (same dataset, configuration, plans, base, kind, K)."""
    return [Experiment(exp.dataset, exp.configuration, f, exp.num_replicas, exp.base, exp.kind, exp.plans, exp.start)
            for f in range(num_folds)]


def flags_without_fold(exp: Experiment) -> str:
    return exp.flags.replace(f" -f {exp.fold}", "")


def samples_command(exp: Experiment) -> str:
    return f"nnunet_varaug samples {flags_without_fold(exp)} --source {OUT_OF_FOLD}"


def replicas_commands(exp: Experiment, missing_folds: Sequence[int]) -> str:
    """One ``replicas`` call per fold (``replicas -f`` takes one fold), joined for a message."""
    calls = [f"`nnunet_varaug replicas {Experiment(exp.dataset, exp.configuration, f, exp.num_replicas, exp.base, exp.kind, exp.plans, exp.start).flags}`"
             for f in missing_folds]
    return ", ".join(calls)


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
        raise VarAugError(f"out-of-fold samples need {exp.num_replicas} finished replicas of each of the "
                          f"{len(splits)} folds of {exp.dataset} {exp.configuration}; not finished: {detail}. Run "
                          f"{replicas_commands(exp, sorted(missing))} (one call per fold), then "
                          f"`{samples_command(exp)}`")
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

    from nnunet_varaug import sampleset as S
    from nnunet_varaug.predictor import make_predictor, torch_device
    from nnunet_varaug.samples import _remove_stale, predict_case_maps

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
    fix = samples_command(exp)
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


# ---- reading side: what a <Base>_varaug_oof trainer checks ---------------------------------------------------------
def trainer_fix_command(dataset: str, plans: str, configuration: str, base: str, num_folds: int,
                        manifest: Optional[dict] = None, bare: bool = False) -> str:
    """The commands that (re)build the out-of-fold set a ``_oof`` trainer needs, quoted for a message.

    K and the replicas' base come from the manifest when there is one; otherwise K counts the finished seed
    replicas of fold 0 (10 with none). Folds whose K replicas are not all finished get their ``replicas`` call
    first. ``bare``: only the samples command, unquoted.
    """
    from nnunet_varaug.registry import replica_name

    results = os.environ.get("nnUNet_results")
    kind = (manifest or {}).get("kind", "seed")
    start = int((manifest or {}).get("start", 0))
    k = int((manifest or {}).get("num_replicas") or 0)
    if manifest is not None:
        base = manifest.get("base", base)

    def finished(fold: int, j: int) -> bool:
        if not results:
            return False
        model = paths.model_folder_for(results, dataset, replica_name(base, kind, j), plans, configuration)
        return os.path.isfile(paths.final_checkpoint_in(paths.fold_folder_for(model, fold)))

    if not k:
        while finished(0, start + k):
            k += 1
        k = k or 10
    exp = Experiment(dataset, configuration, 0, k, base, kind, plans, start)
    command = samples_command(exp)
    if bare:
        return command
    missing = [f for f in range(num_folds) if not all(finished(f, start + j) for j in range(k))]
    if missing:
        return f"{replicas_commands(exp, missing)} (one call per fold), then `{command}`"
    return f"`{command}`"


def validate_out_of_fold_set(folder: str, *, plans: str, configuration: str, fold: int, cases: Sequence[str],
                             splits: folds_module.Splits, shapes: Dict[str, Tuple[int, ...]], fix: str,
                             verify_files: bool = True, preprocessed_folder: Optional[str] = None) -> dict:
    """Check an out-of-fold set against what fold ``fold``'s trainer trains on; return its manifest.

    Every training case must have maps made by the replicas of the fold that validates it under ``splits`` (never
    by ``fold`` itself); ``fix`` is quoted in every error.

    Raises:
        VarAugError: no set, a set of the other source, other plans or configuration, cases missing (named with
            the folds whose replicas make them), maps from the wrong fold, wrong shapes, corrupt files.
    """
    from nnunet_varaug import sampleset as S

    if not os.path.isfile(os.path.join(folder, S.MANIFEST)):
        raise VarAugError(f"no out-of-fold variability samples for {plans} {configuration} in {folder}: run {fix}")
    manifest = S.read_manifest(folder)
    if manifest.get("source") != OUT_OF_FOLD:
        raise VarAugError(f"{folder} holds a '{manifest.get('source', IN_FOLD)}' sample set, not an out-of-fold one: "
                          f"rebuild it with {fix}")
    for key, want in (("plans", plans), ("configuration", configuration)):
        if str(manifest.get(key)) != str(want):
            raise VarAugError(f"the sample set in {folder} was made for {key} '{manifest.get(key)}', not '{want}': "
                              f"rebuild it with {fix}")
    owner = folds_module.validating_folds(splits)
    listed = manifest["cases"]
    missing = sorted(c for c in cases if c not in listed)
    if missing:
        need = sorted({owner.get(c, -1) for c in missing})
        raise VarAugError(f"the out-of-fold sample set in {folder} has no maps of {len(missing)} training case(s) of "
                          f"fold {fold} ({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}), which the "
                          f"replicas of fold(s) {', '.join(map(str, need))} make: run {fix}")
    for case in sorted(cases):
        made_by = listed[case].get("fold")
        if made_by is None or int(made_by) != owner.get(case) or int(made_by) == int(fold):
            raise VarAugError(f"the maps of case {case} in {folder} come from fold {made_by}'s replicas, but "
                              f"splits_final.json has it validated by fold {owner.get(case)} (the splits changed "
                              f"since the set was made?): rebuild it with {fix}")
    k = int(manifest["num_replicas"])
    for case in sorted(cases):
        entry = listed[case]
        want_shape = [k, *[int(s) for s in shapes[case]]] if case in shapes else list(entry["shape"])
        if list(entry["shape"]) != want_shape:
            raise VarAugError(f"variability samples of case {case} have shape {tuple(entry['shape'])}, but the "
                              f"preprocessed case needs {tuple(want_shape)}: rebuild them with {fix}")
        path = S.sample_file(folder, case)
        if not os.path.isfile(path):
            raise VarAugError(f"variability samples of case {case} are missing ({path}): run {fix}")
        if verify_files and file_sha256(path) != entry["sha256"]:
            raise VarAugError(f"variability samples of case {case} are corrupt ({path}: sha256 differs): run {fix}")
        if preprocessed_folder is not None and entry.get("seg_sha256") is not None and \
                S.seg_digest(preprocessed_folder, case) != entry["seg_sha256"]:
            raise VarAugError(f"variability samples of case {case} were made from another version of its "
                              f"preprocessed segmentation (preprocessed again?): rebuild them with {fix}")
    return manifest


# ---- what in-sample prediction hides ----------------------------------------------------------------------------
def compare_sources(in_fold: str, out_of_fold: str, dataset_json: dict,
                    cases: Optional[Sequence[str]] = None) -> List[dict]:
    """Per label, the replicas' mean pairwise Dice on the same cases in the in-fold and the out-of-fold set.

    ``cases`` defaults to every case both sets hold. Voxels outside the nonzero mask (-1) are equal in every map
    and belong to no label, so they do not count. Returns one row per structure: ``label``, ``name``, ``cases``,
    ``pairwise_dice_in_fold``, ``pairwise_dice_out_of_fold`` and their difference.
    """
    from nnunet_varaug import sampleset as S
    from nnunet_varaug.variability import pair_indices, pairwise_dice, structures_from_dataset_json

    a, b = S.read_manifest(in_fold), S.read_manifest(out_of_fold)
    if a is None or b is None:
        raise VarAugError(f"comparing sources needs both sample sets: {in_fold if a is None else out_of_fold} has no "
                          f"manifest")
    shared = sorted(set(a["cases"]) & set(b["cases"])) if cases is None else sorted(cases)
    if not shared:
        raise VarAugError(f"{in_fold} and {out_of_fold} hold no case in common")
    structures = structures_from_dataset_json(dataset_json)
    sums = np.zeros((2, len(structures)))
    for case in shared:
        for i, folder in enumerate((in_fold, out_of_fold)):
            maps = S.read_sample_array(S.sample_file(folder, case))
            dice = pairwise_dice(maps, structures)
            pairs = pair_indices(maps.shape[0])
            sums[i] += np.array([np.mean([dice[s, p, q] for p, q in pairs]) for s in range(len(structures))])
    means = sums / len(shared)
    return [{"label": s.key, "name": s.name, "cases": len(shared), "pairwise_dice_in_fold": float(means[0, j]),
             "pairwise_dice_out_of_fold": float(means[1, j]),
             "difference": float(means[0, j] - means[1, j])} for j, s in enumerate(structures)]


def write_source_comparison(in_fold: str, out_of_fold: str, dataset_json: dict, cases: Optional[Sequence[str]],
                            output: str) -> Optional[str]:
    """``output/sources.csv`` from :func:`compare_sources` when both sets exist; None (nothing written) otherwise.
    Called by ``analyze``."""
    from nnunet_varaug import sampleset as S
    from nnunet_varaug.fileio import write_text

    if not (os.path.isfile(os.path.join(in_fold, S.MANIFEST)) and os.path.isfile(os.path.join(out_of_fold, S.MANIFEST))):
        return None
    rows = compare_sources(in_fold, out_of_fold, dataset_json, cases)
    head = list(rows[0])
    lines = [",".join(head)] + [",".join(str(r[k]) for k in head) for r in rows]
    path = os.path.join(output, "sources.csv")
    write_text(path, "\n".join(lines) + "\n")
    return path


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
