"""``results.md`` of ``nnunet_varaug benchmark``: Dice of every model, the verdicts (:mod:`.verdicts`), the published
reference, compute per stage.

Reads what the stages left in the output folder (``evaluation/dice.json``, ``analysis/summary.csv`` and the state
file) and renders it as Markdown; written atomically after every stage, so an interrupted benchmark still has an
up-to-date page.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Dict, List, Sequence

from nnunet_varaug.experiments.benchmark import verdicts
from nnunet_varaug.experiments.benchmark.state import fmt_seconds
from nnunet_varaug.utilities.fileio import write_text

if TYPE_CHECKING:
    from nnunet_varaug.experiments.benchmark.state import Benchmark

# nnU-Net's published Dice for Decathlon tasks, by label name (lower case). What they are: Isensee et al. (arXiv
# 1809.10486) report nnU-Net's results on the MSD phase-1 *online leaderboard*: the Decathlon's held-out test set,
# case-averaged Dice, predicted by an ensemble of nnU-Net configurations; not cross-validation, not one model, not
# our split. The values were entered from memory in an earlier version and could not be checked against the paper
# from the machines this was built on, so they are shown as approximate and unverified, in a table of their own.
PUBLISHED_SOURCE = ("Isensee et al., nnU-Net: Self-adapting Framework for U-Net-Based Medical Image Segmentation, "
                    "arXiv:1809.10486 (2018): nnU-Net on the Medical Segmentation Decathlon phase-1 online "
                    "leaderboard (held-out test set, case-averaged Dice, an ensemble of nnU-Net models)")
PUBLISHED_DICE: Dict[str, dict] = {
    "Task02_Heart": {"dice": {"left atrium": 0.93}, "source": PUBLISHED_SOURCE, "verified": False},
    "Task04_Hippocampus": {"dice": {"anterior": 0.90, "posterior": 0.89}, "source": PUBLISHED_SOURCE,
                           "verified": False},
}


def write_results(bench: "Benchmark") -> str:
    """Write ``OUT/results.md`` atomically; return its path."""
    path = os.path.join(bench.out, "results.md")
    os.makedirs(bench.out, exist_ok=True)
    write_text(path, render_results(bench))
    return path


def _mean_sd(values: Sequence[float]) -> str:
    import numpy as np

    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def render_results(bench: "Benchmark") -> str:
    """results.md: held-out test Dice, stability, fold validation Dice, in-fold vs out-of-fold maps, the replicas'
    variability, the published reference (in its own table), compute per stage."""
    split = bench.state.get("test_split", {})
    lines = [f"# nnunet_varaug benchmark: {bench.task.folder_name}", "",
             f"{bench.dataset}, configuration `{bench.configuration}`, fold {bench.fold} of {bench.num_folds}, base "
             f"trainer `{bench.base}`, {bench.num_replicas} seed replicas, variability-augmented trainer(s) "
             f"{', '.join(f'`{t}`' for t in bench.varaug_trainers)} (sample source(s): {', '.join(bench.sources)}), "
             f"plans `{bench.plans}`, device `{bench.device}`.", "",
             f"Held-out test split: {len(split.get('cases', []))} of {len(bench.task.training_cases)} labelled cases "
             f"(--test-fraction {split.get('fraction')}, --test-seed {split.get('seed')}: "
             f"{', '.join(split.get('cases', []))}), moved out of imagesTr before planning: no fingerprint, plan, "
             f"preprocessing, fold, replica, sample set or training used them.", ""]
    dice_path = os.path.join(bench.out, "evaluation", "dice.json")
    ev = None
    if os.path.isfile(dice_path):
        with open(dice_path) as f:
            ev = json.load(f)
    lines += ["## Dice on the held-out test split", ""]
    if ev is not None and "test" in ev:
        lines += _dice_table(bench, ev, "test")
        lines += ["", f"{len(ev['test']['cases'])} test cases, predicted from the raw images by nnU-Net's "
                      "`nnUNetPredictor` (mirroring on, as `nnUNetv2_predict`), Dice from nnU-Net's "
                      "`compute_metrics_on_folder` against the held-out labels (per-case files in "
                      "`evaluation/test/`). The majority vote takes, per voxel, the label most replicas predict (ties: "
                      "the smaller label). This is the table to compare models with: no model saw these cases."]
        lines += [""] + render_verdicts(bench, ev, verdicts.verdict_lines)
        stability = ev["test"].get("stability") or {}
        if stability:
            lines += _stability_lines(bench, ev, stability)
    else:
        lines += ["(not evaluated yet: run the `evaluate` stage)"]
    lines += ["", f"## Dice on fold {bench.fold}'s validation cases (cross-validation; not for comparing sources)", ""]
    if ev is not None and "validation" in ev:
        lines += _dice_table(bench, ev, "validation")
        lines += ["", f"{len(ev['validation']['cases'])} validation cases of fold {bench.fold}; nnU-Net's own "
                      "`validation/summary.json` of each model. Optimistic for out-of-fold (`_oof`) models: their "
                      "samples of fold " f"{bench.fold}'s training cases come from replicas of the other folds, which "
                      "were trained on these very validation cases."]
    lines += _analysis_lines(bench)
    lines += _published(bench, ev)
    lines += _compute_lines(bench)
    return "\n".join(lines)


def _stability_lines(bench: "Benchmark", ev: dict, stability: dict) -> List[str]:
    """results.md's stability section: pairwise Dice and volume CV across training seeds on the test split, and
    the seed noise of the test Dice."""
    lines = ["", "## Stability across training seeds, on the held-out test split", ""]
    keys = list(ev["labels"])
    head = ["models", *[f"{ev['labels'][k]} ({k}): {m}" for k in keys
                        for m in ("pairwise Dice", "volume CV")]]
    rows = []
    for group, g in stability.items():
        title = (f"plain replicas `{g['members'][0]}`…" if group == "replicas"
                 else f"`{group}`, seeds `{g['members'][0]}`…")
        rows.append([f"{title} (K={len(g['members'])})",
                     *[f"{g['labels'][k][m]:.4f}" for k in keys for m in ("pairwise_dice", "volume_cv")]])
    lines += _table(head, rows)
    lines += ["", "Per test case: the mean Dice over all pairs of the K models, and the coefficient of "
                  "variation (sd / mean) of the label's volume across them; then the mean over test cases. "
                  "A more stable method has higher pairwise Dice and lower volume CV. Same cases, same "
                  "metrics as `analyze` (`evaluation/dice.json` has min pairwise Dice and volume sd too)."]
    lines += ["", "Seed noise of the test Dice, and its ratio to the plain replicas':", ""]
    lines += render_verdicts(bench, ev, verdicts.seed_noise_lines)
    return lines


def _analysis_lines(bench: "Benchmark") -> List[str]:
    """results.md's in-fold vs out-of-fold and replica-variability tables, from ``analysis/`` where written."""
    lines = []
    sources_csv = os.path.join(bench.out, "analysis", "sources.csv")
    if os.path.isfile(sources_csv):
        table = _csv(sources_csv)
        lines += ["", "## In-fold versus out-of-fold maps (`analysis/sources.csv`)", ""]
        lines += _table(table[0], [[_short(c) for c in r] for r in table[1:]])
        lines += ["", f"The replicas' mean pairwise Dice on fold {bench.fold}'s training cases, in the in-fold set "
                      "(predicted by replicas trained on those cases) and the out-of-fold set (predicted by replicas "
                      "that never saw them): how much in-sample prediction hides of the replicas' disagreement."]
    summary_csv = os.path.join(bench.out, "analysis", "summary.csv")
    if os.path.isfile(summary_csv):
        table = _csv(summary_csv)
        if table:
            lines += ["", "## Variability of the replicas on the held-out test split (`analysis/summary.csv`)", ""]
            lines += _table(table[0], [[_short(c) for c in r] for r in table[1:21]])
            lines += ["", "Full report: [analysis/report.html](analysis/report.html)"]
    return lines


