"""The variability report's tables (cases, pairs, majority, summary, comparison), their conventions and the
terminal summary; ``report.py`` writes them with the maps, figures and HTML.

Conventions (docs/variability.md): pairwise Dice of two empty masks is 1 and such pairs are flagged
(``both_empty``), so the summary gives the mean with and without them; Dice to the ground truth follows nnU-Net
(NaN when both are empty, left out of means, the number left out in ``gt_both_empty``); significant digits are
per case, unanimous cases counted apart and never averaged, capped by the voxel count (:mod:`volume_stats`).
When the IEEE model (``<Base>_ieee``) was predicted, its rows are in ``cases.csv`` (``replica`` = its name,
``role`` = ``reference``) and its volume is the significant digits' reference.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from nnunet_varaug.evaluation import variability, volume_stats

CASES_COLUMNS = ["case", "label", "replica", "role", "volume_mm3", "dice_to_gt", "dice_to_reference"]
PAIRS_COLUMNS = ["case", "label", "replica_a", "replica_b", "dice", "both_empty"]
MAJORITY_COLUMNS = ["case", "label", "kind", "volume_mm3", "dice_to_gt", "dice_to_reference", "tie_voxels",
                    "ties_by_probability"]


def _f(x) -> float:
    return float(x) if x is not None else math.nan


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def build_tables(experiments, results: Dict[str, Dict[str, variability.CaseResult]],
                 reference: Optional[str] = None):
    """``cases``, ``pairs``, ``majority`` and ``summary`` DataFrames from per-kind, per-case results.

    Summary, per kind and structure (each column says what it averages over in docs/variability.md):
    pairwise Dice min and mean over all cases and pairs (``pairwise_dice_mean``: empty-empty pairs count as 1;
    ``pairwise_dice_mean_nonempty``: without them; ``both_empty_pairs``: how many); volume mean, std and CV per
    case over the K replicas, averaged over cases; significant bits/digits (median over cases, a unanimous case
    counting as its voxel cap; mean over non-unanimous cases; ``unanimous_cases``); mean Dice to the ground truth
    of the replicas and of the majority vote over (case, replica) values that are not NaN (``gt_both_empty``:
    how many were left out); with a reference model, mean Dice of the replicas to it.

    Args:
        experiments: one ``Experiment`` per kind.
        results: ``kind -> case -> CaseResult``.
        reference: the reference model's name (``<Base>_ieee``) when the results carry its counts.
    """
    import pandas as pd

    cases_rows, pair_rows, maj_rows, summary_rows = [], [], [], []
    ref_done = set()
    for exp in experiments:
        per_case = results[exp.kind]
        names = exp.replica_names
        k = len(names)
        pairs = variability.pair_indices(k)
        structures = next(iter(per_case.values())).structures
        acc = {s: {"vol": [], "vox": [], "ref": [], "pw": [], "empty": [], "gt": [], "maj": [], "to_ref": []}
               for s in range(len(structures))}
        for case, res in per_case.items():
            _add_case_rows(exp, case, res, structures, pairs, reference, ref_done, acc,
                           (cases_rows, pair_rows, maj_rows))
        for s, st in enumerate(structures):
            summary_rows.append(_summary_row(exp, st, acc[s], len(per_case), k, reference))
    cases = pd.DataFrame(cases_rows, columns=CASES_COLUMNS)
    pairs = pd.DataFrame(pair_rows, columns=PAIRS_COLUMNS)
    majority = pd.DataFrame(maj_rows, columns=MAJORITY_COLUMNS)
    summary = pd.DataFrame(summary_rows)
    return cases, pairs, majority, summary


def _add_case_rows(exp, case: str, res: variability.CaseResult, structures, pairs, reference: Optional[str],
                   ref_done: set, acc: dict, rows: tuple) -> None:
    """One case's rows of the cases, pairs and majority tables (``rows``, appended to; the reference model's
    rows once per case and structure, ``ref_done``), and its values gathered per structure in ``acc``."""
    cases_rows, pair_rows, maj_rows = rows
    names = exp.replica_names
    k = len(names)
    volumes, voxels, pw, both = res.volumes_mm3, res.voxels, res.pairwise_dice, res.pairwise_both_empty
    to_gt, maj_gt, to_ref = res.dice_to_gt, res.majority_dice_to_gt, res.dice_to_reference
    maj_vol = np.diagonal(res.overlap, axis1=1, axis2=2)[:, k] * res.voxel_volume
    for s, st in enumerate(structures):
        for i, name in enumerate(names):
            cases_rows.append((case, st.key, name, "replica", float(volumes[s, i]),
                               _f(None if to_gt is None else to_gt[s, i]),
                               _f(None if to_ref is None else to_ref[s, i])))
        if res.has_reference and reference and (case, st.key) not in ref_done:
            ref_done.add((case, st.key))
            ref_gt = res.reference_dice_to_gt
            cases_rows.append((case, st.key, reference, "reference", float(res.reference_volume_mm3[s]),
                               _f(None if ref_gt is None else ref_gt[s]), 1.0))
        for p, (a, b) in enumerate(pairs):
            pair_rows.append((case, st.key, names[a], names[b], float(pw[s, p]), bool(both[s, p])))
        maj_rows.append((case, st.key, exp.kind, float(maj_vol[s]),
                         _f(None if maj_gt is None else maj_gt[s]),
                         _f(None if to_ref is None else to_ref[s, k]), res.tie_voxels,
                         res.ties_by_probability))
        a = acc[s]
        a["vol"].append(volumes[s])
        a["vox"].append(voxels[s])
        a["pw"].append(pw[s])
        a["empty"].append(both[s])
        if res.has_reference:
            a["ref"].append(res.reference_volume_mm3[s])
            a["to_ref"].append(to_ref[s, :k])
        if to_gt is not None:
            a["gt"].append(to_gt[s])
            a["maj"].append(maj_gt[s])


def _summary_row(exp, st: variability.Structure, a: dict, num_cases: int, k: int, reference: Optional[str]) -> dict:
    """The summary row of one kind and structure from the values gathered over its cases (:func:`_add_case_rows`)."""
    ref = np.asarray(a["ref"]) if len(a["ref"]) == len(a["vol"]) else None
    spread = volume_stats.volume_spread(np.stack(a["vol"], axis=1), np.stack(a["vox"], axis=1), ref)
    d, empty = np.concatenate(a["pw"]), np.concatenate(a["empty"])
    gt = np.concatenate(a["gt"]) if a["gt"] else np.array([])
    maj = np.asarray(a["maj"], dtype=np.float64)
    return {
        "kind": exp.kind, "label": st.key, "name": st.name, "cases": num_cases, "replicas": k,
        "pairwise_dice_min": float(d.min()), "pairwise_dice_mean": float(d.mean()),
        "pairwise_dice_mean_nonempty": float(d[~empty].mean()) if (~empty).any() else math.nan,
        "both_empty_pairs": int(empty.sum()), "pairs": int(d.size),
        "volume_mean_mm3": _nanmean(spread["mean"]), "volume_std_mm3": _nanmean(spread["std"]),
        "volume_cv": _nanmean(spread["cv"]),
        **volume_stats.summarize_digits(spread),
        "sig_reference": reference if ref is not None else "replica mean",
        "dice_to_gt_mean": _nanmean(gt), "gt_both_empty": int(np.isnan(gt).sum()),
        "majority_dice_to_gt_mean": _nanmean(maj), "majority_gt_both_empty": int(np.isnan(maj).sum()),
        "dice_to_reference_mean": _nanmean(np.concatenate(a["to_ref"])) if a["to_ref"] else math.nan,
    }


def compare_kinds(summary):
    """Per structure, the mean pairwise Dice, volume CV and median significant digits of each kind side by side,
    and the Pearson correlation across structures of the kinds' mean pairwise Dice (``attrs["pearson_r"]``);
    None with one kind."""
    kinds = list(dict.fromkeys(summary["kind"]))
    if len(kinds) < 2:
        return None
    a, b = kinds[:2]
    measures = ("pairwise_dice_mean", "volume_cv", "sig_digits_median")
    wide = summary.pivot(index=["label", "name"], columns="kind", values=list(measures))
    wide = wide[[(m, k) for m in measures for k in kinds]]
    wide.columns = [f"{m}_{k}" for m, k in wide.columns]
    wide = wide.reset_index()
    order = {k: i for i, k in enumerate(summary.loc[summary["kind"] == a, "label"])}
    wide = wide.sort_values("label", key=lambda c: c.map(order)).reset_index(drop=True)
    wide.attrs["pearson_r"] = variability.pearson(wide[f"pairwise_dice_mean_{a}"], wide[f"pairwise_dice_mean_{b}"])
    wide.attrs["kinds"] = (a, b)
    return wide


def format_volume(mm3: float) -> str:
    """A volume as people write it: ``569.4 mL`` from 1 mL (1000 mm³) up, ``212.4 mm³`` below; 4 significant
    digits, thousands separated, never an exponent."""
    if mm3 is None or not np.isfinite(mm3):
        return "–"
    value, unit = (mm3 / 1000.0, "mL") if abs(mm3) >= 1000.0 else (mm3, "mm³")
    if value == 0:
        return f"0 {unit}"
    decimals = max(0, 3 - int(math.floor(math.log10(abs(value)))))
    return f"{value:,.{decimals}f} {unit}"


def format_summary(summary) -> str:
    """A few lines per structure (and kind) for the terminal: agreement, volume spread, accuracy."""
    lines = []
    multi = summary["kind"].nunique() > 1
    for _, r in summary.iterrows():
        head = f"{r['name']} ({r['label']})" + (f" [{r['kind']}]" if multi else "")
        text = (f"{head}: pairwise Dice mean {r['pairwise_dice_mean']:.4f} (min {r['pairwise_dice_min']:.4f}); "
                f"volume {format_volume(r['volume_mean_mm3'])}, CV {100 * r['volume_cv']:.2f}%, "
                f"{r['sig_digits_median']:.2f} significant digits median ({r['sig_bits_median']:.1f} bits, "
                f"{r['unanimous_cases']} unanimous case(s))")
        if not math.isnan(r["dice_to_gt_mean"]):
            text += f"; Dice to GT {r['dice_to_gt_mean']:.4f}, majority vote {r['majority_dice_to_gt_mean']:.4f}"
        if not math.isnan(r.get("dice_to_reference_mean", math.nan)):
            text += f"; Dice to {r['sig_reference']} {r['dice_to_reference_mean']:.4f}"
        lines.append(text)
    if "pearson_r" in summary.attrs:
        lines.append(f"correlation across structures of the kinds' mean pairwise Dice: {summary.attrs['pearson_r']:.4f}")
    return "\n".join(lines)
