"""The variability report: tables, voxel maps, figures and one self-contained ``report.html``.

Files of one report folder (docs/design.md, "Files on disk"): ``cases.csv``, ``pairs.csv``, ``summary.csv``, ``majority.csv``,
``comparison.csv`` (only with two kinds),
``maps/<case>[_<kind>]_{entropy,entropy_norm,majority,disagreement}.nii.gz``,
``figures/*.png`` and ``report.html``. Everything is written into a staging folder first and moved into place
at the end (:class:`ReportStage`), so a failed run leaves the previous report untouched. ``report.html`` is
made of marked sections (``<!-- section:ID -->…<!-- /section:ID -->``); other commands add theirs with
:func:`add_html_section`, and a rerun of ``analyze`` keeps the sections it does not own.
"""
from __future__ import annotations

import html as html_lib
import math
import os
import re
import shutil
import tempfile
from typing import List, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation import variability, volume_stats, voting
from nnunet_varaug.report.png import embed_png
from nnunet_varaug.utilities.fileio import replacing, write_text
from nnunet_varaug.report.figures import make_figures
from nnunet_varaug.report.tables import build_tables, compare_kinds, format_volume

REPORT = "report.html"
OWN_SECTIONS = ("overview", "summary", "comparison", "figures", "cases", "files", "pictures", "calibration",
                "structures", "review", "failures", "lesions")
"""Sections that ``analyze`` writes on every run (pictures and calibration are added after the page is built, the
latter only with ``--calibration``), so an earlier run's copy never survives a rerun."""
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

    suffix = ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]
    with replacing(path, suffix) as tmp:
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
                to_original = ornt_transform(axcodes2ornt("RAS"), io_orientation(st["original_affine"]))
                image = image.as_reoriented(to_original)
            else:
                image = nibabel.Nifti1Image(data, affine=st["original_affine"])
            nibabel.save(image, tmp)
        else:  # e.g. 2D natural images: no geometry beyond the spacing
            image = sitk.GetImageFromArray(array[0] if array.shape[0] == 1 else array)
            spacing = [float(s) for s in properties.get("spacing", [1.0] * array.ndim)][::-1][: image.GetDimension()]
            image.SetSpacing(spacing)
            sitk.WriteImage(image, tmp, True)


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
        """``maps/<stem>_entropy`` (bits), ``_entropy_norm`` (bits / log2 K), ``_majority``, ``_disagreement``
        ``.nii.gz`` of one case."""
        write_map(result.entropy, self.path("maps", f"{stem}_entropy.nii.gz"), properties)
        write_map(voting.normalised_entropy(result.entropy, result.num_replicas),
                  self.path("maps", f"{stem}_entropy_norm.nii.gz"), properties)
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


# ---- tables (report_tables.py) ------------------------------------------------------------------------------
def _write_csv(df, path: str) -> None:
    df.to_csv(path, index=False, float_format="%.10g")


