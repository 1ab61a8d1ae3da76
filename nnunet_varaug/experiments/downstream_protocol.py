"""Downstream experiment, step 2: the protocol (arms, group splits, models, metrics) on a :class:`Design`.

Arms (arXiv 2509.05238's experiment, plus two labelled controls): ``ieee`` (the reference model's rows only: the
paper's single model), ``replicas`` (N pooled replica rows per subject, N = 1 … K, each inheriting the
subject's target, up to M combinations per N), ``gaussian`` (the reference row plus N − 1 copies with
independent Gaussian noise, per-feature scale = the pooled within-subject std of the training subjects' replica
rows), ``gaussian_corr`` (the same with correlated noise: the pooled within-subject covariance, Ledoit–Wolf
shrunk, volumes reflected at 0) and ``combined`` (replica rows plus independent-noise copies). Test subjects are
described by the reference (``--test-features reference``), the mean of their replica rows (``mean``), or all
their replica rows with predictions averaged per subject (``all``, as the authors' ``X_test`` keeps them).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from nnunet_varaug.experiments.downstream_data import Design
from nnunet_varaug.utilities.errors import VarAugError

ARMS: Tuple[str, ...] = ("ieee", "replicas", "gaussian", "gaussian_corr", "combined")
ARM_LABELS = {"ieee": "reference model alone", "replicas": "replica rows",
              "gaussian": "Gaussian control, independent noise per feature",
              "gaussian_corr": "Gaussian control, correlated noise (Ledoit–Wolf within-subject covariance)",
              "combined": "replica rows + independent Gaussian copies"}
MODELS: Tuple[str, ...] = ("rf", "svr", "gb", "knn", "ridge")
MODEL_NAMES = {"rf": "random forest", "svr": "SVR", "gb": "gradient boosting", "knn": "KNN", "ridge": "ridge"}
METRICS: Tuple[str, ...] = ("MAE", "RMSE", "R2")
TEST_FEATURES: Tuple[str, ...] = ("reference", "mean", "all")
KNN_NEIGHBOURS = 5  # scikit-learn's default k


@dataclass
class Options:
    """The experiment's settings (the CLI flags); defaults follow the paper where it says."""

    model: str = "rf"
    arms: Tuple[str, ...] = ARMS
    n_max: Optional[int] = None  # default: all K replicas
    combinations: int = 10
    test_size: float = 0.1
    test_features: str = "reference"
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
        if self.test_features not in TEST_FEATURES:
            raise VarAugError(f"--test-features must be one of {', '.join(TEST_FEATURES)}, got "
                              f"'{self.test_features}'")
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
    """Per-feature scale of the independent Gaussian control: the pooled within-subject standard deviation across
    replicas, sqrt(mean over subjects of the across-replica variance), from training subjects only."""
    return np.sqrt(np.mean(np.var(X_train, axis=1, ddof=1), axis=0))


def noise_covariance(X_train: np.ndarray) -> np.ndarray:
    """Covariance of the correlated Gaussian control: the pooled within-subject covariance of the training
    subjects' replica rows, shrunk by Ledoit–Wolf (scikit-learn's ``LedoitWolf``).

    Deviations from each subject's replica mean are pooled (``S * K`` rows, centred by construction, so
    ``assume_centered=True``); ``LedoitWolf`` divides by ``S * K``, and the factor ``K / (K - 1)`` restores the
    unbiased within-subject normalisation (``S * (K - 1)`` degrees of freedom), so that its diagonal before
    shrinkage equals :func:`noise_scale` squared.
    """
    from sklearn.covariance import LedoitWolf

    s, k, f = X_train.shape
    dev = (X_train - X_train.mean(axis=1, keepdims=True)).reshape(s * k, f)
    return LedoitWolf(assume_centered=True).fit(dev).covariance_ * (k / (k - 1))


def _cov_root(cov: np.ndarray) -> np.ndarray:
    """A square root ``R`` with ``R @ R.T = cov`` (eigendecomposition: works for a singular covariance too)."""
    w, v = np.linalg.eigh(cov)
    return v * np.sqrt(np.clip(w, 0.0, None))


def correlated_copies(ref: np.ndarray, count: int, cov: np.ndarray, rng: np.random.Generator,
                      nonnegative: np.ndarray) -> np.ndarray:
    """``count`` noisy copies per row of ``ref`` ``(S, F)``: ``ref + e``, ``e ~ N(0, cov)``; features flagged in
    ``nonnegative`` (volumes) are reflected at 0 (``|x|``), so a copy never has a negative volume.

    Why reflection and not clipping: clipping puts an atom of exact zeros (a structure "absent") into the copies;
    reflection keeps a continuous distribution. Both raise the mean of a feature whose value is within a few
    noise standard deviations of 0 (folded normal: by ``2σφ(μ/σ) − 2μΦ(−μ/σ)``, under 0.001σ for μ > 3σ).
    """
    noise = rng.standard_normal((ref.shape[0], count, ref.shape[1])) @ _cov_root(cov).T
    out = ref[:, None, :] + noise
    return np.where(nonnegative, np.abs(out), out)


