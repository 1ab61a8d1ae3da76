"""``nnunet_varaug downstream``: the paper's augmentation experiment on per-replica features.

arXiv 2509.05238 treats each replica's per-region volumes of a subject as one "variability sample" and trains a
regressor (brain age) on N replica rows per subject instead of one. This module runs that protocol on any tidy
table of per-replica features (``subject, replica, feature...``; ``analyze``'s ``cases.csv`` is accepted as is):

* subjects are split into train and test by group (``GroupShuffleSplit``), so no subject is on both sides;
* arms: ``ieee`` (the reference replica only: the paper's single model), ``replicas`` (N replica rows per
  subject, N = 1 … K, each inheriting the subject's target, up to M combinations of replicas per N),
  ``gaussian`` (the reference row plus N − 1 copies with Gaussian noise whose per-feature scale is the features'
  own across-replica standard deviation: the control) and ``combined`` (the replica rows plus those noisy copies);
* test subjects are predicted from their reference replica (or the replica mean); MAE, RMSE and R² are
  summarised as mean ± std over combinations (and splits).

Replica rows are not a free lunch: a nearest-neighbour model sees N copies of each subject crowding every
neighbourhood and gets worse (the paper's KNN went from 9.32 to 15.04 years). The verdict says so per arm.
"""
from __future__ import annotations

import argparse
import base64
import html as html_lib
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from nnunet_varaug.fileio import temporary_name, write_text
from nnunet_varaug.experiment import VarAugError

ARMS: Tuple[str, ...] = ("ieee", "replicas", "gaussian", "combined")
MODELS: Tuple[str, ...] = ("rf", "svr", "gb", "knn", "ridge")
MODEL_NAMES = {"rf": "random forest", "svr": "SVR", "gb": "gradient boosting", "knn": "KNN", "ridge": "ridge"}
CASES_COLUMNS = ("case", "label", "replica", "volume_mm3")
METRICS: Tuple[str, ...] = ("MAE", "RMSE", "R2")
# A relative MAE change smaller than this (in either direction) is reported as "no clear effect".
VERDICT_TOLERANCE = 0.02
KNN_NEIGHBOURS = 5  # scikit-learn's default k


# ----------------------------------------------------------------------------------------------------------------
# Input tables
# ----------------------------------------------------------------------------------------------------------------

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
    """Features as an array (subject, replica, feature), targets per subject, and the reference replica."""

    subjects: List[str]
    replicas: List[str]
    features: List[str]
    X: np.ndarray  # (S, K, F) float64
    y: np.ndarray  # (S,) float64
    reference: int  # index into ``replicas``
    unused_targets: int = 0

    @property
    def reference_name(self) -> str:
        return self.replicas[self.reference]


