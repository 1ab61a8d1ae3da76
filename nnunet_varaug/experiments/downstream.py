"""``nnunet_varaug downstream``: the paper's augmentation experiment on per-replica features — step 3: the
verdict, figure, report section, output files and the command line.

arXiv 2509.05238 treats each replica's per-region volumes of a subject as one "variability sample" and trains a
regressor (brain age) on N replica rows per subject instead of one. Input tables and the reference model:
:mod:`downstream_data`; arms, splits, models and metrics: :mod:`downstream_protocol`. The reference (the
paper's single "IEEE" model) defaults to the features' ``<Base>_ieee`` model and is never one of the pooled
replicas; every output names it.

Replica rows are not a free lunch: a nearest-neighbour model sees N copies of each subject crowding every
neighbourhood and gets worse (the paper's KNN went from 9.32 to 15.04 years). The verdict says so per arm.
"""
from __future__ import annotations

import html as html_lib
import json
import os
from dataclasses import asdict
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pandas as pd

from nnunet_varaug.experiments.downstream_data import Design, prepare
from nnunet_varaug.experiments.downstream_protocol import ARM_LABELS, ARMS, METRICS, MODEL_NAMES, Options, run_protocol, summarize
from nnunet_varaug.report.png import embed_png, save_figure
from nnunet_varaug.report.variability_report import add_html_section
from nnunet_varaug.utilities.fileio import write_text

# A relative MAE change smaller than this (in either direction) is reported as "no clear effect".
VERDICT_TOLERANCE = 0.02


def arm_verdicts(summary: pd.DataFrame, tolerance: float = VERDICT_TOLERANCE) -> Dict[str, Dict[str, Any]]:
    """Per augmentation arm: MAE with the most rows (largest N) against the single model (``ieee``).

    Judged at the largest N, not the best one, because picking the best N on the test set flatters the arm.
    ``effect`` is ``helps`` / ``hurts`` when the relative MAE change exceeds ``tolerance`` and, with several
    splits, the split-paired difference exceeds twice its standard error; else ``no clear effect``.
    """
    out: Dict[str, Dict[str, Any]] = {}
    base = summary[summary["arm"] == "ieee"]
    if base.empty:
        return out
    base_mae = float(base["MAE_mean"].iat[0])
    for arm in [a for a in ARMS if a != "ieee" and a in set(summary["arm"])]:
        part = summary[summary["arm"] == arm].sort_values("N")
        last = part.iloc[-1]
        best = part.loc[part["MAE_mean"].idxmin()]
        change = (float(last["MAE_mean"]) - base_mae) / base_mae if base_mae > 0 else 0.0
        delta, se = float(last.get("MAE_delta_mean", np.nan)), float(last.get("MAE_delta_se", np.nan))
        beyond_noise = not np.isfinite(se) or abs(delta) > 2 * se
        clear = abs(change) > tolerance and beyond_noise
        effect = "no clear effect" if not clear else "helps" if change < 0 else "hurts"
        out[arm] = {"effect": effect, "change": change, "N": int(last["N"]), "MAE": float(last["MAE_mean"]),
                    "MAE_std": float(last["MAE_std"]), "baseline": base_mae, "best_N": int(best["N"]),
                    "best_MAE": float(best["MAE_mean"]), "rows_per_subject": int(last["rows_per_subject"]),
                    "delta": delta, "delta_se": se, "splits": int(last.get("splits", 1))}
    return out