def training_rows(X_train: np.ndarray, y_train: np.ndarray, arm: str, replicas: Sequence[int], n: int,
                  ref_train: np.ndarray, scale: np.ndarray, rng: np.random.Generator,
                  cov: Optional[np.ndarray] = None, nonnegative: Optional[np.ndarray] = None
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows one arm trains on: features, targets and the group (training-subject index) of each row.

    ``ieee``: the reference model's row. ``replicas``: the pooled rows of ``replicas``. ``gaussian``: the
    reference row plus ``n - 1`` copies with independent noise of per-feature scale ``scale``.
    ``gaussian_corr``: the reference row plus ``n - 1`` copies with correlated noise of covariance ``cov``,
    volumes reflected at 0. ``combined``: the rows of ``replicas`` plus ``n - 1`` independent-noise copies of the
    reference row. Every row inherits its subject's target. ``ref_train``: ``(S, F)`` reference rows.
    """
    s = X_train.shape[0]
    ref = ref_train[:, None, :]
    blocks = []
    if arm in ("ieee", "gaussian", "gaussian_corr"):
        blocks.append(ref)
    if arm in ("replicas", "combined"):
        blocks.append(X_train[:, list(replicas), :])
    if arm in ("gaussian", "combined") and n > 1:
        blocks.append(ref + rng.standard_normal((s, n - 1, X_train.shape[2])) * scale)
    if arm == "gaussian_corr" and n > 1:
        flags = np.zeros(X_train.shape[2], bool) if nonnegative is None else nonnegative
        blocks.append(correlated_copies(ref_train, n - 1, cov, rng, flags))
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
    """Fit, then predict ``X_test``: ``(T, F)``, or ``(T, R, F)`` whose R rows per subject are predicted one by
    one and averaged (``--test-features all``)."""
    if grid:
        model.fit(X, y, groups=groups)
    else:
        model.fit(X, y)
    if X_test.ndim == 3:
        t, r, f = X_test.shape
        return np.asarray(model.predict(X_test.reshape(t * r, f)), dtype=np.float64).reshape(t, r).mean(axis=1)
    return np.asarray(model.predict(X_test), dtype=np.float64)


def describe_test_subjects(design: Design, test: np.ndarray, how: str) -> np.ndarray:
    """Test subjects' features: the reference's rows ``(T, F)``, the mean of their replica rows ``(T, F)``, or
    all their replica rows ``(T, K, F)`` (predictions then averaged per subject)."""
    if how == "reference":
        return design.X_ref[test]
    if how == "mean":
        return design.X[test].mean(axis=1)
    return design.X[test]


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
        X_train, y_train, ref_train = design.X[train], design.y[train], design.X_ref[train]
        X_test = describe_test_subjects(design, test, options.test_features)
        y_test = design.y[test]
        scale = noise_scale(X_train)
        cov = noise_covariance(X_train) if "gaussian_corr" in options.arms else None
        nonnegative = (np.concatenate([X_train.reshape(-1, X_train.shape[2]), ref_train]) >= 0).all(axis=0)
        for arm in options.arms:
            ns = [1] if arm == "ieee" else range(1, n_max + 1)
            for n in ns:
                if arm == "ieee":
                    draws: List[Tuple[int, ...]] = [()]
                elif arm in ("gaussian", "gaussian_corr"):
                    # N = 1 is the reference row alone: one draw; else as many noise draws as replica combinations
                    draws = [()] * (1 if n == 1 else len(combos[n]))
                else:
                    draws = combos[n]
                for c, reps in enumerate(draws):
                    rng = np.random.default_rng([options.seed, split, _arm_code(arm), n, c])
                    X, y, g = training_rows(X_train, y_train, arm, reps, n, ref_train, scale, rng, cov, nonnegative)
                    model = make_model(options.model, options.seed, options.grid, len(train),
                                       X.shape[0] // len(train))
                    pred = _fit_predict(model, X, y, g, X_test, options.grid)
                    records.append({"model": options.model, "split": split, "arm": arm, "N": n, "combination": c,
                                    "rows_per_subject": X.shape[0] // len(train),
                                    "replicas": ";".join(design.replicas[r] for r in reps),
                                    **metrics(y_test, pred)})
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


