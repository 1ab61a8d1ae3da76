"""``compare``'s report: a verdict per structure for a reader, every number as CSV, a figure per structure, and a
section of ``report.html`` in the style of ``analyze``'s.

Files of the output folder: ``compare.md`` (the verdicts), ``compare.csv`` (one row per pair of trainers, measure
and structure), ``scores.csv`` (every case, trainer, replica and structure: Dice and volumes),
``figures/compare_<label>.png`` and the ``compare`` section of ``report.html``. Each is written atomically.
Dice differences are given in Dice points (1 point = 0.01 Dice), volumes in mm³ or mL.
"""
from __future__ import annotations

import html as html_lib
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation.comparison import MIN_REPLICAS, MIN_REPLICAS_REASON, Comparison
from nnunet_varaug.report.png import embed_png, save_figure
from nnunet_varaug.report.tables import format_volume
from nnunet_varaug.report.variability_report import REPORT, add_html_section, page, section
from nnunet_varaug.utilities.fileio import write_text

SECTION = "compare"
MEAN_KEY = "mean"
"""The ``label`` of the row that averages Dice over the structures (per case and replica, NaN left out)."""


@dataclass
class Row:
    """One comparison: trainer B against trainer A on one measure of one structure."""

    trainer_a: str
    trainer_b: str
    measure: str          # "dice" or "volume" (the absolute volume difference to the labels, mm³)
    structure: str        # the structure's name, or "mean over structures"
    label: str            # its key ("1", "1+2") or MEAN_KEY
    result: Comparison


def points(x: float) -> str:
    """A Dice difference in Dice points, two decimals (``0.0083`` -> ``0.83``)."""
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def amount(row: Row, x: float, signed: bool = False) -> str:
    """A difference in the row's unit: Dice points, or a volume; ``signed`` puts + or − in front."""
    if x is None or not np.isfinite(x):
        return "–"
    if row.measure == "dice":
        return f"{100 * x:+.2f}".replace("-", "−") if signed else f"{100 * x:.2f}"
    sign = ("+" if x > 0 else "−" if x < 0 else "") if signed else ""
    return sign + format_volume(abs(x) if signed else x)


def unit(row: Row) -> str:
    return " Dice points" if row.measure == "dice" else ""


def verdict(row: Row, more: Optional[Dict[str, str]] = None) -> str:
    """The plain-language verdict of one row (Markdown): which trainer is better and by how much, or that the
    data cannot tell, then the flip probability, the replicas needed, the seed noise and the two tests.
    ``more``: trainer -> the command that trains :data:`MIN_REPLICAS` replicas of it (shown below that K)."""
    r, a, b = row.result, f"`{row.trainer_a}`", f"`{row.trainer_b}`"
    u = unit(row)
    if r.status == "no_cases":
        return (f"**Not enough cases**: {r.n_cases} case(s) have a defined score in every replica of both trainers "
                f"({r.left_out} left out: prediction and labels both empty, nnU-Net's NaN); at least 2 are needed.")
    iv = r.interval
    lo, hi, d = float(iv.low), float(iv.high), float(iv.delta)
    if r.status in ("b_better", "a_better"):
        first, second = (b, a) if r.status == "b_better" else (a, b)
        size, low, high = (abs(d), *sorted((abs(lo), abs(hi))))
        ci = f"95 % interval {amount(row, low)} to {amount(row, high)}{u}"
        head = (f"**{first} is better than {second} by {amount(row, size)}{u}** ({ci})." if row.measure == "dice"
                else f"**{first}'s volumes are closer to the labels than {second}'s by {amount(row, size)}** on "
                     f"average ({ci}).")
    else:
        diff = f"{b} − {a} = {amount(row, d, True)}{u}, 95 % interval {amount(row, lo, True)} to {amount(row, hi, True)}{u}"
        if r.status == "too_few_replicas":
            k = min(r.k_a, r.k_b)
            train = "; ".join(f"`{c}`" for c in (more or {}).values())
            head = (f"**K too small to say** ({diff}, for information only): no verdict with K = {k}: "
                    f"{MIN_REPLICAS_REASON}. Train at least {MIN_REPLICAS} replicas of each{': ' + train if train else ''}.")
        else:
            head = f"**No difference beyond seed noise and case-to-case spread** ({diff})."
    parts = [head]
    if r.flips is not None and np.isfinite(r.flips.probability):
        parts.append(f"One training of each would have ranked them the other way round with probability "
                     f"{r.flips.probability:.2f} ({r.flips.flips:g} of {r.flips.pairs} replica pairs).")
    parts.append(needed_sentence(row))
    noise = (f"{points(r.seed_noise_a)} and {points(r.seed_noise_b)} Dice points" if row.measure == "dice"
             else f"{format_volume(r.seed_noise_a)} and {format_volume(r.seed_noise_b)}")
    parts.append(f"Seed noise (sd of one training's mean over these cases): {a} and {b}: {noise}.")
    parts.append(tests_sentence(r))
    return " ".join(p for p in parts if p)


