"""What replicas analysed together must share, read from their debug.json: a warning for each difference.

* the platform: seed and numerical replicas record their machine and software (``determinism.platform``, written
  by :func:`nnunet_varaug.training.seeding.platform_record`); the same replica trained on another CPU gives other
  weights (:func:`platform_warning`);
* the random-stream layout (``streams.layout``; :func:`nnunet_varaug.training.seeding.layout_warning`);
* the rounding-noise generator of numerical replicas (``numerics.generator``;
  :func:`nnunet_varaug.training.numerics.noise.generator_warning`).

:func:`replica_warnings` gives all three; ``analyze`` prints them.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.training.numerics.noise import generator_warning
from nnunet_varaug.training.seeding import layout_warning

PLATFORM_KEYS = ("cpu", "simd", "torch_threads", "torch", "numpy", "nnunetv2", "cuda", "cudnn", "gpu")


def platform_warning(experiments: Sequence[Experiment]) -> Optional[str]:
    """A warning when the replicas compared were trained on different machines or software, as their debug.json
    records it (``determinism.platform``, written by seed and numerical replicas): the same replica trained on
    another CPU gives other weights, so their disagreement would mix platform differences into the variability
    measured. None when the records agree; replicas without a record are left out."""
    return _platform_warning(replica_records(experiments))


def _platform_warning(records: Dict[str, Optional[dict]]) -> Optional[str]:
    groups: Dict[tuple, List[str]] = {}
    for name, record in records.items():
        try:
            platform = record["determinism"]["platform"]
        except (KeyError, TypeError):
            continue
        groups.setdefault(tuple(platform.get(k) for k in PLATFORM_KEYS), []).append(name)
    if len(groups) < 2:
        return None
    differ = [i for i, k in enumerate(PLATFORM_KEYS) if len({key[i] for key in groups}) > 1]
    described = "; ".join(", ".join(names) + ": " + ", ".join(f"{PLATFORM_KEYS[i]}={key[i]}" for i in differ)
                          for key, names in groups.items())
    return (f"the replicas were trained on {len(groups)} different platforms ({described}); the same replica "
            f"gives other weights on another machine, so their disagreement is not seed or rounding variability "
            f"alone. Train the replicas you compare on one kind of machine with the same software")


def replica_records(experiments: Sequence[Experiment]) -> Dict[str, Optional[dict]]:
    """Replica name -> the ``nnunet_varaug`` record of its debug.json (None when it has none or cannot be read)."""
    records: Dict[str, Optional[dict]] = {}
    for exp in experiments:
        for name in exp.replica_names:
            try:
                with open(os.path.join(exp.fold_folder(name), "debug.json")) as f:
                    record = json.load(f).get("nnunet_varaug")
            except (OSError, ValueError, AttributeError):
                record = None
            records[name] = record if isinstance(record, dict) else None
    return records


def replica_warnings(experiments: Sequence[Experiment]) -> List[str]:
    """Every warning about replicas analysed together (module docstring): platform, stream layout, noise
    generator; an empty list when they agree."""
    records = replica_records(experiments)
    numerics = {name: (record.get("numerics") or {}).get("generator") for name, record in records.items()
                if record and (record.get("numerics") or {}).get("kind") == "mca"}
    return [w for w in (_platform_warning(records), layout_warning(records), generator_warning(numerics)) if w]