def format_verdict(summary: pd.DataFrame, reference: Optional[str] = None) -> str:
    """Plain-language verdict, one line per augmentation arm: does adding rows help this model?

    A model that gets worse is reported as such (KNN typically: copies of one subject crowd its neighbourhoods).
    ``reference``: the reference model's name, stated on the first line.
    """
    if summary.empty:
        return "no results"
    model = str(summary["model"].iat[0]) if "model" in summary.columns else "?"
    name = MODEL_NAMES.get(model, model)
    verdicts = arm_verdicts(summary)
    if "ieee" not in set(summary["arm"]):
        return f"{name}: no verdict, the ieee arm (the single-model baseline) was not run"
    base = summary[summary["arm"] == "ieee"].iloc[0]
    lines = [f"{name}: single model (ieee) MAE {base['MAE_mean']:.4g}"
             + (f"; reference model {reference} (not in the replica pool)" if reference else "")]
    what = {"replicas": "replica rows", "gaussian": "independent Gaussian copies",
            "gaussian_corr": "correlated Gaussian copies", "combined": "replica rows + Gaussian copies"}
    for arm, v in verdicts.items():
        head = {"helps": f"{what[arm]} HELP {name}", "hurts": f"{what[arm]} HURT {name}",
                "no clear effect": f"{what[arm]} make no clear difference to {name}"}[v["effect"]]
        paired = (f"; paired by split {v['delta']:+.3g} ± {v['delta_se']:.2g} (SE)"
                  if np.isfinite(v["delta_se"]) else "")
        line = (f"{arm}: {head}: MAE {v['MAE']:.4g} ± {v['MAE_std']:.2g} at N={v['N']} "
                f"({v['rows_per_subject']} rows per subject) vs {v['baseline']:.4g} single model "
                f"({100 * v['change']:+.1f} %{paired}); lowest MAE {v['best_MAE']:.4g} at N={v['best_N']}")
        if v["effect"] == "hurts" and model == "knn":
            line += (". Copies of one subject crowd each neighbourhood, so the k nearest rows come from fewer "
                     "subjects; do not use replica rows with KNN (or tune k with --grid)")
        lines.append(line)
    if not verdicts:
        lines.append("no augmentation arm was run")
    elif int(base.get("splits", 1)) == 1:
        lines.append("(one train/test split: these differences include test-set noise; rerun with --splits 10 "
                     "for a verdict beyond it)")
    return "\n".join(lines)


