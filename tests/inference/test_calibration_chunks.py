"""predict's calibration counts, added row chunk by row chunk (nnunet_varaug.inference.ensemble.add_calibration),
equal the counts of the whole case at once (CalibrationCounts.add_case), both scopes."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation import calibration, chunked
from nnunet_varaug.inference import ensemble

pytestmark = pytest.mark.unit


def test_chunked_counts_equal_whole_case_counts(monkeypatch):
    monkeypatch.setattr(chunked.row_chunks, "__defaults__", (1, 3 * 8 * 12 * 10))  # 8 rows of 12 x 10 per chunk
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 30, 12, 10)) * 2
    logits[0] += 5  # background almost everywhere: the ROI is a part of the grid
    logits[1, 10:16, 3:8, 2:7] += 9
    p = (np.exp(logits) / np.exp(logits).sum(axis=0)).astype(np.float32)
    gt = np.zeros((30, 12, 10), np.uint8)
    gt[11:17, 3:8, 2:7] = 1
    gt[0:2] = 3  # ignore label
    whole, parts = calibration.CalibrationCounts([0, 1, 2]), calibration.CalibrationCounts([0, 1, 2])
    whole.add_case("m", p, gt, 3, (2.0, 1.0, 1.5))
    ensemble.add_calibration(parts, "m", p, gt, 3, (2.0, 1.0, 1.5))
    for scope in calibration.SCOPES:
        a, b = whole.stats[scope]["m"], parts.stats[scope]["m"]
        assert a["n"] == b["n"] > 0
        for key in ("classwise", "top", "brier"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-9)
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-10)
    assert parts.stats["roi"]["m"]["n"] < parts.stats["all"]["m"]["n"]