# ---- HTML -------------------------------------------------------------------------------------------------------
_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;
margin:.4em 0}.note{color:#555;font-size:.9em}code{background:#f5f5f5;padding:0 3px}
.wide{max-width:100%;overflow-x:auto}.wide table{font-size:.78em}.wide th{white-space:normal;max-width:8em;
vertical-align:bottom}"""


def section(section_id: str, title: str, body: str) -> str:
    """One marked section of report.html."""
    return (f"<!-- section:{section_id} -->\n<section id=\"{html_lib.escape(section_id)}\">\n"
            f"<h2>{html_lib.escape(title)}</h2>\n{body}\n</section>\n<!-- /section:{section_id} -->\n")


def page(title: str, sections: Sequence[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html_lib.escape(title)}"
            f"</title>\n<style>{_STYLE}</style></head>\n<body>\n<h1>{html_lib.escape(title)}</h1>\n"
            + "".join(sections) + f"{_END}\n</body></html>\n")


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
            for m in _SECTION.finditer(text) if m.group("id").split("-")[0] not in OWN_SECTIONS]


_SUMMARY_HTML = [  # (summary column, header, formatter): the HTML shows a page-wide selection, summary.csv all
    ("name", "structure", str), ("label", "label", str), ("kind", "kind", str), ("cases", "cases", str),
    ("pairwise_dice_mean", "pairwise Dice (all pairs)", lambda v: f"{v:.4f}"),
    ("pairwise_dice_mean_nonempty", "pairwise Dice (non-empty pairs)", lambda v: f"{v:.4f}"),
    ("pairwise_dice_min", "min", lambda v: f"{v:.4f}"),
    ("volume_mean_mm3", "volume", format_volume), ("volume_cv", "volume CV", lambda v: f"{100 * v:.2f} %"),
    ("sig_bits_median", "sig. bits (median)", lambda v: f"{v:.1f}"),
    ("sig_bits_mean", "sig. bits (mean, non-unanimous)", lambda v: f"{v:.1f}"),
    ("unanimous_cases", "unanimous cases", str),
    ("dice_to_gt_mean", "Dice to GT", lambda v: f"{v:.4f}"), ("gt_both_empty", "GT: both empty (left out)", str),
    ("majority_dice_to_gt_mean", "majority vote Dice to GT", lambda v: f"{v:.4f}"),
    ("dice_to_reference_mean", "Dice to reference model", lambda v: f"{v:.4f}"),
]


def _summary_table(summary) -> str:
    import pandas as pd

    cols = [(c, h, f) for c, h, f in _SUMMARY_HTML if c in summary.columns and summary[c].notna().any()]
    shown = pd.DataFrame({h: [f(v) if not (isinstance(v, float) and math.isnan(v)) else "–" for v in summary[c]]
                          for c, h, f in cols})
    return f'<div class="wide">{shown.to_html(index=False, border=0)}</div>'


def headlines(summary, num_replicas: int) -> str:
    """A compact table, one row per structure (and kind), each number marked with a footnote that says what it
    averages over, over how many values (cases carrying a value, pairs), and by which convention."""
    k = num_replicas
    multi = summary["kind"].nunique() > 1
    has_gt = summary["dice_to_gt_mean"].notna().any()
    has_ref = summary.get("dice_to_reference_mean", summary["dice_to_gt_mean"] * np.nan).notna().any()
    head = (["structure"] + (["kind"] if multi else []) + ["pairwise Dice¹", "volume²", "volume CV²",
            "significant bits³"] + (["Dice to GT⁴", "majority vote Dice to GT⁵"] if has_gt else [])
            + (["Dice to reference⁶"] if has_ref else []))
    rows = []
    for _, r in summary.iterrows():
        cells = _headline_cells(r, k, multi, has_gt, has_ref)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    notes = _headline_notes(summary, k, has_gt, has_ref)
    table = ("<div class=\"wide\"><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
             + "".join(rows) + "</table></div>")
    return table + "".join(f'<p class="note">{n}</p>' for n in notes)


def _headline_cells(r, k: int, multi: bool, has_gt: bool, has_ref: bool) -> List[str]:
    """The cells of one summary row (``r``) in :func:`headlines`' table."""
    esc = html_lib.escape
    n_cases, pairs = int(r["cases"]), int(r["pairs"])
    sig_cases = int(r.get("sig_cases", n_cases))
    cells = [f"{esc(r['name'])} ({esc(r['label'])})"] + ([esc(r["kind"])] if multi else [])
    cells += [f"{r['pairwise_dice_mean']:.4f}<br><small>{pairs} pairs; without {int(r['both_empty_pairs'])} "
              f"empty–empty: {r['pairwise_dice_mean_nonempty']:.4f}</small>",
              f"{format_volume(r['volume_mean_mm3'])}<br><small>{n_cases} cases</small>",
              f"{100 * r['volume_cv']:.2f} %",
              f"{r['sig_bits_median']:.1f} ({r['sig_digits_median']:.2f} digits)<br><small>median over "
              f"{sig_cases} cases; {int(r['unanimous_cases'])} unanimous; mean {r['sig_bits_mean']:.1f}"
              f"</small>"]
    if has_gt:
        n_gt = n_cases * k - int(r["gt_both_empty"])
        cells += [f"{r['dice_to_gt_mean']:.4f}<br><small>{n_gt} values, {int(r['gt_both_empty'])} NaN left "
                  f"out</small>",
                  f"{r['majority_dice_to_gt_mean']:.4f}<br><small>{n_cases - int(r['majority_gt_both_empty'])}"
                  f" cases</small>"]
    if has_ref:
        v = r.get("dice_to_reference_mean", math.nan)
        cells.append("–" if math.isnan(v) else f"{v:.4f}<br><small>{n_cases * k} values</small>")
    return cells


def _headline_notes(summary, k: int, has_gt: bool, has_ref: bool) -> List[str]:
    """The footnotes of :func:`headlines`' table: what each number averages over and by which convention."""
    prob = volume_stats.bound_probability(k)
    needed = volume_stats.trials_needed()
    ref_text = ("the replicas' mean volume" if (summary["sig_reference"] == "replica mean").all()
                else "the volume of the IEEE reference model where one was predicted")
    parity = ("odd: with two labels (background and one structure) a voxel cannot tie; with three or more it can"
              if k % 2 else "even: a voxel can tie between two labels (e.g. half the replicas background, half "
              "the structure)")
    notes = [
        f"¹ Mean Dice over every pair of replicas and every case (K = {k}: {k * (k - 1) // 2} replica pairs per "
        f"case), two empty masks counted as 1 — the headline uses all pairs; the small print gives the mean without "
        f"those pairs.",
        f"² Per case over the {k} replicas (mean; CV = standard deviation with ddof = 1 / mean), then the mean over "
        f"the cases.",
        f"³ Significant bits of the volume (general method of <code>significantdigits</code>), relative error to "
        f"{ref_text}; each case capped at floor(log2 voxels) + 1 bits, a unanimous case counted at its cap, an empty "
        f"against a non-empty volume counted as 0 bits; the median is over the cases that carry a value (a structure "
        f"absent everywhere carries none). With K = {k} samples all within the bound, the bound holds with "
        f"probability at least {prob:.3f} at 95 % confidence (<code>probability_estimation_bernoulli({k}, {k}, "
        f"0.95)</code> = 1 + ln(1 − 0.95) / K; Sohier et al. 2021, ACM TOMS 47(2)); "
        f"<code>minimum_number_of_trials(0.95, 0.95)</code> = {needed} replicas for 95 % probability at 95 % "
        f"confidence.",
    ]
    if has_gt:
        notes += ["⁴ Single replicas against the ground truth, mean over (case, replica) values; nnU-Net's "
                  "convention: a value where prediction and ground truth are both empty is NaN and left out.",
                  f"⁵ The majority vote against the ground truth, mean over cases, same convention. K = {k} is "
                  f"{parity}; ties go to the tied label with the highest mean predicted probability over the "
                  f"replicas where probabilities were available, else to the smallest label (majority.csv: "
                  f"<code>tie_voxels</code>, <code>ties_by_probability</code>)."]
    else:
        notes.append(f"Majority vote: K = {k} is {parity}; ties go to the tied label with the highest mean "
                     f"predicted probability over the replicas where probabilities were available, else to the "
                     f"smallest label (majority.csv).")
    if has_ref:
        notes.append("⁶ Single replicas against the reference model, mean over (case, replica) values, two empty "
                     "masks counted as 1.")
    return notes


def build_html(experiments, summary, comparison, figures: Sequence[str], cases, output: str) -> str:
    exp = experiments[0]
    kinds = ", ".join(e.kind for e in experiments)
    replicas = cases[cases["role"] == "replica"]
    n_cases = cases["case"].nunique()
    has_gt = cases["dice_to_gt"].notna().any()
    reference = sorted(set(cases.loc[cases["role"] == "reference", "replica"]))
    overview = (
        f"<p>{exp.dataset}, configuration <code>{exp.configuration}</code>, fold {exp.fold}, plans "
        f"<code>{exp.plans}</code>, base trainer <code>{exp.base}</code>: {exp.num_replicas} {kinds} replicas "
        f"each, {n_cases} case(s){'' if has_gt else ', no ground truth'}"
        + (f"; reference model <code>{html_lib.escape(reference[0])}</code> (IEEE, unperturbed)" if reference
           else "") + ".</p>\n"
        f"<p class=\"note\">Replicas: {', '.join(n for e in experiments for n in e.replica_names)}.</p>\n"
        "<h3>Headline numbers (what each averages over)</h3>\n" + headlines(summary, exp.num_replicas)
        + "<p class=\"note\">Entropy maps are in bits (<code>_entropy</code>) and divided by log2 K "
          "(<code>_entropy_norm</code>, 0–1, comparable across K). See docs/variability.md.</p>")
    sections = [section("overview", "Experiment", overview),
                section("summary", "Per structure", _summary_table(summary)
                        + "<p class=\"note\">All columns, volumes in mm³: <code>summary.csv</code>.</p>")]
    if comparison is not None:
        a, b = comparison.attrs["kinds"]
        sections.append(section("comparison", f"{a} vs {b} replicas",
                                f"<p>Pearson correlation across structures of the mean pairwise Dice: "
                                f"<b>{comparison.attrs['pearson_r']:.4f}</b></p>\n" + _table(comparison)))
    sections.append(section("figures", "Figures", "\n".join(embed_png(f, os.path.basename(f)) for f in figures)))
    kind_of = {n: e.kind for e in experiments for n in e.replica_names}
    per_case = replicas.assign(kind=replicas["replica"].map(kind_of)).groupby(
        ["case", "kind", "label"], sort=False).agg(volume_mean_mm3=("volume_mm3", "mean"),
                                                   volume_std_mm3=("volume_mm3", "std"),
                                                   dice_to_gt_mean=("dice_to_gt", "mean")).reset_index()
    per_case["volume CV"] = [f"{100 * s / m:.2f} %" if m > 0 else "–"
                             for s, m in zip(per_case["volume_std_mm3"], per_case["volume_mean_mm3"])]
    per_case["volume (mean)"] = per_case["volume_mean_mm3"].map(format_volume)
    per_case["volume (std)"] = per_case["volume_std_mm3"].map(format_volume)
    per_case = per_case[["case", "kind", "label", "volume (mean)", "volume (std)", "volume CV", "dice_to_gt_mean"]]
    sections.append(section("cases", "Per case: volume over replicas",
                            f'<div class="wide">{_table(per_case)}</div>'))
    sections.append(section("files", "Files",
                            "<p class=\"note\"><code>cases.csv</code> (volume in mm³, Dice to ground truth and to "
                            "the reference model per case, structure, replica; the reference model's own rows have "
                            "<code>role</code> = reference), <code>pairs.csv</code> (Dice per replica pair, "
                            "<code>both_empty</code>), <code>summary.csv</code>, <code>majority.csv</code>, "
                            "<code>maps/</code> (entropy in bits and normalised, majority vote and disagreement as "
                            "NIfTI in each input image's grid), <code>predictions/</code>.</p>"))
    sections.extend(foreign_sections(os.path.join(output, REPORT)))
    return page(f"Replica variability — {exp.dataset} {exp.configuration} fold {exp.fold}", sections)


def write_report(stage: ReportStage, experiments, results, reference: Optional[str] = None) -> "object":
    """Tables, figures and report.html into ``stage``, then commit. Returns the summary DataFrame.

    ``reference``: the reference model's name (``<Base>_ieee``) when the results carry its counts."""
    cases, pairs, majority, summary = build_tables(experiments, results, reference)
    comparison = compare_kinds(summary)
    for name, df in (("cases.csv", cases), ("pairs.csv", pairs), ("majority.csv", majority),
                     ("summary.csv", summary)):
        _write_csv(df, stage.path(name))
    if comparison is not None:
        _write_csv(comparison, stage.path("comparison.csv"))
        summary.attrs["pearson_r"] = comparison.attrs["pearson_r"]
    figures = make_figures(stage.path("figures"), pairs, cases, majority, summary, experiments)
    text = build_html(experiments, summary, comparison, figures, cases, stage.output)
    write_text(stage.path(REPORT), text)
    stage.commit()
    return summary
