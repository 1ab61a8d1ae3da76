"""Calibration in the reports: ``calibration.csv``, the reliability diagram and the report section, for ``predict
-l`` and ``analyze --calibration`` (the counts themselves: :mod:`nnunet_varaug.evaluation.calibration`)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from nnunet_varaug.evaluation import calibration, variability
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.inference.ensemble import ENSEMBLE, Weights, check_replicas, ensemble_case, load_predictor
from nnunet_varaug.report import variability_report as report
from nnunet_varaug.report.png import embed_png, save_figure
from nnunet_varaug.utilities.fileio import write_text

CALIBRATION_TITLE = "Calibration against the labels: single replicas and their ensemble"


def calibration_html(counts: calibration.CalibrationCounts, out: str, names: List[str], structures) -> str:
    """Write ``calibration.csv`` and ``figures/reliability.png`` into ``out``; return the report section's body."""
    import pandas as pd

    label_names = {0: "background", **{int(st.labels[0]): st.name for st in structures}}
    cal = pd.DataFrame(counts.rows(label_names))
    write_text(os.path.join(out, "calibration.csv"), cal.to_csv(index=False, float_format="%.10g"))
    png = reliability_diagram(counts, os.path.join(out, "figures", "reliability.png"), ENSEMBLE,
                                          label_names)
    wide = cal[cal["label"] != "all"].pivot(index="model", columns="name", values="ece").reindex(names + [ENSEMBLE])
    brier = cal[cal["label"] == "all"].set_index("model")["brier"].reindex(names + [ENSEMBLE])
    table = wide.add_prefix("ECE ").assign(**{"Brier (all labels)": brier}).reset_index()
    return (f"<p class=\"note\">Voxel-wise, every voxel of the image grid except the ignore label. ECE: "
            f"{counts.bins} equal-width bins, one-vs-rest per label (Guo et al. 2017); Brier: multi-class, the sum "
            f"over labels of the one-vs-rest mean squared error. See docs/inference.md.</p>"
            + table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0)
            + embed_png(png, "reliability diagram"))


def add_calibration_section(exp, cases: List[Case], report_dir: str, device: str = "cuda") -> bool:
    """``analyze --calibration``: calibration of the replicas and their ensemble on the labelled ``cases`` (one more
    prediction pass with probabilities), into report_dir's calibration.csv and report.html. False: no labels."""
    labelled = [c for c in cases if c.label]
    if not labelled:
        return False
    names = exp.replica_names
    predictor = load_predictor(exp, names[0], "checkpoint_final.pth", device, True, 0.5)
    weights, reader = Weights(check_replicas(exp, "checkpoint_final.pth")), \
        predictor.plans_manager.image_reader_writer_class()
    counts = None
    for case in labelled:
        gt = reader.read_seg(case.label)[0][0]
        cal = ensemble_case(predictor, weights, case, names, gt, variability.ignore_label(exp.dataset_json))[-1]
        counts = cal if counts is None else (counts.merge(cal) or counts)
    structures = variability.structures_from_dataset_json(exp.dataset_json)
    report.add_html_section(report_dir, "calibration", CALIBRATION_TITLE,
                            calibration_html(counts, report_dir, names, structures))
    return True


def reliability_diagram(counts: calibration.CalibrationCounts, path: str, ensemble: str, names: Optional[Dict[int, str]] = None,
                        ) -> str:
    """One panel per foreground label: each replica (thin grey) and the ensemble (bold) against the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    labels = [(i, v) for i, v in enumerate(counts.labels) if v != 0] or list(enumerate(counts.labels))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels) + 0.4, 3.4), squeeze=False)
    for ax, (i, label) in zip(axes[0], labels):
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for model in counts.data:
            conf, freq, _ = counts.reliability(model, i)
            if model == ensemble:
                ax.plot(conf, freq, "o-", color="C3", lw=2, ms=4, label=f"ensemble (ECE {counts.ece(model)[i]:.4f})",
                        zorder=5)
            else:
                ax.plot(conf, freq, "-", color="0.6", lw=1, alpha=0.8)
        ax.plot([], [], "-", color="0.6", lw=1, label="single replicas")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability (bin)")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{names.get(label, label)} ({label}), {counts.bins} bins", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)
