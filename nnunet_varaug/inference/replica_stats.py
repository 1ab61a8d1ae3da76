"""What ``analyze`` gathers per kind and case while the replicas' probabilities exist, so that nothing is predicted
twice: the sum of the replicas' predictive entropies (for the mutual information of structures.csv) and, with
labels, the calibration counts of each replica and of their ensemble and the temperature fit's NLL sums.

Stored beside the mean probabilities of :mod:`.probsums`: ``OUT/predictions/_replica_stats/<kind>/<case>.npz``
(``entropy_sum``, float32, bits) and ``<case>.json`` (the identity: the replicas' checkpoint sha256 and the prediction
settings; calibration counts; NLL sums). A case whose record does not match is predicted again by all K replicas.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation import calibration, temperature, uncertainty
from nnunet_varaug.utilities.fileio import read_npz_array, replacing, write_json

FOLDER = "_replica_stats"
ENSEMBLE = "ensemble"


def folder(output: str, kind: str) -> str:
    return os.path.join(output, "predictions", FOLDER, kind)


def load_record(output: str, kind: str, case: str) -> Optional[dict]:
    path = os.path.join(folder(output, kind), case + ".json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None


def is_current(output: str, kind: str, case: str, identity: dict, need_calibration: bool) -> bool:
    """Whether the stored statistics of ``case`` come from exactly these replicas and settings (and hold the
    calibration counts when they are needed)."""
    record = load_record(output, kind, case)
    return (record is not None and record.get("identity") == identity
            and (not need_calibration or record.get("calibration") is not None)
            and os.path.isfile(os.path.join(folder(output, kind), case + ".npz")))


def load_entropy_sum(output: str, kind: str, case: str) -> Optional[np.ndarray]:
    return read_npz_array(os.path.join(folder(output, kind), case + ".npz"), "entropy_sum")


class Accumulator:
    """One kind's statistics of one case, replica by replica (one replica's probabilities at a time)."""

    def __init__(self, labels: Sequence[int], gt: Optional[np.ndarray], ignore: Optional[int],
                 spacing: Sequence[float], calibrate: bool) -> None:
        self.labels, self.gt, self.ignore, self.spacing = list(labels), gt, ignore, spacing
        self.entropy_sum: Optional[np.ndarray] = None
        self.counts = calibration.CalibrationCounts(labels) if calibrate and gt is not None else None
        self.nll = np.zeros(temperature.GRID)
        self.voxels = 0.0

    def add(self, name: str, probabilities: np.ndarray) -> None:
        h = uncertainty.entropy_bits(probabilities)
        self.entropy_sum = h if self.entropy_sum is None else self.entropy_sum + h
        if self.counts is not None:
            self.counts.add_case(name, probabilities, self.gt, self.ignore, self.spacing)
            sums, voxels = temperature.nll_sums(probabilities, self.gt, self.labels, self.ignore)
            self.nll += sums
            self.voxels += voxels

    def add_ensemble(self, mean: np.ndarray) -> None:
        if self.counts is not None:
            self.counts.add_case(ENSEMBLE, mean, self.gt, self.ignore, self.spacing)

    def save(self, output: str, kind: str, case: str, identity: dict) -> None:
        where = folder(output, kind)
        os.makedirs(where, exist_ok=True)
        with replacing(os.path.join(where, case + ".npz"), ".npz") as tmp:
            np.savez_compressed(tmp, entropy_sum=self.entropy_sum.astype(np.float32))
        write_json(os.path.join(where, case + ".json"), {
            "identity": identity, "calibration": None if self.counts is None else self.counts.to_json(),
            "nll_sums": self.nll.tolist() if self.counts is not None else None, "voxels": self.voxels})


def calibration_of(output: str, kind: str, cases: Sequence[str], ensemble_name: str = ENSEMBLE) -> Optional[Dict]:
    """``{"counts", "temperature"}`` of one kind over the labelled ``cases`` (the ensemble's counts renamed
    ``ensemble_name``), or None without labelled cases."""
    counts, fit = None, temperature.Fit()
    for case in cases:
        record = load_record(output, kind, case)
        if not record or record.get("calibration") is None:
            continue
        c = calibration.CalibrationCounts.from_json(record["calibration"])
        for scope in c.stats.values():
            if ENSEMBLE in scope and ensemble_name != ENSEMBLE:
                scope[ensemble_name] = scope.pop(ENSEMBLE)
        counts = c if counts is None else counts.merge(c)
        fit.add(np.asarray(record["nll_sums"]), record["voxels"])
        fit.cases += 1
    if counts is None:
        return None
    return {"counts": counts, "temperature": {**fit.result(), "cases": fit.cases}}


# ---- the fitted temperature, where predict --temperature auto finds it ---------------------------------------------
def temperature_path(results: str, dataset: str, base: str, kind: str, plans: str, configuration: str, fold) -> str:
    """``$nnUNet_results/<Dataset>/varaug_temperature/<Base>_<kind>__<Plans>__<Config>__fold_<F>.json``."""
    return os.path.join(results, dataset, "varaug_temperature", f"{base}_{kind}__{plans}__{configuration}__fold_{fold}.json")


def save_temperature(path: str, fit: dict, replicas: Dict[str, str], tta: bool, step_size: float,
                     cases: Sequence[str]) -> dict:
    """Record a fit: T, the NLL before and after, and what it was fitted on (replicas' checkpoint sha256, settings,
    cases)."""
    record = {**fit, "replicas": dict(replicas), "tta": tta, "step_size": step_size, "cases_fitted": list(cases)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, record)
    return record


def load_temperature(path: str, replicas: Dict[str, str]) -> dict:
    """The fit at ``path`` for these replicas (name -> checkpoint sha256). Raises ValueError naming what is wrong:
    no fit, or a replica it was not fitted with (retrained, or not among the fitted ones)."""
    if not os.path.isfile(path):
        raise ValueError(f"no fitted temperature at {path}")
    with open(path) as f:
        record = json.load(f)
    wrong = [n for n, sha in replicas.items() if record.get("replicas", {}).get(n) != sha]
    if wrong:
        raise ValueError(f"the temperature at {path} was fitted with other checkpoints of {', '.join(wrong)} (or "
                         f"without them)")
    return record
