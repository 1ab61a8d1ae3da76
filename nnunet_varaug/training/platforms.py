"""The platform a replica was trained on, compared across replicas: a warning when they differ.

Seed and numerical replicas record their machine and software in debug.json (``determinism.platform``, written by
:func:`nnunet_varaug.training.seeding.platform_record`); the same replica trained on another CPU gives other weights.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.training.experiment import Experiment

PLATFORM_KEYS = ("cpu", "simd", "torch_threads", "torch", "numpy", "nnunetv2", "cuda", "cudnn", "gpu")


def platform_warning(experiments: Sequence[Experiment]) -> Optional[str]:
    """A warning when the replicas compared were trained on different machines or software, as their debug.json
    records it (``determinism.platform``, written by seed and numerical replicas): the same replica trained on
    another CPU gives other weights, so their disagreement would mix platform differences into the variability
    measured. None when the records agree; replicas without a record are left out."""
    groups: Dict[tuple, List[str]] = {}
    for exp in experiments:
        for name in exp.replica_names:
            try:
                with open(os.path.join(exp.fold_folder(name), "debug.json")) as f:
                    record = json.load(f)["nnunet_varaug"]["determinism"]["platform"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            groups.setdefault(tuple(record.get(k) for k in PLATFORM_KEYS), []).append(name)
    if len(groups) < 2:
        return None
    differ = [i for i, k in enumerate(PLATFORM_KEYS) if len({key[i] for key in groups}) > 1]
    described = "; ".join(", ".join(names) + ": " + ", ".join(f"{PLATFORM_KEYS[i]}={key[i]}" for i in differ)
                          for key, names in groups.items())
    return (f"the replicas were trained on {len(groups)} different platforms ({described}); the same replica "
            f"gives other weights on another machine, so their disagreement is not seed or rounding variability "
            f"alone. Train the replicas you compare on one kind of machine with the same software")
