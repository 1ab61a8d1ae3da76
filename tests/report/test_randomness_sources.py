"""The sources report on a planted attribution: the verdict names the right source and fraction, the CSV holds
every number of the table, the figure is a PNG."""
from __future__ import annotations

import csv

import pytest

from nnunet_varaug.evaluation.attribution import Additivity, SourceRow
from nnunet_varaug.report import randomness_sources as report

pytestmark = pytest.mark.unit


def row(structure, source, ratio, interval, dice=0.8):
    return SourceRow(structure, source, 30, 3, dice, (dice - 0.05, dice + 0.05), 0.1, (0.05, 0.2), 100.0 * ratio,
                     ratio, interval)


ROWS = [row("organ", "seed", 1.0, (1.0, 1.0)), row("organ", "init", 0.8, (0.6, 0.95)),
        row("organ", "order", 0.1, (0.05, 0.2)), row("organ", "mca", 1 / 60, (0.01, 0.02)),
        row("lesion", "seed", 1.0, (1.0, 1.0)), row("lesion", "init", 0.3, (0.2, 0.5)),
        row("lesion", "order", 0.35, (0.25, 0.6)), row("lesion", "mca", 0.0, (0.0, 0.0))]
SUMS = [Additivity("organ", ("init", "order", "mca"), 0.9167, (0.7, 1.1)),
        Additivity("lesion", ("init", "order", "mca"), 0.65, (0.5, 0.9))]


def test_verdict_names_the_largest_source_and_the_smallest_fraction():
    organ, lesion = report.verdict(ROWS, SUMS, ["organ", "lesion"])
    assert organ.startswith("**organ**: changing only the initial weights gives 0.8 of the seed replicas'")
    assert "it explains most of the disagreement" in organ
    assert "Changing only the rounding (stochastic rounding) gives 0.0167 (1/60 of it)" in organ
    assert "within noise of it (the interval holds 1)" in organ
    assert lesion.startswith("**lesion**: changing only the data order")  # 0.35 > 0.3
    assert "less than half of it, and the largest share" in lesion
    assert "Changing only the initial weights (0.3, 0.2–0.5) cannot be told apart from it" in lesion
    assert "gives 0 (no volume changed in any case)" in lesion
    assert "less than it: changing every source at once moves the volumes more" in lesion


def test_files_hold_the_table(tmp_path):
    written = report.write_report(str(tmp_path), ROWS, SUMS, ["organ", "lesion"],
                                  {"seed": ["B_seed0", "B_seed1", "B_seed2"], "init": ["B_seed0", "B_init1", "B_init2"],
                                   "order": ["B_seed0", "B_order1", "B_order2"], "mca": ["B_mca0", "B_mca1", "B_mca2"]},
                                  30, ["a planted note"])
    with open(written[report.CSV]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["structure"], r["randomness_source"]) for r in rows[:4]] == [
        ("organ", "seed"), ("organ", "init"), ("organ", "order"), ("organ", "mca")]
    init = rows[1]
    assert float(init["variance_ratio_to_seed"]) == 0.8 and float(init["ratio_ci_low"]) == 0.6
    assert float(init["volume_variance_mm6"]) == 80.0 and init["replicas"] == "3" and init["cases"] == "30"
    assert rows[-1]["randomness_source"] == "sum_of_single_sources:init+order+mca"
    assert float(rows[-1]["variance_ratio_to_seed"]) == 0.65
    with open(written[report.FIGURE], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(written[report.MARKDOWN]).read()
    assert "`B_order1`" in text and "## Verdict" in text and "(figures/sources.png)" in text
    assert "| lesion | mca | 3 |" in text and "Note: a planted note" in text
