"""The calibration section's figure."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation import calibration
from nnunet_varaug.report.calibration import reliability_diagram

pytestmark = pytest.mark.unit


def test_reliability_diagram_is_a_png(tmp_path):
    counts = calibration.CalibrationCounts([0, 1])
    p1 = np.linspace(0, 1, 50, dtype=np.float32)
    counts.add("r0", np.stack([1 - p1, p1]), (p1 > 0.5).astype(int))
    counts.add("ensemble", np.stack([1 - p1, p1]), (p1 > 0.5).astype(int))
    path = reliability_diagram(counts, str(tmp_path / "r.png"), "ensemble", {1: "fg"})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