def _compute_lines(bench: "Benchmark") -> List[str]:
    """results.md's compute table: per stage its status, compute time, attempts and log."""
    lines = ["", "## Compute", ""]
    rows, total = [], 0.0
    for stage in bench.stages:
        rec = bench.state["stages"].get(stage, {})
        seconds = rec.get("seconds")
        total += seconds or 0.0
        status = rec.get("status", "pending") + (f" ({rec['note']})" if rec.get("note") else "")
        rows.append([stage, status, fmt_seconds(seconds), str(rec.get("attempts", 0)),
                     os.path.relpath(rec["log"], bench.out) if rec.get("log") else "–"])
    rows.append(["**total**", "", fmt_seconds(total), "", ""])
    lines += _table(["stage", "status", "compute (h:mm:ss)", "attempts", "log"], rows)
    lines += ["", "Compute is wall time of the stage's commands on this machine, summed over attempts (resumed "
                  "stages count every attempt); a stage found complete on disk without a record shows –.", ""]
    return lines


def render_verdicts(bench: "Benchmark", ev: dict, make) -> List[str]:
    """A section made by :mod:`verdicts` from the per-model evaluation files; a note where they are missing."""
    try:
        return make(bench, ev["labels"])
    except (OSError, KeyError, ValueError) as e:
        return [f"(no verdicts: the per-model evaluation files of `evaluation/test/` are incomplete ({e}); rerun "
                "the `evaluate` stage)"]


