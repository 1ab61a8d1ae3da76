"""In-sample versus out-of-fold maps: the replicas' mean pairwise Dice on the same training cases in a fold's in-fold
sample set and in the out-of-fold set (``sources.csv`` of an ``analyze`` report). In-fold maps are predictions of
cases the replicas were trained on, so they agree more than on unseen images; the difference says by how much."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation.variability import pair_indices, pairwise_dice, structures_from_dataset_json
from nnunet_varaug.training import sampleset as S
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.training.outoffold import out_of_fold_folder
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import write_text


def compare_sources(in_fold: str, out_of_fold: str, dataset_json: dict,
                    cases: Optional[Sequence[str]] = None) -> List[dict]:
    """Per label, the replicas' mean pairwise Dice on the same cases in the in-fold and the out-of-fold set.

    ``cases`` defaults to every case both sets hold. Voxels outside the nonzero mask (-1) are equal in every map
    and belong to no label, so they do not count. Returns one row per structure: ``label``, ``name``, ``cases``,
    ``pairwise_dice_in_fold``, ``pairwise_dice_out_of_fold`` and their difference.
    """
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
    if not all(os.path.isfile(os.path.join(f, S.MANIFEST)) for f in (in_fold, out_of_fold)):
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
