"""The replicas' mean predicted probabilities per case, kept for the majority vote's tie-break.

Why a running sum: the vote needs, at tied voxels, each label's probability averaged over the K replicas. Keeping
K probability maps per case would cost K times the memory (and disk); ``analyze`` adds each replica's softmax,
in the input image's grid, to one ``(C, *spatial)`` float32 sum while it predicts the case (two such arrays in
memory at a time: the sum and the replica being added), and stores the mean once: ``OUT/predictions/_probabilities/<kind>/<case>.npz`` (array ``mean``), with ``record.json`` naming the
replicas and checkpoint sha256 it averages. A case whose record does not match the replicas' current
checkpoints has all K replicas predicted again (the sum needs every one of them).

Region-based datasets have sigmoid outputs per region, not a distribution over labels: no probabilities are kept
there and ties go to the smallest label (docs/variability.md).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from nnunet_varaug.utilities.fileio import read_npz_array, replacing, write_json

FOLDER = "_probabilities"


def folder(output: str, kind: str) -> str:
    return os.path.join(output, "predictions", FOLDER, kind)


def _record(output: str, kind: str) -> dict:
    path = os.path.join(folder(output, kind), "record.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def is_current(output: str, kind: str, case: str, shas: Dict[str, str]) -> bool:
    """Whether the stored mean of ``case`` averages exactly the replicas ``shas`` (name -> checkpoint sha256)."""
    return (_record(output, kind).get(case) == shas
            and os.path.isfile(os.path.join(folder(output, kind), case + ".npz")))


def save(output: str, kind: str, case: str, total: np.ndarray, shas: Dict[str, str]) -> None:
    """Store ``total / len(shas)`` atomically, then record which replicas it averages."""
    where = folder(output, kind)
    os.makedirs(where, exist_ok=True)
    path = os.path.join(where, case + ".npz")
    with replacing(path, ".npz") as tmp:
        np.savez_compressed(tmp, mean=(total / len(shas)).astype(np.float32))
    record = _record(output, kind)
    record[case] = dict(shas)
    write_json(os.path.join(where, "record.json"), record)


def load(output: str, kind: str, case: str) -> Optional[np.ndarray]:
    """The stored ``(C, *spatial)`` mean probabilities of ``case``, or None."""
    return read_npz_array(os.path.join(folder(output, kind), case + ".npz"), "mean")