def needed_sentence(row: Row) -> str:
    r = row.result
    k = min(r.k_a, r.k_b)
    floor = f"the case-to-case spread alone leaves ±{amount(row, r.cases_only_halfwidth)}{unit(row)} with these {r.n_cases} cases: more cases are needed, not more replicas"
    out = []
    if r.delta == 0 or not np.isfinite(r.delta):
        pass
    elif r.needed_for_effect is None:
        out.append(f"No number of replicas resolves an effect of this size: {floor}.")
    elif r.status in ("b_better", "a_better") and r.needed_for_effect <= k:
        out.append(f"{r.needed_for_effect} replicas each would have sufficed for this effect.")
    else:
        out.append(f"About {r.needed_for_effect} replicas each would be needed for an effect of this size to exclude "
                   f"zero (the expected half-width falls below it; a true effect of exactly this size would then be "
                   f"found about half of the time).")
    if r.target_halfwidth is not None and row.measure == "dice":
        h = f"±{points(r.target_halfwidth)} Dice points"
        out.append(f"For a 95 % interval of {h}: {r.needed_for_target} replicas each." if r.needed_for_target
                   else f"An interval of {h} is out of reach: {floor}.")
    return " ".join(out)


def tests_sentence(r: Comparison) -> str:
    if not np.isfinite(r.wilcoxon_p) and not np.isfinite(r.permutation_p):
        return ""
    smallest = 2 / r.permutation_labelings if r.permutation_exact and r.k_a == r.k_b else 1 / max(1, r.permutation_labelings)
    how = (f"all {r.permutation_labelings} labelings; the smallest possible p is {smallest:.2g}" if r.permutation_exact
           else f"{r.permutation_labelings} random labelings")
    wil = f"p = {r.wilcoxon_p:.3g}" if np.isfinite(r.wilcoxon_p) else "undefined (no case differs)"
    return (f"Wilcoxon signed-rank over cases (replica-averaged, these trainings fixed): {wil}; permutation over "
            f"replica labels: p = {r.permutation_p:.3g} ({how}).")


