"""Pictures for report.html: one slice per case where the replicas disagree most, image + contour + entropy.

Each picture shows the case's first image channel in grey, the consensus (or majority-vote) segmentation as one
contour per structure, and the voxel entropy as a heat overlay (transparent where it is 0). The slice is taken
along the first array axis of nnU-Net's reader (the slowest axis of the file: axial for the usual RAS/LPS
NIfTI volumes) and chosen by :func:`worst_slice`. PNGs are written atomically and embedded in the HTML as
base64, like the report's other figures.
"""
from __future__ import annotations

import html as html_lib
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.report.png import embed_png, save_figure


def worst_slice(disagreement: np.ndarray, entropy: np.ndarray, consensus: np.ndarray) -> int:
    """Index along axis 0 of the slice with the largest summed disagreement; ties and all-zero disagreement
    fall back to the summed entropy, then to the most consensus foreground, then to the middle slice."""
    axes = tuple(range(1, disagreement.ndim))
    keys = np.stack([disagreement.sum(axis=axes, dtype=np.float64), entropy.sum(axis=axes, dtype=np.float64),
                     (consensus > 0).sum(axis=axes).astype(np.float64)])
    if not keys.any():
        return disagreement.shape[0] // 2
    order = np.lexsort(keys[::-1])  # last key is primary for lexsort
    return int(order[-1])


def render_case(path: str, image: np.ndarray, consensus: np.ndarray, entropy: np.ndarray,
                disagreement: np.ndarray, spacing: Sequence[float], title: str,
                structures: Sequence[Tuple[str, Sequence[int]]], max_entropy: Optional[float] = None) -> str:
    """One PNG: the worst slice of ``image`` (grey), consensus contours, entropy heat (bits). 3D arrays only
    (2D ``(1, y, x)`` arrays work too: their only slice is shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = worst_slice(disagreement, entropy, consensus)
    img, seg, ent = image[z].astype(np.float32), consensus[z], entropy[z]
    sy, sx = (float(spacing[-2]), float(spacing[-1])) if len(spacing) >= 2 else (1.0, 1.0)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=sy / sx, interpolation="nearest")
    vmax = max_entropy if max_entropy else max(float(entropy.max()), 1e-6)
    heat = ax.imshow(np.ma.masked_where(ent <= 0, ent), cmap="inferno", alpha=0.65, vmin=0, vmax=vmax,
                     aspect=sy / sx, interpolation="nearest")
    for i, (name, labels) in enumerate(structures):
        mask = np.isin(seg, list(labels))
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[f"C{i % 10}"], linewidths=1.2)
            ax.plot([], [], color=f"C{i % 10}", label=name)
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04, label="entropy (bits)")
    ax.set_title(f"{title}\nslice {z} of {image.shape[0]}, disagreement {float(disagreement[z].sum()):.0f} voxels",
                 fontsize=8)
    ax.set_axis_off()
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def section_html(pictures: Sequence[Tuple[str, str]], note: str) -> str:
    """HTML body: a note, then each ``(caption, png)`` as an embedded figure, two per row on wide pages."""
    items = "\n".join(f'<figure style="display:inline-block;margin:.3em;vertical-align:top">{embed_png(p, c)}'
                      f'<figcaption class="note">{html_lib.escape(c)}</figcaption></figure>' for c, p in pictures)
    return f'<p class="note">{note}</p>\n{items}'


PICTURE_NOTE = ("Each picture: the case's first image channel in grey, the {what} as a contour per structure, "
                "and the voxel entropy (bits) as a heat overlay, on the slice (first array axis) where the replicas "
                "disagree most. See docs/inference.md.")


def add_report_section(report_dir: str, cases, reader, limit: int = 12) -> List[str]:
    """Pictures for ``analyze``'s report: for its first ``limit`` cases, from the report's own maps
    (``maps/<case>_majority/_entropy/_disagreement.nii.gz``: vote entropy and majority vote of the replicas'
    label maps). Adds the section ``pictures`` to report.html; returns the PNGs written."""
    from nnunet_varaug.report import variability_report as report

    pictures = []
    for case in list(cases)[:limit]:
        maps = os.path.join(report_dir, "maps", case.name)
        if not os.path.isfile(maps + "_entropy.nii.gz"):
            continue
        try:  # the maps are NIfTI; a reader of other formats (PNG, TIFF) cannot read them: no picture then
            image, props = reader.read_images(case.images[:1])
            majority = reader.read_seg(maps + "_majority.nii.gz")[0][0]
            entropy = reader.read_images([maps + "_entropy.nii.gz"])[0][0]
            disagreement = reader.read_images([maps + "_disagreement.nii.gz"])[0][0]
        except Exception as e:  # noqa: BLE001  (a picture is never worth failing the report)
            print(f"no picture of {case.name}: {e}")
            continue
        png = os.path.join(report_dir, "figures", f"{case.name}_overlay.png")
        labels = sorted(int(v) for v in np.unique(majority) if v != 0)
        render_case(png, image[0], majority, entropy, disagreement, props["spacing"], case.name,
                    [(str(v), (v,)) for v in labels])
        pictures.append((case.name, png))
    if pictures:
        report.add_html_section(report_dir, "pictures", "Where the replicas disagree",
                                section_html(pictures, PICTURE_NOTE.format(what="majority vote")))
    return pictures
