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

This module is the set's reading side, safe inside ``nnUNetv2_train`` (no command-layer imports): its folder, the
commands its errors name and the trainer's checks. The writer behind ``samples --source out-of-fold`` is
:mod:`nnunet_varaug.inference.samples`; the in-fold versus out-of-fold comparison that ``analyze`` writes is
:mod:`nnunet_varaug.inference.sample_sources`.

The leak: the teachers of fold F's training cases (replicas of the other folds) were trained on fold F's
validation cases, so fold F's validation Dice of an out-of-fold model is optimistic; compare models on a test split
that no training saw (``benchmark --test-fraction``).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple


from nnunet_varaug.utilities import folds as folds_module
from nnunet_varaug.utilities import paths
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import file_sha256

IN_FOLD = "in-fold"
OUT_OF_FOLD = "out-of-fold"
SOURCES = (IN_FOLD, OUT_OF_FOLD)


def out_of_fold_folder(preprocessed_base: str, plans: str, configuration: str) -> str:
    """``<preprocessed_base>/varaug/<plans>__<configuration>__out-of-fold``: one set for every fold."""
    return os.path.join(preprocessed_base, "varaug", f"{plans}__{configuration}__{OUT_OF_FOLD}")


def replicas_commands(dataset_id: int, configuration: str, folds: Sequence[int], num_replicas: int,
                      base: str = "nnUNetTrainer", kind: str = "seed", plans: str = "nnUNetPlans",
                      start: int = 0) -> str:
    """One quoted ``nnunet_varaug replicas`` call per fold (``replicas -f`` takes one fold), joined by commas."""
    return ", ".join(f"`nnunet_varaug replicas "
                     f"{paths.experiment_flags(dataset_id, configuration, f, num_replicas, base, kind, plans, start)}`"
                     for f in folds)


# ---- reading side: what a <Base>_varaug_oof trainer checks ---------------------------------------------------------
def trainer_fix_command(dataset: str, plans: str, configuration: str, base: str, num_folds: int,
                        manifest: Optional[dict] = None, bare: bool = False) -> str:
    """The commands that (re)build the out-of-fold set a ``_oof`` trainer needs, quoted for a message.

    K and the replicas' base come from the manifest when there is one; otherwise K counts the finished seed
    replicas of fold 0 (10 with none). Folds whose K replicas are not all finished get their ``replicas`` call
    first. ``bare``: only the samples command, unquoted.
    """
    from nnunet_varaug.utilities.names import replica_name

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
    dataset_id = paths.dataset_id_of(dataset)
    command = paths.samples_command(dataset_id, configuration, None, k, base, kind, plans, start, source=OUT_OF_FOLD)
    if bare:
        return command
    missing = [f for f in range(num_folds) if not all(finished(f, start + j) for j in range(k))]
    if missing:
        return (f"{replicas_commands(dataset_id, configuration, missing, k, base, kind, plans, start)} "
                f"(one call per fold), then `{command}`")
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
    from nnunet_varaug.training import sampleset as S

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
