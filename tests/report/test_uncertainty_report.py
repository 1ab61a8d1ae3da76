"""structures.csv, review.csv, lesions, failure_detection.csv and the report sections from per-case records,
against the evaluation functions applied by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nnunet_varaug.evaluation import failure_detection as fd
from nnunet_varaug.evaluation.case_record import record_from_arrays
from nnunet_varaug.evaluation.variability import Structure
from nnunet_varaug.report.uncertainty_report import ReviewOptions, write_uncertainty_outputs

pytestmark = pytest.mark.unit

ST = [Structure("organ", (1,)), Structure("lesion", (2,))]


def make_records(n=6, k=4):
    rng = np.random.default_rng(0)
    records, truth = {}, {}
    for c in range(n):
        gt = np.zeros((16, 16, 16), np.uint8)
        gt[3:12, 3:12, 3:12] = 1
        gt[5:7, 5:7, 5:7] = 2
        maps = np.stack([gt.copy() for _ in range(k)])
        for i in range(k):  # case c: replicas shifted by up to c voxels: more disagreement, lower Dice
            maps[i] = np.roll(maps[i], (i * c) // 3, axis=0)
        mean = np.stack([(maps == v).mean(0) for v in range(3)]).astype(np.float32)
        consensus = mean.argmax(0).astype(np.uint8)
        ent = rng.random(gt.shape).astype(np.float32)
        mi = rng.random(gt.shape).astype(np.float32)
        records[f"c{c}"] = record_from_arrays(maps, consensus, mean, ent, mi, (1.0, 1.0, 1.0), ST, [0, 1, 2],
                                              gt=gt, instances=["lesion"])
        truth[f"c{c}"] = (consensus, gt)
    return records, truth


def test_tables_and_sections(tmp_path):
    records, truth = make_records()
    opt = ReviewOptions(failure_dice=0.9, instances=["lesion"])
    sections = write_uncertainty_outputs(str(tmp_path), records, opt, str(tmp_path / "figures"))
    s = pd.read_csv(tmp_path / "structures.csv", dtype={"label": str})
    assert len(s) == 12 and {"soft_mm3", "review_score", "dice_to_labels", "nsd_to_labels"} <= set(s.columns)
    for case, (consensus, gt) in truth.items():
        row = s[(s["case"] == case) & (s["label"] == "1")].iloc[0]
        assert row["dice_to_labels"] == pytest.approx(fd.dice(consensus == 1, gt == 1))
    review = pd.read_csv(tmp_path / "review.csv")
    worst = s.groupby("case")["review_score"].max()
    assert [review["score"][i] == pytest.approx(worst[c]) for i, c in enumerate(review["case"])] == [True] * 6
    assert list(review["score"]) == sorted(review["score"], reverse=True) and review["score"].iloc[0] > 0
    table = pd.read_csv(tmp_path / "failure_detection.csv")
    case = table[table["level"] == "case"].iloc[0]
    dice_case = s.groupby("case")["dice_to_labels"].min()
    assert case["aurc"] == pytest.approx(fd.aurc(1 - dice_case.to_numpy(), worst[dice_case.index].to_numpy()))
    assert case["failures"] == int((dice_case < 0.9).sum())
    thresholds = pd.read_csv(tmp_path / "review_thresholds.csv")
    assert list(thresholds["share_of_failures"]) == list(fd.SHARES)
    counts = pd.read_csv(tmp_path / "lesion_counts.csv")
    assert len(counts) == 6 and (tmp_path / "lesions.csv").exists()
    assert (tmp_path / "figures" / "risk_coverage.png").exists()
    assert "AURC" in sections["failures"] and "⁷" in sections["structures"] and "lesions" in sections
