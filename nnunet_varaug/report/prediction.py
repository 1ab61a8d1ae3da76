"""The outputs of ``predict`` that are read by people: ``volumes.csv``, ``review.csv``, ``structures.csv``, with
``--instances`` ``lesions.csv``/``lesion_counts.csv``, with ``-l`` ``failure_detection.csv``,
``review_thresholds.csv`` and ``calibration.csv``, and ``report.html``, built from the per-case records of
``OUT/varaug_predict.json``."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

from nnunet_varaug.evaluation import calibration, uncertainty
from nnunet_varaug.report import overlays, variability_report as report
from nnunet_varaug.report.calibration import CALIBRATION_TITLE, calibration_html
from nnunet_varaug.report.tables import format_volume
from nnunet_varaug.report.uncertainty_report import ReviewOptions, write_uncertainty_outputs
from nnunet_varaug.utilities.fileio import write_text


def _old_review(summaries, structures, flag_above):
    """review.csv of records made before per-structure records existed (format 1): 1 − min mean pairwise Dice."""
    import pandas as pd

    review = pd.DataFrame(uncertainty.review_rows(summaries, structures, flag_above))
    return review[["rank", "case", "score", "flagged", "least_agreeing_structure", "min_mean_pairwise_dice",
                   "uncertain_volume_mm3"]]


def write_outputs(exp, out: str, records: Dict[str, dict], structures, names: List[str],
                  flag_above: Optional[float], pictures: int, review: Optional[ReviewOptions] = None,
                  temperature: Optional[float] = None) -> None:
    """All tables and report.html from the per-case records (``review``: the review score's settings;
    ``temperature``: the T applied to every replica, said in the report)."""
    import pandas as pd

    review = dataclasses.replace(review or ReviewOptions(), flag_above=flag_above)
    summaries = {c: uncertainty.CaseSummary.from_json(r["summary"]) for c, r in records.items()}
    volumes = pd.DataFrame([row for c, s in summaries.items() for row in uncertainty.volume_rows(c, s, structures)])
    write_text(os.path.join(out, "volumes.csv"), volumes.to_csv(index=False, float_format="%.10g"))
    sections_of = {}
    if records and all("structures" in r for r in records.values()):
        sections_of = write_uncertainty_outputs(out, records, review, os.path.join(out, "figures"))
        ranked = pd.read_csv(os.path.join(out, "review.csv"))
    else:
        ranked = _old_review(summaries, structures, flag_above)
        write_text(os.path.join(out, "review.csv"), ranked.to_csv(index=False, float_format="%.10g"))
        sections_of["review"] = ranked.to_html(index=False, border=0)
    cal_html = ""
    if records and all(r.get("calibration") for r in records.values()):
        counts = None
        for r in records.values():
            c = calibration.CalibrationCounts.from_json(r["calibration"])
            counts = c if counts is None else counts.merge(c)
        cal_html = report.section("calibration", CALIBRATION_TITLE, calibration_html(counts, out, names, structures))
    vol = volumes.assign(**{c: volumes[c].map(format_volume) for c in volumes.columns if c.endswith("_mm3")})
    vol.columns = [c.replace("_mm3", "") for c in vol.columns]
    flag_note = "" if flag_above is None else f" Flagged: score above {flag_above}."
    top = [(f"#{r['rank']} {r['case']} (score {r['score']:.3f})", os.path.join(out, records[r["case"]]["picture"]))
           for _, r in ranked.head(pictures).iterrows()]
    t_note = "" if not temperature or temperature == 1.0 else (
        f" Every replica's probabilities were scaled by the temperature T = {temperature:.3f} (softmax(z / T)) "
        f"before averaging: the consensus, maps and tables are of the scaled replicas.")
    sections = [
        report.section("overview", "Prediction", f"<p>{exp.dataset}, <code>{exp.configuration}</code>, fold "
                       f"{exp.fold}, plans <code>{exp.plans}</code>: ensemble of {len(names)} {exp.kind} replicas "
                       f"({', '.join(names)}), {len(records)} case(s). Consensus = argmax of the mean probability "
                       f"(as <code>nnUNetv2_ensemble</code>).{t_note} See docs/inference.md.</p>"),
        report.section("structures", "Per structure: how sure each volume is", sections_of.get("structures", "")),
        report.section("review", "Review list (most doubtful first)",
                       f"<p class=\"note\">Score = (1 − mean pairwise Dice) × min(1, mean replica volume / "
                       f"{review.min_volume:g} mm³) of the structure that scores highest; a structure no replica "
                       f"finds scores 1 unless it may be absent. Uncertain volume: where some but not all replicas "
                       f"hold a structure, summed over structures.{flag_note}</p>" + sections_of["review"]),
        report.section("failures", "Would the review list have caught the failures?", sections_of["failures"])
        if "failures" in sections_of else "",
        report.section("lesions", "Lesions: how many, and how sure", sections_of["lesions"])
        if "lesions" in sections_of else "",
        report.section("volumes", "Volumes: consensus and replicas", vol.to_html(index=False, border=0)),
        cal_html,
        report.section("pictures", "Where the replicas disagree",
                       overlays.section_html(top, overlays.PICTURE_NOTE.format(what="consensus"))),
    ]
    write_text(os.path.join(out, report.REPORT),
               report.page(f"Replica ensemble prediction — {exp.dataset} {exp.configuration} fold {exp.fold}",
                           [s for s in sections if s and "</h2>\n\n</section>" not in s]))
