"""The variability report: tables, voxel maps, figures and one self-contained ``report.html``.

Files of one report folder (DESIGN.md): ``cases.csv``, ``pairs.csv``, ``summary.csv``, ``majority.csv``,
``comparison.csv`` (only with two kinds), ``maps/<case>[_<kind>]_{entropy,majority,disagreement}.nii.gz``,
``figures/*.png`` and ``report.html``. Everything is written into a staging folder first and moved into place
at the end (:class:`ReportStage`), so a failed run leaves the previous report untouched. ``report.html`` is
made of marked sections (``<!-- section:ID -->…<!-- /section:ID -->``); other commands add theirs with
:func:`add_html_section`, and a rerun of ``analyze`` keeps the sections it does not own.
"""
from __future__ import annotations

import base64
import html as html_lib
import math
import os
import re
import shutil
import tempfile
import uuid
from typing import Dict, List, Sequence

import numpy as np

from nnunet_varaug import variability
from nnunet_varaug.fileio import write_text

REPORT = "report.html"
OWN_SECTIONS = ("overview", "summary", "comparison", "figures", "cases", "files")
_SECTION = re.compile(r"<!-- section:(?P<id>[A-Za-z0-9_.-]+) -->.*?<!-- /section:(?P=id) -->\n?", re.S)
_END = "<!-- end of sections -->"


# ---- NIfTI maps -------------------------------------------------------------------------------------------------
def write_map(array: np.ndarray, path: str, properties: dict) -> None:
    """Write a voxel map as NIfTI in the grid and orientation of the image that nnU-Net read with ``properties``.

    Why not the reader-writer's ``write_seg``: it casts to uint8, and entropy and disagreement are fractions.
    This repeats its geometry handling (SimpleITK: spacing, origin, direction, reorientation; nibabel: affine,
    reorientation) for any dtype.
    """
    import SimpleITK as sitk

    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{uuid.uuid4().hex[:8]}_{name}")
    if "sitk_stuff" in properties:
        st = properties["sitk_stuff"]
        image = sitk.GetImageFromArray(array if len(st["spacing"]) == 3 else array[0])
        image.SetSpacing(st["spacing"])
        image.SetOrigin(st["origin"])
        image.SetDirection(st["direction"])
        if "original_orientation" in st:
            image = sitk.DICOMOrient(image, st["original_orientation"])
        sitk.WriteImage(image, tmp, True)
    elif "nibabel_stuff" in properties:
        import nibabel
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        st = properties["nibabel_stuff"]
        data = np.ascontiguousarray(array.transpose((2, 1, 0)))
        if "reoriented_affine" in st:
            image = nibabel.Nifti1Image(data, affine=st["reoriented_affine"])
            image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), io_orientation(st["original_affine"])))
        else:
            image = nibabel.Nifti1Image(data, affine=st["original_affine"])
        nibabel.save(image, tmp)
    else:  # e.g. 2D natural images: no geometry beyond the spacing
        image = sitk.GetImageFromArray(array[0] if array.shape[0] == 1 else array)
        spacing = [float(s) for s in properties.get("spacing", [1.0] * array.ndim)][::-1][: image.GetDimension()]
        image.SetSpacing(spacing)
        sitk.WriteImage(image, tmp, True)
    os.replace(tmp, path)


