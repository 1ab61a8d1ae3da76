"""``analyze``'s uncertainty and calibration sections, added to its report folder after the variability report is
committed: structures.csv, review.csv, lesions, failure detection (per kind; the first kind in the report folder,
others in ``OUT/<kind>/``), calibration.csv with one fitted temperature per kind (``temperature.json``, and
``$nnUNet_results/<Dataset>/varaug_temperature/…json`` where ``predict --temperature auto`` finds it)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from nnunet_varaug.evaluation import variability
from nnunet_varaug.inference import replica_stats
from nnunet_varaug.report import variability_report as report
from nnunet_varaug.report.calibration import CALIBRATION_TITLE, calibration_html
from nnunet_varaug.report.uncertainty_report import ReviewOptions, write_uncertainty_outputs
from nnunet_varaug.utilities.fileio import file_sha256, write_text

TITLES = {"structures": "Per structure: how sure each volume is",
          "review": "Review list (most doubtful first)",
          "failures": "Would the review list have caught the failures?",
          "lesions": "Lesions: how many, and how sure"}


def add_uncertainty_sections(output: str, records: Dict[str, Dict[str, dict]], review: ReviewOptions,
                             kinds: Sequence[str]) -> None:
    """The tables of :mod:`.uncertainty_report` per kind, and their sections in report.html."""
    for i, kind in enumerate(kinds):
        if not records.get(kind):
            continue
        folder = output if i == 0 else os.path.join(output, kind)
        os.makedirs(folder, exist_ok=True)
        sections = write_uncertainty_outputs(folder, records[kind], review, os.path.join(folder, "figures"))
        suffix = "" if len(kinds) == 1 else f" ({kind} replicas)"
        where = "" if i == 0 else f"<p class=\"note\">Files in <code>{kind}/</code>.</p>"
        note = ("<p class=\"note\">Consensus = argmax of the replicas' mean probability (as predict). Score = (1 − "
                f"mean pairwise Dice) × min(1, mean replica volume / {review.min_volume:g} mm³), largest over "
                "structures; a structure no replica finds scores 1 unless it may be absent (--may-be-absent). "
                "docs/inference.md.</p>")
        for sid, body in sections.items():
            text = where + (note + body if sid == "review" else body)
            report.add_html_section(output, sid if i == 0 else f"{sid}-{kind}", TITLES[sid] + suffix, text)


def add_calibration_section(experiments, labelled: List[str], output: str, tta: bool, step_size: float) -> Dict:
    """calibration.csv, the reliability diagram and the temperature fit of every kind, from the statistics gathered
    while predicting (no second prediction pass). Returns ``kind -> temperature record``."""
    counts, fits = None, {}
    several = len(experiments) > 1
    for exp in experiments:
        got = replica_stats.calibration_of(output, exp.kind, labelled,
                                           f"ensemble ({exp.kind})" if several else "ensemble")
        if got is None:
            continue
        counts = got["counts"] if counts is None else counts.merge(got["counts"])
        shas = {n: file_sha256(exp.final_checkpoint(n)) for n in exp.replica_names}
        path = replica_stats.temperature_path(os.environ["nnUNet_results"], exp.dataset, exp.base, exp.kind,
                                              exp.plans, exp.configuration, exp.fold)
        fits[exp.kind] = replica_stats.save_temperature(path, got["temperature"], shas, tta, step_size, labelled)
        fits[exp.kind]["path"] = path
    if counts is None:
        return {}
    write_text(os.path.join(output, "temperature.json"), json.dumps(fits, indent=2) + "\n")
    names = [n for e in experiments for n in e.replica_names]
    structures = variability.structures_from_dataset_json(experiments[0].dataset_json)
    report.add_html_section(output, "calibration", CALIBRATION_TITLE,
                            calibration_html(counts, output, names, structures, fits))
    return fits
