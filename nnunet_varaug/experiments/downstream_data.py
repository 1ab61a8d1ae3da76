"""Downstream experiment, step 1: the input tables (per-replica features, targets) checked and shaped into a
:class:`Design`, with the reference model chosen and kept out of the replica pool.

``analyze``'s ``cases.csv`` is accepted as is (one volume column per label); the reference defaults to the
table's IEEE twin ``<Base>_ieee`` (``analyze`` writes its rows when that model exists), else must be named.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from nnunet_varaug.utilities.errors import VarAugError

CASES_COLUMNS = ("case", "label", "replica", "volume_mm3")


def natural_key(text: str) -> List[Union[int, str]]:
    """Sort key that puts ``seed2`` before ``seed10`` (replica names carry their index as digits)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def features_from_cases(cases: pd.DataFrame) -> pd.DataFrame:
    """``analyze``'s ``cases.csv`` (case, label, replica, volume_mm3, ...) -> tidy features, one row per replica.

    Each label's volume becomes one feature column ``volume_<label>``; the case is the subject. Other columns
    (``dice_to_gt``) are dropped: they need the ground truth and are not features of a new subject.

    Args:
        cases: the table ``analyze`` writes.

    Returns:
        Columns ``subject, replica, volume_<label>...``, sorted by subject and replica.
    """
    missing = [c for c in CASES_COLUMNS if c not in cases.columns]
    if missing:
        raise VarAugError(f"cases table lacks column(s) {missing}; expected {list(CASES_COLUMNS)} as written by "
                          f"`nnunet_varaug analyze`")
    table = cases.loc[:, list(CASES_COLUMNS)].copy()
    table["case"] = table["case"].astype(str)
    table["replica"] = table["replica"].astype(str)
    dup = table.duplicated(["case", "label", "replica"], keep=False)
    if dup.any():
        first = table[dup].iloc[0]
        raise VarAugError(f"cases table has {int(dup.sum())} duplicated (case, label, replica) rows, e.g. case "
                          f"'{first['case']}', label {first['label']}, replica '{first['replica']}'")
    wide = table.pivot(index=["case", "replica"], columns="label", values="volume_mm3")
    labels = sorted(wide.columns, key=natural_key)
    wide = wide[labels]
    wide.columns = [f"volume_{label}" for label in labels]
    wide = wide.reset_index().rename(columns={"case": "subject"})
    wide.columns.name = None
    order = sorted(range(len(wide)), key=lambda i: (natural_key(wide["subject"].iat[i]),
                                                     natural_key(wide["replica"].iat[i])))
    return wide.iloc[order].reset_index(drop=True)


def is_cases_table(table: pd.DataFrame) -> bool:
    """Whether ``table`` looks like ``analyze``'s ``cases.csv`` rather than a tidy features table."""
    return "subject" not in table.columns and all(c in table.columns for c in CASES_COLUMNS)


