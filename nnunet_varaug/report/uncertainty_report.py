"""The uncertainty a reader acts on, as files and report sections, for ``predict`` and ``analyze``: structures.csv,
review.csv (size-aware score), lesions.csv / lesion_counts.csv (``--instances``), failure_detection.csv,
review_thresholds.csv and the risk–coverage figure (with labels). Built from per-case records
(:func:`nnunet_varaug.evaluation.case_record.case_record`)."""
from __future__ import annotations

import html as html_lib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation import failure_detection as fd, structures
from nnunet_varaug.report.png import embed_png, save_figure
from nnunet_varaug.report.tables import format_volume
from nnunet_varaug.utilities.fileio import write_text


@dataclass
class ReviewOptions:
    """How the review score and failures are defined (flags of predict and analyze)."""

    min_volume: float = structures.MIN_VOLUME_MM3
    may_be_absent: Sequence[str] = ()
    flag_above: Optional[float] = None
    failure_dice: float = fd.FAILURE_DICE
    instances: Sequence[str] = field(default_factory=tuple)
    nsd_tolerance: float = fd.NSD_TOLERANCE_MM


def _csv(df, path: str) -> None:
    write_text(path, df.to_csv(index=False, float_format="%.10g"))


def structure_frame(records: Dict[str, dict], opt: ReviewOptions):
    """structures.csv: one row per case and structure, with its review score and reason (and, with labels, the
    consensus's Dice and NSD)."""
    import pandas as pd

    rows = []
    for case, rec in records.items():
        labels = {r["label"]: r for r in rec.get("labels", [])}
        for r in rec["structures"]:
            allowed = r["name"] in opt.may_be_absent or r["label"] in opt.may_be_absent
            score, reason = structures.review_score(r, opt.min_volume, allowed)
            extra = {}
            if labels:
                extra = {"dice_to_labels": labels[r["label"]]["dice"], "nsd_to_labels": labels[r["label"]]["nsd"]}
            rows.append({"case": case, **r, "review_score": score, "review_reason": reason, **extra})
    return pd.DataFrame(rows)


def review_frame(records: Dict[str, dict], opt: ReviewOptions):
    import pandas as pd

    table = structures.review_table({c: r["structures"] for c, r in records.items()}, opt.min_volume,
                                    opt.may_be_absent, opt.flag_above)
    return pd.DataFrame(table, columns=["rank", "case", "score", "flagged", "structure", "reason",
                                        "uncertain_volume_mm3"])


def failure_units(frame):
    """(units per case and structure, units per case) for failure detection; the case's Dice is its worst
    structure's (structures without a Dice — absent from consensus and labels — left out)."""
    units = [{"case": r.case, "name": r.name, "dice": r.dice_to_labels, "review_score": r.review_score,
              "mi_in_structure_bits": r.mi_in_structure_bits, "uncertain_mm3": r.uncertain_mm3,
              "soft_hard_gap_mm3": abs(r.soft_minus_consensus_mm3)} for r in frame.itertuples()]
    cases = []
    for case, group in frame.groupby("case", sort=False):
        d = group["dice_to_labels"].to_numpy(dtype=np.float64)
        cases.append({"case": case, "dice": float(np.nanmin(d)) if np.isfinite(d).any() else math.nan,
                      "review_score": float(group["review_score"].max())})
    return units, cases


def failure_frames(frame, opt: ReviewOptions):
    """(failure_detection.csv, review_thresholds.csv, units, case units)."""
    import pandas as pd

    units, cases = failure_units(frame)
    rows = fd.score_rows("case", cases, [("review_score", "review score (largest over structures)")],
                         opt.failure_dice)
    names = list(dict.fromkeys(u["name"] for u in units))
    for name in names:
        rows += fd.score_rows(f"structure: {name}", [u for u in units if u["name"] == name], fd.SUMMARIES,
                              opt.failure_dice)
    if len(names) > 1:
        rows += fd.score_rows("all structures", units, fd.SUMMARIES, opt.failure_dice)
    kept = [c for c in cases if np.isfinite(c["dice"])]
    thresholds = fd.review_thresholds([c["review_score"] for c in kept],
                                      [c["dice"] < opt.failure_dice for c in kept])
    return pd.DataFrame(rows), pd.DataFrame(thresholds), units, kept