class ReportStage:
    """A staging folder inside the report folder; :meth:`commit` moves everything into place, :meth:`abort`
    removes it. Why: a report is many files, and an error halfway must not leave a mix of old and new."""

    def __init__(self, output: str):
        self.output = output
        os.makedirs(output, exist_ok=True)
        self.folder = tempfile.mkdtemp(prefix=".varaug_partial_", dir=output)
        for sub in ("maps", "figures"):
            os.makedirs(os.path.join(self.folder, sub))

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def write_maps(self, stem: str, result: variability.CaseResult, properties: dict) -> None:
        """``maps/<stem>_entropy``, ``_majority``, ``_disagreement`` ``.nii.gz`` of one case."""
        write_map(result.entropy, self.path("maps", f"{stem}_entropy.nii.gz"), properties)
        write_map(result.majority, self.path("maps", f"{stem}_majority.nii.gz"), properties)
        write_map(result.disagreement, self.path("maps", f"{stem}_disagreement.nii.gz"), properties)

    def commit(self) -> None:
        """Folders are swapped whole (no stale maps of other cases survive); files replaced one by one, the
        report page last."""
        for sub in ("maps", "figures"):
            final = os.path.join(self.output, sub)
            old = None
            if os.path.exists(final):
                old = os.path.join(self.folder, f"old_{sub}")
                os.replace(final, old)
            os.replace(self.path(sub), final)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        names = sorted(f for f in os.listdir(self.folder) if os.path.isfile(self.path(f)))
        if os.path.exists(os.path.join(self.output, "comparison.csv")) and "comparison.csv" not in names:
            os.remove(os.path.join(self.output, "comparison.csv"))  # from an earlier two-kind run
        for name in sorted(names, key=lambda n: n == REPORT):
            os.replace(self.path(name), os.path.join(self.output, name))
        shutil.rmtree(self.folder, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- tables -----------------------------------------------------------------------------------------------------
def build_tables(experiments, results: Dict[str, Dict[str, variability.CaseResult]]):
    """``cases``, ``pairs``, ``majority`` and ``summary`` DataFrames from per-kind, per-case results.

    Summary, per kind and structure: pairwise Dice min and mean over all cases and pairs; volume mean, standard
    deviation, coefficient of variation and significant bits/digits computed per case over the K replicas and
    then averaged over cases; mean Dice to the ground truth of the replicas and of the majority vote.
    """
    import pandas as pd

    cases_rows, pair_rows, maj_rows, summary_rows = [], [], [], []
    for exp in experiments:
        per_case = results[exp.kind]
        names = exp.replica_names
        pairs = variability.pair_indices(len(names))
        structures = next(iter(per_case.values())).structures
        vols = {s: [] for s in range(len(structures))}
        dices = {s: [] for s in range(len(structures))}
        absent = {s: 0 for s in range(len(structures))}
        gt_d = {s: [] for s in range(len(structures))}
        maj_d = {s: [] for s in range(len(structures))}
        for case, res in per_case.items():
            volumes = res.volumes_mm3
            pw = res.pairwise_dice
            to_gt, maj_gt = res.dice_to_gt, res.majority_dice_to_gt
            maj_vol = np.diagonal(res.overlap, axis1=1, axis2=2)[:, res.num_replicas] * res.voxel_volume
            for s, st in enumerate(structures):
                for k, name in enumerate(names):
                    cases_rows.append((case, st.key, name, float(volumes[s, k]),
                                       float(to_gt[s, k]) if to_gt is not None else math.nan))
                for p, (a, b) in enumerate(pairs):
                    pair_rows.append((case, st.key, names[a], names[b], float(pw[s, p])))
                    absent[s] += int(res.overlap[s, a, a] == 0 and res.overlap[s, b, b] == 0)
                maj_rows.append((case, st.key, exp.kind, float(maj_vol[s]),
                                 float(maj_gt[s]) if maj_gt is not None else math.nan))
                vols[s].append(volumes[s])
                dices[s].append(pw[s])
                if to_gt is not None:
                    gt_d[s].append(to_gt[s])
                    maj_d[s].append(maj_gt[s])
        for s, st in enumerate(structures):
            spread = variability.volume_spread(np.stack(vols[s], axis=1))  # (K, cases)
            d = np.concatenate(dices[s])
            summary_rows.append({
                "kind": exp.kind, "label": st.key, "name": st.name, "cases": len(per_case),
                "pairwise_dice_min": float(d.min()), "pairwise_dice_mean": float(d.mean()),
                "volume_mean_mm3": _nanmean(spread["mean"]), "volume_std_mm3": _nanmean(spread["std"]),
                "volume_cv": _nanmean(spread["cv"]), "sig_bits": _nanmean(spread["sig_bits"]),
                "sig_digits": _nanmean(spread["sig_digits"]),
                "dice_to_gt_mean": float(np.mean(np.concatenate(gt_d[s]))) if gt_d[s] else math.nan,
                "majority_dice_to_gt_mean": float(np.mean(maj_d[s])) if maj_d[s] else math.nan,
                "absent_pairs": absent[s],
            })
    cases = pd.DataFrame(cases_rows, columns=["case", "label", "replica", "volume_mm3", "dice_to_gt"])
    pairs = pd.DataFrame(pair_rows, columns=["case", "label", "replica_a", "replica_b", "dice"])
    majority = pd.DataFrame(maj_rows, columns=["case", "label", "kind", "volume_mm3", "dice_to_gt"])
    summary = pd.DataFrame(summary_rows)
    return cases, pairs, majority, summary


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def compare_kinds(summary):
    """Per structure, the mean pairwise Dice and volume CV of each kind side by side, and the Pearson
    correlation across structures of the kinds' mean pairwise Dice (``attrs["pearson_r"]``); None with one kind."""
    kinds = list(dict.fromkeys(summary["kind"]))
    if len(kinds) < 2:
        return None
    a, b = kinds[:2]
    wide = summary.pivot(index=["label", "name"], columns="kind",
                         values=["pairwise_dice_mean", "volume_cv", "sig_digits"])
    wide = wide[[(m, k) for m in ("pairwise_dice_mean", "volume_cv", "sig_digits") for k in kinds]]
    wide.columns = [f"{m}_{k}" for m, k in wide.columns]
    wide = wide.reset_index()
    order = {k: i for i, k in enumerate(summary.loc[summary["kind"] == a, "label"])}
    wide = wide.sort_values("label", key=lambda c: c.map(order)).reset_index(drop=True)
    wide.attrs["pearson_r"] = variability.pearson(wide[f"pairwise_dice_mean_{a}"], wide[f"pairwise_dice_mean_{b}"])
    wide.attrs["kinds"] = (a, b)
    return wide


def _write_csv(df, path: str) -> None:
    df.to_csv(path, index=False, float_format="%.10g")


# ---- figures ----------------------------------------------------------------------------------------------------
def _figure_to_png(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def make_figures(folder: str, pairs, cases, majority, summary, experiments) -> List[str]:
    """Boxplots of pairwise Dice per structure, bars of volume CV, replicas' vs majority's Dice to GT, and
    (two kinds) one kind's pairwise Dice against the other's. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [e.kind for e in experiments]
    kind_of = {n: e.kind for e in experiments for n in e.replica_names}
    labels = list(dict.fromkeys(summary["label"]))
    names = dict(zip(summary["label"], summary["name"]))
    ticks = [f"{names[l]}\n({l})" for l in labels]
    width = 0.8 / len(kinds)
    written = []

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(labels)), 3.6))
    kind_col = pairs["replica_a"].map(kind_of)
    for i, kind in enumerate(kinds):
        data = [pairs.loc[(pairs["label"] == l) & (kind_col == kind), "dice"].to_numpy() for l in labels]
        pos = np.arange(len(labels)) + (i - (len(kinds) - 1) / 2) * width
        box = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True, showfliers=True)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{i}")
            patch.set_alpha(0.6)
        ax.plot([], [], color=f"C{i}", lw=6, alpha=0.6, label=f"{kind} replicas")
    ax.set_xticks(np.arange(len(labels)), ticks)
    ax.set_ylabel("pairwise Dice")
    ax.set_title("Agreement between replicas (all cases and pairs)", fontsize=10)
    ax.legend(fontsize=8)
    written.append(os.path.join(folder, "pairwise_dice.png"))
    _figure_to_png(fig, written[-1])

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(labels)), 3.4))
    for i, kind in enumerate(kinds):
        rows = summary[summary["kind"] == kind].set_index("label").loc[labels]
        ax.bar(np.arange(len(labels)) + (i - (len(kinds) - 1) / 2) * width, 100 * rows["volume_cv"], width,
               color=f"C{i}", alpha=0.8, label=f"{kind} replicas")
    ax.set_xticks(np.arange(len(labels)), ticks)
    ax.set_ylabel("volume CV over replicas (%)")
    ax.set_title("Volume spread (mean over cases)")
    ax.legend(fontsize=8)
    written.append(os.path.join(folder, "volume_cv.png"))
    _figure_to_png(fig, written[-1])

    if cases["dice_to_gt"].notna().any():
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(labels)), 3.6))
        rep_kind = cases["replica"].map(kind_of)
        for i, kind in enumerate(kinds):
            pos = np.arange(len(labels)) + (i - (len(kinds) - 1) / 2) * width
            data = [cases.loc[(cases["label"] == l) & (rep_kind == kind), "dice_to_gt"].to_numpy() for l in labels]
            box = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True)
            for patch in box["boxes"]:
                patch.set_facecolor(f"C{i}")
                patch.set_alpha(0.5)
            maj = [majority.loc[(majority["label"] == l) & (majority["kind"] == kind), "dice_to_gt"].mean()
                   for l in labels]
            ax.scatter(pos, maj, marker="D", color="k", zorder=5, s=22,
                       label="majority vote (mean)" if i == 0 else None)
            ax.plot([], [], color=f"C{i}", lw=6, alpha=0.5, label=f"{kind} replicas")
        ax.set_xticks(np.arange(len(labels)), ticks)
        ax.set_ylabel("Dice to ground truth")
        ax.set_title("Single replicas vs their majority vote")
        ax.legend(fontsize=8)
        written.append(os.path.join(folder, "dice_to_gt.png"))
        _figure_to_png(fig, written[-1])

    comparison = compare_kinds(summary)
    if comparison is not None:
        a, b = comparison.attrs["kinds"]
        fig, ax = plt.subplots(figsize=(4.2, 4.0))
        x, y = comparison[f"pairwise_dice_mean_{a}"], comparison[f"pairwise_dice_mean_{b}"]
        ax.scatter(x, y)
        for _, row in comparison.iterrows():
            ax.annotate(row["name"], (row[f"pairwise_dice_mean_{a}"], row[f"pairwise_dice_mean_{b}"]), fontsize=8)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        ax.set_xlabel(f"mean pairwise Dice, {a} replicas")
        ax.set_ylabel(f"mean pairwise Dice, {b} replicas")
        ax.set_title(f"Per structure (Pearson r = {comparison.attrs['pearson_r']:.3f})")
        written.append(os.path.join(folder, "kinds.png"))
        _figure_to_png(fig, written[-1])
    return written


# ---- HTML -------------------------------------------------------------------------------------------------------
_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;
margin:.4em 0}.note{color:#555;font-size:.9em}code{background:#f5f5f5;padding:0 3px}"""


def section(section_id: str, title: str, body: str) -> str:
    """One marked section of report.html."""
    return (f"<!-- section:{section_id} -->\n<section id=\"{html_lib.escape(section_id)}\">\n"
            f"<h2>{html_lib.escape(title)}</h2>\n{body}\n</section>\n<!-- /section:{section_id} -->\n")


def page(title: str, sections: Sequence[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html_lib.escape(title)}"
            f"</title>\n<style>{_STYLE}</style></head>\n<body>\n<h1>{html_lib.escape(title)}</h1>\n"
            + "".join(sections) + f"{_END}\n</body></html>\n")


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html_lib.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(df, digits: int = 4) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.{digits}g}", na_rep="–", border=0)


def add_html_section(report_dir: str, section_id: str, title: str, html: str) -> None:
    """Insert or replace the section ``section_id`` of ``report_dir/report.html``, atomically.

    The section is wrapped in ``<!-- section:ID -->…<!-- /section:ID -->`` markers; a section with that id is
    replaced in place, a new one goes after the last section. ``html`` is the section's body (trusted HTML).

    Raises:
        FileNotFoundError: there is no report.html yet (run ``nnunet_varaug analyze`` first).
        ValueError: ``section_id`` is not made of letters, digits, ``_ . -``.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", section_id):
        raise ValueError(f"section id '{section_id}' must be made of letters, digits, '_', '.', '-'")
    path = os.path.join(report_dir, REPORT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run `nnunet_varaug analyze ... -o {report_dir}` first")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = section(section_id, title, html)
    pattern = re.compile(rf"<!-- section:{re.escape(section_id)} -->.*?<!-- /section:{re.escape(section_id)} -->\n?",
                         re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text, count=1)
    elif _END in text:
        text = text.replace(_END, new + _END, 1)
    else:
        text = text.replace("</body>", new + "</body>", 1)
    write_text(path, text)


def foreign_sections(path: str) -> List[str]:
    """Sections of an existing report.html that analyze does not own (e.g. added by ``downstream``)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [m.group(0) if m.group(0).endswith("\n") else m.group(0) + "\n"
            for m in _SECTION.finditer(text) if m.group("id") not in OWN_SECTIONS]


def build_html(experiments, summary, comparison, figures: Sequence[str], cases, output: str) -> str:
    exp = experiments[0]
    kinds = ", ".join(e.kind for e in experiments)
    n_cases = cases["case"].nunique()
    has_gt = cases["dice_to_gt"].notna().any()
    overview = (
        f"<p>{exp.dataset}, configuration <code>{exp.configuration}</code>, fold {exp.fold}, plans "
        f"<code>{exp.plans}</code>, base trainer <code>{exp.base}</code>: {exp.num_replicas} {kinds} replicas "
        f"each, {n_cases} case(s){'' if has_gt else ', no ground truth'}.</p>\n"
        f"<p class=\"note\">Replicas: {', '.join(n for e in experiments for n in e.replica_names)}.</p>\n"
        "<p class=\"note\">Pairwise Dice: agreement of two replicas on a structure (1 = identical; two empty "
        "masks count as 1). Volume CV: standard deviation over replicas divided by their mean, per case, averaged "
        "over cases. Significant digits: how many leading digits (bits) of a volume all replicas share, through "
        "the <code>significantdigits</code> package (general method, relative error to the replicas' mean). "
        "See docs/variability.md.</p>")
    shown = summary.copy()
    body = _table(shown)
    sections = [section("overview", "Experiment", overview), section("summary", "Per structure", body)]
    if comparison is not None:
        a, b = comparison.attrs["kinds"]
        sections.append(section("comparison", f"{a} vs {b} replicas",
                                f"<p>Pearson correlation across structures of the mean pairwise Dice: "
                                f"<b>{comparison.attrs['pearson_r']:.4f}</b></p>\n" + _table(comparison)))
    sections.append(section("figures", "Figures", "\n".join(_img(f, os.path.basename(f)) for f in figures)))
    kind_of = {n: e.kind for e in experiments for n in e.replica_names}
    per_case = cases.assign(kind=cases["replica"].map(kind_of)).groupby(["case", "kind", "label"], sort=False).agg(
        volume_mean_mm3=("volume_mm3", "mean"), volume_std_mm3=("volume_mm3", "std"),
        dice_to_gt_mean=("dice_to_gt", "mean")).reset_index()
    per_case["volume_cv"] = per_case["volume_std_mm3"] / per_case["volume_mean_mm3"].where(
        per_case["volume_mean_mm3"] > 0)
    sections.append(section("cases", "Per case: volume over replicas", _table(per_case)))
    sections.append(section("files", "Files",
                            "<p class=\"note\"><code>cases.csv</code> (volume and Dice to ground truth per case, "
                            "structure, replica), <code>pairs.csv</code> (Dice per replica pair), "
                            "<code>summary.csv</code>, <code>majority.csv</code>, <code>maps/</code> (entropy, "
                            "majority vote and disagreement as NIfTI in each input image's grid), "
                            "<code>predictions/</code>.</p>"))
    sections.extend(foreign_sections(os.path.join(output, REPORT)))
    return page(f"Replica variability — {exp.dataset} {exp.configuration} fold {exp.fold}", sections)


def write_report(stage: ReportStage, experiments, results) -> "object":
    """Tables, figures and report.html into ``stage``, then commit. Returns the summary DataFrame."""
    cases, pairs, majority, summary = build_tables(experiments, results)
    comparison = compare_kinds(summary)
    for name, df in (("cases.csv", cases), ("pairs.csv", pairs), ("majority.csv", majority),
                     ("summary.csv", summary)):
        _write_csv(df, stage.path(name))
    if comparison is not None:
        _write_csv(comparison, stage.path("comparison.csv"))
        summary.attrs["pearson_r"] = comparison.attrs["pearson_r"]
    figures = make_figures(stage.path("figures"), pairs, cases, majority, summary, experiments)
    text = build_html(experiments, summary, comparison, figures, cases, stage.output)
    with open(stage.path(REPORT), "w", encoding="utf-8") as f:
        f.write(text)
    stage.commit()
    return summary


# ---- text -------------------------------------------------------------------------------------------------------
def format_summary(summary) -> str:
    """A few lines per structure (and kind) for the terminal: agreement, volume spread, accuracy."""
    lines = []
    multi = summary["kind"].nunique() > 1
    for _, r in summary.iterrows():
        head = f"{r['name']} ({r['label']})" + (f" [{r['kind']}]" if multi else "")
        text = (f"{head}: pairwise Dice mean {r['pairwise_dice_mean']:.4f} (min {r['pairwise_dice_min']:.4f}); "
                f"volume {r['volume_mean_mm3']:.6g} mm3, CV {100 * r['volume_cv']:.2f}%, "
                f"{r['sig_digits']:.2f} significant digits ({r['sig_bits']:.1f} bits)")
        if not math.isnan(r["dice_to_gt_mean"]):
            text += f"; Dice to GT {r['dice_to_gt_mean']:.4f}, majority vote {r['majority_dice_to_gt_mean']:.4f}"
        lines.append(text)
    if "pearson_r" in summary.attrs:
        lines.append(f"correlation across structures of the kinds' mean pairwise Dice: {summary.attrs['pearson_r']:.4f}")
    return "\n".join(lines)