def read_csv(path: str, what: str) -> pd.DataFrame:
    """Read a CSV with an error that names the flag when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise VarAugError(f"{what} file '{path}' does not exist")
    try:
        return pd.read_csv(path, dtype={"subject": str, "replica": str, "case": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise VarAugError(f"cannot read {what} file '{path}' as CSV: {e}") from None


def _examples(items: Sequence[Any], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def target_column(targets: pd.DataFrame) -> str:
    """The target column: ``target``, else the one column besides ``subject`` (e.g. ``age``)."""
    if "subject" not in targets.columns:
        raise VarAugError(f"targets table needs a 'subject' column; it has {list(targets.columns)}")
    if "target" in targets.columns:
        return "target"
    others = [c for c in targets.columns if c != "subject"]
    if len(others) == 1:
        return others[0]
    raise VarAugError(f"targets table needs a 'target' column (or exactly one column besides 'subject'); it has "
                      f"{list(targets.columns)}")


@dataclass
class Design:
    """Features as arrays, targets per subject, and the reference model kept apart from the replica pool.

    ``X`` holds the K pooled replicas only; the reference model's rows are ``X_ref``: the reference is never one
    of the pooled replicas (issue 12).
    """

    subjects: List[str]
    replicas: List[str]  # the pool, natural order
    features: List[str]
    X: np.ndarray  # (S, K, F) float64, pooled replicas
    y: np.ndarray  # (S,) float64
    reference_name: str
    X_ref: np.ndarray  # (S, F) float64, the reference model's rows
    unused_targets: int = 0


IEEE_SUFFIX = "_ieee"


def choose_reference(models: Sequence[str], reference: Optional[str]) -> str:
    """The reference model: ``reference`` if named, else the one IEEE twin ``<Base>_ieee`` of the table.

    Raises:
        VarAugError: the named model is not in the table; or none named and the table has no (or several)
            ``*_ieee`` models.
    """
    if reference is not None:
        if reference not in models:
            raise VarAugError(f"--reference '{reference}' is not a replica of the features table; replicas: "
                              f"{_examples(models, 20)}")
        return reference
    ieee = [m for m in models if m.endswith(IEEE_SUFFIX)]
    if len(ieee) == 1:
        return ieee[0]
    if ieee:
        raise VarAugError(f"the features table has several IEEE models ({_examples(ieee)}); name the reference "
                          f"with --reference NAME")
    raise VarAugError(f"no reference model: the features table has no '<Base>{IEEE_SUFFIX}' rows (the unperturbed "
                      f"IEEE twin; train it with `nnUNetv2_train D C F -tr <Base>{IEEE_SUFFIX}` and rerun `nnunet_varaug "
                      f"analyze`), so name one with --reference NAME, e.g. --reference {models[0]}; it is then "
                      f"left out of the replica pool")


def prepare(features: pd.DataFrame, targets: pd.DataFrame, reference: Optional[str] = None) -> Design:
    """Check the two tables and shape them for the protocol; every problem is a ``VarAugError`` naming it.

    Args:
        features: tidy table ``subject, replica, feature...`` (or ``analyze``'s cases table).
        targets: ``subject, target`` (or ``subject`` and one other column, e.g. ``age``).
        reference: the model that plays the single model; default the table's ``<Base>_ieee`` model
            (:func:`choose_reference`). It is taken out of the replica pool.
    """
    features, feature_columns = checked_features(features)
    models = sorted(set(features["replica"]), key=natural_key)
    reference = choose_reference(models, reference)
    replicas = [m for m in models if m != reference]
    per_subject = features.groupby("subject", sort=False)["replica"].apply(frozenset)
    incomplete = [s for s, reps in per_subject.items() if len(reps) != len(models)]
    if incomplete:
        counts = features.groupby("subject")["replica"].nunique()
        raise VarAugError(f"every subject needs the same replicas: {len(models)} replicas exist, but subject(s) "
                          f"{_examples(sorted(incomplete, key=natural_key))} have "
                          f"{sorted(set(int(counts[s]) for s in incomplete))}; drop those subjects or the "
                          f"replicas they lack")
    if len(replicas) < 2:
        raise VarAugError(f"only {len(replicas)} replica(s) besides the reference '{reference}' in the features "
                          f"table: replica rows need at least 2 (train more with `nnunet_varaug replicas -n K`)")
    subjects = sorted(per_subject.index, key=natural_key)
    target_of = checked_targets(targets)
    y = target_vector(target_of, subjects)
    indexed = features.set_index(["subject", "replica"])[feature_columns]
    full = pd.MultiIndex.from_product([subjects, replicas], names=["subject", "replica"])
    X = indexed.reindex(full).to_numpy(dtype=np.float64).reshape(len(subjects), len(replicas), len(feature_columns))
    ref = pd.MultiIndex.from_product([subjects, [reference]], names=["subject", "replica"])
    X_ref = indexed.reindex(ref).to_numpy(dtype=np.float64)
    return Design(subjects=subjects, replicas=replicas, features=feature_columns, X=X, y=y,
                  reference_name=reference, X_ref=X_ref, unused_targets=len(set(target_of) - set(subjects)))


def checked_features(features: pd.DataFrame) -> Tuple[pd.DataFrame, List[str]]:
    """The features table with string subject and replica columns, and its feature columns: numeric, finite, one
    row per (subject, replica)."""
    if is_cases_table(features):
        features = features_from_cases(features)
    for column in ("subject", "replica"):
        if column not in features.columns:
            raise VarAugError(f"features table needs columns 'subject' and 'replica' (or analyze's cases.csv "
                              f"columns {list(CASES_COLUMNS)}); it has {list(features.columns)}")
    features = features.copy()
    features["subject"] = features["subject"].astype(str)
    features["replica"] = features["replica"].astype(str)
    feature_columns = [c for c in features.columns if c not in ("subject", "replica")]
    if not feature_columns:
        raise VarAugError("features table has no feature columns besides 'subject' and 'replica'")
    non_numeric = [c for c in feature_columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise VarAugError(f"feature column(s) {non_numeric} are not numeric; drop them or encode them as numbers")
    values = features[feature_columns].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        where = [f"{features['subject'].iat[r]}/{features['replica'].iat[r]}/{feature_columns[c]}"
                 for r, c in zip(rows, cols)]
        raise VarAugError(f"features table has {int(bad.sum())} NaN or infinite value(s) (subject/replica/feature): "
                          f"{_examples(where)}; fix or drop them before running downstream")
    dup = features.duplicated(["subject", "replica"], keep=False)
    if dup.any():
        raise VarAugError(f"features table has duplicated (subject, replica) rows for subject(s) "
                          f"{_examples(sorted(set(features.loc[dup, 'subject']), key=natural_key))}")
    return features, feature_columns


def checked_targets(targets: pd.DataFrame) -> Dict[str, float]:
    """``subject -> target`` from the targets table: one numeric target per subject."""
    targets = targets.copy()
    tcol = target_column(targets)
    targets["subject"] = targets["subject"].astype(str)
    if targets["subject"].duplicated().any():
        raise VarAugError(f"targets table lists subject(s) "
                          f"{_examples(sorted(set(targets.loc[targets['subject'].duplicated(), 'subject'])))} "
                          f"more than once")
    if not pd.api.types.is_numeric_dtype(targets[tcol]):
        raise VarAugError(f"target column '{tcol}' is not numeric")
    return dict(zip(targets["subject"], targets[tcol].astype(np.float64)))


def target_vector(target_of: Dict[str, float], subjects: List[str]) -> np.ndarray:
    """The targets of ``subjects`` in order: every subject has a finite one, and there are at least 3."""
    lacking = [s for s in subjects if s not in target_of]
    if lacking:
        raise VarAugError(f"{len(lacking)} subject(s) of the features table have no target: {_examples(lacking)}; "
                          f"add them to the targets table or drop them from the features")
    y = np.array([target_of[s] for s in subjects], dtype=np.float64)
    if not np.isfinite(y).all():
        raise VarAugError(f"target is NaN or infinite for subject(s) {_examples(np.array(subjects)[~np.isfinite(y)])}")
    if len(subjects) < 3:
        raise VarAugError(f"only {len(subjects)} subject(s): a train/test split needs at least 3")
    return y