def prepare(features: pd.DataFrame, targets: pd.DataFrame, reference: Optional[str] = None) -> Design:
    """Check the two tables and shape them for the protocol; every problem is a ``VarAugError`` naming it.

    Args:
        features: tidy table ``subject, replica, feature...`` (or ``analyze``'s cases table).
        targets: ``subject, target`` (or ``subject`` and one other column, e.g. ``age``).
        reference: the replica that plays the single model; default the first replica in natural sort order.
    """
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

    replicas = sorted(set(features["replica"]), key=natural_key)
    per_subject = features.groupby("subject", sort=False)["replica"].apply(frozenset)
    incomplete = [s for s, reps in per_subject.items() if len(reps) != len(replicas)]
    if incomplete:
        counts = features.groupby("subject")["replica"].nunique()
        raise VarAugError(f"every subject needs the same replicas: {len(replicas)} replicas exist, but subject(s) "
                          f"{_examples(sorted(incomplete, key=natural_key))} have "
                          f"{sorted(set(int(counts[s]) for s in incomplete))}; drop those subjects or the "
                          f"replicas they lack")
    if len(replicas) < 2:
        raise VarAugError(f"only one replica ('{replicas[0]}') in the features table: replica rows need at least "
                          f"2 replicas (train more with `nnunet_varaug replicas -n K`)")
    if reference is None:
        reference = replicas[0]
    elif reference not in replicas:
        raise VarAugError(f"--reference '{reference}' is not a replica of the features table; replicas: "
                          f"{_examples(replicas, 20)}")

    targets = targets.copy()
    tcol = target_column(targets)
    targets["subject"] = targets["subject"].astype(str)
    if targets["subject"].duplicated().any():
        raise VarAugError(f"targets table lists subject(s) "
                          f"{_examples(sorted(set(targets.loc[targets['subject'].duplicated(), 'subject'])))} "
                          f"more than once")
    if not pd.api.types.is_numeric_dtype(targets[tcol]):
        raise VarAugError(f"target column '{tcol}' is not numeric")
    target_of = dict(zip(targets["subject"], targets[tcol].astype(np.float64)))
    subjects = sorted(per_subject.index, key=natural_key)
    lacking = [s for s in subjects if s not in target_of]
    if lacking:
        raise VarAugError(f"{len(lacking)} subject(s) of the features table have no target: {_examples(lacking)}; "
                          f"add them to the targets table or drop them from the features")
    y = np.array([target_of[s] for s in subjects], dtype=np.float64)
    if not np.isfinite(y).all():
        raise VarAugError(f"target is NaN or infinite for subject(s) {_examples(np.array(subjects)[~np.isfinite(y)])}")
    if len(subjects) < 3:
        raise VarAugError(f"only {len(subjects)} subject(s): a train/test split needs at least 3")

    indexed = features.set_index(["subject", "replica"])[feature_columns]
    full = pd.MultiIndex.from_product([subjects, replicas], names=["subject", "replica"])
    X = indexed.reindex(full).to_numpy(dtype=np.float64).reshape(len(subjects), len(replicas), len(feature_columns))
    return Design(subjects=subjects, replicas=replicas, features=feature_columns, X=X, y=y,
                  reference=replicas.index(reference), unused_targets=len(set(target_of) - set(subjects)))


# ----------------------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Options:
    """The experiment's settings (the CLI flags); defaults follow the paper where it says."""

    model: str = "rf"
    arms: Tuple[str, ...] = ARMS
    n_max: Optional[int] = None  # default: all K replicas
    combinations: int = 10
    test_size: float = 0.1
    test_on: str = "reference"
    seed: int = 0
    grid: bool = False
    reference: Optional[str] = None
    splits: int = 1

    def check(self) -> None:
        if self.model not in MODELS:
            raise VarAugError(f"--model must be one of {', '.join(MODELS)}; got '{self.model}'")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise VarAugError(f"--arms must be a comma-separated subset of {','.join(ARMS)}; got "
                              f"'{','.join(self.arms)}'")
        if self.combinations < 1:
            raise VarAugError(f"--combinations must be >= 1, got {self.combinations}")
        if self.n_max is not None and self.n_max < 1:
            raise VarAugError(f"--n-max must be >= 1, got {self.n_max}")
        if self.test_on not in ("reference", "mean"):
            raise VarAugError(f"--test-on must be 'reference' or 'mean', got '{self.test_on}'")
        if self.splits < 1:
            raise VarAugError(f"--splits must be >= 1, got {self.splits}")
        if not (0 < self.test_size < 1 or (float(self.test_size).is_integer() and self.test_size >= 1)):
            raise VarAugError(f"--test-size must be a fraction in (0, 1) or a number of subjects >= 1, got "
                              f"{self.test_size}")


