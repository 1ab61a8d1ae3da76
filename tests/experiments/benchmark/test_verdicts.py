"""The benchmark's verdicts from per-model evaluation files (nnU-Net's summary format, written here): the tables
are read in the right order, the verdicts are ``compare``'s, the seed-noise ratio is the F interval."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
from scipy import stats

from nnunet_varaug.evaluation import comparison
from nnunet_varaug.experiments.benchmark import verdicts
from nnunet_varaug.report.comparison import Row, verdict

pytestmark = pytest.mark.unit

LABELS = {"1": "Anterior", "2": "Posterior"}
CASES = [f"hippocampus_{i:03d}" for i in (4, 1, 9, 12, 3, 7)]  # written out of order on purpose


def bench_like(out: str, k: int, stability: bool = True):
    plain = [f"T_seed{i}" for i in range(k)]
    return types.SimpleNamespace(
        out=out, base="T", replica_names=plain, num_replicas=k, stability=stability, sources=["in-fold"],
        varaug_for=lambda source: "T_varaug", stability_names=lambda source: [f"T_varaug_seed{i}" for i in range(k)])


def write_model(folder: str, trainer: str, dice: np.ndarray, reverse: bool = False) -> None:
    """nnU-Net's summary.json layout: metric_per_case with per-label Dice (NaN allowed), keys as nnU-Net writes
    them; ``reverse``: the cases listed in the opposite order."""
    per_case = [{"metrics": {key: {"Dice": float(dice[i, j])} for j, key in enumerate(LABELS)},
                 "prediction_file": f"/x/{trainer}/{case}.nii.gz", "reference_file": f"/y/{case}.nii.gz"}
                for i, case in enumerate(CASES)][:: -1 if reverse else 1]
    with open(os.path.join(folder, f"{trainer}.json"), "w") as f:
        json.dump({"metric_per_case": per_case, "mean": {}, "foreground_mean": {}}, f)


@pytest.fixture
def evaluated(tmp_path):
    folder = tmp_path / "evaluation" / "test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tables = {}
    for trainer, shift in [(f"T_seed{i}", 0.0) for i in range(3)] + [(f"T_varaug_seed{i}", 0.04) for i in range(3)]:
        tables[trainer] = np.clip(rng.normal(0.8 + shift, 0.03, (len(CASES), 2)), 0, 1)
    tables["T_seed1"][2, 1] = np.nan  # both empty in one model: that case leaves the label's comparison
    for trainer, dice in tables.items():
        write_model(str(folder), trainer, dice, reverse="varaug" in trainer)
    order = np.argsort([f"{c}.nii.gz" for c in CASES])  # the tables are read in file-name order
    return {"out": str(tmp_path), "tables": {t: d[order] for t, d in tables.items()}}


def stacked(tables, names, j):
    return np.stack([tables[n][:, j] for n in names], axis=1)


def test_verdicts_are_compares_on_the_per_case_tables(evaluated):
    bench = bench_like(evaluated["out"], 3)
    lines = verdicts.verdict_lines(bench, LABELS)
    tables = evaluated["tables"]
    plain, varaug = [f"T_seed{i}" for i in range(3)], [f"T_varaug_seed{i}" for i in range(3)]
    for j, (key, name) in enumerate(LABELS.items()):
        result = comparison.compare(stacked(tables, plain, j), stacked(tables, varaug, j))
        expected = verdict(Row("T (plain)", "T_varaug", "dice", name, key, result))
        assert f"- **{name} ({key})**: {expected}" in lines
    assert comparison.compare(stacked(tables, plain, 1), stacked(tables, varaug, 1)).left_out == 1
    mean_a = np.nanmean(np.stack([stacked(tables, plain, j) for j in range(2)]), axis=0)
    mean_b = np.nanmean(np.stack([stacked(tables, varaug, j) for j in range(2)]), axis=0)
    expected = verdict(Row("T (plain)", "T_varaug", "dice", "mean over labels", "mean",
                           comparison.compare(mean_a, mean_b)))
    assert f"- **mean over labels**: {expected}" in lines


def test_one_varaug_training_gets_no_interval(evaluated):
    lines = "\n".join(verdicts.verdict_lines(bench_like(evaluated["out"], 3, stability=False), LABELS))
    assert "`T_varaug` is one training" in lines and "--stability" in lines and "interval 0" not in lines


def test_two_replicas_are_too_few_for_a_verdict(evaluated):
    lines = "\n".join(verdicts.verdict_lines(bench_like(evaluated["out"], 2), LABELS))
    assert lines.count("**K too small to say**") == 3 and "is better than" not in lines


def test_seed_noise_ratio_rows(evaluated):
    bench = bench_like(evaluated["out"], 3)
    lines = verdicts.seed_noise_lines(bench, LABELS)
    tables = evaluated["tables"]
    plain, varaug = stacked(tables, bench.replica_names, 0), stacked(tables, bench.stability_names(""), 0)
    sd_a, sd_b = np.std(plain.mean(0), ddof=1), np.std(varaug.mean(0), ddof=1)
    f = (sd_b / sd_a) ** 2
    low, high = np.sqrt(f / stats.f.ppf(0.975, 2, 2)), np.sqrt(f / stats.f.ppf(0.025, 2, 2))
    assert f"| plain replicas (K=3) | Anterior (1) | {100 * sd_a:.2f} | 1 | – |" in lines
    row = next(line for line in lines if line.startswith("| `T_varaug` seed replicas (K=3) | Anterior (1)"))
    assert f"| {100 * sd_b:.2f} | {sd_b / sd_a:.2f} | {low:.2f} to {high:.2f} |" in row
    assert "39.0 times its lower end" in lines[-1]


def test_results_md_says_why_when_files_are_missing(tmp_path):
    from nnunet_varaug.experiments.benchmark.results import render_verdicts

    text = "\n".join(render_verdicts(bench_like(str(tmp_path), 3), {"labels": LABELS}, verdicts.verdict_lines))
    assert "no verdicts" in text and "rerun the `evaluate` stage" in text