# ---- tables ---------------------------------------------------------------------------------------------------
def csv_frame(rows: Sequence[Row]):
    """compare.csv: every number of every row."""
    import pandas as pd

    out = []
    for row in rows:
        r, iv = row.result, row.result.interval
        get = (lambda f: float(f(iv))) if iv is not None else (lambda f: math.nan)
        out.append({
            "trainer_a": row.trainer_a, "trainer_b": row.trainer_b, "measure": row.measure,
            "structure": row.structure, "label": row.label, "cases": r.n_cases, "cases_left_out": r.left_out,
            "k_a": r.k_a, "k_b": r.k_b, "mean_a": r.mean_a, "mean_b": r.mean_b, "delta": r.delta,
            "ci_low": get(lambda i: i.low), "ci_high": get(lambda i: i.high), "se": get(lambda i: np.sqrt(i.variance)),
            "df": get(lambda i: i.df), "seed_noise_a": r.seed_noise_a, "seed_noise_b": r.seed_noise_b,
            "replica_var_a": get(lambda i: i.a.replica_var), "replica_var_b": get(lambda i: i.b.replica_var),
            "residual_var_a": get(lambda i: i.a.residual_var), "residual_var_b": get(lambda i: i.b.residual_var),
            "case_var": get(lambda i: i.case_var),
            "flip_probability": r.flips.probability if r.flips else math.nan,
            "flip_pairs": r.flips.pairs if r.flips else 0, "wilcoxon_statistic": r.wilcoxon_statistic,
            "wilcoxon_p": r.wilcoxon_p, "permutation_p": r.permutation_p,
            "permutation_labelings": r.permutation_labelings, "permutation_exact": r.permutation_exact,
            "replicas_for_effect": r.needed_for_effect, "replicas_for_target": r.needed_for_target,
            "target_halfwidth": r.target_halfwidth, "cases_only_halfwidth": r.cases_only_halfwidth,
            "replica_means_a": _listing(r.replica_means_a), "replica_means_b": _listing(r.replica_means_b),
            "verdict": r.status})
    return pd.DataFrame(out)


def _listing(values) -> str:
    return "" if values is None else ";".join(f"{v:.10g}" for v in values)


def summary_frame(rows: Sequence[Row]):
    """The table shown in compare.md and the HTML: one line per row, in the row's unit."""
    import pandas as pd

    out = []
    for row in rows:
        r = row.result
        iv = r.interval
        out.append({
            "B vs A": f"{row.trainer_b} vs {row.trainer_a}", "structure": row.structure,
            "measure": "Dice (points)" if row.measure == "dice" else "abs. volume difference",
            "mean A": _value(row, r.mean_a), "mean B": _value(row, r.mean_b),
            "B − A": amount(row, r.delta, True),
            "95 % interval": "–" if iv is None else f"{amount(row, float(iv.low), True)} to {amount(row, float(iv.high), True)}",
            "flip probability": "–" if not r.flips or not np.isfinite(r.flips.probability) else f"{r.flips.probability:.2f}",
            "replicas for this effect": "–" if r.needed_for_effect is None else str(r.needed_for_effect),
            "verdict": r.status.replace("_", " ")})
    return pd.DataFrame(out)


def _value(row: Row, x: float) -> str:
    return ("–" if not np.isfinite(x) else f"{x:.4f}") if row.measure == "dice" else format_volume(x)


def markdown_table(frame) -> List[str]:
    head = list(frame.columns)
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *["| " + " | ".join(str(v) for v in r) + " |" for r in frame.itertuples(index=False)]]