def _dice_table(bench: "Benchmark", ev: dict, which: str) -> List[str]:
    keys = list(ev["labels"])
    models = ev[which]["models"]
    head = ["model", *[f"{ev['labels'][k]} ({k})" for k in keys], "mean"]

    def row(title: str, m: dict) -> List[str]:
        return [title, *[f"{m['dice'][k]:.4f}" for k in keys], f"{m['foreground_mean']:.4f}"]

    def spread(title: str, names: Sequence[str]) -> List[str]:
        group = [models[n] for n in names]
        return [f"{title}, mean ± sd (n={len(group)})", *[_mean_sd([m["dice"][k] for m in group]) for k in keys],
                _mean_sd([m["foreground_mean"] for m in group])]

    rows = [row(f"baseline `{bench.base}`", models[bench.base])]
    rows += [row(f"replica `{n}`", models[n]) for n in bench.replica_names]
    rows.append(spread("replicas", bench.replica_names))
    rows.append(row(f"majority vote of the {bench.num_replicas} replicas", models["majority_vote"]))
    for source in bench.sources:
        trainer = bench.varaug_for(source)
        rows.append(row(f"variability-augmented, {source} samples `{trainer}`", models[trainer]))
        if bench.stability:
            rows += [row(f"seed replica `{n}`", models[n]) for n in bench.stability_names(source)]
            rows.append(spread(f"`{trainer}` seed replicas", bench.stability_names(source)))
    return _table(head, rows)


def _published(bench: "Benchmark", ev) -> List[str]:
    published = PUBLISHED_DICE.get(bench.task.folder_name)
    lines = ["", "## nnU-Net's published figures (another evaluation: not comparable with the tables above)", ""]
    if not published:
        return lines + [f"No published nnU-Net Dice is stored for {bench.task.folder_name} "
                        f"(known: {', '.join(sorted(PUBLISHED_DICE))}; see docs/benchmark.md)."]
    labels = list(ev["labels"].values()) if ev else [n for n in published["dice"]]
    rows = [[name, f"≈ {published['dice'][name.lower()]:.2f}" if name.lower() in published["dice"] else "–"]
            for name in labels]
    lines += _table(["label", "Dice, approximate (unverified)"], rows)
    lines += ["", f"Source: {published['source']}. These are not cross-validation figures, nor figures on this "
                  "benchmark's test split, and they were not re-checked against the paper (entered from memory in an "
                  "earlier version): treat them as a rough sanity check only (a baseline far below them suggests a "
                  "problem), never as a reference column for the rows above."]
    return lines


def _csv(path: str) -> List[List[str]]:
    import csv

    with open(path) as f:
        return list(csv.reader(f))


def _short(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() and "." not in cell else f"{value:.4g}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]