def plot_mae(summary: pd.DataFrame, path: str) -> None:
    """MAE against N per arm, band = ± std over combinations; ``ieee`` is a horizontal line over all N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    n_top = int(summary["N"].max())
    xs_all = np.arange(1, n_top + 1)
    colors = {"ieee": "black", "replicas": "tab:blue", "gaussian": "tab:orange", "gaussian_corr": "tab:red",
              "combined": "tab:green"}
    for arm in [a for a in ARMS if a in set(summary["arm"])]:
        part = summary[summary["arm"] == arm].sort_values("N")
        mean, std = part["MAE_mean"].to_numpy(), part["MAE_std"].to_numpy()
        if arm == "ieee":
            xs, mean, std = xs_all, np.full(len(xs_all), mean[0]), np.full(len(xs_all), std[0])
            ax.plot(xs, mean, "--", color=colors[arm], label="ieee (reference model alone)")
        else:
            xs = part["N"].to_numpy()
            ax.plot(xs, mean, "o-", ms=3, color=colors[arm], label=f"{arm}: {ARM_LABELS[arm]}")
        ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.15, linewidth=0)
    model = str(summary["model"].iat[0])
    ax.set_xlabel("N (replica rows per subject)")
    ax.set_ylabel("MAE")
    ax.set_title(f"Downstream regression, {MODEL_NAMES.get(model, model)}")
    ax.set_xticks(xs_all if n_top <= 20 else np.linspace(1, n_top, 10).round().astype(int))
    ax.legend(fontsize=7)
    save_figure(fig, path)


def section_html(summary: pd.DataFrame, verdict: str, design: Design, options: Options, figure: str) -> str:
    """The report section: what was run, the verdict, the figure (embedded, like the report's own) and the summary
    table."""
    esc = html_lib.escape
    table = summary[["arm", "N", "combinations", "rows_per_subject"]].copy()
    for m in METRICS:
        table[m] = [f"{a:.4g} ± {b:.2g}" for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    lines = "".join(f"<li>{esc(line)}</li>" for line in verdict.splitlines())
    test = {"reference": "the reference model's features", "mean": "the mean of their replica rows",
            "all": "all their replica rows, predictions averaged per subject"}[options.test_features]
    arms = "".join(f"<li><code>{a}</code>: {esc(ARM_LABELS[a])}</li>" for a in options.arms)
    return (f"<p>Each replica's features of a subject are one extra training row (arXiv 2509.05238). "
            f"{len(design.subjects)} subjects, {len(design.replicas)} pooled replicas, reference model "
            f"<code>{esc(design.reference_name)}</code> (not in the pool), {len(design.features)} features; model "
            f"{esc(MODEL_NAMES[options.model])}; test subjects described by {esc(test)}; seed "
            f"{options.seed}. MAE is the mean over test subjects, then over combinations and splits.</p>"
            f"<ul>{arms}</ul><ul>{lines}</ul>"
            + embed_png(figure, "MAE against N")
            + table.to_html(index=False, escape=True, border=0))


def write_csv(table: pd.DataFrame, path: str) -> None:
    write_text(path, table.to_csv(index=False))


def output_folder(out: str) -> Tuple[str, Optional[str]]:
    """Where outputs go, and the report folder to add a section to: ``OUT/downstream/`` when OUT holds an
    ``analyze`` report (``report.html``), else OUT itself."""
    if os.path.isfile(os.path.join(out, "report.html")):
        return os.path.join(out, "downstream"), out
    return out, None


def run_experiment(features: pd.DataFrame, targets: pd.DataFrame, out: str, progress: bool = False,
                   **options: Any) -> pd.DataFrame:
    """Run the downstream experiment and write its outputs; returns the summary.

    Args:
        features: tidy ``subject, replica, feature...`` table, or ``analyze``'s cases table.
        targets: ``subject, target`` (or ``subject`` plus one column such as ``age``).
        out: output folder; if it holds a ``report.html``, outputs go to ``out/downstream/`` and a section is added
            to the report.
        progress: print a line per split and arm.
        **options: fields of ``Options`` (model, arms, n_max, combinations, test_size, test_features, seed,
            grid, reference, splits); ``test_on`` is accepted as the old name of ``test_features``.

    Writes ``results.csv``, ``summary.csv``, ``splits.csv``, ``verdict.txt``, ``settings.json`` and
    ``figures/mae_vs_n.png``.
    """
    if "test_on" in options:
        options["test_features"] = options.pop("test_on")
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(Options.__dataclass_fields__)}")
    if isinstance(options.get("arms"), str):
        options["arms"] = tuple(a.strip() for a in options["arms"].split(",") if a.strip())
    opts = Options(**options)
    opts.arms = tuple(opts.arms)
    opts.check()
    design = prepare(features, targets, opts.reference)
    opts.reference = design.reference_name
    results, splits = run_protocol(design, opts, progress=progress)
    summary = summarize(results)
    summary.insert(1, "reference", design.reference_name)
    verdict = format_verdict(summary, design.reference_name)

    folder, report_dir = output_folder(out)
    os.makedirs(os.path.join(folder, "figures"), exist_ok=True)
    write_csv(results, os.path.join(folder, "results.csv"))
    write_csv(summary, os.path.join(folder, "summary.csv"))
    write_csv(splits, os.path.join(folder, "splits.csv"))
    write_text(os.path.join(folder, "verdict.txt"), verdict + "\n")
    import sklearn

    settings = {**asdict(opts), "arms": list(opts.arms), "subjects": len(design.subjects),
                "replicas": design.replicas, "reference_in_pool": False, "features": design.features,
                "targets_without_features": design.unused_targets, "scikit_learn": sklearn.__version__}
    write_text(os.path.join(folder, "settings.json"), json.dumps(settings, indent=2) + "\n")
    plot_mae(summary, os.path.join(folder, "figures", "mae_vs_n.png"))
    if report_dir is not None:
        add_report_section(report_dir, section_html(summary, verdict, design, opts,
                                                    os.path.join(folder, "figures", "mae_vs_n.png")))
    return summary


def add_report_section(report_dir: str, html: str) -> None:
    """Add the downstream section to ``report_dir/report.html`` through ``report.add_html_section``."""
    add_html_section(report_dir, "downstream", "Downstream augmentation (replica rows)", html)
