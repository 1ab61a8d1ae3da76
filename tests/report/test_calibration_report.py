"""The calibration section: calibration.csv, the table (all voxels / ROI) and the reliability diagram."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nnunet_varaug.evaluation import calibration
from nnunet_varaug.evaluation.variability import Structure
from nnunet_varaug.report.calibration import calibration_html, reliability_diagram

pytestmark = pytest.mark.unit


def counts_of_two_models():
    counts = calibration.CalibrationCounts([0, 1])
    p1 = np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 4, 4)
    gt = (p1 > 0.5).astype(int)
    for model in ("r0", "ensemble"):
        counts.add_case(model, np.stack([1 - p1, p1]), gt, None, (1.0, 1.0, 1.0))
    return counts


def test_reliability_diagram_is_a_png(tmp_path):
    path = reliability_diagram(counts_of_two_models(), str(tmp_path / "r.png"), "ensemble", {1: "fg"})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_calibration_csv_and_table(tmp_path):
    counts = counts_of_two_models()
    html = calibration_html(counts, str(tmp_path), ["r0"], [Structure("fg", (1,))],
                            {"seed": {"temperature": 1.5, "nll_at_1": 0.3, "nll_at_fit": 0.2, "cases": 3}})
    table = pd.read_csv(tmp_path / "calibration.csv", dtype={"label": str})
    assert set(table["scope"]) == {"all", "roi"} and set(table["model"]) == {"r0", "ensemble"}
    row = table[(table["model"] == "r0") & (table["scope"] == "all") & (table["label"] == "all")].iloc[0]
    assert row["top_label_ece"] == pytest.approx(counts.top_label_ece("r0")) and row["nll"] == pytest.approx(
        counts.nll("r0"))
    assert "class-wise ECE fg" in html and "1.500" in html and (tmp_path / "figures" / "reliability.png").exists()