def group_splits(groups: np.ndarray, test_size: float, seed: int, n_splits: int = 1
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``GroupShuffleSplit`` over rows grouped by subject; asserts on the actual indices that no group is on both
    sides (a leak would make every replica-row arm look better than it is)."""
    from sklearn.model_selection import GroupShuffleSplit

    size: Union[int, float] = int(test_size) if test_size >= 1 else float(test_size)
    n_groups = len(np.unique(groups))
    n_test = size if isinstance(size, int) else math.ceil(size * n_groups)
    if n_test >= n_groups - 1:
        raise VarAugError(f"--test-size {test_size} leaves {n_groups - n_test} training subject(s) of {n_groups}; "
                          f"use a smaller test size or more subjects")
    splitter = GroupShuffleSplit(n_splits=n_splits, test_size=size, random_state=seed)
    for train, test in splitter.split(np.zeros(len(groups)), groups=groups):
        leaked = np.intersect1d(groups[train], groups[test])
        assert leaked.size == 0, f"group split leaked subjects {leaked[:5]} into both train and test"
        yield train, test


def replica_combinations(k: int, n: int, m: int, rng: np.random.Generator) -> List[Tuple[int, ...]]:
    """Up to ``m`` distinct size-``n`` subsets of ``range(k)``: all of them when there are at most ``m``, else
    ``m`` drawn uniformly without repetition (sorted, so the list depends only on the generator)."""
    total = math.comb(k, n)
    if total <= m:
        return list(itertools.combinations(range(k), n))
    chosen = set()
    while len(chosen) < m:
        chosen.add(tuple(sorted(rng.choice(k, size=n, replace=False).tolist())))
    return sorted(chosen)


def noise_scale(X_train: np.ndarray) -> np.ndarray:
    """Per-feature scale of the Gaussian control: the pooled within-subject standard deviation across replicas,
    sqrt(mean over subjects of the across-replica variance), from training subjects only."""
    return np.sqrt(np.mean(np.var(X_train, axis=1, ddof=1), axis=0))


def training_rows(X_train: np.ndarray, y_train: np.ndarray, arm: str, replicas: Sequence[int], n: int,
                  reference: int, scale: np.ndarray, rng: np.random.Generator
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows one arm trains on: features, targets and the group (training-subject index) of each row.

    ``ieee``: the reference row. ``replicas``: the rows of ``replicas``. ``gaussian``: the reference row plus
    ``n - 1`` noisy copies of it. ``combined``: the rows of ``replicas`` plus ``n - 1`` noisy copies of the
    reference row. Every row inherits its subject's target.
    """
    s = X_train.shape[0]
    blocks = []
    if arm == "ieee":
        blocks.append(X_train[:, [reference], :])
    if arm in ("replicas", "combined"):
        blocks.append(X_train[:, list(replicas), :])
    if arm == "gaussian":
        blocks.append(X_train[:, [reference], :])
    if arm in ("gaussian", "combined") and n > 1:
        ref = X_train[:, [reference], :]
        blocks.append(ref + rng.standard_normal((s, n - 1, X_train.shape[2])) * scale)
    rows = np.concatenate(blocks, axis=1)  # (S, R, F)
    per_subject = rows.shape[1]
    groups = np.repeat(np.arange(s), per_subject)
    return rows.reshape(s * per_subject, -1), np.repeat(y_train, per_subject), groups


def make_model(model: str, seed: int, grid: bool = False, n_groups: int = 0, rows_per_group: int = 1) -> Any:
    """A scikit-learn regressor by name, standardised where the model needs it (SVR, KNN, ridge).

    SVR also standardises the target (its epsilon and C are in target units). With ``grid``, a ``GridSearchCV``
    over a small grid with ``GroupKFold`` over training subjects, so replica rows of one subject never sit on both
    sides of an inner fold; call ``fit(X, y, groups=groups)``. KNN's grid keeps only the k that every inner
    training fold can serve (``n_groups`` subjects of ``rows_per_group`` rows each).
    """
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    if model == "rf":
        estimator = RandomForestRegressor(random_state=seed, n_jobs=1)
        params = {"max_features": [1.0, "sqrt"], "min_samples_leaf": [1, 5]}
    elif model == "gb":
        estimator = GradientBoostingRegressor(random_state=seed)
        params = {"learning_rate": [0.05, 0.1], "max_depth": [2, 3]}
    elif model == "svr":
        estimator = TransformedTargetRegressor(
            regressor=Pipeline([("scale", StandardScaler()), ("svr", SVR())]), transformer=StandardScaler())
        params = {"regressor__svr__C": [0.1, 1.0, 10.0], "regressor__svr__epsilon": [0.01, 0.1, 0.5]}
    elif model == "knn":
        estimator = Pipeline([("scale", StandardScaler()), ("knn", KNeighborsRegressor(KNN_NEIGHBOURS))])
        params = {"knn__n_neighbors": [3, 5, 10, 20], "knn__weights": ["uniform", "distance"]}
    elif model == "ridge":
        estimator = Pipeline([("scale", StandardScaler()), ("ridge", Ridge())])
        params = {"ridge__alpha": [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]}
    else:
        raise VarAugError(f"--model must be one of {', '.join(MODELS)}; got '{model}'")
    if not grid:
        return estimator
    if n_groups < 2:
        raise VarAugError("--grid needs at least 2 training subjects for its inner cross-validation")
    folds = min(5, n_groups)
    if model == "knn":
        smallest_train = (n_groups - math.ceil(n_groups / folds)) * rows_per_group
        params["knn__n_neighbors"] = [k for k in params["knn__n_neighbors"] if k <= smallest_train] or [1]
    return GridSearchCV(estimator, params, cv=GroupKFold(n_splits=folds),
                        scoring="neg_mean_absolute_error", n_jobs=1)


def _fit_predict(model: Any, X: np.ndarray, y: np.ndarray, groups: np.ndarray, X_test: np.ndarray,
                 grid: bool) -> np.ndarray:
    if grid:
        model.fit(X, y, groups=groups)
    else:
        model.fit(X, y)
    return np.asarray(model.predict(X_test), dtype=np.float64)


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Dict[str, float]:
    """MAE, RMSE and R² (NaN with fewer than two test subjects, where it is undefined)."""
    err = y_pred - y_true
    mae = float(np.mean(np.abs(err)))
    rmse = float(np.sqrt(np.mean(err ** 2)))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    r2 = float(1.0 - np.sum(err ** 2) / ss_tot) if len(y_true) > 1 and ss_tot > 0 else float("nan")
    return {"MAE": mae, "RMSE": rmse, "R2": r2}


def _arm_code(arm: str) -> int:
    return ARMS.index(arm)


def run_protocol(design: Design, options: Options, progress: bool = False
                 ) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Run every arm on every split; returns ``(results, splits)``.

    ``results`` has one row per (split, arm, N, combination): model, split, arm, N, combination, rows_per_subject,
    replicas (the replica indices used, ``;``-joined), MAE, RMSE, R2. ``splits`` lists (split, subject, side).
    Every random draw comes from ``options.seed``: combinations per N are drawn once and shared by all splits and
    arms; the noise of each (split, arm, N, combination) has its own generator, so adding an arm changes nothing
    else.
    """
    options.check()
    S, K, F = design.X.shape
    n_max = K if options.n_max is None else options.n_max
    if n_max > K:
        raise VarAugError(f"--n-max {n_max} exceeds the number of replicas ({K})")
    combos = {n: replica_combinations(K, n, options.combinations, np.random.default_rng([options.seed, n]))
              for n in range(1, n_max + 1)}
    groups = np.repeat(np.arange(S), K)  # one row per (subject, replica), grouped by subject
    records: List[Dict[str, Any]] = []
    split_rows: List[Dict[str, Any]] = []
    for split, (train_rows, test_rows) in enumerate(group_splits(groups, options.test_size, options.seed,
                                                                 options.splits)):
        train = np.unique(groups[train_rows])
        test = np.unique(groups[test_rows])
        split_rows += [{"split": split, "subject": design.subjects[i], "side": "train"} for i in train]
        split_rows += [{"split": split, "subject": design.subjects[i], "side": "test"} for i in test]
        if options.model == "knn" and not options.grid and len(train) < KNN_NEIGHBOURS:
            raise VarAugError(f"--model knn averages {KNN_NEIGHBOURS} neighbours but the single-model arm has only "
                              f"{len(train)} training subjects: use more subjects, a smaller --test-size, --grid "
                              f"(tunes k) or another --model")
        X_train, y_train = design.X[train], design.y[train]
        X_test = design.X[test, design.reference] if options.test_on == "reference" else design.X[test].mean(axis=1)
        y_test = design.y[test]
        scale = noise_scale(X_train)
        for arm in options.arms:
            ns = [1] if arm == "ieee" else range(1, n_max + 1)
            for n in ns:
                if arm == "ieee":
                    draws: List[Tuple[int, ...]] = [(design.reference,)]
                elif arm == "gaussian":
                    # N = 1 is the reference row alone: one draw; else as many noise draws as replica combinations
                    draws = [(design.reference,)] * (1 if n == 1 else len(combos[n]))
                else:
                    draws = combos[n]
                for c, reps in enumerate(draws):
                    rng = np.random.default_rng([options.seed, split, _arm_code(arm), n, c])
                    X, y, g = training_rows(X_train, y_train, arm, reps, n, design.reference, scale, rng)
                    model = make_model(options.model, options.seed, options.grid, len(train),
                                       X.shape[0] // len(train))
                    pred = _fit_predict(model, X, y, g, X_test, options.grid)
                    records.append({"model": options.model, "split": split, "arm": arm, "N": n, "combination": c,
                                    "rows_per_subject": X.shape[0] // len(train),
                                    "replicas": ";".join(str(r) for r in reps), **metrics(y_test, pred)})
            if progress:
                print(f"  split {split} {arm}: done", flush=True)
    return pd.DataFrame.from_records(records), pd.DataFrame.from_records(split_rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, N): mean and population std (ddof=0) of each metric over combinations and splits, and the MAE
    difference to the single model paired by split.

    ``MAE_delta_mean`` averages, over splits, (mean MAE of the arm's combinations in the split) − (ieee MAE in the
    same split): both are scored on the same test subjects, so test-set sampling cancels out of the difference.
    ``MAE_delta_se`` is its standard error over splits (NaN with one split or without the ieee arm).
    """
    rows = []
    order = {a: i for i, a in enumerate(ARMS)}
    ieee = results[results["arm"] == "ieee"].groupby("split")["MAE"].mean()
    for (arm, n), part in sorted(results.groupby(["arm", "N"]), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        n_splits = int(part["split"].nunique())
        row: Dict[str, Any] = {"model": part["model"].iat[0], "arm": arm, "N": int(n), "splits": n_splits,
                               "combinations": int(len(part)) // n_splits,
                               "rows_per_subject": int(part["rows_per_subject"].iat[0])}
        for m in METRICS:
            values = part[m].to_numpy(dtype=np.float64)
            finite = values[np.isfinite(values)]
            row[f"{m}_mean"] = float(finite.mean()) if finite.size else float("nan")
            row[f"{m}_std"] = float(finite.std()) if finite.size else float("nan")
        delta = (part.groupby("split")["MAE"].mean() - ieee).dropna().to_numpy()
        row["MAE_delta_mean"] = float(delta.mean()) if delta.size else float("nan")
        row["MAE_delta_se"] = float(delta.std(ddof=1) / np.sqrt(delta.size)) if delta.size > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame.from_records(rows)


# ----------------------------------------------------------------------------------------------------------------
# Verdict, figure, report section
# ----------------------------------------------------------------------------------------------------------------

def arm_verdicts(summary: pd.DataFrame, tolerance: float = VERDICT_TOLERANCE) -> Dict[str, Dict[str, Any]]:
    """Per augmentation arm: MAE with the most rows (largest N) against the single model (``ieee``).

    Judged at the largest N, not the best one, because picking the best N on the test set flatters the arm.
    ``effect`` is ``helps`` / ``hurts`` when the relative MAE change exceeds ``tolerance`` and, with several
    splits, the split-paired difference exceeds twice its standard error; else ``no clear effect``.
    """
    out: Dict[str, Dict[str, Any]] = {}
    base = summary[summary["arm"] == "ieee"]
    if base.empty:
        return out
    base_mae = float(base["MAE_mean"].iat[0])
    for arm in [a for a in ARMS if a != "ieee" and a in set(summary["arm"])]:
        part = summary[summary["arm"] == arm].sort_values("N")
        last = part.iloc[-1]
        best = part.loc[part["MAE_mean"].idxmin()]
        change = (float(last["MAE_mean"]) - base_mae) / base_mae if base_mae > 0 else 0.0
        delta, se = float(last.get("MAE_delta_mean", np.nan)), float(last.get("MAE_delta_se", np.nan))
        beyond_noise = not np.isfinite(se) or abs(delta) > 2 * se
        clear = abs(change) > tolerance and beyond_noise
        effect = "no clear effect" if not clear else "helps" if change < 0 else "hurts"
        out[arm] = {"effect": effect, "change": change, "N": int(last["N"]), "MAE": float(last["MAE_mean"]),
                    "MAE_std": float(last["MAE_std"]), "baseline": base_mae, "best_N": int(best["N"]),
                    "best_MAE": float(best["MAE_mean"]), "rows_per_subject": int(last["rows_per_subject"]),
                    "delta": delta, "delta_se": se, "splits": int(last.get("splits", 1))}
    return out


def format_verdict(summary: pd.DataFrame) -> str:
    """Plain-language verdict, one line per augmentation arm: does adding rows help this model?

    A model that gets worse is reported as such (KNN typically: copies of one subject crowd its neighbourhoods).
    """
    if summary.empty:
        return "no results"
    model = str(summary["model"].iat[0]) if "model" in summary.columns else "?"
    name = MODEL_NAMES.get(model, model)
    verdicts = arm_verdicts(summary)
    if "ieee" not in set(summary["arm"]):
        return f"{name}: no verdict, the ieee arm (the single-model baseline) was not run"
    base = summary[summary["arm"] == "ieee"].iloc[0]
    lines = [f"{name}: single model (ieee) MAE {base['MAE_mean']:.4g}"]
    what = {"replicas": "replica rows", "gaussian": "Gaussian copies", "combined": "replica rows + Gaussian copies"}
    for arm, v in verdicts.items():
        head = {"helps": f"{what[arm]} HELP {name}", "hurts": f"{what[arm]} HURT {name}",
                "no clear effect": f"{what[arm]} make no clear difference to {name}"}[v["effect"]]
        paired = (f"; paired by split {v['delta']:+.3g} ± {v['delta_se']:.2g} (SE)"
                  if np.isfinite(v["delta_se"]) else "")
        line = (f"{arm}: {head}: MAE {v['MAE']:.4g} ± {v['MAE_std']:.2g} at N={v['N']} "
                f"({v['rows_per_subject']} rows per subject) vs {v['baseline']:.4g} single model "
                f"({100 * v['change']:+.1f} %{paired}); lowest MAE {v['best_MAE']:.4g} at N={v['best_N']}")
        if v["effect"] == "hurts" and model == "knn":
            line += (". Copies of one subject crowd each neighbourhood, so the k nearest rows come from fewer "
                     "subjects; do not use replica rows with KNN (or tune k with --grid)")
        lines.append(line)
    if not verdicts:
        lines.append("no augmentation arm was run")
    elif int(base.get("splits", 1)) == 1:
        lines.append("(one train/test split: these differences include test-set noise; rerun with --splits 10 "
                     "for a verdict beyond it)")
    return "\n".join(lines)


def plot_mae(summary: pd.DataFrame, path: str) -> None:
    """MAE against N per arm, band = ± std over combinations; ``ieee`` is a horizontal line over all N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    n_top = int(summary["N"].max())
    xs_all = np.arange(1, n_top + 1)
    colors = {"ieee": "black", "replicas": "tab:blue", "gaussian": "tab:orange", "combined": "tab:green"}
    for arm in [a for a in ARMS if a in set(summary["arm"])]:
        part = summary[summary["arm"] == arm].sort_values("N")
        mean, std = part["MAE_mean"].to_numpy(), part["MAE_std"].to_numpy()
        if arm == "ieee":
            xs, mean, std = xs_all, np.full(len(xs_all), mean[0]), np.full(len(xs_all), std[0])
            ax.plot(xs, mean, "--", color=colors[arm], label="ieee (single model)")
        else:
            xs = part["N"].to_numpy()
            ax.plot(xs, mean, "o-", ms=3, color=colors[arm], label=arm)
        ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.15, linewidth=0)
    model = str(summary["model"].iat[0])
    ax.set_xlabel("N (replica rows per subject)")
    ax.set_ylabel("MAE")
    ax.set_title(f"Downstream regression, {MODEL_NAMES.get(model, model)}")
    ax.set_xticks(xs_all if n_top <= 20 else np.linspace(1, n_top, 10).round().astype(int))
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = temporary_name(path, ".tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def section_html(summary: pd.DataFrame, verdict: str, design: Design, options: Options, figure: str) -> str:
    """The report section: what was run, the verdict, the figure (embedded, like the report's own) and the summary
    table."""
    esc = html_lib.escape
    with open(figure, "rb") as f:
        png = base64.b64encode(f.read()).decode("ascii")
    table = summary[["arm", "N", "combinations", "rows_per_subject"]].copy()
    for m in METRICS:
        table[m] = [f"{a:.4g} ± {b:.2g}" for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    lines = "".join(f"<li>{esc(line)}</li>" for line in verdict.splitlines())
    return (f"<p>Each replica's features of a subject are one extra training row (arXiv 2509.05238). "
            f"{len(design.subjects)} subjects, {len(design.replicas)} replicas (reference "
            f"<code>{esc(design.reference_name)}</code>), {len(design.features)} features; model "
            f"{esc(MODEL_NAMES[options.model])}, test on the {esc(options.test_on)} replica features, seed "
            f"{options.seed}.</p><ul>{lines}</ul>"
            f"<img alt=\"MAE against N\" src=\"data:image/png;base64,{png}\">"
            + table.to_html(index=False, escape=True, border=0))


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes and the experiment entry point
# ----------------------------------------------------------------------------------------------------------------

def write_csv(table: pd.DataFrame, path: str) -> None:
    write_text(path, table.to_csv(index=False))


def output_folder(out: str) -> Tuple[str, Optional[str]]:
    """Where outputs go, and the report folder to add a section to: ``OUT/downstream/`` when OUT holds an
    ``analyze`` report (``report.html``), else OUT itself."""
    if os.path.isfile(os.path.join(out, "report.html")):
        return os.path.join(out, "downstream"), out
    return out, None


def run_experiment(features: pd.DataFrame, targets: pd.DataFrame, out: str, progress: bool = False,
                   **options: Any) -> pd.DataFrame:
    """Run the downstream experiment and write its outputs; returns the summary.

    Args:
        features: tidy ``subject, replica, feature...`` table, or ``analyze``'s cases table.
        targets: ``subject, target`` (or ``subject`` plus one column such as ``age``).
        out: output folder; if it holds a ``report.html``, outputs go to ``out/downstream/`` and a section is added
            to the report.
        progress: print a line per split and arm.
        **options: fields of ``Options`` (model, arms, n_max, combinations, test_size, test_on, seed, grid,
            reference, splits).

    Writes ``results.csv``, ``summary.csv``, ``splits.csv``, ``verdict.txt``, ``settings.json`` and
    ``figures/mae_vs_n.png``.
    """
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(Options.__dataclass_fields__)}")
    if isinstance(options.get("arms"), str):
        options["arms"] = tuple(a.strip() for a in options["arms"].split(",") if a.strip())
    opts = Options(**options)
    opts.arms = tuple(opts.arms)
    opts.check()
    design = prepare(features, targets, opts.reference)
    opts.reference = design.reference_name
    results, splits = run_protocol(design, opts, progress=progress)
    summary = summarize(results)
    verdict = format_verdict(summary)

    folder, report_dir = output_folder(out)
    os.makedirs(os.path.join(folder, "figures"), exist_ok=True)
    write_csv(results, os.path.join(folder, "results.csv"))
    write_csv(summary, os.path.join(folder, "summary.csv"))
    write_csv(splits, os.path.join(folder, "splits.csv"))
    write_text(os.path.join(folder, "verdict.txt"), verdict + "\n")
    import sklearn

    settings = {**asdict(opts), "arms": list(opts.arms), "subjects": len(design.subjects),
                "replicas": design.replicas, "features": design.features,
                "targets_without_features": design.unused_targets, "scikit_learn": sklearn.__version__}
    write_text(os.path.join(folder, "settings.json"), json.dumps(settings, indent=2) + "\n")
    plot_mae(summary, os.path.join(folder, "figures", "mae_vs_n.png"))
    if report_dir is not None:
        add_report_section(report_dir, section_html(summary, verdict, design, opts,
                                                    os.path.join(folder, "figures", "mae_vs_n.png")))
    return summary


def add_report_section(report_dir: str, html: str) -> None:
    """Add the downstream section to ``report_dir/report.html`` through ``report.add_html_section``."""
    try:
        from nnunet_varaug.report import add_html_section
    except ImportError as e:
        raise VarAugError(f"cannot add a section to {report_dir}/report.html: nnunet_varaug.report is unavailable "
                          f"({e}); the outputs are in {report_dir}/downstream/") from None
    add_html_section(report_dir, "downstream", "Downstream augmentation (replica rows)", html)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def _test_size(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The paper's augmentation experiment: train a regressor on N replica rows per subject "
                          "(N = 1..K) against the single model, a Gaussian-noise control and both combined; "
                          "MAE/RMSE/R² on test subjects split by group.")
    parser.add_argument("--features", required=True,
                        help="tidy CSV: subject, replica, feature columns; or analyze's cases.csv (pivoted to one "
                             "volume column per label, subject = case)")
    parser.add_argument("--targets", required=True,
                        help="CSV: subject, target (or subject plus one column, e.g. age)")
    parser.add_argument("-o", "--output", required=True, dest="output",
                        help="output folder; an analyze report folder gets OUT/downstream/ and a report section")
    parser.add_argument("--model", default="rf", choices=MODELS, help="regressor (default rf)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--n-max", type=int, default=None, help="largest N (default: all replicas)")
    parser.add_argument("--combinations", type=int, default=10,
                        help="at most this many replica combinations (and noise draws) per N (default 10)")
    parser.add_argument("--test-size", type=_test_size, default=0.1,
                        help="test fraction of subjects, or a number of subjects (default 0.1)")
    parser.add_argument("--test-on", default="reference", choices=("reference", "mean"),
                        help="predict test subjects from the reference replica's features or the replica mean")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, combinations, noise and models")
    parser.add_argument("--splits", type=int, default=1,
                        help="repeat with this many group shuffle splits (default 1)")
    parser.add_argument("--grid", action="store_true",
                        help="tune hyperparameters with an inner GroupKFold over training subjects")
    parser.add_argument("--reference", default=None,
                        help="the replica that plays the single model (default: first in natural sort order)")


def run(args: argparse.Namespace) -> int:
    features = read_csv(args.features, "--features")
    targets = read_csv(args.targets, "--targets")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    summary = run_experiment(features, targets, args.output, progress=True, model=args.model, arms=arms,
                             n_max=args.n_max, combinations=args.combinations, test_size=args.test_size,
                             test_on=args.test_on, seed=args.seed, grid=args.grid, reference=args.reference,
                             splits=args.splits)
    folder, report_dir = output_folder(args.output)
    print(format_verdict(summary))
    print(f"results: {os.path.join(folder, 'results.csv')}, {os.path.join(folder, 'summary.csv')}, "
          f"{os.path.join(folder, 'figures', 'mae_vs_n.png')}"
          + (f"; section added to {os.path.join(report_dir, 'report.html')}" if report_dir else ""))
    return 0
