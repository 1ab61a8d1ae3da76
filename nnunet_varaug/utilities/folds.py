"""Cross-validation folds and held-out test splits: nnU-Net's ``splits_final.json`` read, checked and written.

nnU-Net trains fold F on ``splits[F]["train"]`` and validates it on ``splits[F]["val"]``; in a proper K-fold split
every case is validated by exactly one fold. Out-of-fold variability samples take each case's maps from the
replicas of the fold that validates it (:func:`validating_folds`), so no map was made by a model that saw that
case's label. The benchmark holds out a test split before anything is planned or trained
(:func:`choose_test_cases`) and writes a splits file without those cases (:func:`write_splits`); nnU-Net uses an
existing ``splits_final.json`` as it is.

Everything here works on case lists and plain dicts; nnU-Net is imported only to make nnU-Net's own K-fold split.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import write_json

Splits = List[Dict[str, List[str]]]
SPLITS_FILE = "splits_final.json"


def read_splits(path: str) -> Splits:
    """The folds of a ``splits_final.json``: a list of ``{"train": [...], "val": [...]}``.

    Raises:
        VarAugError: missing file, unreadable JSON or not a list of train/val dicts.
    """
    if not os.path.isfile(path):
        raise VarAugError(f"{path} does not exist: nnU-Net writes it on the first training of the dataset "
                          f"(or write your own folds there)")
    try:
        with open(path) as f:
            splits = json.load(f)
    except (OSError, ValueError) as e:
        raise VarAugError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
            for s in splits):
        raise VarAugError(f"{path} is not nnU-Net's splits format (a list of {{\"train\": [...], \"val\": [...]}} "
                          f"per fold)")
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def validating_folds(splits: Splits) -> Dict[str, int]:
    """Map every case to the fold whose validation set holds it.

    Raises:
        VarAugError: a case validated by two folds, or trained and validated by the same fold.
    """
    owner: Dict[str, int] = {}
    for fold, split in enumerate(splits):
        both = sorted(set(split["train"]) & set(split["val"]))
        if both:
            raise VarAugError(f"fold {fold} trains and validates on the same case(s) {', '.join(both[:5])}: "
                              f"not a cross-validation split")
        for case in split["val"]:
            if case in owner:
                raise VarAugError(f"case {case} is validated by folds {owner[case]} and {fold}: out-of-fold "
                                  f"samples need every case validated by exactly one fold")
            owner[case] = fold
    return owner


def check_cross_validation(splits: Splits, cases: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """Check that ``splits`` is a K-fold split (of ``cases`` if given) and return :func:`validating_folds`.

    Every fold must train on exactly the cases the other folds validate.

    Raises:
        VarAugError: naming the fold and cases that break it.
    """
    owner = validating_folds(splits)
    every = set(owner)
    if cases is not None:
        cases = set(cases)
        missing, extra = sorted(cases - every), sorted(every - cases)
        if missing or extra:
            raise VarAugError(f"the splits do not cover the dataset's cases: "
                              f"{'not validated by any fold: ' + ', '.join(missing[:5]) if missing else ''}"
                              f"{'; ' if missing and extra else ''}"
                              f"{'not in the dataset: ' + ', '.join(extra[:5]) if extra else ''}")
    for fold, split in enumerate(splits):
        want = every - set(split["val"])
        if set(split["train"]) != want:
            odd = sorted(set(split["train"]) ^ want)
            raise VarAugError(f"fold {fold} does not train on exactly the cases the other folds validate "
                              f"(differs in {', '.join(odd[:5])}): not a K-fold split")
    return owner


def choose_test_cases(cases: Sequence[str], fraction: float, seed: int = 0, min_remaining: int = 2) -> List[str]:
    """A held-out test split: ``round(fraction * n)`` cases (at least one) drawn without replacement.

    Deterministic: the same cases, fraction and seed give the same split on every machine (numpy's PCG64 on the
    sorted case list), independent of the order the cases are listed in.

    Raises:
        VarAugError: fraction outside (0, 1), or fewer than ``min_remaining`` cases left for training.
    """
    import numpy as np

    if not 0.0 < float(fraction) < 1.0:
        raise VarAugError(f"--test-fraction must be within (0, 1), got {fraction}")
    ordered = sorted(set(cases))
    n_test = max(1, int(round(float(fraction) * len(ordered))))
    if len(ordered) - n_test < min_remaining:
        raise VarAugError(f"--test-fraction {fraction} of {len(ordered)} cases leaves {len(ordered) - n_test} for "
                          f"training, fewer than the {min_remaining} the folds need: lower --test-fraction")
    picked = np.random.default_rng(int(seed)).permutation(len(ordered))[:n_test]
    return sorted(ordered[i] for i in picked)


def crossval_splits(cases: Sequence[str], num_folds: int = 5, seed: int = 12345) -> Splits:
    """nnU-Net's own K-fold split of ``cases`` (``generate_crossval_split``, the split nnU-Net writes on its first
    training: sorted case list, seed 12345, 5 folds)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if not 2 <= int(num_folds) <= len(cases):
        raise VarAugError(f"--folds {num_folds}: need 2..{len(cases)} folds for {len(cases)} training cases")
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]}
            for s in generate_crossval_split(sorted(cases), seed=seed, n_splits=int(num_folds))]


def check_excluded(splits: Splits, held_out: Iterable[str]) -> None:
    """Raise if any held-out case is trained or validated by any fold."""
    held_out = set(held_out)
    for fold, split in enumerate(splits):
        leaked = sorted(held_out & (set(split["train"]) | set(split["val"])))
        if leaked:
            raise VarAugError(f"fold {fold} of the splits uses held-out test case(s) {', '.join(leaked[:5])}: the "
                              f"test split must never be trained or validated on")


def write_splits(path: str, splits: Splits, held_out: Iterable[str] = ()) -> None:
    """Write ``splits`` as nnU-Net's ``splits_final.json``, atomically, after checking it is a K-fold split that
    leaves ``held_out`` out."""
    check_cross_validation(splits)
    check_excluded(splits, held_out)
    write_json(path, splits, indent=4)