# ---- figure ---------------------------------------------------------------------------------------------------
def figure(path: str, title: str, trainers: Sequence[str], rows: Sequence[Row]) -> str:
    """Left: each replica's mean Dice as a dot, per trainer (the bar: the trainers' mean). Right: each pair's
    difference with its 95 % interval as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means: Dict[str, np.ndarray] = {}
    for row in rows:
        for name, m in ((row.trainer_a, row.result.replica_means_a), (row.trainer_b, row.result.replica_means_b)):
            if m is not None and name not in means:
                means[name] = np.asarray(m)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    for x, name in enumerate(trainers):
        m = means.get(name)
        if m is None:
            continue
        jitter = np.linspace(-0.12, 0.12, m.size) if m.size > 1 else np.zeros(1)
        left.plot(x + jitter, m, "o", color="C0", alpha=0.8)
        left.hlines(m.mean(), x - 0.25, x + 0.25, color="k")
    left.set_xticks(range(len(trainers)), [t.replace("nnUNetTrainer", "nnUNetTrainer\n") for t in trainers],
                    fontsize=7)
    left.set_ylabel("mean Dice of one replica")
    left.set_title(f"{title}: each replica (dots), mean (bar)", fontsize=9)
    for y, row in enumerate(rows):
        iv = row.result.interval
        if iv is None:
            continue
        d, lo, hi = 100 * float(iv.delta), 100 * float(iv.low), 100 * float(iv.high)
        color = "C2" if row.result.status in ("b_better", "a_better") else "C7"
        right.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=4)
    right.axvline(0, color="k", lw=0.8)
    right.set_yticks(range(len(rows)), [f"{r.trainer_b}\n− {r.trainer_a}" for r in rows], fontsize=7)
    right.set_xlabel("difference in Dice points (95 % interval)")
    right.set_title("B − A", fontsize=9)
    return save_figure(fig, path, dpi=110)


# ---- writing --------------------------------------------------------------------------------------------------
def render_markdown(title: str, intro: Sequence[str], rows: Sequence[Row], more: Optional[Dict[str, str]] = None
                    ) -> str:
    lines = [f"# {title}", "", *intro, ""]
    pairs = list(dict.fromkeys((r.trainer_a, r.trainer_b) for r in rows))
    for a, b in pairs:
        lines += [f"## `{b}` vs `{a}`", ""]
        for measure, heading in (("dice", "Dice to the labels"),
                                 ("volume", "Volume: mean absolute difference to the labels (lower is better)")):
            chosen = [r for r in rows if (r.trainer_a, r.trainer_b) == (a, b) and r.measure == measure]
            if not chosen:
                continue
            lines += [f"### {heading}", ""]
            lines += [f"- **{r.structure}**{'' if r.label == MEAN_KEY else f' ({r.label})'}: {verdict(r, more)}"
                      for r in chosen]
            lines.append("")
    lines += ["## All rows", "", *markdown_table(summary_frame(rows)), "",
              "Every number: `compare.csv`; every case, trainer and replica: `scores.csv`; how to read them: "
              "docs/compare.md.", ""]
    return "\n".join(lines)


def markdown_to_html(text: str) -> str:
    """The few Markdown forms of compare.md's verdict lines (bold, code) as HTML."""
    text = html_lib.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def write_outputs(output: str, title: str, intro: Sequence[str], rows: Sequence[Row], trainers: Sequence[str],
                  scores, more: Optional[Dict[str, str]] = None) -> str:
    """compare.md, compare.csv, scores.csv, one figure per structure and the report.html section; returns the
    path of compare.md."""
    os.makedirs(os.path.join(output, "figures"), exist_ok=True)
    md = render_markdown(title, intro, rows, more)
    write_text(os.path.join(output, "compare.csv"), csv_frame(rows).to_csv(index=False, float_format="%.10g"))
    write_text(os.path.join(output, "scores.csv"), scores.to_csv(index=False, float_format="%.10g"))
    figures = []
    for label in dict.fromkeys(r.label for r in rows):
        chosen = [r for r in rows if r.label == label and r.measure == "dice"]
        if chosen:
            name = "".join(c if c.isalnum() or c in "+-" else "_" for c in label)
            figures.append(figure(os.path.join(output, "figures", f"compare_{name}.png"), chosen[0].structure,
                                  trainers, chosen))
    body = ("".join(f"<p>{markdown_to_html(line)}</p>\n" for line in intro)
            + "<ul>" + "".join(f"<li><b>{html_lib.escape(r.structure)}</b>, {html_lib.escape(r.trainer_b)} vs "
                               f"{html_lib.escape(r.trainer_a)} ({'Dice' if r.measure == 'dice' else 'volume'}): "
                               f"{markdown_to_html(verdict(r, more))}</li>\n" for r in rows) + "</ul>\n"
            + f'<div class="wide">{summary_frame(rows).to_html(index=False, border=0)}</div>\n'
            + "\n".join(embed_png(f, os.path.basename(f)) for f in figures)
            + "<p class=\"note\">Every number: <code>compare.csv</code>; per case and replica: <code>scores.csv</code>; "
              "the statistics: docs/compare.md.</p>")
    if os.path.isfile(os.path.join(output, REPORT)):
        add_html_section(output, SECTION, title, body)
    else:
        write_text(os.path.join(output, REPORT), page(title, [section(SECTION, title, body)]))
    path = os.path.join(output, "compare.md")
    write_text(path, md)
    return path
