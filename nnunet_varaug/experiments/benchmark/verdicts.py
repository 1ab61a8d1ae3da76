"""The benchmark's verdicts in results.md: plain replicas against each variability-augmented model's seed replicas
on the held-out test split, and the ratio of their seed noise — ``compare``'s statistics on the ``evaluate``
stage's per-case Dice.

The ``evaluate`` stage leaves, per model, nnU-Net's ``compute_metrics_on_folder`` summary in
``evaluation/test/<trainer>.json`` (Dice per test case and label; NaN where prediction and label are both empty).
A group of K models (the K plain replicas, or the K seed replicas ``<varaug>_seed<k>`` that ``--stability``
trains) gives one (cases x K) table per label; :func:`nnunet_varaug.evaluation.comparison.compare` does the rest.
Without ``--stability`` each varaug model is one training, whose seed noise cannot be measured: no interval.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Sequence

import numpy as np

from nnunet_varaug.evaluation import comparison
from nnunet_varaug.evaluation.significance import seed_noise_ratio
from nnunet_varaug.report.comparison import MEAN_KEY, Row, points, verdict


def case_table(folder: str, trainers: Sequence[str], keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """``{label key: (cases, K) Dice}`` of the models ``trainers`` from ``folder/<trainer>.json``, cases in the
    order of the file names; ``MEAN_KEY``: per case and model the mean over the labels with a defined Dice."""
    columns = []
    cases = None
    for trainer in trainers:
        with open(os.path.join(folder, f"{trainer}.json")) as f:
            per_case = json.load(f)["metric_per_case"]
        by_case = {os.path.basename(c["prediction_file"]): c["metrics"] for c in per_case}
        names = sorted(by_case)
        if cases is None:
            cases = names
        elif names != cases:
            raise ValueError(f"{folder}/{trainer}.json evaluates other cases than {trainers[0]}.json")
        columns.append(np.array([[float(by_case[c][k]["Dice"]) for k in keys] for c in names]))
    stack = np.stack(columns, axis=-1)  # (cases, labels, K)
    tables = {k: stack[:, j, :] for j, k in enumerate(keys)}
    defined = np.isfinite(stack)
    with np.errstate(invalid="ignore", divide="ignore"):
        tables[MEAN_KEY] = np.where(defined.any(1), np.where(defined, stack, 0).sum(1) / defined.sum(1), np.nan)
    return tables


def groups(bench) -> Dict[str, List[str]]:
    """``{varaug trainer: the models that stand for it}``: its K seed replicas with ``--stability``, else itself."""
    return {bench.varaug_for(x): (bench.stability_names(x) if bench.stability else [bench.varaug_for(x)])
            for x in bench.sources}


def verdict_lines(bench, labels: Mapping[str, str]) -> List[str]:
    """The ``Verdicts`` section of results.md (Markdown lines), or an explanation of why there is none."""
    folder = os.path.join(bench.out, "evaluation", "test")
    keys = list(labels)
    names = {**labels, MEAN_KEY: "mean over labels"}
    lines = ["## Verdicts: variability-augmented against plain training, on the held-out test split", ""]
    plain = case_table(folder, bench.replica_names, keys)
    for trainer, members in groups(bench).items():
        lines += [f"### `{trainer}` against the plain replicas `{bench.replica_names[0]}`…", ""]
        if len(members) < 2:
            lines += [f"`{trainer}` is one training: its seed noise is unknown, so no interval can say whether it "
                      f"beats the {bench.num_replicas} plain replicas beyond seed noise. Run the benchmark with "
                      f"`--stability` to train {bench.num_replicas} seed replicas of it.", ""]
            continue
        varaug = case_table(folder, members, keys)
        for key in keys + ([MEAN_KEY] if len(keys) > 1 else []):
            result = comparison.compare(plain[key], varaug[key])
            row = Row(f"{bench.base} (plain)", trainer, "dice", names[key], key, result)
            title = names[key] if key == MEAN_KEY else f"{names[key]} ({key})"
            lines.append(f"- **{title}**: {verdict(row)}")
        lines.append("")
    lines += ["Each interval treats the test cases and the trainings (seeds) as random: it says whether a new "
              "training of each, on new cases like these, would differ (docs/compare.md). With fewer than "
              f"{comparison.MIN_REPLICAS} replicas per model there is no verdict: run a benchmark with "
              f"`-n {comparison.MIN_REPLICAS}` or more and `--stability`.", ""]
    return lines


def seed_noise_lines(bench, labels: Mapping[str, str]) -> List[str]:
    """The seed-noise table of the stability section: per label, the sd of one training's mean test Dice in each
    group and the ratio varaug / plain with its 95 % interval (F distribution)."""
    from scipy import stats

    folder = os.path.join(bench.out, "evaluation", "test")
    keys = list(labels)
    plain = case_table(folder, bench.replica_names, keys)
    head = ["models", "label", "seed noise (Dice points)", "ratio to plain", "95 % interval of the ratio"]
    rows = []
    for key in keys:
        means = comparison.replica_means(plain[key][comparison.complete_cases(plain[key])])
        rows.append([f"plain replicas (K={len(bench.replica_names)})", f"{labels[key]} ({key})",
                     points(float(np.std(means, ddof=1))), "1", "–"])
        for trainer, members in groups(bench).items():
            if len(members) < 2:
                continue
            table = case_table(folder, members, keys)[key]
            keep = comparison.complete_cases(plain[key], table)
            ratio = seed_noise_ratio(comparison.replica_means(plain[key][keep]), comparison.replica_means(table[keep]))
            rows.append([f"`{trainer}` seed replicas (K={len(members)})", f"{labels[key]} ({key})",
                         points(float(comparison.seed_noise(table[keep]))), f"{ratio.ratio:.2f}",
                         f"{ratio.low:.2f} to {ratio.high:.2f}"])
    k = len(bench.replica_names)
    factor = float(stats.f.ppf(0.975, k - 1, k - 1))
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *["| " + " | ".join(r) + " |" for r in rows], "",
            "Seed noise: the standard deviation over a group's K trainings of one training's mean test Dice (cases "
            "where a model's Dice is NaN left out). The ratio's interval assumes normally distributed replica means "
            "(an F distribution with K − 1 degrees of freedom on each side); an interval that contains 1 does not "
            f"show that varaug changes the seed noise. With K = {k} each, the interval's upper end is "
            f"{factor:.1f} times its lower end (the 97.5 % point of F({k - 1}, {k - 1})): a ratio of seed noise "
            "takes many more replicas to pin down than a difference of Dice."]
