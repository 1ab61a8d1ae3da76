"""``results.md`` of ``nnunet_varaug benchmark``: Dice of every model, the published reference, compute per stage.

Reads what the stages left in the output folder (``evaluation/dice.json``, ``analysis/summary.csv`` and the state
file) and renders it as Markdown; written atomically after every stage, so an interrupted benchmark still has an
up-to-date page.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Dict, List, Sequence

from nnunet_varaug.benchmark.stages import STAGES, fmt_seconds
from nnunet_varaug.fileio import write_text

if TYPE_CHECKING:
    from nnunet_varaug.benchmark.stages import Benchmark

# nnU-Net's published Dice for Decathlon tasks, by label name (lower case). These are MSD *test-set* results of
# nnU-Net (an ensemble chosen by 5-fold cross-validation, evaluated by the challenge), not fold validation of one
# model; docs/benchmark.md says where each number comes from.
PUBLISHED_DICE: Dict[str, dict] = {
    "Task02_Heart": {
        "dice": {"left atrium": 0.93},
        "source": "Isensee et al., nnU-Net: Self-adapting Framework for U-Net-Based Medical Image Segmentation, "
                  "arXiv:1809.10486 (2018), Table 2: Medical Segmentation Decathlon test set",
    },
    "Task04_Hippocampus": {
        "dice": {"anterior": 0.90, "posterior": 0.89},
        "source": "Isensee et al., nnU-Net: Self-adapting Framework for U-Net-Based Medical Image Segmentation, "
                  "arXiv:1809.10486 (2018), Table 2: Medical Segmentation Decathlon test set",
    },
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
    """results.md: the Dice table (with nnU-Net's published numbers), variability summary, compute per stage."""
    lines = [f"# nnunet_varaug benchmark: {bench.task.folder_name}", "",
             f"{bench.dataset}, configuration `{bench.configuration}`, fold {bench.fold}, base trainer `{bench.base}`, "
             f"{bench.num_replicas} seed replicas, variability-augmented trainer `{bench.varaug_trainer}`, "
             f"plans `{bench.plans}`, device `{bench.device}`.", ""]
    dice_path = os.path.join(bench.out, "evaluation", "dice.json")
    published = PUBLISHED_DICE.get(bench.task.folder_name)
    lines += ["## Dice on the fold's validation cases", ""]
    if os.path.isfile(dice_path):
        with open(dice_path) as f:
            ev = json.load(f)
        keys = list(ev["labels"])
        head = ["model", *[f"{ev['labels'][k]} ({k})" for k in keys], "mean"]
        rows = []
        models = ev["models"]

        def row(title: str, m: dict) -> List[str]:
            return [title, *[f"{m['dice'][k]:.4f}" for k in keys], f"{m['foreground_mean']:.4f}"]

        rows.append(row(f"baseline `{models['baseline']['trainer']}`", models["baseline"]))
        for name in bench.replica_names:
            rows.append(row(f"replica `{name}`", models[name]))
        reps = [models[n] for n in bench.replica_names]
        rows.append([f"replicas, mean ± sd (n={len(reps)})", *[_mean_sd([m["dice"][k] for m in reps]) for k in keys],
                     _mean_sd([m["foreground_mean"] for m in reps])])
        rows.append(row(f"majority vote of the {len(reps)} replicas", models["majority_vote"]))
        rows.append(row(f"variability-augmented `{models['varaug']['trainer']}`", models["varaug"]))
        if published:
            ref = [published["dice"].get(ev["labels"][k].lower()) for k in keys]
            mean = f"{sum(ref) / len(ref):.3f}" if all(r is not None for r in ref) else "–"
            rows.append(["nnU-Net, published (MSD test set)¹", *[f"{r:.2f}" if r is not None else "–" for r in ref],
                         mean])
        lines += _table(head, rows)
        lines += ["", f"{len(ev['validation_cases'])} validation cases; Dice from nnU-Net's "
                      "`compute_metrics_on_folder` against `gt_segmentations` (per-case files in `evaluation/`). "
                      "The majority vote takes, per voxel, the label most replicas predict (ties: the smaller label)."]
        if published:
            lines += ["", f"¹ {published['source']}. Published numbers are the Decathlon's hidden test set, predicted "
                          "by nnU-Net's cross-validated ensemble; the rows above are one fold's validation cases of "
                          "single models, so compare them with each other first and with the reference only roughly."]
        else:
            lines += ["", f"No published nnU-Net Dice is stored for {bench.task.folder_name} "
                          f"(known: {', '.join(sorted(PUBLISHED_DICE))}; see docs/benchmark.md)."]
    else:
        lines += ["(not evaluated yet: run the `evaluate` stage)"]
    summary_csv = os.path.join(bench.out, "analysis", "summary.csv")
    if os.path.isfile(summary_csv):
        import csv

        with open(summary_csv) as f:
            table = list(csv.reader(f))
        if table:
            lines += ["", "## Variability of the replicas (`analysis/summary.csv`)", ""]
            lines += _table(table[0], [[_short(c) for c in r] for r in table[1:21]])
            lines += ["", "Full report: [analysis/report.html](analysis/report.html)"]
    lines += ["", "## Compute", "", ]
    rows, total = [], 0.0
    for stage in STAGES:
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
    return "\n".join(lines)


def _short(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() and "." not in cell else f"{value:.4g}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]

