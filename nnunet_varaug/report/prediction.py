"""The outputs of ``predict`` that are read by people: ``volumes.csv``, ``review.csv`` and ``report.html``, built
from the per-case records of ``OUT/varaug_predict.json``."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from nnunet_varaug.evaluation import calibration, uncertainty
from nnunet_varaug.report import overlays, variability_report as report
from nnunet_varaug.report.calibration import CALIBRATION_TITLE, calibration_html
from nnunet_varaug.report.tables import format_volume
from nnunet_varaug.utilities.fileio import write_text


def write_outputs(exp, out: str, records: Dict[str, dict], structures, names: List[str],
                  flag_above: Optional[float], pictures: int) -> None:
    """volumes.csv, review.csv, calibration.csv (with labels) and report.html from the per-case records."""
    import pandas as pd

    summaries = {c: uncertainty.CaseSummary.from_json(r["summary"]) for c, r in records.items()}
    volumes = pd.DataFrame([row for c, s in summaries.items() for row in uncertainty.volume_rows(c, s, structures)])
    review = pd.DataFrame(uncertainty.review_rows(summaries, structures, flag_above))
    review = review[["rank", "case", "score", "flagged", "least_agreeing_structure", "min_mean_pairwise_dice",
                     "uncertain_volume_mm3"]]
    write_text(os.path.join(out, "volumes.csv"), volumes.to_csv(index=False, float_format="%.10g"))
    write_text(os.path.join(out, "review.csv"), review.to_csv(index=False, float_format="%.10g"))
    cal_html = ""
    if records and all(r.get("calibration") for r in records.values()):
        counts = None
        for r in records.values():
            c = calibration.CalibrationCounts.from_json(r["calibration"])
            counts = c if counts is None else (counts.merge(c) or counts)
        cal_html = report.section("calibration", CALIBRATION_TITLE, calibration_html(counts, out, names, structures))
    shown = review.assign(score=review["score"].map("{:.4f}".format),
                          min_mean_pairwise_dice=review["min_mean_pairwise_dice"].map("{:.4f}".format),
                          uncertain_volume=review["uncertain_volume_mm3"].map(format_volume)).drop(
        columns=["uncertain_volume_mm3"])
    vol = volumes.assign(**{c: volumes[c].map(format_volume) for c in volumes.columns if c.endswith("_mm3")})
    vol.columns = [c.replace("_mm3", "") for c in vol.columns]
    flag_note = "" if flag_above is None else f" Flagged: score above {flag_above}."
    top = [(f"#{r['rank']} {r['case']} (score {r['score']:.3f})", os.path.join(out, records[r["case"]]["picture"]))
           for _, r in review.head(pictures).iterrows()]
    sections = [
        report.section("overview", "Prediction", f"<p>{exp.dataset}, <code>{exp.configuration}</code>, fold "
                       f"{exp.fold}, plans <code>{exp.plans}</code>: ensemble of {len(names)} {exp.kind} replicas "
                       f"({', '.join(names)}), {len(records)} case(s). Consensus = argmax of the mean probability "
                       f"(as <code>nnUNetv2_ensemble</code>). See docs/inference.md.</p>"),
        report.section("review", "Review list (most doubtful first)",
                       "<p class=\"note\">Score = 1 − mean pairwise Dice of the replicas on the structure that agrees "
                       f"least; uncertain volume: where any replica differs from the consensus.{flag_note}</p>"
                       + shown.to_html(index=False, border=0)),
        report.section("volumes", "Volumes: consensus and replicas", vol.to_html(index=False, border=0)),
        cal_html,
        report.section("pictures", "Where the replicas disagree",
                       overlays.section_html(top, overlays.PICTURE_NOTE.format(what="consensus"))),
    ]
    write_text(os.path.join(out, report.REPORT),
               report.page(f"Replica ensemble prediction — {exp.dataset} {exp.configuration} fold {exp.fold}",
                           [s for s in sections if s]))
