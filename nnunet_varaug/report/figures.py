"""The variability report's figures (PNG): pairwise Dice, volume CV, Dice to ground truth, kind vs kind."""
from __future__ import annotations

import os
from typing import List

import numpy as np

from nnunet_varaug.report.png import save_figure
from nnunet_varaug.report.tables import compare_kinds


def _per_label_axes(fig, ax, ticks, ylabel: str, title: str, path: str) -> str:
    """Label a per-structure chart (one tick per structure, a legend), write it as PNG, return its path."""
    ax.set_xticks(np.arange(len(ticks)), ticks)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return path


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
    save_figure(fig, written[-1], dpi=110)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(labels)), 3.4))
    for i, kind in enumerate(kinds):
        rows = summary[summary["kind"] == kind].set_index("label").loc[labels]
        ax.bar(np.arange(len(labels)) + (i - (len(kinds) - 1) / 2) * width, 100 * rows["volume_cv"], width,
               color=f"C{i}", alpha=0.8, label=f"{kind} replicas")
    written.append(_per_label_axes(fig, ax, ticks, "volume CV over replicas (%)", "Volume spread (mean over cases)",
                                   os.path.join(folder, "volume_cv.png")))

    if cases["dice_to_gt"].notna().any():
        written.append(_dice_to_gt_figure(plt, folder, cases, majority, kinds, kind_of, labels, ticks, width))

    comparison = compare_kinds(summary)
    if comparison is not None:
        written.append(_kinds_figure(plt, folder, comparison))
    return written


def _dice_to_gt_figure(plt, folder: str, cases, majority, kinds, kind_of: dict, labels, ticks, width: float) -> str:
    """dice_to_gt.png: the single replicas' Dice to the ground truth per structure and kind, with the majority
    vote's mean; returns its path."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(labels)), 3.6))
    rep_kind = cases["replica"].map(kind_of)
    for i, kind in enumerate(kinds):
        pos = np.arange(len(labels)) + (i - (len(kinds) - 1) / 2) * width
        data = [cases.loc[(cases["label"] == l) & (rep_kind == kind), "dice_to_gt"].dropna().to_numpy()
                for l in labels]  # NaN: structure absent from prediction and ground truth (nnU-Net's rule)
        box = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{i}")
            patch.set_alpha(0.5)
        maj = [majority.loc[(majority["label"] == l) & (majority["kind"] == kind), "dice_to_gt"].mean()
               for l in labels]
        ax.scatter(pos, maj, marker="D", color="k", zorder=5, s=22,
                   label="majority vote (mean)" if i == 0 else None)
        ax.plot([], [], color=f"C{i}", lw=6, alpha=0.5, label=f"{kind} replicas")
    return _per_label_axes(fig, ax, ticks, "Dice to ground truth", "Single replicas vs their majority vote",
                           os.path.join(folder, "dice_to_gt.png"))


def _kinds_figure(plt, folder: str, comparison) -> str:
    """kinds.png: one kind's mean pairwise Dice per structure against the other's; returns its path."""
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
    path = os.path.join(folder, "kinds.png")
    save_figure(fig, path, dpi=110)
    return path


