"""The ``sources`` command's report: which source of randomness drives the replicas' disagreement.

Writes, into the command's own output folder, ``sources.csv`` (one row per structure and source of randomness, and
one per structure for the single sources' sum; not ``analyze``'s file of the same name, which compares in-fold and
out-of-fold variability samples), ``figures/sources.png`` (one bar group per structure: each source's share of the
seed replicas' volume variance, with its bootstrap interval) and ``sources.md`` (the table and a plain-language
verdict).
The numbers come from :mod:`nnunet_varaug.evaluation.attribution`.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.evaluation.attribution import REFERENCE, Additivity, SourceRow, find_row
from nnunet_varaug.report.png import save_figure
from nnunet_varaug.utilities.fileio import replacing

CSV, FIGURE, MARKDOWN = "sources.csv", "figures/sources.png", "sources.md"

#: What each source of randomness is, in words (the replica names say which trainer suffix).
SOURCE_LABELS = {REFERENCE: "every source at once (seed replicas)", "init": "the initial weights",
                 "order": "the data order (cases and patch locations)", "aug": "the augmentation parameters",
                 "mca": "the rounding (stochastic rounding)", "nondet": "the GPU's non-deterministic kernels"}
SUM = "sum_of_single_sources"
COLUMNS = ("structure", "randomness_source", "replicas", "cases", "mean_pairwise_dice", "dice_ci_low",
           "dice_ci_high", "volume_cv", "cv_ci_low", "cv_ci_high", "volume_variance_mm6", "variance_ratio_to_seed",
           "ratio_ci_low", "ratio_ci_high")


def _number(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def write_csv(path: str, rows: Sequence[SourceRow], sums: Sequence[Additivity]) -> str:
    """One row per structure and source, then per structure the single sources' summed variance ratio."""
    with replacing(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for r in rows:
            out.writerow([r.structure, r.source, r.replicas, r.cases, _number(r.mean_pairwise_dice),
                          *map(_number, r.dice_interval), _number(r.volume_cv), *map(_number, r.cv_interval),
                          _number(r.volume_variance), _number(r.variance_ratio), *map(_number, r.ratio_interval)])
        for a in sums:
            cases = next((r.cases for r in rows if r.structure == a.structure), "")
            out.writerow([a.structure, SUM + ":" + "+".join(a.sources), "", cases, "", "", "", "", "", "", "",
                          _number(a.ratio_sum), *map(_number, a.interval)])
    return path


def fraction(ratio: float) -> str:
    """A ratio in words: ``0.017 (1/60 of it)``; ``0`` and undefined ratios said as such."""
    if not math.isfinite(ratio):
        return "undefined (the seed replicas agree on every case)"
    if ratio == 0:
        return "0 (no volume changed in any case)"
    text = f"{ratio:.3g}"
    return text + (f" (1/{round(1 / ratio)} of it)" if ratio < 0.5 else "")


def _ci(interval) -> str:
    low, high = interval
    return "n/a" if not (math.isfinite(low) and math.isfinite(high)) else f"{low:.3g}–{high:.3g}"


def verdict(rows: Sequence[SourceRow], sums: Sequence[Additivity], structures: Sequence[str]) -> List[str]:
    """One plain-language paragraph per structure: the source that gives the largest share of the seed
    replicas' volume variance (and whether the next one can be told apart), the smallest, and the sum."""
    out = []
    for structure in structures:
        singles = sorted((r for r in rows if r.structure == structure and r.source != REFERENCE),
                         key=lambda r: -r.variance_ratio if math.isfinite(r.variance_ratio) else math.inf)
        if not singles or not math.isfinite(singles[0].variance_ratio):
            out.append(f"**{structure}**: the seed replicas' volumes agree on every case; there is no disagreement "
                       f"to attribute.")
            continue
        top = singles[0]
        text = (f"**{structure}**: changing only {SOURCE_LABELS.get(top.source, top.source)} gives "
                f"{fraction(top.variance_ratio)} of the seed replicas' between-replica volume variance (95 % "
                f"interval {_ci(top.ratio_interval)}); ")
        if top.ratio_interval[0] <= 1 <= top.ratio_interval[1] or top.variance_ratio >= 1:
            text += "on its own it moves the volumes as much as changing every source at once."
        elif top.variance_ratio >= 0.5:
            text += "it explains most of the disagreement."
        else:
            text += "less than half of it" + (", and the largest share of the sources measured." if len(singles) > 1
                                              else ".")
        if len(singles) > 1:
            second = singles[1]
            if math.isfinite(second.ratio_interval[1]) and second.ratio_interval[1] >= top.ratio_interval[0]:
                text += (f" Changing only {SOURCE_LABELS.get(second.source, second.source)} "
                         f"({second.variance_ratio:.3g}, {_ci(second.ratio_interval)}) cannot be told apart from "
                         f"it with these cases.")
            low = singles[-1]
            text += f" Changing only {SOURCE_LABELS.get(low.source, low.source)} gives {fraction(low.variance_ratio)}."
        add = next((a for a in sums if a.structure == structure), None)
        if add is not None and len(add.sources) > 1 and math.isfinite(add.ratio_sum):
            low, high = add.interval
            how = ("within noise of it (the interval holds 1)" if low <= 1 <= high else
                   "less than it: changing every source at once moves the volumes more than the single changes "
                   "together" if high < 1 else "more than it: the single changes overlap rather than add")
            text += (f" Together the {len(add.sources)} single sources give {add.ratio_sum:.3g} ({_ci(add.interval)}) "
                     f"of the seed replicas' variance, {how}.")
        out.append(text)
    return out


def write_figure(path: str, rows: Sequence[SourceRow], sums: Sequence[Additivity],
                 structures: Sequence[str]) -> str:
    """One bar group per structure: each single source's variance ratio to the seed replicas (log scale, 95 %
    bootstrap interval as error bar) and their sum; the line at 1 is the seed replicas themselves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sources = list(dict.fromkeys(r.source for r in rows if r.source != REFERENCE))
    bars = sources + (["sum"] if sums else [])
    floor = 1e-4
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.55 * len(bars) * len(structures)), 3.8))
    width = 0.8 / max(1, len(bars))
    for i, source in enumerate(bars):
        values, lows, highs = [], [], []
        for structure in structures:
            item = (next((a for a in sums if a.structure == structure), None) if source == "sum"
                    else find_row(rows, structure, source))
            value = (item.ratio_sum if source == "sum" else item.variance_ratio) if item is not None else math.nan
            interval = item.interval if source == "sum" and item is not None else (
                item.ratio_interval if item is not None else (math.nan, math.nan))
            values.append(max(value, floor) if math.isfinite(value) else math.nan)
            lows.append(max(interval[0], floor) if math.isfinite(interval[0]) else math.nan)
            highs.append(max(interval[1], floor) if math.isfinite(interval[1]) else math.nan)
        x = np.arange(len(structures)) + (i - (len(bars) - 1) / 2) * width
        v, lo, hi = (np.array(a, dtype=float) for a in (values, lows, highs))
        label = "sum of single sources" if source == "sum" else SOURCE_LABELS.get(source, source)
        ax.bar(x, v, width, label=label, hatch="//" if source == "sum" else None,
               yerr=np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0), capsize=3)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.text(-0.5, 1.0, " seed replicas", va="bottom", ha="left", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(structures)), list(structures))
    ax.set_ylabel("volume variance / seed replicas'")
    ax.set_title("Share of the seed replicas' volume variance, per source\n(95 % bootstrap interval over cases)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path, dpi=110)


def write_markdown(path: str, rows: Sequence[SourceRow], sums: Sequence[Additivity], structures: Sequence[str],
                   replicas: Dict[str, List[str]], cases: int, notes: Optional[Sequence[str]] = None) -> str:
    """``sources.md``: what was compared, the verdict, the table and the figure."""
    lines = ["# Where does the replicas' disagreement come from?", "",
             f"{cases} cases; per source of randomness, the replicas compared:", ""]
    lines += [f"- `{s}`, {SOURCE_LABELS.get(s, s)}: {', '.join(f'`{n}`' for n in names)}"
              for s, names in replicas.items()]
    lines += ["", "## Verdict", ""] + [f"- {v}" for v in verdict(rows, sums, structures)]
    lines += ["", "## Table", "", "Variance ratio: the source's between-replica volume variance (mean over cases, "
              "ddof = 1) over the seed replicas'. Brackets: 95 % percentile bootstrap interval over cases (it does "
              "not cover the uncertainty from the finite number of replicas).", "",
              "| structure | source | replicas | mean pairwise Dice | volume CV | variance ratio to seed |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.structure} | {r.source} | {r.replicas} | {r.mean_pairwise_dice:.4f} "
                     f"[{_ci(r.dice_interval)}] | {r.volume_cv:.4f} [{_ci(r.cv_interval)}] | "
                     f"{r.variance_ratio:.4g} [{_ci(r.ratio_interval)}] |")
    for a in (a for a in sums if len(a.sources) > 1):
        lines.append(f"| {a.structure} | sum of {' + '.join(a.sources)} | | | | "
                     f"{a.ratio_sum:.4g} [{_ci(a.interval)}] |")
    lines += ["", f"![variance ratio per source]({FIGURE})", ""]
    lines += [f"Note: {n}" for n in (notes or [])]
    with replacing(path, ".md") as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def write_report(folder: str, rows: Sequence[SourceRow], sums: Sequence[Additivity], structures: Sequence[str],
                 replicas: Dict[str, List[str]], cases: int, notes: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Write sources.csv, figures/sources.png and sources.md into ``folder``; their paths by file name."""
    os.makedirs(folder, exist_ok=True)
    return {CSV: write_csv(os.path.join(folder, CSV), rows, sums),
            FIGURE: write_figure(os.path.join(folder, FIGURE), rows, sums, structures),
            MARKDOWN: write_markdown(os.path.join(folder, MARKDOWN), rows, sums, structures, replicas, cases, notes)}
