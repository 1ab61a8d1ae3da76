"""Everything ``predict`` and ``analyze`` record per case beyond the voxel maps: per-structure uncertainty
(:mod:`.structures`), the per-lesion view of the ``--instances`` structures (:mod:`.lesions`) and, with labels, the
consensus's Dice and normalized surface Dice (:mod:`.failure_detection`). Plain JSON-friendly numbers, so that the
tables can be rebuilt from the records of finished cases."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.evaluation import failure_detection, lesions, structures, variability


def case_record(maps: np.ndarray, consensus: np.ndarray, spacing: Sequence[float],
                structure_list: Sequence[variability.Structure], soft: Sequence[float],
                entropy: Sequence[Tuple[float, float]], mutual_information: Sequence[Tuple[float, float]],
                mi_map: Optional[np.ndarray] = None, gt: Optional[np.ndarray] = None, ignore: Optional[int] = None,
                instances: Sequence[str] = (), nsd_tolerance: float = failure_detection.NSD_TOLERANCE_MM) -> Dict:
    """``{"structures": [...], "lesions": [...], "lesion_counts": [...], "labels": [...]}`` for one case.

    ``soft``, ``entropy``, ``mutual_information``: :func:`structures.soft_voxels` and :func:`structures.map_means`
    (so that a streaming caller need not hold the mean probability and both maps at once); ``mi_map`` is needed for
    ``instances`` (structure names or label keys); ``gt`` adds the label agreement.
    """
    record: Dict = {"structures": structures.structure_rows(maps, consensus, spacing, structure_list, soft, entropy,
                                                            mutual_information)}
    chosen = [st for st in structure_list if st.name in instances or st.key in instances]
    if chosen:
        if mi_map is None:
            raise ValueError("the per-lesion view needs the mutual-information map")
        record["lesions"], record["lesion_counts"] = [], []
        for st in chosen:
            rows, counts = lesions.lesion_rows(maps, consensus, mi_map, spacing, st)
            record["lesions"] += rows
            record["lesion_counts"].append(counts)
    if gt is not None:
        record["labels"] = failure_detection.label_agreement(consensus, gt, spacing, structure_list, ignore,
                                                             nsd_tolerance)
    return record


def record_from_arrays(maps: np.ndarray, consensus: np.ndarray, mean: np.ndarray, entropy: np.ndarray,
                       mutual_information: np.ndarray, spacing: Sequence[float],
                       structure_list: Sequence[variability.Structure], channels: Sequence[int], **kwargs) -> Dict:
    """:func:`case_record` from whole arrays (``mean``: ``(C, *spatial)``, channel ``i`` = label ``channels[i]``)."""
    return case_record(maps, consensus, spacing, structure_list,
                       structures.soft_voxels(mean, structure_list, channels),
                       structures.map_means(entropy, consensus, structure_list, spacing),
                       structures.map_means(mutual_information, consensus, structure_list, spacing),
                       mi_map=mutual_information, **kwargs)