def risk_coverage_figure(path: str, units, cases, failure_dice: float) -> str:
    """Two panels: cases ranked by review score; case × structure units ranked by each summary; with the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    panels = [(axes[0], cases, [("review_score", "review score")], "cases (worst structure's Dice)"),
              (axes[1], [u for u in units if np.isfinite(u["dice"])], fd.SUMMARIES, "case × structure")]
    for ax, data, columns, title in panels:
        risk = np.array([1 - u["dice"] for u in data])
        if risk.size == 0:
            ax.set_axis_off()
            continue
        for i, (column, name) in enumerate(columns):
            values = np.array([u[column] for u in data], dtype=np.float64)
            ok = np.isfinite(values)
            if ok.any():
                cov, r = fd.risk_coverage(risk[ok], values[ok])
                ax.plot(cov, r, "-", color=f"C{i}", label=f"{name} (AURC {fd.aurc(risk[ok], values[ok]):.3f})")
        cov, r = fd.risk_coverage(risk, risk)
        ax.plot(cov, r, "k:", label=f"oracle (AURC {fd.aurc(risk, risk):.3f})")
        ax.axhline(risk.mean(), color="0.6", lw=1, label="random")
        ax.set_xlim(0, 1)
        ax.set_xlabel("coverage (share kept, least uncertain first)")
        ax.set_ylabel("selective risk (mean 1 − Dice)")
        ax.set_title(f"{title}, n = {risk.size}", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# ---- HTML ----------------------------------------------------------------------------------------------------------
def _fmt(v, digits=3):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def headline_table(frame, nsd_tolerance: float = fd.NSD_TOLERANCE_MM) -> str:
    """One compact row per structure over cases, with footnotes saying what each number is and over how many cases
    it is taken."""
    esc = html_lib.escape
    k = int(frame["replicas"].iloc[0])
    head = ("<tr><th>structure</th><th>cases</th><th>consensus volume¹</th><th>soft − consensus²</th>"
            "<th>min–max range³</th><th>uncertain volume⁴</th><th>MI in band⁵</th><th>detected by⁶</th>"
            "<th>review score⁷</th>" + ("<th>Dice / NSD to labels⁸</th>" if "dice_to_labels" in frame else "")
            + "</tr>")
    body = []
    for (label, name), g in frame.groupby(["label", "name"], sort=False):
        n = len(g)
        def med(col):
            v = g[col].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            return (float(np.median(v)) if v.size else math.nan), int(v.size)
        cons, _ = med("consensus_mm3")
        gap, _ = med("soft_minus_consensus_mm3")
        rng_ = float(np.median(g["replica_max_mm3"] - g["replica_min_mm3"]))
        unc, _ = med("uncertain_mm3")
        mi, n_mi = med("mi_in_band_bits")
        det = f"{int((g['detected_by'] == k).sum())} of {n} by all {k}"
        score, _ = med("review_score")
        cells = [f"{esc(name)} ({esc(str(label))})", str(n), format_volume(cons), format_volume(gap),
                 format_volume(rng_), format_volume(unc), f"{_fmt(mi)} ({n_mi})", det,
                 f"{_fmt(score)} (max {_fmt(float(g['review_score'].max()))})"]
        if "dice_to_labels" in frame:
            d, nd = med("dice_to_labels")
            s, _ = med("nsd_to_labels")
            cells.append(f"{_fmt(d)} / {_fmt(s)} ({nd})")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    cov = (k - 1) / (k + 1)
    notes = [
        "Medians over the cases in the column <i>cases</i>; a number in parentheses counts the cases that carry a "
        "value (a structure absent from the consensus has no mean inside it, nor a Dice when the labels lack it too).",
        "¹ voxels of the structure in the consensus × voxel volume.",
        "² soft volume (Σ mean probability × voxel volume) minus the consensus volume.",
        f"³ largest minus smallest replica volume; one more replica trained the same way falls inside the min–max "
        f"range with probability (K − 1)/(K + 1) = {cov:.2f} for K = {k} (exchangeable replicas).",
        "⁴ volume where some but not all replicas hold the structure.",
        "⁵ mean mutual information (bits) within 2 mm of the consensus surface: what the replicas disagree on.",
        "⁶ cases where every replica finds the structure at all.",
        "⁷ (1 − mean pairwise Dice) × min(1, mean replica volume / V_min); 1 when every replica leaves a structure "
        "empty that may not be absent; see docs/inference.md.",
    ]
    if "dice_to_labels" in frame:
        notes.append(f"⁸ consensus against the labels: Dice / normalized surface Dice at {nsd_tolerance:g} mm; "
                     f"a structure absent from both consensus and labels has no value (nnU-Net's convention).")
    return (f'<div class="wide"><table>{head}{"".join(body)}</table></div>'
            + "".join(f'<p class="note">{n}</p>' for n in notes))


def failure_html(fd_frame, thresholds, figure: str, opt: ReviewOptions) -> str:
    """The failure-detection section: would the review list have caught the failures, and at which threshold."""
    case = fd_frame[fd_frame["level"] == "case"].iloc[0]
    parts = [f"<p>A failure is a case whose worst structure has Dice &lt; {opt.failure_dice:g} to the labels: "
             f"<b>{int(case['failures'])} of {int(case['units'])}</b> cases "
             f"({int(case['left_out_no_dice'])} left out: no structure in consensus or labels). Ranked by the review "
             f"score, AURC <b>{_fmt(case['aurc'])}</b> (random ranking {_fmt(case['aurc_random'])}, lower is "
             f"better), E-AURC <b>{_fmt(case['eaurc'])}</b> (0 = cases ordered exactly by Dice), Spearman ρ with "
             f"Dice {_fmt(case['spearman_rho'])} (– : fewer than 3 cases, or no spread).</p>"]
    if len(thresholds) and int(thresholds["failures"].iloc[0]) > 0:
        rows = "".join(
            f"<tr><td>{100 * r.share_of_failures:.0f} %</td><td>{_fmt(r.threshold)}</td>"
            f"<td>{int(r.cases_to_review)} of {int(r.cases)}</td><td>{int(r.failures_caught)} of {int(r.failures)}"
            f"</td><td>{int(r.false_alarms)}</td></tr>" for r in thresholds.itertuples())
        parts.append("<table><tr><th>to catch</th><th>review score ≥</th><th>cases to review</th>"
                     f"<th>failures caught</th><th>false alarms</th></tr>{rows}</table>")
    else:
        parts.append("<p class=\"note\">No failure among these cases: no threshold to report.</p>")
    shown = fd_frame[fd_frame["level"] != "case"]
    if len(shown):
        rows = "".join(f"<tr><td>{html_lib.escape(r.level)}</td><td>{html_lib.escape(r.description)}</td>"
                       f"<td>{int(r.units)}</td><td>{int(r.failures)}</td><td>{_fmt(r.aurc)}</td>"
                       f"<td>{_fmt(r.aurc_random)}</td><td>{_fmt(r.eaurc)}</td><td>{_fmt(r.spearman_rho)}</td></tr>"
                       for r in shown.itertuples())
        parts.append("<table><tr><th>units</th><th>uncertainty</th><th>n</th><th>failures</th><th>AURC</th>"
                     f"<th>random</th><th>E-AURC</th><th>Spearman ρ</th></tr>{rows}</table>")
    parts.append(embed_png(figure, "risk-coverage curves"))
    parts.append('<p class="note">Risk = 1 − Dice. AURC: mean selective risk over the coverages 1/n … n/n '
                 '(Jaeger et al., ICLR 2023; ValUES, Kahl et al., ICLR 2024); E-AURC: AURC minus that of the ranking '
                 'by Dice itself. Few cases make these figures noisy: read the table of thresholds as what would have '
                 'happened on these cases. failure_detection.csv, review_thresholds.csv.</p>')
    return "\n".join(parts)


def lesions_html(counts) -> str:
    rows = "".join(f"<tr><td>{html_lib.escape(str(r.case))}</td><td>{html_lib.escape(r.name)}</td>"
                   f"<td>{int(r.consensus_lesions)}</td><td>{int(r.replica_lesions_min)}–{int(r.replica_lesions_max)}"
                   f"</td><td>{int(r.found_by_all)}</td><td>{int(r.found_by_one)}</td>"
                   f"<td>{int(r.unmatched_replica_lesions)}</td></tr>" for r in counts.itertuples())
    return ("<table><tr><th>case</th><th>structure</th><th>consensus lesions</th><th>replicas' count (min–max)</th>"
            "<th>found by all</th><th>found by one</th><th>replica lesions not in the consensus</th></tr>"
            f"{rows}</table><p class=\"note\">Lesion = connected component (26-connectivity); a replica finds a "
            "consensus lesion when one of its lesions overlaps it. Per lesion: lesions.csv.</p>")


def write_uncertainty_outputs(out: str, records: Dict[str, dict], opt: ReviewOptions, figures: str) -> Dict[str, str]:
    """Write structures.csv, review.csv, lesions.csv, lesion_counts.csv, failure_detection.csv,
    review_thresholds.csv and the risk–coverage figure into ``out``; return report sections' bodies by id
    (``structures``, ``failures``, ``lesions``) and ``review`` (the review table HTML)."""
    import pandas as pd

    frame = structure_frame(records, opt)
    _csv(frame, os.path.join(out, "structures.csv"))
    review = review_frame(records, opt)
    _csv(review, os.path.join(out, "review.csv"))
    sections = {"structures": headline_table(frame, opt.nsd_tolerance)}
    lesion_rows = [{"case": c, **row} for c, r in records.items() for row in r.get("lesions", [])]
    count_rows = [{"case": c, **row} for c, r in records.items() for row in r.get("lesion_counts", [])]
    for name in ("lesions.csv", "lesion_counts.csv", "failure_detection.csv", "review_thresholds.csv"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))  # from an earlier run with other flags
    if count_rows:
        _csv(pd.DataFrame(lesion_rows), os.path.join(out, "lesions.csv"))
        counts = pd.DataFrame(count_rows)
        _csv(counts, os.path.join(out, "lesion_counts.csv"))
        sections["lesions"] = lesions_html(counts)
    if "dice_to_labels" in frame:
        fd_frame, thresholds, units, cases = failure_frames(frame, opt)
        _csv(fd_frame, os.path.join(out, "failure_detection.csv"))
        _csv(thresholds, os.path.join(out, "review_thresholds.csv"))
        png = risk_coverage_figure(os.path.join(figures, "risk_coverage.png"), units, cases, opt.failure_dice)
        sections["failures"] = failure_html(fd_frame, thresholds, png, opt)
    shown = review.assign(score=review["score"].map("{:.4f}".format),
                          uncertain_volume=review["uncertain_volume_mm3"].map(format_volume)).drop(
        columns=["uncertain_volume_mm3"])
    sections["review"] = shown.to_html(index=False, border=0)
    return sections
