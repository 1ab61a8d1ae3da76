"""Calibration in the reports: ``calibration.csv``, the reliability diagram (with the voxel count of every bin) and
the report section, for ``predict -l`` and ``analyze --calibration`` (the counts themselves, and the definitions:
:mod:`nnunet_varaug.evaluation.calibration`; temperature scaling: :mod:`nnunet_varaug.evaluation.temperature`)."""
from __future__ import annotations

import html as html_lib
import math
import os
from typing import Dict, List, Optional

import numpy as np

from nnunet_varaug.evaluation import calibration
from nnunet_varaug.report.png import embed_png, save_figure
from nnunet_varaug.utilities.fileio import write_text

CALIBRATION_TITLE = "Calibration against the labels: single replicas and their ensemble"
ENSEMBLE = "ensemble"


def _f(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.4f}"


def calibration_table(counts: calibration.CalibrationCounts, names: Dict[int, str]) -> str:
    """Per model: top-label ECE, NLL, multi-class Brier, and class-wise ECE per foreground label; each over all
    voxels / over the ROI."""
    fg = [(i, v) for i, v in enumerate(counts.labels) if i > 0]
    head = ("<tr><th>model</th><th>top-label ECE</th><th>NLL (nats)</th><th>Brier (all labels)</th>"
            + "".join(f"<th>class-wise ECE {html_lib.escape(names.get(v, str(v)))}</th>" for _, v in fg) + "</tr>")
    rows = []
    for model in counts.models:
        has_roi = model in counts.stats["roi"]

        def pair(metric, index=None):
            a = getattr(counts, metric)(model, "all")
            b = getattr(counts, metric)(model, "roi") if has_roi else math.nan
            if index is not None:
                a, b = a[index], (b[index] if has_roi else math.nan)
            elif metric == "brier":
                a, b = float(np.sum(a)), float(np.sum(b)) if has_roi else math.nan
            return f"{_f(a)} / {_f(b)}"

        cells = [html_lib.escape(model), pair("top_label_ece"), pair("nll"), pair("brier")]
        cells += [pair("classwise_ece", i) for i, _ in fg]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="wide"><table>{head}{"".join(rows)}</table></div>'


def calibration_html(counts: calibration.CalibrationCounts, out: str, names: List[str], structures,
                     temperatures: Optional[Dict[str, dict]] = None) -> str:
    """Write ``calibration.csv`` and ``figures/reliability.png`` into ``out``; return the report section's body.
    ``temperatures``: kind -> the fit (:class:`nnunet_varaug.evaluation.temperature.Fit` result), shown when given."""
    import pandas as pd

    label_names = {counts.labels[0]: "background", **{int(st.labels[0]): st.name for st in structures}}
    cal = pd.DataFrame(counts.rows(label_names))
    write_text(os.path.join(out, "calibration.csv"), cal.to_csv(index=False, float_format="%.10g"))
    ensembles = [m for m in counts.models if m.startswith(ENSEMBLE)]
    png = reliability_diagram(counts, os.path.join(out, "figures", "reliability.png"), ensembles, label_names)
    text = [f"<p class=\"note\">Each cell: over all voxels / over the ROI (voxels where the model's segmentation or "
            f"the label is foreground, dilated by {calibration.ROI_MARGIN_MM:g} mm). Over all voxels a small "
            f"structure's figures shrink with its prevalence; the ROI figures do not. Top-label ECE: Guo et al. 2017, "
            f"eq. 3; class-wise ECE: one-vs-rest per label (Kull et al. 2019, Nixon et al. 2019); {counts.bins} "
            f"equal-width bins; NLL: mean −ln p(label); Brier: multi-class, summed over labels. Ignore-label voxels "
            f"left out. See docs/inference.md.</p>", calibration_table(counts, label_names)]
    if temperatures:
        rows = "".join(f"<tr><td>{html_lib.escape(k)}</td><td>{v['temperature']:.3f}"
                       f"{' (grid edge)' if v.get('at_grid_edge') else ''}</td><td>{_f(v.get('nll_at_1'))}</td>"
                       f"<td>{_f(v.get('nll_at_fit'))}</td><td>{int(v.get('cases', 0))}</td></tr>"
                       for k, v in temperatures.items())
        text.append("<h3>Temperature scaling</h3><table><tr><th>kind</th><th>T</th><th>NLL at T = 1</th>"
                    f"<th>NLL at T</th><th>cases</th></tr>{rows}</table><p class=\"note\">One T per kind, minimising "
                    "the NLL of every replica on these labelled cases (log-spaced grid from 0.05 to 20, refined by "
                    "a parabola in ln T). Models named <code>… (T=…)</code> above are the replicas and ensemble with "
                    "T applied before averaging; on the cases T was fitted on, their figures are in-sample. Apply it "
                    "to new images with <code>predict --temperature auto</code>.</p>")
    text.append(embed_png(png, "reliability diagram"))
    return "\n".join(text)


def reliability_diagram(counts: calibration.CalibrationCounts, path: str, ensembles, names: Optional[Dict] = None,
                        scope: str = "all") -> str:
    """Top row: one panel per foreground label (class-wise) and one top-label panel; each replica thin grey, each
    ensemble bold, against the diagonal. Bottom row: voxels per bin of the first ensemble (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    ensembles = [ensembles] if isinstance(ensembles, str) else list(ensembles)
    panels = [(i, f"{names.get(v, v)} ({v}), class-wise") for i, v in enumerate(counts.labels) if i > 0]
    panels.append((None, "top label"))
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels) + 0.4, 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3]})
    centres = (np.arange(counts.bins) + 0.5) / counts.bins
    for col, (index, title) in enumerate(panels):
        ax, bars = axes[0, col], axes[1, col]
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for model in counts.models:
            conf, freq, _ = counts.reliability(model, index, scope)
            if model in ensembles:
                c = f"C{3 + ensembles.index(model)}"
                ece = counts.top_label_ece(model, scope) if index is None else counts.classwise_ece(model, scope)[index]
                ax.plot(conf, freq, "o-", color=c, lw=2, ms=4, label=f"{model} (ECE {ece:.4f})", zorder=5)
            else:
                ax.plot(conf, freq, "-", color="0.6", lw=1, alpha=0.8)
        ax.plot([], [], "-", color="0.6", lw=1, label="single replicas")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency")
        ax.set_title(f"{title}, {counts.bins} bins", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        if ensembles:
            st = counts.stats[scope][ensembles[0]]
            n = (st["top"] if index is None else st["classwise"][index])[:, 0]
            bars.bar(centres, np.maximum(n, 0.5), width=0.9 / counts.bins, color="C3", alpha=0.6, log=True)
            for x, v in zip(centres, n):
                bars.text(x, max(v, 0.5), f"{int(v):,}" if v < 1e4 else f"{v:.1e}", ha="center", va="bottom",
                          fontsize=5.5, rotation=90)
        bars.set(xlim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="voxels per bin")
    return save_figure(fig, path)
